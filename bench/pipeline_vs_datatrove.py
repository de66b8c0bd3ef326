"""Data preparation end to end: shardflow vs datatrove on the same real corpus, same workers.

    python bench/make_corpus.py --out bench/_data/corpus --target-mb 120    # once (real Debian docs)
    python bench/pipeline_vs_datatrove.py --corpus bench/_data/corpus --workers 2

shardflow side: clean → filter (Gopher quality, Gopher repetition, C4, FineWeb) → dedup (exact +
MinHash 14×8, four phases) → tokenize → pack, each stage's shards run over a process pool of
``--workers`` (what the Prefect flows map, without the orchestration), each stage in its own
process so that its peak RSS is measured alone. The tokenizer is trained once beforehand and not
timed on either side. datatrove side (bench/datatrove_side.py, in its own virtualenv under
bench/_data/dt-venv): JsonlReader → the same four filters (datatrove's defaults, which are also
shardflow's) → MinHash signatures/buckets/clusters/filter → DocumentTokenizer with the same
sentencepiece model converted to a tokenizers JSON. Language ID is off on both sides (datatrove's
model is downloaded from a hub at run time). Prints docs/s of both and the ratio.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

STAGE_SCRIPT = r"""
import json, resource, sys, time
from concurrent.futures import ProcessPoolExecutor
from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import plan, run_shard
from shardflow.storage import Storage

cfg = PrepConfig.model_validate(json.loads(sys.argv[1]))
storage = Storage(sys.argv[2])
names = sys.argv[3].split(",")
workers = int(sys.argv[4])
from bench_stages import stages_by_name
t0 = time.perf_counter()
counts = {}
with ProcessPoolExecutor(workers) as pool:
    for stage in stages_by_name(cfg, names):
        todo = [p.spec for p in plan(stage, storage, force=True)]
        for rec in pool.map(run_shard, [stage] * len(todo), [storage] * len(todo), todo):
            for k, v in rec.counts.items():
                counts[f"{stage.name}.{k}"] = counts.get(f"{stage.name}.{k}", 0) + v
wall = time.perf_counter() - t0
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"wall_s": wall, "peak_rss_mb": rss / 1024, "counts": counts}))
"""

STAGES_MODULE = r"""
from shardflow.dataprep.doc_stages import CleanStage, FilterStage
from shardflow.dataprep.dedup import dedup_stages
from shardflow.dataprep.tokenizer import TokenizerStage
from shardflow.dataprep.tokenize import tokenize_stages

def all_stages(cfg):
    return [CleanStage(cfg), FilterStage(cfg), *dedup_stages(cfg), TokenizerStage(cfg), *tokenize_stages(cfg)]

def stages_by_name(cfg, names):
    return [s for s in all_stages(cfg) if s.name in names]
