"""Where things live under a dataset root: the one list of on-disk paths every part agrees on.

Why one module: data preparation writes these paths, training and evaluation read them, and the
flows report on them. Each spelled out in one place means a reader can never look for a file
somewhere the writer did not put it. (Shard-format details live in ``shards``, the manifest
protocol in ``manifest``, tokenizer files in ``tokenizer_files``.) The full picture is in
docs/architecture.md, "One dataset root".
"""
from __future__ import annotations

import re

PIPELINE_REF = "pipeline.yaml"
"""The resolved pipeline config and its digest, written before any stage runs."""

STAGES_DIR = "stages"
QUARANTINE_DIR = "quarantine"
RUNS_DIR = "runs"

DOCS_SUFFIX = ".jsonl.zst"
"""Document stages write zstd-compressed JSON lines, one file per shard."""

_RUN_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def stage_dir(stage: str) -> str:
    """``stages/<stage>``: a stage's outputs (and its ``_manifest/``)."""
    return f"{STAGES_DIR}/{stage}"


def stage_docs_ref(stage: str, shard_id: str) -> str:
    """``stages/<stage>/<shard>.jsonl.zst``: the documents a document stage kept for one shard."""
    return f"{STAGES_DIR}/{stage}/{shard_id}{DOCS_SUFFIX}"


def dropped_docs_ref(stage: str, shard_id: str) -> str:
    """``stages/<stage>/_dropped/<shard>.jsonl.zst``: documents a filter dropped, with the reason."""
    return f"{STAGES_DIR}/{stage}/_dropped/{shard_id}{DOCS_SUFFIX}"


def quarantine_ref(stage: str, shard_id: str) -> str:
    """``quarantine/<stage>/<shard>.jsonl.zst``: malformed input records with file, line and reason."""
    return f"{QUARANTINE_DIR}/{stage}/{shard_id}{DOCS_SUFFIX}"


def run_ref(run: str) -> str:
    """``runs/<run>``: a training run's checkpoints, metrics, evaluation and exports.

    The name is checked (letters, digits, ``_ - .``, not ``.`` or ``..``) so that no run can
    address anything outside its own folder."""
    if not run or "/" in run or run in (".", "..") or not _RUN_NAME.fullmatch(run):
        raise ValueError(f"run name must be a non-empty name of letters, digits, '_', '-', '.', got {run!r}")
    return f"{RUNS_DIR}/{run}"


def metrics_ref(run: str) -> str:
    return f"{run_ref(run)}/metrics.jsonl"


def tensorboard_dir(run: str) -> str:
    """TensorBoard event files of a run (``train.metrics.tensorboard``): ``tensorboard --logdir <root>/runs``."""
    return f"{run_ref(run)}/tb"


def eval_dir(run: str) -> str:
    return f"{run_ref(run)}/eval"


def export_dir(run: str, step: int | None) -> str:
    """``runs/<run>/export/step-<n>`` (or ``.../latest`` when the step is unknown)."""
    return f"{run_ref(run)}/export/step-{step}" if step is not None else f"{run_ref(run)}/export/latest"
