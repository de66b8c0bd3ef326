"""``shardflow demo``: the whole pipeline on the bundled corpus, with embedded defaults.

Local storage under the workdir, the ephemeral Prefect API (unless PREFECT_API_URL is set), a tiny
MoE model sized to finish on a 2-core CPU in minutes. ``configs/demo.yaml`` holds the same settings
as a file (a test keeps the two equal); ``--config`` and ``--set`` change them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from shardflow.storage import Storage
from shardflow.storage.manifest import list_records

DEMO_SETTINGS: dict[str, Any] = {
    "name": "demo",
    "prep": {
        "workers": 2,
        "filter": {
            # The bundled corpus is technical documentation: code samples and option lists are real
            # content there, so the C4 rules that target web boilerplate are relaxed.
            "c4": {"filter_curly_bracket": False, "filter_no_terminal_punct": False, "min_num_sentences": 2},
            "fineweb": {"line_punct_thr": 0.0, "short_line_thr": 0.9},
            "gopher_quality": {"max_symbol_word_ratio": 0.3},
            "write_dropped": True,
        },
        "tokenizer": {"vocab_size": 4096, "sample_docs": 4000},
        "tokenize": {"seq_len": 128, "samples_per_shard": 2048, "val_fraction": 0.05},
    },
    "train": {
        "run": "demo",
        "model": {"vocab_size": 4096, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "n_experts": 8,
                  "top_k": 2, "expert_hidden": 256, "max_seq_len": 128},
        "data": {"batch_size": 16, "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 30},
        "trainer": {"steps": 300, "log_every": 25, "eval_every": 100, "eval_batches": 10},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
    },
    "eval": {"max_val_batches": 40, "cloze_examples": 200},
}


def demo_config(workdir: str | os.PathLike[str], config: str | None = None, overrides: list[str] | None = None):
    from shardflow.dataprep.demo_corpus import demo_corpus_path

    from .config import load_config

    workdir = Path(workdir).resolve()
    base = json.loads(json.dumps(DEMO_SETTINGS))
    base["storage"] = {"root": str(workdir / "data")}
    base["prep"]["inputs"] = [str(demo_corpus_path())]
    return load_config(config, overrides, base=base)


def summarize(storage: Storage, run: str) -> dict[str, Any]:
    """Numbers for the closing summary, read back from what the pipeline wrote."""
    out: dict[str, Any] = {"root": storage.root}
    clean = list_records(storage, "clean")
    if clean:
        out["documents_in"] = sum(r.counts.get("docs_in", 0) for r in clean.values())
        out["quarantined"] = sum(v for r in clean.values() for k, v in r.counts.items() if k.startswith("quarantined."))
    for stage in ("filter", "dedup"):
        recs = list_records(storage, stage)
        if recs:
            out[f"documents_after_{stage}"] = sum(r.counts.get("docs_out", 0) for r in recs.values())
    if storage.exists("shards/index.json"):
        index = storage.read_json("shards/index.json")
        for split, info in index.get("splits", {}).items():
            out[f"{split}_shards"] = len(info.get("shards", []))
            out[f"{split}_tokens"] = info.get("tokens", 0)
    metrics_ref = f"runs/{run}/metrics.jsonl"
    if storage.exists(metrics_ref):
        rows = [json.loads(line) for line in storage.read_text(metrics_ref).splitlines() if line.strip()]
        train_rows = [r for r in rows if "loss" in r]
        val_rows = [r for r in rows if "val_loss" in r]
        if train_rows:
            out["steps"] = train_rows[-1].get("step")
            out["final_train_loss"] = round(float(train_rows[-1]["loss"]), 4)
        if val_rows:
            out["final_val_loss"] = round(float(val_rows[-1]["val_loss"]), 4)
    results_ref = f"runs/{run}/eval/results.json"
    if storage.exists(results_ref):
        out["eval"] = storage.read_json(results_ref)
    return out


def _print_summary(summary: dict[str, Any], wall_s: float) -> None:
    print("\n=== shardflow demo: done in %.0f s ===" % wall_s)
    print(f"dataset root      : {summary['root']}")
    for key in ("documents_in", "quarantined", "documents_after_filter", "documents_after_dedup",
                "train_shards", "train_tokens", "val_shards", "val_tokens", "steps", "final_train_loss", "final_val_loss"):
        if key in summary:
            print(f"{key.replace('_', ' '):<18}: {summary[key]}")
    ev = summary.get("eval") or {}
    flat = ev.get("summary") or {k: v for k, v in ev.items() if isinstance(v, (int, float))}
    for k, v in sorted(flat.items()):
        print(f"eval {k:<13}: {v}")
    run_dir = f"{summary['root']}/runs/"
    print(f"report            : {run_dir}<run>/eval/report.md")
    print("status            : shardflow status --config <your config>  (or re-run the demo: only changed shards redo)")


def run_demo(workdir: str = "./shardflow-demo", overrides: list[str] | None = None, config: str | None = None) -> dict[str, Any]:
    from .pipeline import run_pipeline

    t0 = time.perf_counter()
    cfg = demo_config(workdir, config, overrides)
    print(f"shardflow demo: dataset root {cfg.storage.root}")
    result = run_pipeline(cfg)
    summary = summarize(cfg.storage_handle(), cfg.train.run)
    _print_summary(summary, time.perf_counter() - t0)
    return {"ok": bool(result.get("ok", True)), "summary": summary, "result": result}
