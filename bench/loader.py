"""Streaming loader throughput against the I/O limit and against stock WebDataset, plus resume latency.

    python bench/loader.py [--mb 200] [--batch 32] [--seq-len 2047] [--repeats 3] [--workers 0]

Writes ~``--mb`` MB of WebDataset shards of random tokens (an I/O benchmark: token values do not
matter) with storage/shards.py's ShardWriter into a temporary dataset root, then in one run measures,
the measurements of each repeat interleaved (the machine is noisy; best of ``--repeats`` each):

* limit: the same member bytes read with plain buffered reads + ``np.frombuffer`` (no shuffling,
  no batching, no int64 conversion);
* int64 floor: the limit plus cutting the rows into int64 batches, sequentially (a reference:
  int64 writes 8 bytes per 2-byte token read, mostly memory bandwidth);
* shardflow: ``build_loader`` delivering shuffled ``(batch, seq_len + 1)`` tensors, one epoch, with
  ``out_dtype`` int64 (the default, what the goal is judged on), int32 and native (uint16);
* stock WebDataset: ``webdataset.WebDataset(urls).decode()`` unbatched into rows and batched to the
  same batch size, converted to int64 tensors (unshuffled, which favours it);
* time to first batch when resuming deep in a later epoch vs at position 0;
* for the record, one batch's gather + widening from a window buffer with numpy and with torch.

Every figure is from this run on this machine; ratios compare figures of the same run.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import ShardWriter, make_index, read_index, token_dtype, write_index
from shardflow.train.config import LoaderConfig
from shardflow.train.data import build_loader


def write_shards(root: str, total_mb: int, seq_len: int, vocab: int) -> dict:
    storage = Storage(root)
    dtype = token_dtype(vocab)
    row_bytes = (seq_len + 1) * dtype.itemsize
    rows_total = total_mb * 1_000_000 // row_bytes
    rng = np.random.default_rng(0)
    with ShardWriter(storage, "train", seq_len, dtype, samples_per_shard=max(1, (32 << 20) // row_bytes)) as w:
        for i in range(0, rows_total, 4096):
            n = min(4096, rows_total - i)
            w.write(rng.integers(0, vocab, size=(n, seq_len + 1), dtype=dtype))
    write_index(storage, make_index(seq_len, dtype, vocab, "sha256:bench", 0, {"train": w.shards}))
    return read_index(storage)


def limit_tokens_per_s(root: str, index: dict) -> float:
    """Each member's token bytes by plain buffered reads into numpy: what any loader must at least do."""
    dtype = np.dtype(index["dtype"])
    tokens = 0
    t0 = time.perf_counter()
    for shard in index["splits"]["train"]["shards"]:
        with open(f"{root}/shards/{shard['name']}", "rb") as f:
            for m in shard["members"]:
                f.seek(m["offset"] + m["npy_header"])
                arr = np.frombuffer(f.read(m["size"] - m["npy_header"]), dtype=dtype)
                tokens += arr.size
    return tokens / (time.perf_counter() - t0)


def int64_floor_tokens_per_s(root: str, index: dict, batch: int) -> float:
    """The limit plus what the contract adds: batches of int64 (8 bytes written per 2-byte token).

    Sequential, unshuffled: the least work any loader delivering int64 batches must do."""
    dtype = np.dtype(index["dtype"])
    row_len = index["seq_len"] + 1
    tokens = 0
    t0 = time.perf_counter()
    for shard in index["splits"]["train"]["shards"]:
        with open(f"{root}/shards/{shard['name']}", "rb") as f:
            for m in shard["members"]:
                f.seek(m["offset"] + m["npy_header"])
                rows = np.frombuffer(f.read(m["size"] - m["npy_header"]), dtype=dtype).reshape(-1, row_len)
                for i in range(0, len(rows) - batch + 1, batch):
                    tokens += torch.from_numpy(rows[i : i + batch].astype(np.int64)).numel()
    return tokens / (time.perf_counter() - t0)


def loader_tokens_per_s(root: str, batch: int, workers: int = 0, out_dtype: str = "int64") -> tuple[float, float]:
    """(tokens/s over the epoch, seconds to the first batch)."""
    loader = build_loader(LoaderConfig(batch_size=batch, num_workers=workers, out_dtype=out_dtype), Storage(root), epochs=1)
    want = {"int64": torch.int64, "int32": torch.int32}.get(out_dtype)
    tokens = 0
    first = None
    t0 = time.perf_counter()
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        assert want is None or b.dtype == want
        tokens += b.numel()
    return tokens / (time.perf_counter() - t0), first


