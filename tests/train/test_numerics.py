"""Numerics of the GPU paths, checked on CPU: fp32 routing under bf16 autocast and FSDP2 mixed
precision, backward outside autocast, GQA without repeated K/V, the determinism switch, the
dispatch-path report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from shardflow.train import model as model_mod
from shardflow.train.config import OptimConfig
from shardflow.train.distributed import DistEnv
from shardflow.train.model import ModelConfig, MoETransformer, causal_attention
from shardflow.train.moe import MoEBlock, Router, dropless_path, load_balancing_loss, router_z_loss
from shardflow.train.optim import build_optimizer
from shardflow.train.trainer import _deterministic, moe_dispatch_path, optimizer_step

BF16 = torch.bfloat16


def fp32_route(x: torch.Tensor, weight: torch.Tensor, k: int):
    """The reference decision: everything in fp32, no autocast anywhere."""
    logits = F.linear(x.float(), weight.float())
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    return logits, probs, top_p / top_p.sum(-1, keepdim=True), top_i


@pytest.fixture
def router_and_tokens():
    torch.manual_seed(0)
    router = Router(64, 8, 2)
    torch.nn.init.normal_(router.weight, std=0.02)  # the model's init scale: logits close together
    return router, torch.randn(8192, 64)


def test_router_is_fp32_and_identical_to_the_fp32_reference_under_bf16_autocast(router_and_tokens):
    router, x = router_and_tokens
    want = fp32_route(x, router.weight, 2)
    for inp in (x, x.to(BF16)):  # fp32 residual stream (autocast) or bf16 activations (FSDP2 mixed precision)
        with torch.autocast("cpu", dtype=BF16):
            got = router(inp)
        ref = fp32_route(inp.float(), router.weight, 2) if inp.dtype == BF16 else want
        assert all(t.dtype == torch.float32 for t in got[:3])
        for g, w in zip(got, ref):
            assert torch.equal(g, w)
    # What the test guards against: the same gate left to autocast runs in bf16 and flips choices.
    with torch.autocast("cpu", dtype=BF16):
        bf16_logits = F.linear(x.float(), router.weight.float())
    flipped = (bf16_logits.float().topk(2).indices != want[3]).any(-1).float().mean().item()
    assert bf16_logits.dtype == BF16 and flipped > 0.005, flipped


def test_router_losses_are_fp32_under_autocast():
    torch.manual_seed(1)
    block = MoEBlock(32, 4, 2, 48)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(300, 32)
    _, aux_ref, z_ref, counts_ref, _ = block(x)
    with torch.autocast("cpu", dtype=BF16):
        y, aux, z, counts, _ = block(x)
        # the loss functions on their own, called inside the region, also stay fp32
        r = block.router(x)
        assert load_balancing_loss(r.probs, r.experts, 4).dtype == torch.float32
        assert router_z_loss(r.logits).dtype == torch.float32
    assert y.dtype == BF16 and aux.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.equal(counts, counts_ref) and torch.equal(aux, aux_ref) and torch.equal(z, z_ref)


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                expert_hidden=64, dense_hidden=64, max_seq_len=32)
    return ModelConfig(**(base | kw))


def test_every_router_of_the_model_routes_like_fp32_under_autocast():
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_cfg(n_experts=8))
    seen = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].detach(), out)))
    tokens = torch.randint(0, 128, (8, 32))
    with torch.autocast("cpu", dtype=BF16):
        model(tokens, tokens)
    assert len(seen) == 2
    for mod, x, out in seen:  # each layer's decision on the input it actually got
        assert torch.equal(out.experts, fp32_route(x, mod.weight, 2)[3])


def test_backward_runs_outside_autocast():
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_cfg())
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    in_autocast = []
    for p in (model.embed.weight, model.blocks[0].ffn.router.weight, model.blocks[1].ffn.experts.w2):
        p.register_hook(lambda g: in_autocast.append(torch.is_autocast_enabled("cpu")))
    batches = [torch.randint(0, 128, (2, 17)) for _ in range(2)]
    out = optimizer_step(model, opt, batches, env=DistEnv(), grad_clip=1.0, autocast=BF16)
    assert in_autocast == [False] * 6  # 3 parameters x 2 micro-batches, all outside the region
    assert out["loss"] > 0 and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 4)])
def test_gqa_without_repeat_equals_the_repeat_path(heads, kv):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 24, 16, requires_grad=True)
    k = torch.randn(2, kv, 24, 16, requires_grad=True)
    v = torch.randn(2, kv, 24, 16, requires_grad=True)
    g = torch.randn(2, heads, 24, 16)
    outs = []
    for gqa in ([True, False] if model_mod.SDPA_GQA else [False]):
        y = causal_attention(q, k, v, gqa=gqa)
        dq, dk, dv = torch.autograd.grad(y, (q, k, v), g)
        outs.append((y, dq, dk, dv))
    # the definition, written out: head h attends with K/V head h // (heads / kv)
    kr, vr = (t.repeat_interleave(heads // kv, dim=1) for t in (k, v))
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    scores = (q @ kr.transpose(-1, -2) / 4.0).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(outs[0][0], scores.softmax(-1) @ vr, atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0], outs[-1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_attention_does_not_repeat_kv_when_sdpa_has_gqa(monkeypatch):
    if not model_mod.SDPA_GQA:
        pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa (torch < 2.5)")

    def no_repeat(*a, **kw):
        raise AssertionError("K/V materialised with repeat_interleave")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_repeat)
    monkeypatch.setattr(torch, "repeat_interleave", no_repeat)
    model = MoETransformer(tiny_model_cfg(n_heads=8, n_kv_heads=2))
    tokens = torch.randint(0, 128, (2, 16))
    model(tokens, tokens).total_loss.backward()


def test_determinism_switch_sets_and_restores_kernel_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    cuda = torch.device("cuda", 0)  # only flags are set: no GPU needed
    with _deterministic(False, cuda):
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with _deterministic(True, cuda):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with _deterministic(False, torch.device("cpu")):
        assert not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic) == before


def test_dispatch_path_names_the_expert_path(monkeypatch):
    cpu = torch.device("cpu")
    model = MoETransformer(tiny_model_cfg())
    assert moe_dispatch_path(model, cpu, None, compiled=False) == "dropless fallback"
    assert moe_dispatch_path(model, cpu, None, compiled=True) == "dropless compiled loop"
    assert moe_dispatch_path(MoETransformer(tiny_model_cfg(moe_layers=[])), cpu, None, False) == "dense"
    cap = MoETransformer(tiny_model_cfg(router={"dispatch": "capacity"}))
    assert moe_dispatch_path(cap, cpu, BF16, compiled=True) == "capacity"
    # On a GPU the answer follows the grouped_mm probe, faked here both ways.
    from shardflow.train import moe

    for works, want in ((True, "grouped_mm"), (False, "fallback")):
        monkeypatch.setattr(moe, "_GROUPED_MM_OK", {("cuda:0", BF16, 32, 64): works})
        assert dropless_path(torch.device("cuda:0"), BF16, 32, 64) == want
        assert dropless_path(torch.device("cuda:0"), BF16, 32, 64, compiled=True) == ("grouped_mm" if works else "compiled loop")


FSDP_SCRIPT = textwrap.dedent('''
    import json, torch, torch.nn.functional as F
    from shardflow.train.distributed import init_distributed, teardown, wrap_model
    from shardflow.train.model import ModelConfig, MoETransformer
    from shardflow.train.moe import Router

    env = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2,
                      expert_hidden=64, max_seq_len=64)
    model = MoETransformer(cfg)
    routers = {name: m for name, m in model.named_modules() if isinstance(m, Router)}
    full = {name: m.weight.detach().clone() for name, m in routers.items()}
    seen = []
    for name, m in routers.items():
        m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].detach(), out)))
    q_dtype = []
    model.blocks[0].attn.wq.register_forward_hook(lambda mod, inp, out: q_dtype.append(out.dtype))
    wrap_model(model, env, "fsdp", param_dtype=torch.bfloat16)
    tokens = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(env.rank))
    out = model(tokens, tokens)
    out.total_loss.backward()
    res = {"rank": env.rank, "layers": []}
    for name, x, r in seen:
        ref = F.linear(x.float(), full[name]).softmax(-1).topk(2).indices
        rounded = F.linear(x.float(), full[name].bfloat16().float()).softmax(-1).topk(2).indices
        res["layers"].append({"logits": str(r.logits.dtype), "probs": str(r.probs.dtype),
                              "equal": bool(torch.equal(r.experts, ref)),
                              "bf16_gate_flips": int((rounded != ref).any(-1).sum())})
    res["attention_dtype"] = str(q_dtype[0])
    g = routers["blocks.0.ffn.router"].weight.grad
    res["router_grad_finite"] = bool(torch.isfinite(g.full_tensor()).all()) if g is not None else False
    print(json.dumps(res), flush=True)
    teardown(env)
''')


def test_router_stays_fp32_under_fsdp2_bf16_mixed_precision(tmp_path):
    """Two gloo ranks, FSDP2 with param_dtype bf16: each router decides exactly as the fp32 one."""
    from .test_trainer import free_port

    script = tmp_path / "fsdp_router.py"
    script.write_text(FSDP_SCRIPT)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        text = out.decode(errors="replace")
        assert p.returncode == 0, text[-3000:]
        results.append(json.loads(text.strip().splitlines()[-1]))
    for res in results:
        assert len(res["layers"]) == 2 and res["router_grad_finite"]
        assert res["attention_dtype"] == "torch.bfloat16"  # the rest of the model does run in bf16
        for layer in res["layers"]:
            assert layer["logits"] == layer["probs"] == "torch.float32" and layer["equal"], res
    print("bf16-rounded gate would flip:", [layer["bf16_gate_flips"] for r in results for layer in r["layers"]])
