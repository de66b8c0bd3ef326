"""Incremental dedup: what adding 1 % new input shards costs, against a full recompute (issue 14).

The corpus (``bench/dedup_corpus.py``) is dealt into ``--shards`` filter shards; the last
``--new`` of them are held back. Dedup runs on the others (untimed), then the new shards are added
and dedup runs again in append mode (the default) — timed per phase — and, on a copy of the same
state, with ``incremental: full`` (the full recompute of the cluster phase; signatures of earlier
shards are reused by both, as they are per shard). A third copy runs every phase from scratch on
the union: the full-run reference. Each run is its own process, one after the other.

It also checks the semantics: the earlier shards' drop lists are byte-identical after the
append run, and it reports how the new documents removed compare with the full recompute.

Usage: ``python bench/dedup_incremental.py --shards 100 --new 1``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import xxhash

HERE = os.path.dirname(os.path.abspath(__file__))


def deal(docs: list[dict], n: int) -> list[list[dict]]:
    shards: list[list[dict]] = [[] for _ in range(n)]
    for d in docs:
        shards[xxhash.xxh3_64_intdigest(d["id"].encode()) % n].append(d)
    return shards


def write(root: str, shards: list[list[dict]]) -> None:
    from shardflow.storage import Storage
    from shardflow.storage.jsonl import write_jsonl
    from shardflow.storage.manifest import ShardRecord, output_ref, write_record

    storage = Storage(root)
    for i, part in enumerate(shards):
        ref = f"stages/filter/{i:06d}.jsonl.zst"
        write_jsonl(storage, ref, part)
        write_record(storage, ShardRecord(stage="filter", shard_id=f"{i:06d}", status="done",
                                          outputs={"docs": output_ref(storage, ref)}))


def run(root: str, mode: str) -> dict:
    """All dedup phases on ``root`` in this process; wall time per phase."""
    from shardflow.dataprep import dedup as dd
    from shardflow.dataprep.config import PrepConfig
    from shardflow.dataprep.stage import run_stage
    from shardflow.storage import Storage

    cfg = PrepConfig()
    cfg.dedup.incremental = mode
    storage = Storage(root)
    phases, t0 = {}, time.perf_counter()
    for stage in dd.dedup_stages(cfg):
        t1 = time.perf_counter()
        r = run_stage(stage, storage)
        if r["failed"]:
            raise SystemExit(f"{stage.name} failed: {r['failed']}")
        phases[stage.name] = {"s": round(time.perf_counter() - t1, 2), "ran": len(r["ran"])}
    report = storage.read_json(dd.REPORT_REF)
    return {"wall_s": round(time.perf_counter() - t0, 2), "phases": phases, "mode": report.get("mode")}


def child(root: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--run", root, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def drops(root: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    d = os.path.join(root, "dedup", "drops")
    t = pq.read_table(d).to_pydict()
    return dict(zip(t["id"], t["survivor"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(HERE, "_data", "dedup_corpus.jsonl.zst"))
    ap.add_argument("--work", default=os.path.join(HERE, "_data", "dedup_incremental"))
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--new", type=int, default=1)
    ap.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run(*args.run)))
        return

    sys.path.insert(0, HERE)
    from minhash_quality import read_corpus

    shards = deal(read_corpus(args.corpus), args.shards)
    old, new = shards[:-args.new], shards[-args.new:]
    shutil.rmtree(args.work, ignore_errors=True)
    base = os.path.join(args.work, "before")
    write(base, old)
    child(base, "append")
    before = {name: open(os.path.join(base, "dedup", "drops", name), "rb").read()
              for name in os.listdir(os.path.join(base, "dedup", "drops"))}
    roots = {m: os.path.join(args.work, m) for m in ("append", "full")}
    for m, root in roots.items():
        shutil.copytree(base, root)
        write(root, old + new)                       # same bytes for the earlier shards, plus the new
    scratch = os.path.join(args.work, "scratch")
    write(scratch, old + new)
    res = {m: child(root, m) for m, root in roots.items()}
    res["scratch"] = child(scratch, "full")

    after = {name: open(os.path.join(roots["append"], "dedup", "drops", name), "rb").read() for name in before}
    new_ids = {d["id"] for part in new for d in part}
    app, full = drops(roots["append"]), drops(roots["full"])
    app_new = {k for k in app if k in new_ids}
    full_new = {k for k in full if k in new_ids}
    old_lost = {k for k in full if k not in new_ids} - {k for k in app if k not in new_ids}
    n_new = sum(len(p) for p in new)
    print(f"{args.shards} shards, {args.new} new ({n_new} documents, {100 * args.new / args.shards:.1f} %)")
    for m in ("append", "full", "scratch"):
        print(f"  {m:8s} {json.dumps(res[m])}")
    ratio = res["append"]["wall_s"] / res["scratch"]["wall_s"]
    print(f"append run / full run from scratch: {ratio:.3f} (goal <= 0.05 for 1 % new files: "
          f"{'PASS' if ratio <= 0.05 else 'FAIL'}); append / full re-cluster with reused signatures: "
          f"{res['append']['wall_s'] / res['full']['wall_s']:.3f}")
    print(f"earlier drop lists byte-identical after append: {after == before}; append run mode: {res['append']['mode']}")
    print(f"new documents removed: append {len(app_new)}, full re-cluster {len(full_new)}, in both {len(app_new & full_new)}; "
          f"earlier documents a full re-cluster would remove instead: {len(old_lost)}")


if __name__ == "__main__":
    sys.exit(main())
