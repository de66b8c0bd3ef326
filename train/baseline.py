"""A run against a baseline run: both checkpoints scored on the same validation rows.

Why re-score the baseline instead of reading its own ``results.json``: that file may come from
another evaluation config (fewer validation batches, another batch size) or an older checkpoint,
and a difference of a few hundredths of a nat is only meaningful on identical rows. Here both
models are scored by :func:`shardflow.train.perplexity.val_perplexity` with the same batch size
and batch bound, so the ``difference`` row is a paired comparison.

Why "active" parameters next to the total: a mixture of experts is compared with a dense model at
equal *active* parameters (the compute per token; ``ModelConfig.num_active_params``), and its
total is larger by design; tokens seen (from the checkpoints' metadata) must be equal too for the
comparison to be fair, and the table shows both so a reader can check.

Used by the evaluation (``eval.compare_with``: a "vs baseline" section of the report and table)
and by ``bench/moe_vs_dense.py``, which prints the same table for each seed.
"""
from __future__ import annotations

from typing import Any

import torch

from shardflow.storage import Storage

from .checkpoint import read_meta, resolve_checkpoint
from .config import TrainConfig
from .eval_data import EvaluationError
from .eval_model import check_checkpoint_tokenizer, load_model
from .model_config import ModelConfig
from .perplexity import val_perplexity


def run_config_of(storage: Storage, run: str, checkpoint: str | None = None) -> tuple[TrainConfig, str]:
    """A train config that loads ``run``'s checkpoint (its latest by default), with the model config the
    checkpoint recorded; and the checkpoint's ref. A run without checkpoints is an :class:`EvaluationError`."""
    from .checkpoint import CheckpointError

    try:
        ref = resolve_checkpoint(storage, checkpoint, run)
        meta = read_meta(storage, ref)
    except CheckpointError as exc:
        raise EvaluationError(f"baseline run {run!r}: {exc}") from None
    model = meta.get("model_config")
    if not isinstance(model, dict):
        raise EvaluationError(f"baseline run {run!r}: {storage.uri(ref)} records no model config")
    return TrainConfig.model_validate({"run": run, "model": model}), ref


def score_model(model: torch.nn.Module, model_cfg: ModelConfig, info: dict[str, Any], run: str, val: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison: who, at which step and tokens, how large, and its validation loss."""
    return {"run": run, "step": info.get("step"), "tokens": info.get("tokens"),
            "active_params": model_cfg.num_active_params(), "params": model_cfg.num_params(),
            "val_loss": val["loss"], "val_ppl": val["ppl"], "val_tokens": val["tokens"]}


def score_run(storage: Storage, index: dict[str, Any], run: str, tokenizer_digest: str, batch_size: int,
              max_batches: int, device: torch.device, checkpoint: str | None = None) -> dict[str, Any]:
    """Load ``run``'s checkpoint and score it on the first ``max_batches`` validation batches."""
    cfg, ref = run_config_of(storage, run, checkpoint)
    model, info = load_model(cfg, storage, ref, device)
    check_checkpoint_tokenizer(info, tokenizer_digest, EvaluationError)
    val = val_perplexity(model, storage, index, batch_size, max_batches, device)
    return score_model(model, cfg.model, info, run, val)


def compare(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """``{"current", "baseline", "difference"}``; difference = current − baseline (negative loss = better)."""
    if current["val_tokens"] != baseline["val_tokens"]:
        raise EvaluationError(f"runs {current['run']!r} and {baseline['run']!r} were scored on different validation "
                              f"rows ({current['val_tokens']} vs {baseline['val_tokens']} tokens)")
    diff = {k: current[k] - baseline[k] for k in ("val_loss", "active_params", "params")}
    diff["tokens"] = (current["tokens"] - baseline["tokens"]
                      if isinstance(current.get("tokens"), int) and isinstance(baseline.get("tokens"), int) else None)
    diff["val_ppl_ratio"] = current["val_ppl"] / baseline["val_ppl"] if baseline["val_ppl"] else None
    return {"current": current, "baseline": baseline, "difference": diff}


def comparison_rows(cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """The table: one row per model and a difference row, the same columns in each."""
    rows = []
    for role in ("current", "baseline"):
        r = cmp[role]
        rows.append({"model": f"{r['run']} ({'this run' if role == 'current' else 'baseline'})", "step": r["step"],
                     "tokens": r["tokens"], "active_params": r["active_params"], "params": r["params"],
                     "val_loss": r["val_loss"], "val_ppl": r["val_ppl"]})
    d = cmp["difference"]
    rows.append({"model": "difference (this run - baseline)", "step": None, "tokens": d["tokens"],
                 "active_params": d["active_params"], "params": d["params"], "val_loss": d["val_loss"],
                 "val_ppl": d["val_ppl_ratio"]})
    return rows


def comparison_note(cmp: dict[str, Any]) -> str:
    """One sentence under the table: on what it was measured, and whether the comparison is at equal
    active parameters and tokens (the fair one for a mixture of experts against a dense model)."""
    cur, base, d = cmp["current"], cmp["baseline"], cmp["difference"]
    equal = ["equal active parameters" if d["active_params"] == 0 else
             f"active parameters {d['active_params']:+,} ({100 * d['active_params'] / base['active_params']:+.2f} %)"]
    equal.append("equal tokens" if d["tokens"] == 0 else "tokens seen differ" if d["tokens"] is not None else "tokens seen unknown")
    better = "lower (better)" if d["val_loss"] < 0 else "higher (worse)" if d["val_loss"] > 0 else "equal"
    return (f"Both checkpoints scored on the same {cur['val_tokens']:,} validation target tokens; {', '.join(equal)}. "
            f"This run's validation loss is {better} than the baseline's by {abs(d['val_loss']):.4f} nats/token; "
            "the val_ppl of the difference row is the perplexity ratio.")
