"""Expert parallelism on 4 gloo processes: EP=2 and EP=4 compute EP=1's loss, router statistics and
every gradient (fp32, rtol 1e-5), dropless and capacity, with DDP and FSDP2 for the other
parameters; plus the trainer end to end, checkpoint resharding and a two-node launch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardflow.storage import Storage
from shardflow.train.checkpoint import Checkpointer, read_meta
from shardflow.train.config import TrainConfig
from shardflow.train.metrics import read_metrics
from shardflow.train.distributed import DistEnv, check_same_on_all_ranks, set_grad_sync, wrap_model
from shardflow.train.expert_parallel import check_degree, clip_grad_norm, state_of
from shardflow.train.launch import rendezvous_args, torchrun_command
from shardflow.train.model import MoETransformer

from .test_trainer import (
    build_dataset,
    finish,
    free_port,
    kill_when_logged,
    launch,
    metrics_ref,
    one_thread,  # noqa: F401 — autouse fixture: one intra-op thread here too
    tiny_cfg,
)

WORLD = 4
RTOL = 1e-5


def _model_cfg(dispatch: str):
    return tiny_cfg("ep", model={"n_experts": 8, "router": {"jitter": 0.0, "dispatch": dispatch,
                                                            "capacity_factor": 1.0}}).model


def _forward_backward(model, batch, micro: int = 2):
    """Two micro-batches with gradient sync on the last only (as the trainer accumulates)."""
    outs = []
    for i, mb in enumerate(batch.chunk(micro)):
        with set_grad_sync(model, i == micro - 1):
            out = model(mb[:, :-1], mb[:, 1:], return_logits=False)
            (out.total_loss / micro).backward()
        outs.append(out)
    return outs


def _close(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """assert_close at rtol 1e-5 (atol 1e-5 of the tensor's largest value); returns max|diff| / max|ref|."""
    got, ref = got.detach(), ref.detach()
    scale = float(ref.abs().max()) + 1e-30
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{name}: {m}")
    return float((got - ref).abs().max()) / scale


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    env = DistEnv(rank, WORLD, 0, torch.device("cpu"))
    report = {}
    try:
        for dispatch in ("dropless", "capacity"):
            cfg = _model_cfg(dispatch)
            gen = torch.Generator().manual_seed(100 + rank)  # every rank its own batch
            batch = torch.randint(0, cfg.vocab_size, (4, 17), generator=gen)
            # EP=1 reference: the full model on every rank, gradients averaged over the world (DDP's result).
            torch.manual_seed(0)
            ref = MoETransformer(cfg)
            init = {k: v.clone() for k, v in ref.state_dict().items()}
            ref_outs = _forward_backward(ref, batch)
            for p in ref.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
            ref_norm = clip_grad_norm(ref, float("inf"))
            combos = [("ddp", 2), ("ddp", 4)] + ([("fsdp", 2)] if dispatch == "dropless" else [])
            for parallelism, ep in combos:
                torch.manual_seed(0)
                model = MoETransformer(cfg)
                model.load_state_dict(init)
                wrapped = wrap_model(model, env, parallelism, expert_parallel=ep)
                st = state_of(wrapped)
                outs = _forward_backward(wrapped, batch)
                errs = {}
                for o, r in zip(outs, ref_outs):
                    for field in ("loss", "aux_loss", "z_loss"):
                        errs[field] = max(errs.get(field, 0.0), _close(field, getattr(o, field), getattr(r, field)))
                    assert torch.equal(o.expert_counts, r.expert_counts) and torch.equal(o.dropped_tokens, r.dropped_tokens)
                lo, hi = st.ep.first, st.ep.first + st.ep.n_local
                grad_err = 0.0
                for n, p in model.named_parameters():
                    want = ref_grads[n][lo:hi] if n in st.expert_fqns else ref_grads[n]
                    assert p.shape == want.shape, n
                    got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 shards
                    grad_err = max(grad_err, _close(n, got, want))
                norm = clip_grad_norm(wrapped, float("inf"))
                errs["grad"], errs["grad_norm"] = grad_err, _close("grad_norm", norm, ref_norm)
                n_exp = sum(p.numel() for n, p in model.named_parameters() if n in st.expert_fqns)
                n_full = sum(ref_grads[n].numel() for n in st.expert_fqns)
                errs["expert_param_fraction"] = n_exp / n_full
                report[f"{dispatch}-{parallelism}-ep{ep}"] = errs
                del wrapped
        check_same_on_all_ranks(env, "same", "configs")
        with pytest.raises(ValueError, match=r"different configs: ranks \[0, 1\] have a; ranks \[2, 3\] have b"):
            check_same_on_all_ranks(env, "a" if rank < 2 else "b", "configs")  # e.g. nodes reading other files
        if rank == 0:
            Path(out_dir, "report.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_ep2_and_ep4_loss_stats_and_every_gradient_equal_ep1(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    print("max relative differences vs EP=1:", json.dumps(report, indent=1))
    assert set(report) == {f"{d}-ddp-ep{e}" for d in ("dropless", "capacity") for e in (2, 4)} | {"dropless-fsdp-ep2"}
    for key, errs in report.items():
        ep = int(key[-1])
        assert errs["expert_param_fraction"] == pytest.approx(1 / ep)
        assert max(v for k, v in errs.items() if k != "expert_param_fraction") <= RTOL  # assert_close also ran per element


def test_degree_checks_are_one_line_errors():
    with pytest.raises(ValueError, match="must divide the number of processes"):
        check_degree(4, 6, 8)
    with pytest.raises(ValueError, match="must divide model.n_experts=6"):
        check_degree(4, 4, 6)
    with pytest.raises(ValueError, match="expert_parallel=3 must divide model.n_experts=4"):
        TrainConfig.model_validate(tiny_cfg("x").model_dump() | {"trainer": {"expert_parallel": 3}})
    with pytest.raises(ValueError, match="must divide the number of processes"):
        wrap_model(MoETransformer(tiny_cfg("x").model), DistEnv(), "ddp", expert_parallel=2)


# -- the trainer end to end (torchrun, 2 ranks) -------------------------------------------------------

STEPS = 20


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("epdata") / "root"))
    build_dataset(storage)
    return storage


