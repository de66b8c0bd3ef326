"""What Prefect orchestration costs: the data-preparation pipeline through the Prefect flow vs the
same stage functions called directly, on the same corpus with the same number of worker processes.

Direct: for each stage in pipeline order, ``dataprep.stage.plan`` then ``run_shard`` for every
pending shard in a ``concurrent.futures.ProcessPoolExecutor(workers)`` (spawn, as Prefect's process
runner uses). Prefect: ``flows.prep_flows.run_prep`` (one task per shard on the configured runner,
manifests, artifacts, logs to the API). Both start from an empty dataset root; the outputs of the
two runs are compared byte for byte. The Prefect API server is started before timing (it is a
service that outlives runs). ``--repeat`` alternates the two so that background load hits both;
the headline ratio is best-of-N (the least disturbed run of each), the median ratio is printed too.

Goal: prefect / direct <= 1.15.

    python bench/prefect_overhead.py                       # 4 files of bench/_data/corpus (or the demo corpus)
    python bench/prefect_overhead.py --files 16 --workers 2 --runner process --process-pool executor
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parents[1]
BENCH_CORPUS = REPO / "bench" / "_data" / "corpus"

# The demo settings for technical documentation (see flows/demo.py), so that most documents survive.
PREP_OVERRIDES = [
    "prep.filter.c4.filter_curly_bracket=false", "prep.filter.c4.filter_no_terminal_punct=false",
    "prep.filter.c4.min_num_sentences=2", "prep.filter.fineweb.line_punct_thr=0.0",
    "prep.filter.fineweb.short_line_thr=0.9", "prep.filter.gopher_quality.max_symbol_word_ratio=0.3",
    "prep.tokenizer.vocab_size=4096", "prep.tokenize.seq_len=256",
]


def corpus_files(n: int, workdir: Path) -> list[str]:
    files = sorted(glob.glob(str(BENCH_CORPUS / "corpus-*.jsonl.zst")))[:n]
    if files:
        return files
    # No bench corpus built: split the bundled demo corpus into n files.
    from shardflow.dataprep.demo_corpus import read_demo_corpus

    lines = read_demo_corpus().split(b"\n")
    out = []
    for i in range(n):
        p = workdir / f"demo-{i}.jsonl"
        p.write_bytes(b"\n".join(lines[i::n]) + b"\n")
        out.append(str(p))
    return out


def _direct_shard(args):
    factory, prep_json, stage_name, spec, storage = args
    from shardflow.dataprep.config import PrepConfig
    from shardflow.dataprep.stage import run_shard
    from shardflow.dataprep.stages import load_factory

    cache = _direct_shard.__dict__.setdefault("cache", {})
    key = (factory, prep_json)
    if key not in cache:
        cache[key] = {s.name: s for s in load_factory(factory)(PrepConfig.model_validate_json(prep_json))}
    run_shard(cache[key][stage_name], storage, spec)
    return spec.shard_id


def run_direct(cfg, workers: int) -> dict[str, float]:
    from shardflow.dataprep.stage import plan
    from shardflow.dataprep.stages import DEFAULT_FACTORY, build_stages

    storage = cfg.storage_handle()
    times: dict[str, float] = {}
    prep_json = cfg.prep.model_dump_json()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for stage in build_stages(cfg.prep):
            t0 = time.perf_counter()
            pending = [p.spec for p in plan(stage, storage) if p.needs_work]
            futures = [pool.submit(_direct_shard, (DEFAULT_FACTORY, prep_json, stage.name, spec, storage)) for spec in pending]
            for f in as_completed(futures):
                f.result()
            times[stage.name] = time.perf_counter() - t0
    return times


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if "_manifest" in rel or rel in ("pipeline.yaml", "_lock.json"):
                continue
            out[rel] = hashlib.sha256(open(os.path.join(dirpath, f), "rb").read()).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=4, help="input files (= shards of the per-file stages)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runner", default="process", choices=["process", "thread", "sequential", "ray"])
    ap.add_argument("--workdir", help="keep the dataset roots here (default: a temp dir, removed)")
    ap.add_argument("--process-pool", default="prefect", choices=["prefect", "executor"],
                    help="runner=process flavour: Prefect's ProcessPoolTaskRunner, or tasks on threads + a plain process pool")
    ap.add_argument("--repeat", type=int, default=1, help="alternate direct/prefect runs this many times; medians")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    from shardflow.flows.config import load_config
    from shardflow.flows.prep_flows import run_prep
    from shardflow.flows.runners import prefect_api

    work = Path(args.workdir or tempfile.mkdtemp(prefix="shardflow-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = corpus_files(args.files, work)
    raw_mb = sum(os.path.getsize(f) for f in inputs) / 1e6

    def config(name: str):
        root = work / name
        shutil.rmtree(root, ignore_errors=True)
        return load_config(None, [f"storage.root={root}", f"prep.inputs={json.dumps(inputs)}", f"prep.workers={args.workers}",
                                  f"flows.runner={args.runner}", f"flows.process_pool={args.process_pool}", *PREP_OVERRIDES])

    print(f"corpus: {len(inputs)} file(s), {raw_mb:.1f} MB on disk; workers {args.workers}; runner {args.runner}"
          f"{' (' + args.process_pool + ')' if args.runner == 'process' else ''}; "
          f"{args.repeat} alternating repeat(s)")
    direct_runs, prefect_runs, same = [], [], True
    with prefect_api():  # started once, before timing: the API is a service that outlives runs
        t0 = time.perf_counter()
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.api_healthcheck()
        api_s = time.perf_counter() - t0
        for rep in range(args.repeat):
            direct_cfg = config("direct")
            t0 = time.perf_counter()
            stage_times = run_direct(direct_cfg, args.workers)
            direct_runs.append(time.perf_counter() - t0)
            print(f"direct  #{rep}: {direct_runs[-1]:8.2f} s   " + "  ".join(f"{k} {v:.1f}" for k, v in stage_times.items()))
            prefect_cfg = config("prefect")
            t0 = time.perf_counter()
            out = run_prep(prefect_cfg, "all", runner=args.runner)
            prefect_runs.append(time.perf_counter() - t0)
            if not out.get("ok"):
                print(f"prefect run failed: {out.get('error')}", file=sys.stderr)
                return 1
            print(f"prefect #{rep}: {prefect_runs[-1]:8.2f} s   " + "  ".join(f"{s['stage']} {s['wall_s']:.1f}" for s in out["stages"]))
            same = same and tree_digest(str(direct_cfg.storage.root)) == tree_digest(str(prefect_cfg.storage.root))
    # Best of the repeats is the headline (the least disturbed run of each: this machine may be
    # shared); the median is printed beside it.
    direct_s, prefect_s = min(direct_runs), min(prefect_runs)
    ratio = prefect_s / direct_s
    median_ratio = statistics.median(prefect_runs) / statistics.median(direct_runs)
    print(f"direct: best {direct_s:.2f} s, median {statistics.median(direct_runs):.2f} s   "
          f"prefect: best {prefect_s:.2f} s, median {statistics.median(prefect_runs):.2f} s   (API health check {api_s:.2f} s, not included)")
    print(f"ratio prefect/direct: {ratio:.3f} best-of-{len(direct_runs)}, {median_ratio:.3f} median  "
          f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}); outputs byte-identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": len(inputs), "mb": raw_mb, "workers": args.workers, "runner": args.runner, "process_pool": args.process_pool,
                                               "direct_s": direct_s, "prefect_s": prefect_s, "ratio": ratio, "median_ratio": median_ratio,
                                               "direct_runs": direct_runs, "prefect_runs": prefect_runs, "identical": same, "stages_direct_s": stage_times}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
