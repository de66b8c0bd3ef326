"""Evaluate a checkpoint: held-out perplexity, downstream tasks, expert statistics, a report.

``run_evaluation`` is what the evaluation flow calls; it imports no Prefect and returns the tables
and markdown the flow publishes as artifacts. Everything it writes goes under
``runs/<run>/eval/`` through :class:`Storage` (atomic), ``results.json`` last, so a report on disk
always belongs to a complete evaluation.

The parts, one module each: the model from a checkpoint (``eval_model``), what is read besides it
-- data checks, split settings, held-out documents (``eval_data``) --, the validation rows shared
with the trainer (``validation``), perplexity overall and per source (``perplexity``), expert
statistics (``expert_stats``), generated and lm-eval-style tasks (``tasks``), the comparison with a baseline
run (``baseline``, when ``eval.compare_with`` names one) and the report (``report``). This module puts them together.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from shardflow.storage import Storage, digest_json
from shardflow.storage.layout import eval_dir, metrics_ref
from shardflow.storage.shards import read_index
from shardflow.storage.tokenizer_files import load_tokenizer

from . import baseline as BL
from . import report as rep
from . import tasks as T
from .config import EvalConfig, TrainConfig
from .eval_data import EvaluationError, check_data, held_out_documents, split_settings  # noqa: F401 - EvaluationError re-exported
from .eval_model import check_checkpoint_tokenizer, load_model, pick_device  # noqa: F401 - load_model re-exported
from .expert_stats import ExpertStats
from .model_config import model_config_digest
from .perplexity import source_perplexity, val_perplexity

RESULTS_VERSION = 1
DEFAULT_TASK_NAME = "heldout_continuation"


def results_ref(run: str) -> str:
    return f"{eval_dir(run)}/results.json"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON (any parser, jq, JavaScript) and not Python's."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _read_previous(storage: Storage, run: str) -> dict[str, Any] | None:
    try:
        prev = storage.read_json(results_ref(run))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # an unreadable previous result is replaced, not fatal
    return prev if isinstance(prev, dict) and prev.get("version") == RESULTS_VERSION else None


def run_evaluation(train_cfg: TrainConfig, eval_cfg: EvalConfig, storage: Storage, checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: ``eval_cfg.checkpoint``, else the run's latest).

    Returns ``{"results": dict, "report_md": str, "tables": {name: [row, ...]}, "files": [refs]}``
    and writes ``runs/<run>/eval/{results.json, report.md, *.png, tasks/*.jsonl}``.
    """
    t0 = time.perf_counter()
    device = pick_device(eval_cfg.device)
    run = train_cfg.run
    out_dir = eval_dir(run)
    index = read_index(storage)
    sp, tok_meta, tok_digest = load_tokenizer(storage)
    check_data(train_cfg, storage, index, tok_meta, tok_digest)
    model, ck = load_model(train_cfg, storage, checkpoint or eval_cfg.checkpoint, device)
    check_checkpoint_tokenizer(ck, tok_digest, EvaluationError)
    settings = split_settings(storage, eval_cfg)
    eos_id = int(index["eos_id"])
    bos_id = int(tok_meta.get("bos_id", -1))
    doc_prefix = [eos_id] + ([bos_id] if settings["add_bos"] and bos_id >= 0 else [])
    max_len = train_cfg.model.max_seq_len
    bs = eval_cfg.batch_size

    stats = ExpertStats(model)
    try:
        val = val_perplexity(model, storage, index, bs, eval_cfg.max_val_batches, device, stats)
    finally:
        stats.close()
    experts = stats.summary()
    vs_baseline = None
    if eval_cfg.compare_with:
        if eval_cfg.compare_with == run:
            raise EvaluationError(f"eval.compare_with={run!r} names the evaluated run itself; name another run of this root")
        vs_baseline = BL.compare(BL.score_model(model, train_cfg.model, ck, run, val),
                                 BL.score_run(storage, index, eval_cfg.compare_with, tok_digest, bs, eval_cfg.max_val_batches, device))

    docs = held_out_documents(storage, settings, eval_cfg.held_out_docs, eval_cfg.seed)
    per_source = {}
    if docs and eval_cfg.max_source_batches:
        per_source = source_perplexity(model, sp, docs, index["seq_len"], doc_prefix, eos_id, bs, eval_cfg.max_source_batches, device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    def encode(text: str) -> list[int]:
        return sp.encode(text, out_type=int)

    files: list[str] = []
    cloze: dict[str, Any] = {}
    if eval_cfg.cloze_examples and docs:
        examples = T.build_cloze(docs, eval_cfg.cloze_examples, eval_cfg.seed, eval_cfg.cloze_min_context_words)
        if examples:
            cloze, _ = T.evaluate_cloze(examples, forward, encode, doc_prefix, bs, max_len, device)

    task_refs: list[tuple[str, str]] = []
    if eval_cfg.mc_examples and docs:
        gen = T.build_continuation_task(docs, eval_cfg.mc_examples, eval_cfg.seed, eval_cfg.mc_choices,
                                        context_words=max(8, eval_cfg.cloze_min_context_words * 2),
                                        continuation_words=eval_cfg.mc_continuation_words)
        if gen:
            ref = f"{out_dir}/tasks/{DEFAULT_TASK_NAME}.jsonl"
            T.write_mc_task(storage, ref, gen)
            files.append(ref)
            task_refs.append((DEFAULT_TASK_NAME, ref))
            if storage.protocol_of(ref) == "file":  # lm-eval's json loader reads local files
                yref = f"{out_dir}/tasks/{DEFAULT_TASK_NAME}.yaml"
                storage.write_text(yref, T.lm_eval_task_yaml(f"shardflow_{DEFAULT_TASK_NAME}", storage.uri(ref)))
                files.append(yref)
    for ref in eval_cfg.tasks:
        name = T.task_name(ref)
        if any(name == n for n, _ in task_refs):
            raise EvaluationError(f"eval.tasks: two task files are named {name!r} ({ref})")
        task_refs.append((name, ref))
    task_results = {}
    for name, ref in task_refs:
        examples = T.load_mc_task(storage, ref)
        metrics, _ = T.evaluate_mc(examples, forward, encode, doc_prefix, bs, max_len, device)
        task_results[name] = {"file": storage.uri(ref), **metrics}

    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "run": run,
        "checkpoint": ck,
        "model_config_digest": model_config_digest(train_cfg.model),
        "eval_config_digest": digest_json(eval_cfg.model_dump(mode="json")),
        "tokenizer_digest": tok_digest,
        "index": {"seq_len": index["seq_len"], "val_samples": index["splits"]["val"]["samples"],
                  "val_tokens": index["splits"]["val"]["tokens"]},
        "split": settings,
        "val": val,
        "per_source": per_source,
        "per_source_note": (f"Per source: {len(docs)} held-out documents (val split by document-id hash, "
                            f"val_fraction={settings['val_fraction']}, split_seed={settings['split_seed']}) re-tokenized "
                            f"and packed like the shards, at most {eval_cfg.max_source_batches} batches per source."
                            if per_source else "No held-out documents found for per-source perplexity (no tokenize "
                            "manifest or stages/dedup outputs under the root)."),
        "cloze": cloze,
        "tasks": task_results,
        "experts": experts,
    }
    if vs_baseline is not None:
        results["vs_baseline"] = vs_baseline
    results["metrics"] = rep.flatten_metrics(results)
    previous = _read_previous(storage, run)
    if previous:
        results["previous"] = {"checkpoint_step": previous.get("checkpoint", {}).get("step"),
                               "checkpoint_uri": previous.get("checkpoint", {}).get("uri"),
                               "metrics": previous.get("metrics", {})}
    results["deltas"] = rep.deltas(results["metrics"], (previous or {}).get("metrics"))

    records = rep.read_metrics(storage, metrics_ref(run))
    plots = {
        "loss": rep.plot_loss(rep.loss_curves(records)),
        "lr": rep.plot_lr(rep.lr_curve(records)),
        "expert_load": rep.plot_expert_load(experts["tokens_per_expert"], experts["layers"]),
    }
    plot_names = {}
    for key, png in plots.items():
        ref = f"{out_dir}/{rep.PLOT_FILES[key]}"
        storage.write_bytes(ref, png)
        files.append(ref)
        plot_names[key] = rep.PLOT_FILES[key]
    tables = rep.build_tables(results)
    report_md = rep.render_markdown(results, tables, plot_names)
    storage.write_text(f"{out_dir}/report.md", report_md)
    files.append(f"{out_dir}/report.md")
    results["wall_time_s"] = round(time.perf_counter() - t0, 3)
    results = _finite(results)
    storage.write_json(results_ref(run), results)  # last: it marks a complete evaluation
    files.append(results_ref(run))
    return {"results": results, "report_md": report_md, "tables": tables, "files": files}
