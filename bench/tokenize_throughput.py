"""Tokenize + pack + shard throughput against its limit: sentencepiece's own batch encoder.

The limit is ``SentencePieceProcessor.encode(list_of_texts, num_threads=N)`` over the same texts,
already in memory, in the same batches, with the same threads (numpy output and EOS appended, the
fastest form sentencepiece offers). The pipeline run is the real thing: the ``tokenize`` stage
(read + decompress + parse JSONL, split train/val by id hash, encode, write per-shard streams) and
the ``pack`` stage (rows, WebDataset tars, index.json), through ``run_stage`` with manifests. Both
are timed round-robin, best of ``--repeat``, because other processes share the machine.

    python bench/tokenize_throughput.py                               # bench/_data/corpus (4 shards) or the demo corpus
    python bench/tokenize_throughput.py --corpus 'bench/_data/corpus/*.jsonl.zst' --shards 8 --threads 2
"""
from __future__ import annotations

import os
import sys


import argparse
import glob
import platform
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import run_stage
from shardflow.dataprep.tokenize import PackStage, TokenizeStage
from shardflow.dataprep.tokenizer import TokenizerStage, iter_id_text
from shardflow.storage import Storage
from shardflow.storage.manifest import ShardRecord, list_records, output_ref, write_record
from shardflow.storage.shards import read_index
from shardflow.storage.tokenizer_files import load_tokenizer

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "_data" / "corpus" / "*.jsonl.zst"
DEMO_CORPUS = HERE.parent / "dataprep" / "data" / "demo_corpus.jsonl.zst"


def register_upstream(storage: Storage, files: list[str]) -> None:
    """Stand the corpus files in for done dedup shards (records point at them, nothing is copied)."""
    for i, path in enumerate(files):
        write_record(storage, ShardRecord(stage="dedup", shard_id=f"{i:06d}", status="done",
                                          outputs={"docs": output_ref(storage, os.path.abspath(path))}))


def clean_demo(storage: Storage, src: str) -> list[str]:
    """The demo corpus carries planted malformed lines: keep only well-formed documents."""
    import json

    from shardflow.storage.jsonl import iter_lines, write_jsonl

    docs = []
    for _, line in iter_lines(storage, src):
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and isinstance(d.get("id"), str) and isinstance(d.get("text"), str):
            docs.append({"id": d["id"], "text": d["text"]})
    refs = []
    for i in range(4):
        ref = storage.uri(f"corpus/{i:06d}.jsonl.zst")
        write_jsonl(storage, ref, docs[i::4])
        refs.append(ref)
    return refs


def limit_run(sp: spm.SentencePieceProcessor, batches: list[list[str]], threads: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = 0
    for texts in batches:
        for a in sp.encode(texts, out_type="numpy", add_eos=True, num_threads=threads):
            tokens += a.size
    return time.perf_counter() - t0, tokens


def pipeline_run(root: str, cfg: PrepConfig) -> tuple[float, int, float]:
    storage = Storage(root)
    for stage in ("tokenize", "pack"):
        storage.remove(f"stages/{stage}", recursive=True)
    storage.remove("shards", recursive=True)
    t0 = time.perf_counter()
    for stage in (TokenizeStage(cfg), PackStage(cfg)):
        res = run_stage(stage, storage)
        if res["failed"]:
            raise SystemExit(f"{stage.name} failed: {res['failed']}")
    wall = time.perf_counter() - t0
    tokens = sum(r.counts["tokens.train"] + r.counts["tokens.val"] for r in list_records(storage, "tokenize").values())
    pack_wall = list_records(storage, "pack")["_all"].wall_time_s
    read_index(storage)
    return wall, tokens, pack_wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="glob of JSONL(.zst) document files")
    ap.add_argument("--shards", type=int, default=4, help="use the first N files of the corpus")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary dataset root")
    args = ap.parse_args()

    root = tempfile.mkdtemp(prefix="shardflow-bench-tokenize-")
    storage = Storage(root)
    files = sorted(glob.glob(args.corpus))[: args.shards]
    if not files:
        print(f"no corpus at {args.corpus}; using the demo corpus {DEMO_CORPUS}", file=sys.stderr)
        files = clean_demo(storage, str(DEMO_CORPUS))
    register_upstream(storage, files)
    cfg = PrepConfig(tokenizer={"vocab_size": args.vocab_size, "num_threads": args.threads, "sample_docs": 5000,
                                "sample_max_chars": 20_000_000},
                     tokenize={"seq_len": args.seq_len, "num_threads": args.threads})

    t0 = time.perf_counter()
    res = run_stage(TokenizerStage(cfg), storage)
    if res["failed"]:
        raise SystemExit(f"tokenizer failed: {res['failed']}")
    tok_wall = time.perf_counter() - t0
    sp, meta, _ = load_tokenizer(storage)

    # The same texts in the same batches as the stage hands to sentencepiece (split order aside).
    batches, cur, chars, text_bytes = [], [], 0, 0
    for f in files:
        for _, text in iter_id_text(storage, f):
            cur.append(text)
            chars += len(text)
            text_bytes += len(text.encode("utf-8"))
            if chars >= cfg.tokenize.encode_batch_chars:
                batches.append(cur)
                cur, chars = [], 0
        if cur:
            batches.append(cur)
            cur, chars = [], 0

    best_limit = best_pipe = float("inf")
    limit_tokens = pipe_tokens = 0
    pack_wall = 0.0
    for _ in range(args.repeat):
        t, limit_tokens = limit_run(sp, batches, args.threads)
        best_limit = min(best_limit, t)
        t, pipe_tokens, pw = pipeline_run(root, cfg)
        if t < best_pipe:
            best_pipe, pack_wall = t, pw
    idx = read_index(storage)
    if pipe_tokens != limit_tokens:
        raise SystemExit(f"token counts differ: pipeline {pipe_tokens}, raw encode {limit_tokens}")

    limit_tps, pipe_tps = limit_tokens / best_limit, pipe_tokens / best_pipe
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; sentencepiece {spm.__version__}; "
          f"threads={args.threads}")
    print(f"corpus: {len(files)} files, {sum(map(len, batches))} docs, {text_bytes / 1e6:.1f} MB text, "
          f"{limit_tokens} tokens (vocab {meta['vocab_size']}, {meta['model_type']})")
    print(f"tokenizer training (sample {meta['sample_docs']} docs, {meta['sample_chars'] / 1e6:.1f} M chars): {tok_wall:.2f} s")
    print(f"limit   sentencepiece encode (numpy, in memory): {limit_tps / 1e6:7.2f} M tokens/s  ({best_limit:.2f} s)")
    print(f"shardflow tokenize + pack + shard (end to end):   {pipe_tps / 1e6:7.2f} M tokens/s  ({best_pipe:.2f} s, pack {pack_wall:.2f} s)")
    print(f"shards: train {len(idx['splits']['train']['shards'])} ({idx['splits']['train']['samples']} rows), "
          f"val {len(idx['splits']['val']['shards'])} ({idx['splits']['val']['samples']} rows) of seq_len {idx['seq_len']}")
    print(f"ratio pipeline / limit: {pipe_tps / limit_tps:.2f}  (goal >= 0.70)")
    if args.keep:
        print(f"dataset root kept at {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
