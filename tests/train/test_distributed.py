"""torchrun with 2 processes over gloo: DDP exact resume after SIGKILL, FSDP2 training and resharding."""
from __future__ import annotations

import math
import os

import pytest
import torch

from shardflow.storage import Storage
from shardflow.storage.shards import read_index
from shardflow.train.checkpoint import Checkpointer, CheckpointError, load_model_weights, read_meta
from shardflow.train.distributed import DistEnv, init_distributed, select_device, set_grad_sync, teardown, wrap_model
from shardflow.train.metrics import read_metrics
from shardflow.train.model import MoETransformer
from shardflow.train.trainer import train
from shardflow.train.validation import val_batches

from .test_trainer import (
    assert_same_run,
    build_dataset,
    finish,
    kill_and_resume,
    launch,
    metrics_ref,
    one_thread,  # noqa: F401 — autouse fixture: one intra-op thread here too
    tiny_cfg,
)

STEPS = 20


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("ddata") / "root"))
    build_dataset(storage)
    return storage


@pytest.fixture(scope="module")
def ddp_reference(data_root: Storage, tmp_path_factory) -> str:
    """An uninterrupted 2-rank DDP run of STEPS steps (grad_accum 2)."""
    cfg = tiny_cfg("ddp-ref", trainer={"grad_accum": 2})
    summary = finish(launch(cfg, data_root, 2, tmp_path_factory.mktemp("ref")))
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    return "ddp-ref"


def test_plain_process_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = init_distributed("cpu")
    assert (env.rank, env.world_size, env.device.type, env.owns_group, env.distributed) == (0, 1, "cpu", False, False)
    model = MoETransformer(tiny_cfg("x").model)
    assert wrap_model(model, env, "fsdp") is model and wrap_model(model, env, "ddp") is model
    t = torch.ones(3)
    assert env.all_reduce_sum(t) is t and env.broadcast_object({"a": 1}) == {"a": 1}
    with set_grad_sync(model, False):
        pass
    teardown(env)  # nothing to tear down
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_device("cuda")
    with pytest.raises(ValueError, match="parallelism"):
        wrap_model(model, DistEnv(world_size=2), "tp")


def test_ddp_two_ranks_sigkill_then_resume_is_bitwise_identical(data_root: Storage, ddp_reference: str, tmp_path):
    log = read_metrics(data_root, metrics_ref(ddp_reference))
    # 2 ranks x 2 micro-batches x batch 4 x 32 tokens per step
    assert [r["tokens"] for r in log] == [512 * s for s in range(1, STEPS + 1)]
    assert all(sum(layer) == 512 * 2 for r in log for layer in r["expert_tokens"])
    info = kill_and_resume(data_root, "ddp-kill", 2, tmp_path, seed=5, trainer={"grad_accum": 2})
    assert_same_run(data_root, ddp_reference, "ddp-kill", STEPS)
    ck = Checkpointer(data_root, "ddp-kill")
    step_dir = data_root.resolve(ck.step_ref(STEPS))[1]
    assert {"rng-rank0.json", "rng-rank1.json"} <= set(os.listdir(step_dir))
    print("2-rank DDP kill/resume:", info)