@pytest.fixture(scope="module")
def ep1_reference(data_root: Storage, tmp_path_factory) -> list[dict]:
    """An uninterrupted 2-rank DDP (EP=1) run of STEPS steps."""
    summary = finish(launch(tiny_cfg("ep1-ref"), data_root, 2, tmp_path_factory.mktemp("ref")))
    assert summary["world_size"] == 2 and summary["step"] == STEPS
    return read_metrics(data_root, metrics_ref("ep1-ref"))


def assert_same_training(log: list[dict], ref: list[dict], steps: range) -> None:
    """Same samples (token counts, routing) and the same losses within float reduction-order noise."""
    got, want = [log[s - 1] for s in steps], [ref[s - 1] for s in steps]
    assert [r["step"] for r in got] == list(steps)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    for key in ("loss", "aux_loss", "z_loss", "grad_norm"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4), key
    assert [r["expert_tokens"] for r in got] == [r["expert_tokens"] for r in want]


def test_ep2_run_sigkilled_then_resumed_at_ep1_trains_like_ep1(data_root: Storage, ep1_reference, tmp_path):
    cfg = tiny_cfg("ep2-kill", trainer={"expert_parallel": 2})
    kill_when_logged(launch(cfg, data_root, 2, tmp_path), data_root, "ep2-kill", 7)
    ck = Checkpointer(data_root, "ep2-kill")
    assert ck.latest_step() == 5
    meta = read_meta(data_root, ck.step_ref(5))
    assert meta["expert_parallel"] == 2 and meta["world_size"] == 2
    # Each rank stored only its experts' slices: every expert appears in exactly one rank's file.
    sizes = [os.path.getsize(os.path.join(data_root.resolve(ck.step_ref(5))[1], f"__{r}_0.distcp")) for r in (0, 1)]
    print("EP=2 checkpoint bytes per rank:", sizes)
    summary = finish(launch(tiny_cfg("ep2-kill"), data_root, 2, tmp_path))  # EP=1 now: DCP reshards the experts
    assert summary["start_step"] == 5 and summary["step"] == STEPS
    log = read_metrics(data_root, metrics_ref("ep2-kill"))
    assert_same_training(log, ep1_reference, range(1, STEPS + 1))


@pytest.mark.slow
def test_ep2_uninterrupted_20_steps_equal_ep1(data_root: Storage, ep1_reference, tmp_path):
    summary = finish(launch(tiny_cfg("ep2-full", trainer={"expert_parallel": 2}), data_root, 2, tmp_path))
    assert summary["step"] == STEPS
    assert_same_training(read_metrics(data_root, metrics_ref("ep2-full")), ep1_reference, range(1, STEPS + 1))