"""


def run_stage_group(cfg_json: str, root: str, names: list[str], workers: int, helper_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=helper_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, cfg_json, root, ",".join(names), str(workers)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"stage group {names} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_datatrove_venv(path: str) -> str:
    py = os.path.join(path, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", path], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "datatrove[processing]", "spacy", "orjson", "zstandard"], check=True)
    return py


def sentencepiece_to_tokenizers_json(spm_path: str, out_path: str) -> None:
    from transformers import LlamaTokenizerFast  # converts the slow sentencepiece model offline

    tok = LlamaTokenizerFast(vocab_file=spm_path, legacy=False, add_bos_token=False, add_eos_token=False, from_slow=True)
    tok.backend_tokenizer.save(out_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=os.path.join(HERE, "_data", "corpus"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--dt-venv", default=os.path.join(HERE, "_data", "dt-venv"))
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()

    files = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(args.corpus, "*.jsonl.zst")))
    if not files:
        raise SystemExit(f"no *.jsonl.zst under {args.corpus}: run bench/make_corpus.py first")
    corpus_bytes = sum(os.path.getsize(f) for f in files)
    work = args.work or tempfile.mkdtemp(prefix="sf-bench-")
    helper_dir = os.path.join(work, "_helper")
    os.makedirs(helper_dir, exist_ok=True)
    with open(os.path.join(helper_dir, "bench_stages.py"), "w") as f:
        f.write(STAGES_MODULE)

    from shardflow.dataprep.config import PrepConfig

    cfg = PrepConfig(inputs=files, workers=args.workers)
    cfg.filter.language.enabled = False  # datatrove's language model needs a hub download
    cfg_json = cfg.model_dump_json()
    root = os.path.join(work, "shardflow")
    shutil.rmtree(root, ignore_errors=True)

    # Untimed: the tokenizer is an input to both sides. Train it on the corpus's dedup output.
    results: dict[str, dict] = {}
    groups = [("clean", ["clean"]), ("filter", ["filter"]),
              ("dedup", ["dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"])]
    for label, names in groups:
        results[label] = run_stage_group(cfg_json, root, names, args.workers, helper_dir)
        print(f"shardflow {label:<9} {results[label]['wall_s']:8.1f} s   peak RSS {results[label]['peak_rss_mb']:7.0f} MB", flush=True)
    tok = run_stage_group(cfg_json, root, ["tokenizer"], args.workers, helper_dir)
    print(f"(untimed) tokenizer training {tok['wall_s']:.1f} s", flush=True)
    results["tokenize"] = run_stage_group(cfg_json, root, ["tokenize", "pack"], args.workers, helper_dir)
    print(f"shardflow {'tokenize':<9} {results['tokenize']['wall_s']:8.1f} s   peak RSS {results['tokenize']['peak_rss_mb']:7.0f} MB", flush=True)

    docs_in = results["clean"]["counts"].get("clean.docs_in", 0)
    sf_total = sum(r["wall_s"] for r in results.values())
    sf_rate = docs_in / sf_total
    print(f"\nshardflow: {docs_in} docs ({corpus_bytes / 1e6:.1f} MB zstd) in {sf_total:.1f} s = {sf_rate:,.0f} docs/s")
    summary = {"docs_in": docs_in, "shardflow_s": sf_total, "shardflow_docs_per_s": sf_rate,
               "shardflow_stages": {k: {"wall_s": round(v["wall_s"], 2), "peak_rss_mb": round(v["peak_rss_mb"])} for k, v in results.items()},
               "kept": {"filter": results["filter"]["counts"].get("filter.docs_out"), "dedup": results["dedup"]["counts"].get("dedup.docs_out")}}

    if not args.skip_datatrove:
        py = ensure_datatrove_venv(args.dt_venv)
        tok_json = os.path.join(work, "tokenizer.json")
        sentencepiece_to_tokenizers_json(os.path.join(root, "tokenizer", "spm.model"), tok_json)
        dt_work = os.path.join(work, "datatrove")
        shutil.rmtree(dt_work, ignore_errors=True)
        t0 = time.perf_counter()
        out = subprocess.run([py, os.path.join(HERE, "datatrove_side.py"), "--input", args.corpus, "--work", dt_work,
                              "--tokenizer", tok_json, "--workers", str(args.workers), "--tasks", str(len(files))],
                             capture_output=True, text=True)
        dt_wall = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"datatrove side failed:\n{out.stderr[-4000:]}")
        dt = json.loads(out.stdout.strip().splitlines()[-1])
        dt_rate = docs_in / dt["total_s"]
        print(f"datatrove: {docs_in} docs in {dt['total_s']:.1f} s = {dt_rate:,.0f} docs/s  (stages {json.dumps({k: round(v, 1) for k, v in dt['times'].items()})}, process wall {dt_wall:.1f} s)")
        print(f"\nRATIO shardflow/datatrove docs/s = {sf_rate / dt_rate:.2f}x  (goal >= 3x)")
        summary.update(datatrove_s=dt["total_s"], datatrove_docs_per_s=dt_rate, ratio=sf_rate / dt_rate,
                       datatrove_stages=dt["times"], datatrove_peak_child_rss_mb=round(dt["peak_child_rss_mb"]))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