def test_fsdp2_two_ranks_trains_like_ddp_and_reshards_to_one_process(data_root: Storage, ddp_reference: str, tmp_path):
    cfg = tiny_cfg("fsdp", trainer={"grad_accum": 2, "parallelism": "fsdp", "eval_every": 3, "eval_batches": 2})
    summary = finish(launch(cfg, data_root, 2, tmp_path, extra=["--max-steps", "6"]))
    assert summary["step"] == 6 and summary["world_size"] == 2
    fsdp, ddp = read_metrics(data_root, metrics_ref("fsdp")), read_metrics(data_root, metrics_ref(ddp_reference))[:6]
    assert [r["step"] for r in fsdp] == list(range(1, 7))
    # Same batches, same math; only the reduction layout differs (reduce-scatter of shards vs all-reduce).
    for key in ("loss", "grad_norm", "aux_loss"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], rel=1e-5), key
    assert [r["expert_tokens"] for r in fsdp] == [r["expert_tokens"] for r in ddp]
    ck = Checkpointer(data_root, "fsdp")
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(data_root.resolve(ck.step_ref(6))[1]))
    assert read_meta(data_root, ck.step_ref(6))["parallelism"] == "fsdp"
    # Validation under FSDP: both ranks ran the same forwards (no hang), and the 2-rank val loss is the
    # one a single process computes on the same rows (2 batches x 4 rows x 2 ranks = 8-row batches x 2).
    model = MoETransformer(cfg.model)
    load_model_weights(model, data_root, cfg, ck.step_ref(6))
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for rows in val_batches(data_root, read_index(data_root), 8, 2):
            t = torch.from_numpy(rows.astype("int64"))
            total += float(model(t[:, :-1], t[:, 1:]).loss) * t[:, 1:].numel()
            count += t[:, 1:].numel()
    assert fsdp[5]["val_loss"] == pytest.approx(total / count, rel=1e-5)

    # The sharded checkpoint resumes in a single plain process (DCP reshards 2 -> 1).
    one = train(cfg, data_root, max_steps=8)
    assert one["start_step"] == 6 and one["step"] == 8 and one["world_size"] == 1
    log = read_metrics(data_root, metrics_ref("fsdp"))
    assert [r["step"] for r in log] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in log)
    # the global sample position carried over, and the global batch with it: 6 steps x 2 ranks x 2 micro
    # x 4, then 1 rank x 4 micro (grad_accum doubled) x 4
    meta = read_meta(data_root, ck.step_ref(8))
    assert meta["loader"]["position"] == 6 * 16 + 2 * 16 and one["grad_accum"] == 4
    assert meta["batch_plan"] == {"batch_size": 4, "grad_accum": 4, "world_size": 1, "global_batch": 16}
    assert abs(log[6]["loss"] - log[5]["loss"]) < 0.2  # trained weights, not a fresh init (~ln V)


def test_resume_on_fewer_ranks_keeps_the_global_batch_and_the_loss_curve(data_root: Storage, tmp_path):
    """2 ranks x 4 sequences x 2 accumulated for 6 steps, resumed on 1 rank: grad_accum 2 -> 4, same curve.

    The reference is one process accumulating 4 micro-batches from the start: the same 16 samples per
    step, so the 2-rank run, the resumed run and it differ only in the order gradients are summed.
    Router jitter is off here: a resume on another world size starts fresh random streams.
    """
    steps, model = 12, {"router": {"jitter": 0.0}}
    ref = train(tiny_cfg("elastic-ref", model=model, trainer={"steps": steps, "grad_accum": 4},
                         checkpoint={"every_steps": 6}), data_root)
    assert ref["grad_accum"] == 4
    cfg = tiny_cfg("elastic", model=model, trainer={"steps": steps, "grad_accum": 2}, checkpoint={"every_steps": 6})
    two = finish(launch(cfg, data_root, 2, tmp_path, extra=["--max-steps", "6"]))
    assert two["world_size"] == 2 and two["step"] == 6
    # a per-rank batch that cannot make 16 on one rank is refused before anything is written
    bad = cfg.model_copy(update={"data": cfg.data.model_copy(update={"batch_size": 3})})
    with pytest.raises(CheckpointError, match=r"global batch of 16 .*train\.data\.batch_size=4 \(grad_accum 4\)"):
        train(bad, data_root)
    one = train(cfg, data_root)
    assert (one["start_step"], one["step"], one["world_size"], one["grad_accum"]) == (6, steps, 1, 4)
    a, b = read_metrics(data_root, metrics_ref("elastic-ref")), read_metrics(data_root, metrics_ref("elastic"))
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a] == [16 * 32 * s for s in range(1, steps + 1)]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-3)
    print("elastic resume, max relative loss difference:",
          max(abs(x["loss"] - y["loss"]) / y["loss"] for x, y in zip(b, a)))
