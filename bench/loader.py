"""Streaming loader throughput against the I/O limit and against stock WebDataset, plus resume latency.

    python bench/loader.py [--mb 200] [--batch 32] [--seq-len 2047] [--workers 0,2]

Writes ~``--mb`` MB of WebDataset shards of random tokens (an I/O benchmark: token values do not
matter) with storage/shards.py's ShardWriter into a temporary dataset root, then in one run measures:

* limit: the same member bytes read with plain buffered reads + ``np.frombuffer`` (no shuffling,
  no batching, no int64 conversion);
* int64 floor: the limit plus cutting the rows into int64 batches, sequentially -- the least work
  for the loader's contract (int64 writes 8 bytes per 2-byte token read: mostly memory bandwidth);
* shardflow: ``build_loader`` delivering shuffled int64 ``(batch, seq_len + 1)`` tensors, one epoch;
* stock WebDataset: ``webdataset.WebDataset(urls).decode()`` unbatched into rows and batched to the
  same batch size, converted to int64 tensors (unshuffled, which favours it);
* time to first batch when resuming deep in a later epoch vs at position 0.

Every figure is from this run on this machine; ratios compare figures of the same run.
"""
from __future__ import annotations

import argparse
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


def loader_tokens_per_s(root: str, batch: int, workers: int) -> float:
    loader = build_loader(LoaderConfig(batch_size=batch, num_workers=workers), Storage(root), epochs=1)
    tokens = 0
    t0 = time.perf_counter()
    for b in loader:
        assert b.dtype == torch.int64
        tokens += b.numel()
    return tokens / (time.perf_counter() - t0)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=2047)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts to measure")
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
        print(f"batch {args.batch} x {args.seq_len + 1} tokens; best of {args.repeats} passes; cores: {torch.get_num_threads()}")

        limit = max(limit_tokens_per_s(root, index) for _ in range(args.repeats))
        print(f"limit (buffered reads + np.frombuffer):   {limit / 1e6:9.1f} M tokens/s")
        floor = max(int64_floor_tokens_per_s(root, index, args.batch) for _ in range(args.repeats))
        print(f"int64 floor (limit + int64 batches):      {floor / 1e6:9.1f} M tokens/s   {floor / limit:5.2f}x limit")
        stock = max(webdataset_tokens_per_s(root, index, args.batch) for _ in range(args.repeats))
        print(f"stock webdataset (.decode() + batching):  {stock / 1e6:9.1f} M tokens/s")
        ours = {}
        for workers in [int(x) for x in args.workers.split(",") if x != ""]:
            ours[workers] = max(loader_tokens_per_s(root, args.batch, workers) for _ in range(args.repeats))
            print(f"shardflow loader, {workers} workers:            {ours[workers] / 1e6:9.1f} M tokens/s   "
                  f"{ours[workers] / limit:5.2f}x limit (goal >= 0.5)   {ours[workers] / floor:5.2f}x int64 floor   "
                  f"{ours[workers] / stock:5.1f}x webdataset (goal >= 5)")

        spe = split["samples"]
        deep = 3 * spe + (7 * spe) // 10 + 13  # epoch 3, 70 % in, not on a batch boundary
        first_batch_s(root, args.batch, 0, 1)  # warm imports and page cache alike for both
        at0 = first_batch_s(root, args.batch, 0, 5 * args.repeats)
        atdeep = first_batch_s(root, args.batch, deep, 5 * args.repeats)
        print(f"time to first batch: position 0 {at0 * 1e3:.1f} ms, position {deep} (epoch 3) {atdeep * 1e3:.1f} ms: "
              f"{atdeep / at0:.2f}x (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
