"""The datatrove side of bench/pipeline_vs_datatrove.py; runs inside the benchmark's own venv.

Equivalent steps to shardflow's prep pipeline: JSONL reader → Gopher quality → Gopher repetition →
C4 → FineWeb → MinHash (signatures, buckets, clusters, filter; 14 bands × 8 rows, 5-grams) →
tokenize with the same tokenizer (converted to HF tokenizers JSON). Language ID is off on both
sides (datatrove's model is downloaded from a hub at run time, which this machine cannot do).
Prints one JSON line of per-stage wall times.
"""
import argparse
import json
import os
import resource
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--tokenizer", required=True, help="HF tokenizers JSON file")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, required=True)
    args = ap.parse_args()
    w, t = args.workers, args.tasks
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    work = args.work
    times = {}

    def run(name, executor):
        t0 = time.perf_counter()
        executor.run()
        times[name] = time.perf_counter() - t0

    run("filter+signatures", LocalPipelineExecutor(pipeline=[
        JsonlReader(args.input, glob_pattern="*.jsonl.zst"),
        GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter(), FineWebQualityFilter(),
        JsonlWriter(f"{work}/filtered", compression="zstd"),
        MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg),
    ], tasks=t, workers=w, logging_dir=f"{work}/logs/s1", skip_completed=False))
    run("buckets", LocalPipelineExecutor(pipeline=[
        MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg),
    ], tasks=cfg.num_buckets, workers=w, logging_dir=f"{work}/logs/s2", skip_completed=False))
    run("clusters", LocalPipelineExecutor(pipeline=[
        MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove_ids", config=cfg),
    ], tasks=1, workers=1, logging_dir=f"{work}/logs/s3", skip_completed=False))
    run("dedup+tokenize", LocalPipelineExecutor(pipeline=[
        JsonlReader(f"{work}/filtered", glob_pattern="*.jsonl.zst"),
        MinhashDedupFilter(input_folder=f"{work}/remove_ids"),
        DocumentTokenizer(output_folder=f"{work}/tokens", tokenizer_name_or_path=args.tokenizer, eos_token="</s>",
                          shuffle_documents=False),
    ], tasks=t, workers=w, logging_dir=f"{work}/logs/s4", skip_completed=False))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"times": times, "total_s": sum(times.values()), "peak_child_rss_mb": peak_kb / 1024}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