@pytest.mark.slow
def test_ep_checkpoints_reshard_across_ep_and_dp_degrees(data_root: Storage, tmp_path):
    """EP=2 dp=1 → EP=4 dp=1 → EP=2 dp=2, each resuming the last one's DCP checkpoint, trains like the
    same sequence of process counts at EP=1 (same samples; the world size changes the per-step batch)."""
    def run(name: str, plan: list[tuple[int, int, int]]) -> list[dict]:
        for nproc, ep, until in plan:
            cfg = tiny_cfg(name, trainer={"expert_parallel": ep})
            summary = finish(launch(cfg, data_root, nproc, tmp_path, extra=["--max-steps", str(until)]))
            assert summary["step"] == until and summary["world_size"] == nproc
        return read_metrics(data_root, metrics_ref(name))

    ep_log = run("ep-reshard", [(2, 2, 8), (4, 4, 14), (4, 2, STEPS)])
    ref_log = run("ep1-reshard", [(2, 1, 8), (4, 1, 14), (4, 1, STEPS)])
    assert_same_training(ep_log, ref_log, range(1, STEPS + 1))
    ck = Checkpointer(data_root, "ep-reshard")
    assert read_meta(data_root, ck.step_ref(STEPS))["expert_parallel"] == 2


# -- multi-node: two "nodes" of 2 processes on 127.0.0.1 through torchrun's c10d rendezvous ------------

@pytest.mark.slow  # ~60 s: two 4-rank launches
def test_two_nodes_through_c10d_rendezvous_train_exactly_as_one_node_of_four(data_root: Storage, tmp_path):
    steps = ["--max-steps", "6"]
    one = finish(launch(tiny_cfg("node1x4", trainer={"expert_parallel": 2}), data_root, 4, tmp_path, extra=steps))
    cfg = tiny_cfg("node2x2", trainer={"expert_parallel": 2})
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [launch(cfg, data_root, 2, tmp_path, extra=steps,
                    torchrun_args=rendezvous_args(2, r, endpoint, "node2x2-test")) for r in (0, 1)]
    summaries = [finish(p) for p in nodes]  # rank 0 of each node prints the summary
    assert [s["world_size"] for s in summaries] == [4, 4] and one["world_size"] == 4
    a, b = read_metrics(data_root, metrics_ref("node1x4")), read_metrics(data_root, metrics_ref("node2x2"))
    assert [r["step"] for r in b] == list(range(1, 7))
    for key in ("loss", "aux_loss", "z_loss", "grad_norm", "tokens", "expert_tokens"):
        assert [r[key] for r in b] == [r[key] for r in a], key


def test_rendezvous_args_validate_and_build_torchrun_options():
    assert rendezvous_args() == []
    args = rendezvous_args(2, 1, "node0.svc:29400", "job-7")
    assert args == ["--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=node0.svc:29400", "--rdzv-id=job-7"]
    cmd = torchrun_command("/x/launch.json", 8, torchrun_args=args)
    assert "--standalone" not in cmd and cmd[cmd.index("-m", 3) - 1] == "--rdzv-id=job-7"
    for bad, match in [((2, 0, None), "needs --rdzv-endpoint"), ((2, 0, "host"), "HOST:PORT"), ((2, 2, "h:1"), "node-rank"),
                       ((0, 0, None), "nnodes")]:
        with pytest.raises(ValueError, match=match):
            rendezvous_args(*bad)


@pytest.mark.slow
def test_ep2_with_fsdp2_trains_like_ep1_and_its_checkpoint_resumes_in_ddp(data_root: Storage, ep1_reference, tmp_path):
    cfg = tiny_cfg("ep2-fsdp", trainer={"expert_parallel": 2, "parallelism": "fsdp"})
    assert finish(launch(cfg, data_root, 2, tmp_path, extra=["--max-steps", "10"]))["step"] == 10
    assert finish(launch(tiny_cfg("ep2-fsdp"), data_root, 2, tmp_path))["start_step"] == 10  # DDP, EP=1 now
    assert_same_training(read_metrics(data_root, metrics_ref("ep2-fsdp")), ep1_reference, range(1, STEPS + 1))