def webdataset_tokens_per_s(root: str, index: dict, batch: int) -> float:
    import webdataset as wds

    urls = [f"{root}/shards/{s['name']}" for s in index["splits"]["train"]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("tokens.npy").unbatched().batched(batch, partial=False)
    tokens = 0
    t0 = time.perf_counter()
    for (b,) in ds:
        t = torch.from_numpy(np.asarray(b).astype(np.int64))
        tokens += t.numel()
    return tokens / (time.perf_counter() - t0)


def first_batch_s(root: str, batch: int, position: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        loader = build_loader(LoaderConfig(batch_size=batch), Storage(root))
        loader.load_state_dict({**loader.state_dict(), "position": position})
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        times.append(time.perf_counter() - t0)
        it.close()
    return statistics.median(times)


def gather_tokens_per_s(batch: int, row_len: int, window_rows: int = 1024, passes: int = 5) -> tuple[float, float]:
    """One batch gathered from a shuffled window of uint16 rows into a fresh int64 tensor: numpy
    (``np.copyto(out, buf[slots])``, what the loader does) vs torch (``out.copy_(buf[slots])``)."""
    rng = np.random.default_rng(0)
    bufs = [rng.integers(0, 1 << 15, size=(window_rows, row_len), dtype=np.uint16) for _ in range(4)]
    slots = rng.permutation(window_rows)

    def run(one) -> float:
        best = 0.0
        for _ in range(passes):
            t0 = time.perf_counter()
            for buf in bufs:
                for i in range(0, window_rows - batch + 1, batch):
                    one(buf, slots[i : i + batch])
            best = max(best, len(bufs) * (window_rows // batch) * batch * row_len / (time.perf_counter() - t0))
        return best

    def with_numpy(buf, s):
        out = np.empty((len(s), row_len), np.int64)
        np.copyto(out, buf[s])

    tbufs = {id(b): torch.from_numpy(b) for b in bufs}

    def with_torch(buf, s):
        out = torch.empty((len(s), row_len), dtype=torch.int64)
        out.copy_(tbufs[id(buf)][torch.from_numpy(s)])

    return run(with_numpy), run(with_torch)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=2047)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0", help="comma-separated DataLoader worker counts to measure (int64); 0 = in-process")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shardflow-bench-loader-") as root:
        t0 = time.perf_counter()
        index = write_shards(root, args.mb, args.seq_len, args.vocab)
        split = index["splits"]["train"]
        nbytes = sum(s["bytes"] for s in split["shards"])
        members = sum(len(s["members"]) for s in split["shards"])
        print(f"shards: {len(split['shards'])} tars, {members} members, {split['samples']} samples, "
              f"{split['tokens'] / 1e6:.1f} M tokens, {nbytes / 1e6:.0f} MB (written in {time.perf_counter() - t0:.1f} s)")
        print(f"batch {args.batch} x {args.seq_len + 1} tokens; best of {args.repeats} interleaved passes; "
              f"cores: {os.cpu_count()}")

        workers = [int(x) for x in args.workers.split(",") if x != ""]
        runs = {"limit": lambda: limit_tokens_per_s(root, index),
                "floor": lambda: int64_floor_tokens_per_s(root, index, args.batch),
                "stock": lambda: webdataset_tokens_per_s(root, index, args.batch)}
        for w in workers:
            runs[f"int64/{w}"] = functools.partial(loader_tokens_per_s, root, args.batch, w, "int64")
        runs["int32/0"] = functools.partial(loader_tokens_per_s, root, args.batch, 0, "int32")
        runs["native/0"] = functools.partial(loader_tokens_per_s, root, args.batch, 0, "native")
        best: dict[str, float] = {}
        firsts: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                got = fn()
                rate, first = got if isinstance(got, tuple) else (got, None)
                best[name] = max(best.get(name, 0.0), rate)
                if first is not None:
                    firsts[name] = min(firsts.get(name, float("inf")), first)

        limit, floor, stock = best["limit"], best["floor"], best["stock"]
        print(f"limit (buffered reads + np.frombuffer):    {limit / 1e6:9.1f} M tokens/s")
        print(f"int64 floor (limit + int64 batches, seq.): {floor / 1e6:9.1f} M tokens/s   {floor / limit:5.2f}x limit")
        print(f"stock webdataset (.decode() + batching):   {stock / 1e6:9.1f} M tokens/s")
        for name in runs:
            if "/" not in name:
                continue
            dt, w = name.split("/")
            r = best[name]
            print(f"shardflow {dt:6s} {w} workers:              {r / 1e6:9.1f} M tokens/s   {r / limit:5.2f}x limit   "
                  f"{r / floor:5.2f}x int64 floor   {r / stock:5.1f}x webdataset   (first batch {firsts[name] * 1e3:.0f} ms)")
        npg, tg = gather_tokens_per_s(args.batch, args.seq_len + 1)
        print(f"one batch's gather + int64 widening: numpy {npg / 1e6:.0f} M tokens/s, torch {tg / 1e6:.0f} M tokens/s")

        spe = split["samples"]
        deep = 3 * spe + (7 * spe) // 10 + 13  # epoch 3, 70 % in, not on a batch boundary
        first_batch_s(root, args.batch, 0, 1)  # warm imports and page cache alike for both
        at0 = first_batch_s(root, args.batch, 0, 5 * args.repeats)
        atdeep = first_batch_s(root, args.batch, deep, 5 * args.repeats)
        print(f"time to first batch: position 0 {at0 * 1e3:.1f} ms, position {deep} (epoch 3) {atdeep * 1e3:.1f} ms")

        ours = best.get("int64/0", max((best[f"int64/{w}"] for w in workers), default=0.0))
        print("goals (int64 output, in-process loader):")
        print(f"  (a) loader / limit            {ours / limit:6.2f}x   goal >= 0.5   {verdict(ours / limit >= 0.5)}")
        print(f"  (b) loader / stock webdataset {ours / stock:6.2f}x   goal >= 5     {verdict(ours / stock >= 5)}")
        print(f"  (c) resume deep / position 0  {atdeep / at0:6.2f}x   goal <= 1.2   {verdict(atdeep / at0 <= 1.2)}")
        print(f"  for reference: int32 {best['int32/0'] / limit:.2f}x limit, native {best['native/0'] / limit:.2f}x limit "
              f"(not the goal's dtype; the trainer widens them on the device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
