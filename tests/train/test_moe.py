"""MoE block: parity with transformers' Mixtral block, dispatch modes, gradients, router losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from shardflow.train.moe import MoEBlock, load_balancing_loss, router_z_loss

DIM, HIDDEN, E = 16, 24, 4


def make_block(top_k=2, dispatch="dropless", capacity_factor=1.25, shared=0, seed=0, dim=DIM, n_experts=E):
    torch.manual_seed(seed)
    block = MoEBlock(dim, n_experts, top_k, HIDDEN, shared, dispatch, capacity_factor)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def expert_out(block, x, e):
    ex = block.experts
    return F.linear(F.silu(F.linear(x, ex.w1[e])) * F.linear(x, ex.w3[e]), ex.w2[e])


def naive(block, x):
    """Per-token loop straight from the definition."""
    logits = x @ block.router.weight.T
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        p = logits[t].softmax(-1)
        w, idx = p.topk(block.top_k)
        w = w / w.sum()
        for wi, e in zip(w, idx.tolist()):
            out[t] += wi * expert_out(block, x[t], e)
    return out


def route_to(experts_per_token, dim=8, n_experts=E):
    """Inputs and a router weight that send token t to ``experts_per_token[t]`` (in preference order)."""
    x = torch.zeros(len(experts_per_token), dim)
    for t, prefs in enumerate(experts_per_token):
        for rank, e in enumerate(prefs):
            x[t, e] = 10.0 - 4.0 * rank
        x[t, n_experts:] = torch.randn(dim - n_experts)
    gate = torch.zeros(n_experts, dim)
    gate[:, :n_experts] = torch.eye(n_experts)
    return x, gate


def test_matches_transformers_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral as mm

    from shardflow.train.hf_export import _LAYOUTS

    hf_cls = getattr(mm, "MixtralSparseMoeBlock", None) or getattr(mm, "MixtralSparseMoEBlock")
    conf = MixtralConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_local_experts=E, num_experts_per_tok=2)
    conf._experts_implementation = "eager"
    hf = hf_cls(conf).eval()
    ours = make_block()
    target = hf.state_dict().keys()
    ex = ours.experts
    for layout in _LAYOUTS.values():
        sd = layout(0, ex.w1.data, ex.w3.data, ex.w2.data, ours.router.weight.data)
        sd = {k.split(".", 4)[-1]: v for k, v in sd.items()}  # drop "model.layers.0.<mlp>."
        if set(sd) == set(target):
            hf.load_state_dict(sd)
            break
    else:
        pytest.fail(f"no layout matches {sorted(target)}")
    x = torch.randn(2, 7, DIM)
    got = ours(x)[0]
    with torch.no_grad():
        want = hf(x)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dropless_equals_naive_loop():
    block = make_block(top_k=2)
    x = torch.randn(37, DIM)
    y, _, _, counts, dropped = block(x)
    torch.testing.assert_close(y, naive(block, x), atol=1e-5, rtol=1e-5)
    assert counts.sum() == 37 * 2 and dropped == 0


def test_top_k_all_experts_is_dense_softmax_mixture():
    block = make_block(top_k=E)
    x = torch.randn(11, DIM)
    probs = (x @ block.router.weight.T).softmax(-1)
    dense = sum(probs[:, e : e + 1] * expert_out(block, x, e) for e in range(E))
    torch.testing.assert_close(block(x)[0], dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_reach_router_and_used_experts_only(dispatch):
    block = make_block(top_k=2, dispatch=dispatch, capacity_factor=2.0, dim=8)
    x, gate = route_to([(t % 3, (t + 1) % 3) for t in range(12)])  # expert 3 never chosen
    with torch.no_grad():
        block.router.weight.copy_(gate + 0.01 * torch.randn_like(gate))
    y, _, _, counts, dropped = block(x.requires_grad_())
    assert counts.tolist() == [8, 8, 8, 0] and dropped == 0
    (y * torch.randn_like(y)).sum().backward()
    assert block.router.weight.grad.abs().sum() > 0
    for w in (block.experts.w1, block.experts.w2, block.experts.w3):
        per_expert = w.grad.abs().flatten(1).sum(1)
        assert (per_expert[:3] > 0).all() and per_expert[3] == 0
    assert x.grad.abs().sum() > 0


def test_capacity_drops_by_hand_count():
    # T=6, k=2, E=4, factor 0.5 -> capacity ceil(0.5*6*2/4) = 2 pairs per expert, earlier tokens first.
    routes = [(0, 1), (0, 2), (0, 1), (1, 0), (3, 2), (0, 3)]
    # expert 0: t0 t1 | t2 t3 t5 dropped (3); expert 1: t0 t2 | t3 dropped (1); experts 2, 3: 2 each.
    x, gate = route_to(routes)
    block = make_block(top_k=2, dispatch="capacity", capacity_factor=0.5, dim=8)
    dropless = make_block(top_k=2, dim=8)
    dropless.load_state_dict(block.state_dict())
    with torch.no_grad():
        block.router.weight.copy_(gate)
        dropless.router.weight.copy_(gate)
    y, _, _, counts, dropped = block(x)
    assert counts.tolist() == [5, 3, 2, 2]
    assert dropped.item() == 4
    y_full = dropless(x)[0]
    torch.testing.assert_close(y[3], torch.zeros(8))  # both of t3's slots dropped
    torch.testing.assert_close(y[[0, 1, 4]], y_full[[0, 1, 4]], atol=1e-5, rtol=1e-5)  # nothing dropped (bmm vs mm rounding)
    # t2 kept only its expert-1 slot: its output is that expert's weighted share.
    probs = (x[2] @ gate.T).softmax(-1)
    w = probs[[0, 1]] / probs[[0, 1]].sum()
    torch.testing.assert_close(y[2], w[1] * expert_out(block, x[2], 1), atol=1e-5, rtol=1e-5)


def test_capacity_with_room_for_everything_is_dropless():
    cap = make_block(top_k=2, dispatch="capacity", capacity_factor=E / 2)  # capacity == tokens
    free = make_block(top_k=2)
    x = torch.randn(2, 9, DIM)
    y_cap, _, _, _, dropped = cap(x)
    assert dropped == 0
    torch.testing.assert_close(y_cap, free(x)[0], atol=1e-6, rtol=1e-6)


def test_shared_expert_is_added_to_every_token():
    block = make_block(shared=12)
    x = torch.randn(5, DIM)
    torch.testing.assert_close(block(x)[0], naive(block, x) + block.shared_expert(x), atol=1e-5, rtol=1e-5)


def test_aux_loss_hand_checked():
    # E=2, k=1: both tokens pick expert 0 -> f = [1, 0]; P = mean probs = [0.7, 0.3] -> 2 * 0.7.
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert load_balancing_loss(probs, torch.tensor([[0], [0]]), 2).item() == pytest.approx(1.4)
    # E=3, k=2, 3 tokens: slots e0:2, e1:3, e2:1 of 6 -> f = [1/3, 1/2, 1/6]; P = [0.4, 0.4, 0.2].
    probs = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.5, 0.2], [0.4, 0.3, 0.3]])
    experts = torch.tensor([[0, 1], [1, 2], [0, 1]])
    want = 3 * (0.4 / 3 + 0.4 / 2 + 0.2 / 6)
    assert load_balancing_loss(probs, experts, 3).item() == pytest.approx(want)
    # perfectly uniform routing scores exactly 1
    uniform = torch.full((4, 4), 0.25)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4).item() == pytest.approx(1.0)


def test_z_loss_hand_checked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp: ln 2, ln 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_block_losses_have_router_gradient():
    block = make_block()
    _, aux, z, _, _ = block(torch.randn(20, DIM))
    (aux + z).backward()
    assert block.router.weight.grad.abs().sum() > 0
    assert block.experts.w1.grad is None


def test_grouped_mm_path_matches_loop():
    """The GPU path (torch._grouped_mm) checked on CPU where this torch has the kernel."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    block = make_block()
    x = torch.randn(30, DIM)
    counts = torch.tensor([9, 0, 13, 8])
    grads = []
    for path in ("grouped", "looped"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        try:
            y = block.experts._grouped(xi, counts) if path == "grouped" else block.experts._looped(xi, counts.tolist())
        except RuntimeError as e:
            pytest.skip(f"no CPU grouped_mm kernel: {e}")
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        grads.append((y.detach(), xi.grad, [p.grad.clone() for p in block.experts.parameters()]))
    (ya, xa, wa), (yb, xb, wb) = grads
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa, xb, atol=1e-5, rtol=1e-5)
    for a, b in zip(wa, wb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a[1].abs().sum() == 0  # expert 1 had no rows


def grads_of(block, x, fn):
    """Output and gradients (input, router, w1, w3, w2) of ``fn(block, x)`` against a fixed cotangent."""
    block.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = fn(block, xi)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    ex = block.experts
    return [y.detach(), xi.grad, block.router.weight.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad]


@pytest.mark.parametrize("top_k", [1, 2, E])
def test_dropless_gradients_equal_per_token_loop(top_k):
    """The single-node dropless kernel (custom backward) against autograd through the definition."""
    block = make_block(top_k=top_k)
    x = torch.randn(29, DIM)
    got = grads_of(block, x, lambda b, xi: b(xi)[0])
    want = grads_of(block, x, naive)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_eager_kernel_matches_compile_path(monkeypatch):
    """Under torch.compile dropless runs the traced per-expert loop; both paths must agree."""
    x, gate = route_to([(t % 3, (t + 1) % 3) for t in range(12)])  # expert 3 gets no rows
    block = make_block(top_k=2, dim=8)
    with torch.no_grad():
        block.router.weight.copy_(gate + 0.01 * torch.randn_like(gate))
    eager = grads_of(block, x, lambda b, xi: b(xi)[0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced = grads_of(block, x, lambda b, xi: b(xi)[0])
    for g, w in zip(eager, traced):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert eager[3][3].abs().sum() == 0 and eager[5][3].abs().sum() == 0  # unused expert: zero grads


def test_dropless_under_bf16_autocast():
    block = make_block(top_k=2)
    x = torch.randn(19, DIM)
    want = grads_of(block, x, lambda b, xi: b(xi)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(block, x, lambda b, xi: b(xi)[0])
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=0.1, rtol=0.05)


def test_routed_scale_multiplies_the_routed_sum():
    """``router.routed_scale`` (DeepSeek's routed_scaling_factor): weights sum to it; the output scales with it."""
    x = torch.randn(23, DIM)
    base, scaled = make_block(seed=4), MoEBlock(DIM, E, 2, HIDDEN, routed_scale=2.0)
    scaled.load_state_dict(base.state_dict())
    r = scaled.router(x)
    torch.testing.assert_close(r.weights.sum(-1), torch.full((23,), 2.0))
    y1, aux1, z1, c1, _ = base(x)
    y2, aux2, z2, c2, _ = scaled(x)
    torch.testing.assert_close(y2, 2 * y1, atol=1e-5, rtol=1e-5)
    assert torch.equal(c1, c2) and torch.equal(aux1, aux2) and torch.equal(z1, z2)  # routing itself unchanged
