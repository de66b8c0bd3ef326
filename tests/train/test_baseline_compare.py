"""The evaluation's "vs baseline" section (``eval.compare_with``): a MoE run and a dense run with the
same active parameters, both trained here on the same tokens, compared on the same validation rows.

The numbers in the section are checked against losses computed separately: each checkpoint loaded
on its own and its token-weighted cross-entropy summed by hand over the validation rows.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shardflow.storage import Storage
from shardflow.storage.shards import read_index
from shardflow.train.baseline import run_config_of
from shardflow.train.evaluate import EvaluationError, load_model, run_evaluation
from shardflow.train.validation import val_batches

from .test_evaluate import RUN, build_eval_root, small_eval, tcfg

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

BASE = "densebase"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> str:
    """The shared evaluation root (a MoE run of 8 steps) plus a dense run of the same active size and tokens."""
    from shardflow.train.trainer import train

    root = str(tmp_path_factory.mktemp("vsbase") / "root")
    shutil.copytree(build_eval_root(str(tmp_path_factory.mktemp("eval"))), root)
    storage = Storage(root)
    moe = tcfg(storage)
    dense = moe.model_copy(update={"run": BASE, "model": moe.model.model_copy(
        update={"moe_layers": [], "dense_hidden": moe.model.top_k * moe.model.expert_hidden})})
    train(dense, storage)
    return root


def separate_loss(storage: Storage, run: str, batch_size: int, max_batches: int) -> float:
    """Token-weighted validation loss of ``run``'s latest checkpoint, computed without the evaluation code."""
    cfg, ref = run_config_of(storage, run)
    model, _ = load_model(cfg, storage, ref, torch.device("cpu"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for arr in val_batches(storage, read_index(storage), batch_size, max_batches):
            rows = torch.from_numpy(arr.astype(np.int64))
            logits = model(rows[:, :-1]).logits
            nll += float(F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum"))
            n += rows[:, 1:].numel()
    return nll / n


def test_vs_baseline_section_matches_separately_computed_losses(two_runs):
    storage = Storage(two_runs)
    cfg = tcfg(storage)
    ev = small_eval(compare_with=BASE, held_out_docs=0, cloze_examples=0, mc_examples=0)
    out = run_evaluation(cfg, ev, storage)
    vb = out["results"]["vs_baseline"]
    cur, base, diff = vb["current"], vb["baseline"], vb["difference"]

    moe_loss = separate_loss(storage, RUN, ev.batch_size, ev.max_val_batches)
    dense_loss = separate_loss(storage, BASE, ev.batch_size, ev.max_val_batches)
    assert cur["val_loss"] == pytest.approx(moe_loss, rel=1e-5)
    assert base["val_loss"] == pytest.approx(dense_loss, rel=1e-5)
    assert diff["val_loss"] == pytest.approx(moe_loss - dense_loss, rel=1e-4, abs=1e-6)
    assert cur["val_loss"] == out["results"]["val"]["loss"]  # the report's own perplexity row
    assert base["val_ppl"] == pytest.approx(math.exp(dense_loss), rel=1e-5)
    assert cur["val_tokens"] == base["val_tokens"] == out["results"]["val"]["tokens"] > 0

    # Sizes and tokens: active parameters equal but for the routers, the MoE's total larger by its idle
    # experts; the same tokens.
    m = cfg.model
    router = len(m.moe_layer_ids) * m.n_experts * m.dim
    assert cur["active_params"] == m.num_active_params() and base["active_params"] == m.num_active_params() - router
    assert diff["active_params"] == router
    idle = len(m.moe_layer_ids) * 3 * m.dim * (m.n_experts - m.top_k) * m.expert_hidden
    assert diff["params"] == cur["params"] - base["params"] == idle + router
    steps, batch = cfg.trainer.steps, cfg.data.batch_size
    assert cur["tokens"] == base["tokens"] == steps * batch * read_index(storage)["seq_len"] and diff["tokens"] == 0
    assert cur["step"] == base["step"] == steps

    rows = out["tables"]["vs_baseline"]
    assert [r["model"] for r in rows] == [f"{RUN} (this run)", f"{BASE} (baseline)", "difference (this run - baseline)"]
    assert rows[2]["val_loss"] == diff["val_loss"] and rows[1]["val_loss"] == base["val_loss"]
    md = out["report_md"]
    assert "## vs baseline" in md and f"active parameters +{router:,} (+0.48 %), equal tokens" in md
    assert f"| {BASE} (baseline) | 8 |" in md
    flat = out["results"]["metrics"]
    assert flat["baseline.val.loss"] == base["val_loss"] and flat["baseline.val.loss_diff"] == diff["val_loss"]
    assert storage.read_json(f"runs/{RUN}/eval/results.json")["vs_baseline"]["baseline"]["run"] == BASE


def test_compare_with_a_missing_or_the_same_run_is_a_clear_error(two_runs):
    storage = Storage(two_runs)
    light = dict(held_out_docs=0, cloze_examples=0, mc_examples=0)
    with pytest.raises(EvaluationError, match="baseline run 'nosuchrun'.*no checkpoint"):
        run_evaluation(tcfg(storage), small_eval(compare_with="nosuchrun", **light), storage)
    with pytest.raises(EvaluationError, match="names the evaluated run itself"):
        run_evaluation(tcfg(storage), small_eval(compare_with=RUN, **light), storage)
