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
        "read": {"source_field": "source"},
        "filter": {
            # The bundled corpus is technical documentation: code samples and option lists are real
            # content there, so the C4 rules that target web boilerplate are relaxed.
            "c4": {"filter_curly_bracket": False, "filter_no_terminal_punct": False, "min_num_sentences": 2},
            "fineweb": {"line_punct_thr": 0.0, "short_line_thr": 0.9},
            # Option lists, code and tables carry many non-alphabetic tokens; short reference
            # entries (the Jargon File's) are real text too.
            "gopher_quality": {"max_symbol_word_ratio": 0.3, "max_non_alpha_words_ratio": 0.6, "min_doc_words": 30},
            "write_dropped": True,
        },
        "tokenizer": {"vocab_size": 4096, "sample_docs": 4000},
        "tokenize": {"seq_len": 128, "samples_per_shard": 2048, "val_fraction": 0.05},
    },
    "train": {
        "run": "demo",
        # 32 fine-grained experts, 4 active: the same active width as 8 of 256, top-2 (and as a dense
        # FFN of 512), but it beats that dense model where 8 x 256 only tied it (bench/RESULTS.md,
        # "MoE vs dense on the bench corpus"; on the demo itself 5.31 vs 5.41).
        "model": {"vocab_size": 4096, "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "n_experts": 32,
                  "top_k": 4, "expert_hidden": 128, "max_seq_len": 128},
        "data": {"batch_size": 16, "num_workers": 0},
        "optim": {"lr": 3e-3, "warmup_steps": 30},
        # eval_batches x batch_size = max_val_batches x eval batch_size (8): the trainer's val loss and
        # the evaluation's perplexity read the same rows (train/validation.py), so they agree.
        "trainer": {"steps": 300, "log_every": 25, "eval_every": 100, "eval_batches": 20},
        "checkpoint": {"every_steps": 100, "keep_last": 2},
    },
    "eval": {"max_val_batches": 40, "cloze_examples": 200},
}


DEMO_INPUT_FILES = 4


def stage_demo_inputs(workdir: Path, n_files: int = DEMO_INPUT_FILES) -> list[str]:
    """Split the bundled corpus into ``n_files`` input files, as a real corpus arrives in many.

    Lines (malformed ones included, byte for byte) go round-robin, so the result is deterministic:
    re-staging writes identical bytes, the clean stage's input digests do not change, and a re-run
    of the demo redoes nothing. Several input shards let the demo show per-shard parallelism and
    reprocessing (delete one output, re-run, only that shard is redone).
    """
    import zstandard

    from shardflow.dataprep.demo_corpus import demo_corpus_lines

    inputs = Storage(str(workdir / "input"))
    names = [f"demo-{i:05d}.jsonl.zst" for i in range(n_files)]
    if all(inputs.exists(n) for n in names):
        return [inputs.uri(n) for n in names]
    lines = demo_corpus_lines()
    cctx = zstandard.ZstdCompressor(level=10)
    for i, name in enumerate(names):
        inputs.write_bytes(name, cctx.compress(b"".join(lines[i::n_files])))
    return [inputs.uri(n) for n in names]


def demo_config(workdir: str | os.PathLike[str], config: str | None = None, overrides: list[str] | None = None):
    from .config import load_config

    workdir = Path(workdir).resolve()
    base = json.loads(json.dumps(DEMO_SETTINGS))
    # The workdir decides where the demo reads and writes, also over a --config file; --set wins.
    placed = [f"storage.root={workdir / 'data'}", f"prep.inputs={json.dumps(stage_demo_inputs(workdir))}"]
    return load_config(config, placed + list(overrides or []), base=base)


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
        from shardflow.train.metrics import read_metrics

        rows = read_metrics(storage, metrics_ref)
        train_rows = [r for r in rows if "loss" in r]
        val_rows = [r for r in rows if "val_loss" in r]
        if train_rows:
            out["steps"] = train_rows[-1].get("step")
            out["final_train_loss"] = round(float(train_rows[-1]["loss"]), 4)
        if val_rows:
            out["final_val_loss"] = round(float(val_rows[-1]["val_loss"]), 4)
    if storage.exists("shards/index.json"):
        out["unigram_entropy"] = round(unigram_entropy(storage), 4)
    results_ref = f"runs/{run}/eval/results.json"
    if storage.exists(results_ref):
        ev = storage.read_json(results_ref)
        out["eval"] = {
            "val_loss": round(ev["val"]["loss"], 4), "val_ppl": round(ev["val"]["ppl"], 2),
            "cloze_acc": round(ev["cloze"]["acc"], 4),
            **{f"{name}_acc": round(t["acc"], 4) for name, t in ev.get("tasks", {}).items()},
            **{f"{name}_chance": round(t["chance"], 4) for name, t in ev.get("tasks", {}).items() if "chance" in t},
            "expert_load_cv": [round(x, 3) for x in ev.get("experts", {}).get("cv", [])],
        }
        out["report"] = storage.uri(f"runs/{run}/eval/report.md")
    return out


def unigram_entropy(storage: Storage) -> float:
    """Entropy (nats/token) of the training tokens' unigram distribution: the loss of a model that
    ignores context, so a trained model's validation loss must land clearly below it."""
    import numpy as np

    from shardflow.storage.shards import read_index, read_member_rows

    index = read_index(storage)
    counts = np.zeros(int(index["vocab_size"]), dtype=np.int64)
    for shard in index["splits"]["train"]["shards"]:
        for member in shard["members"]:
            rows = read_member_rows(storage, shard, member, 0, member["rows"], index["seq_len"], index["dtype"])
            counts += np.bincount(rows[:, 1:].ravel(), minlength=counts.size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _print_summary(summary: dict[str, Any], wall_s: float) -> None:
    print("\n=== shardflow demo: done in %.0f s ===" % wall_s)
    print(f"{'dataset root':<24}: {summary['root']}")
    for key in ("documents_in", "quarantined", "documents_after_filter", "documents_after_dedup",
                "train_shards", "train_tokens", "val_shards", "val_tokens", "steps", "final_train_loss", "final_val_loss",
                "unigram_entropy"):
        if key in summary:
            print(f"{key.replace('_', ' '):<24}: {summary[key]}")
    for k, v in (summary.get("eval") or {}).items():
        print(f"{'eval ' + k.replace('_', ' '):<24}: {v}")
    if "report" in summary:
        print(f"{'report':<24}: {summary['report']}")
    print("re-run the demo and only changed or missing shards are redone. Next, from any folder:")
    for line in next_commands(summary["root"]):
        print(f"  {line}")


def next_commands(root: str) -> list[str]:
    """The hints the demo prints: commands on its root that work as printed, from any folder."""
    import shlex

    r = shlex.quote(root)
    return [f"shardflow status --root {r}", f"shardflow verify --root {r}",
            f"shardflow train --root {r} --set train.trainer.steps=400   # resumes and trains 100 more steps",
            f"shardflow eval --root {r}"]


def run_demo(workdir: str = "./shardflow-demo", overrides: list[str] | None = None, config: str | None = None) -> dict[str, Any]:
    from .pipeline import run_pipeline

    t0 = time.perf_counter()
    cfg = demo_config(workdir, config, overrides)
    print(f"shardflow demo: dataset root {cfg.storage.root}")
    result = run_pipeline(cfg)
    summary = summarize(cfg.storage_handle(), cfg.train.run)
    _print_summary(summary, time.perf_counter() - t0)
    return {"ok": bool(result.get("ok", True)), "summary": summary, "result": result}
