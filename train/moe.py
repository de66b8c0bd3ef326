"""Sparse mixture-of-experts feed-forward: router, stacked SwiGLU experts, two dispatch modes.

Semantics follow Mixtral (softmax over all experts in fp32, top-k, top-k weights renormalized to sum
to one), times ``routed_scale`` (``router.routed_scale``, default top_k: see docs/training.md), which
export folds into each expert's ``w2``, so a trained model exports to ``MixtralForCausalLM``. Expert weights are stacked
3-D parameters rather than ``ModuleList``s: one tensor per projection shards, checkpoints and feeds
grouped/batched matmuls without per-expert bookkeeping.

Dispatch modes:

* ``dropless``: every (token, slot) pair is computed. Pairs are sorted by expert so each expert sees
  one contiguous segment. In eager mode on CPU (and on GPUs without a usable ``torch._grouped_mm``)
  permute → experts → weighted unpermute is one autograd node (``_DroplessExperts``) whose matmuls
  write straight into slices of shared buffers; on GPU ``torch._grouped_mm`` multiplies all segments
  at once where it works for the device/dtype/shape (probed once: CUDA bf16), and under
  ``torch.compile`` the plain per-expert loop is traced.
* ``capacity``: each expert takes at most ``ceil(capacity_factor * tokens * top_k / n_experts)``
  pairs, earlier tokens first; the rest are dropped (contribute zero). Shapes are static, so it
  runs as one ``bmm`` per projection and needs no host sync — the torch.compile-friendly mode.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ep_dispatch
from .ep_dispatch import EPGroup

Dispatch = Literal["dropless", "capacity"]


class SwiGLU(nn.Module):
    """Dense gated FFN ``w2(silu(w1 x) * w3 x)``: the dense layers and the optional shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------------------------- router


class Routing(NamedTuple):
    """One router decision for a flat batch of ``T`` tokens, all fp32 whatever the caller's autocast.

    A NamedTuple (a pytree node) rather than a dataclass so FSDP2's forward/backward hooks see the
    tensors inside when the router is sharded as its own unit (``distributed.wrap_model``).
    """

    logits: Tensor  # [T, E] fp32
    probs: Tensor  # [T, E] fp32, softmax over all experts
    weights: Tensor  # [T, k] fp32, top-k probs renormalized to sum 1, times the router's scale
    experts: Tensor  # [T, k] int64 expert ids, highest prob first


def load_balancing_loss(probs: Tensor, experts: Tensor, n_experts: int) -> Tensor:
    """Switch/Mixtral balance loss ``E * sum_e f_e * P_e``; equals 1 for perfectly uniform routing.

    ``f_e`` is the fraction of token-slots (``T * k`` of them) sent to expert ``e`` and carries no
    gradient; ``P_e`` is the mean router probability, through which the gradient flows. Normalizing
    ``f`` by slots rather than tokens keeps the optimum at 1 for any ``k`` (transformers' Mixtral
    normalizes by tokens, so its value is ``k`` times this one).
    """
    counts = expert_counts(experts, n_experts)
    with torch.autocast(probs.device.type, enabled=False):
        f = counts.float() / experts.numel()
        return n_experts * torch.sum(f * probs.float().mean(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss, mean of ``logsumexp(logits)^2``: keeps router logits small for bf16 stability."""
    with torch.autocast(logits.device.type, enabled=False):
        return torch.logsumexp(logits.float(), dim=-1).square().mean()


def expert_counts(experts: Tensor, n_experts: int) -> Tensor:
    """Token-slots per expert as int64 ``[E]``; scatter_add keeps it sync-free and deterministic."""
    flat = experts.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )


class Router(nn.Module):
    """Linear gate in fp32 → softmax → top-k → renormalize (Mixtral semantics) → × ``scale`` (routed_scale).

    Small logit differences decide routing, so the whole decision is fp32 on every path: autocast
    is switched off around it (autocast would otherwise run ``F.linear`` in bf16 even on fp32
    inputs; that flips the top-k of a few percent of tokens), and under FSDP2 mixed precision the
    router is its own FSDP unit with an fp32 parameter policy (``distributed.wrap_model``, which
    looks for ``keep_fp32``), so the gate is never rounded to bf16. Its cost is negligible
    (``dim × E`` per token).
    """

    keep_fp32 = True  # read by distributed.wrap_model: shard with an fp32 MixedPrecisionPolicy

    def __init__(self, dim: int, n_experts: int, top_k: int, jitter: float = 0.0, scale: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.jitter, self.scale = n_experts, top_k, jitter, scale
        self.weight = nn.Parameter(torch.empty(n_experts, dim))

    def forward(self, x: Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(x, self.weight.float())
            probs = logits.softmax(dim=-1)
            top_p, top_i = probs.topk(self.top_k, dim=-1)
            weights = top_p / top_p.sum(dim=-1, keepdim=True)
            return Routing(logits, probs, weights * self.scale if self.scale != 1.0 else weights, top_i)


# -------------------------------------------------------------------------------------------- experts


_GROUPED_MM_OK: dict[tuple[str, torch.dtype, int, int], bool] = {}


def _use_grouped_mm(device: torch.device, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    # A plain dict lookup so torch.compile traces through it after the first (eager) probe.
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False  # grouped_mm's meta kernel (needed to trace) accepts bf16 only
    key = (str(device), dtype, dim, hidden)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _grouped_mm_works(*key)
    return _GROUPED_MM_OK[key]


@torch.compiler.disable
def _grouped_mm_works(device: str, dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward correctly here.

    Kernels exist only for some device/dtype/alignment combinations and vary across torch
    releases, so instead of encoding a version table we try the real shapes once and compare with
    plain matmuls. Runs with grad on and autocast off whatever the caller's context (a probe under
    ``no_grad`` must not conclude "unsupported" for good).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    dev_type = torch.device(device).type
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(dev_type, enabled=False):
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(24, dim, generator=gen).to(device, dtype).requires_grad_()
            w = (torch.randn(3, hidden, dim, generator=gen) / math.sqrt(dim)).to(device, dtype).requires_grad_()
            offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
            y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
            y.float().square().sum().backward()
            ref = torch.cat([x[:8] @ w[0].T, x[8:] @ w[2].T])
            tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            ok = torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)
            return bool(ok and torch.isfinite(w.grad).all() and w.grad[1].abs().sum() == 0)
    except Exception:  # noqa: BLE001 — any failure means "use the loop"
        return False


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (grouped_mm and ``_DroplessExperts`` are not
    autocast-aware), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def dropless_path(device: torch.device, dtype: torch.dtype, dim: int, hidden: int, compiled: bool = False) -> str:
    """The dropless expert path ``MoEBlock`` takes on ``device`` computing in ``dtype``.

    ``grouped_mm`` (``torch._grouped_mm`` where the one-time probe says it works), ``compiled loop``
    (the per-expert loop traced by torch.compile) or ``fallback`` (the eager single-node kernel
    ``_DroplessExperts``). Mirrors the branches of ``MoEBlock._dropless`` and
    ``SwiGLUExperts.forward_sorted``; the trainer and bench/train_gpu.py print it once at start.
    """
    if compiled:  # traced: _use_grouped_mm answers False for anything but bf16 while compiling
        return "grouped_mm" if dtype == torch.bfloat16 and _use_grouped_mm(device, dtype, dim, hidden) else "compiled loop"
    if device.type != "cpu" and _use_grouped_mm(device, dtype, dim, hidden):
        return "grouped_mm"
    return "fallback"


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU experts as stacked weights: ``w1``/``w3`` ``[E, hidden, dim]``, ``w2`` ``[E, dim, hidden]``.

    Each ``[hidden, dim]`` slice has ``nn.Linear``'s weight layout, so per-expert export is a slice.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.dim, self.hidden, self.n_experts = dim, hidden, n_experts
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        # Set by ``train.expert_parallel.shard_experts``: then the stacks hold only this rank's
        # ``n_experts / ep.size`` experts and tokens reach them through ``train.ep_dispatch``.
        self.ep: EPGroup | None = None

    def forward_sorted(self, x: Tensor, counts: Tensor) -> Tensor:
        """Apply expert ``e`` to the ``counts[e]`` consecutive rows of ``x`` (rows sorted by expert)."""
        dtype = _compute_dtype(x)
        if _use_grouped_mm(x.device, dtype, self.dim, self.hidden):
            return self._grouped(x.to(dtype), counts)
        return self._looped(x, counts.tolist())

    def _grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(x.dtype).transpose(-2, -1) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(x, w1, offs=offs)) * torch._grouped_mm(x, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)

    def _looped(self, x: Tensor, counts: list[int]) -> Tensor:
        # unbind/split rather than w[e] / x[idx]: backward then builds each weight gradient with one
        # stack and the input gradient with one cat, instead of summing E full-size zero tensors
        # (transformers' eager loop pays that, quadratic in E).
        # .to: expert-parallel slices under FSDP2 stay fp32 while x arrives in its param dtype (no-op otherwise).
        w1, w3, w2 = (w.to(x.dtype).unbind(0) for w in (self.w1, self.w3, self.w2))
        outs = [
            F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
            for e, xe in enumerate(x.split(counts))
            if counts[e] > 0
        ]
        return torch.cat(outs) if outs else x.new_zeros(0, self.dim)

    def forward_padded(self, x: Tensor) -> Tensor:
        """Batched experts over a ``[E, C, dim]`` buffer (C slots each): one bmm per projection."""
        w1, w3, w2 = (w.to(x.dtype).transpose(1, 2) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch.bmm(x, w1)) * torch.bmm(x, w3)
        return torch.bmm(h, w2)


class _DroplessExperts(torch.autograd.Function):
    """Permute → ``E`` SwiGLU experts → weighted unpermute as a single autograd node.

    Autograd over the per-expert loop records ~10 nodes per expert; its backward stacks the weight
    gradients and concatenates the input gradients (extra full-size copies), and an ``index_add``
    unpermute is a scatter. Here each matmul writes straight into its expert's slice of one
    preallocated buffer, the elementwise SwiGLU runs once over all rows, and every permutation is a
    gather in both directions: token ``t``'s ``k`` outputs sit at rows ``inv[t*k:(t+1)*k]``, so the
    weighted combine is a batched ``[1, k] @ [k, dim]`` per token and the input gradient a gather
    plus a sum over ``k``. Same matmuls as the autograd loop; only the order of the ``k``-term sums
    differs. An expert with no rows needs no special case: a matmul over an empty dimension writes
    zeros, which is exactly its weight gradient.

    Keeps ``xs``, ``a = xs w1ᵀ``, ``b = xs w3ᵀ``, ``h = silu(a) b`` and the expert outputs for
    backward: one ``[rows, hidden]`` activation less than autograd keeps for the same loop, as
    ``silu(a)`` is recomputed (one elementwise pass, ~1 % of the step).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, order: Tensor,
                counts: list[int]) -> Tensor:
        # x [T, dim]; weights [T, k]; order [T*k]: pair ids (t*k + slot) sorted by expert;
        # counts[e]: rows of expert e. Inputs arrive in the compute dtype, so autocast stays out.
        n_tokens, k = weights.shape
        n, dim, hidden = order.numel(), x.shape[1], w1.shape[1]
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
        with torch.autocast(x.device.type, enabled=False):
            xs = x.index_select(0, order // k)
            a, b, ys = x.new_empty(n, hidden), x.new_empty(n, hidden), x.new_empty(n, dim)
            for e, (xe, ae, be) in enumerate(zip(xs.split(counts), a.split(counts), b.split(counts))):
                torch.mm(xe, w1[e].t(), out=ae)
                torch.mm(xe, w3[e].t(), out=be)
            h = F.silu(a).mul_(b)
            for e, (he, ye) in enumerate(zip(h.split(counts), ys.split(counts))):
                torch.mm(he, w2[e].t(), out=ye)
            y_pairs = ys.index_select(0, inv).view(n_tokens, k, dim)
            out = torch.bmm(weights.unsqueeze(1), y_pairs).squeeze(1)
        ctx.save_for_backward(xs, a, b, h, y_pairs, weights, order, inv, w1, w3, w2)
        ctx.counts = counts
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        xs, a, b, h, y_pairs, weights, order, inv, w1, w3, w2 = ctx.saved_tensors
        counts, (n_tokens, k) = ctx.counts, weights.shape
        grad_out = grad_out.contiguous()
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = torch.bmm(y_pairs, grad_out.unsqueeze(-1)).squeeze(-1)
        # dL/dys in sorted order: the token's output gradient times the pair's routing weight.
        g_ys = grad_out.index_select(0, order // k).mul_(weights.reshape(-1, 1).index_select(0, order))
        g1, g3, g2, g_h = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2), torch.empty_like(h)
        for e, (ge, he, ghe) in enumerate(zip(g_ys.split(counts), h.split(counts), g_h.split(counts))):
            torch.mm(ge.t(), he, out=g2[e])
            torch.mm(ge, w2[e], out=ghe)
        g_b = F.silu(a).mul_(g_h)
        g_a = torch.ops.aten.silu_backward(g_h.mul_(b), a)
        g_xs = torch.empty_like(xs)
        for e, (xe, gae, gbe, gxe) in enumerate(zip(*(t.split(counts) for t in (xs, g_a, g_b, g_xs)))):
            torch.mm(gae.t(), xe, out=g1[e])
            torch.mm(gbe.t(), xe, out=g3[e])
            if ctx.needs_input_grad[0]:
                torch.mm(gae, w1[e], out=gxe).addmm_(gbe, w3[e])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g_xs.index_select(0, inv).view(n_tokens, k, xs.shape[1]).sum(1)
        return grad_x, grad_weights, g1, g3, g2, None, None


# ------------------------------------------------------------------------------------------ MoE block


def capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert in capacity mode; never more than ``n_tokens`` (top-k ids are distinct)."""
    return min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


class MoEBlock(nn.Module):
    """Router + experts (+ optional shared expert) replacing the FFN of a transformer block.

    ``forward(x) -> (y, aux_loss, z_loss, expert_counts, dropped)``: ``expert_counts`` is int64
    ``[E]`` token-slots routed to each expert (before any drop), ``dropped`` an int64 scalar of
    token-slots that capacity dispatch discarded (always 0 when dropless).
    """

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        expert_hidden: int,
        shared_expert_hidden: int = 0,
        dispatch: Dispatch = "dropless",
        capacity_factor: float = 1.25,
        router_jitter: float = 0.0,
        routed_scale: float = 1.0,
    ):
        super().__init__()
        if dispatch not in ("dropless", "capacity"):
            raise ValueError(f"dispatch must be 'dropless' or 'capacity', got {dispatch!r}")
        self.dim, self.n_experts, self.top_k = dim, n_experts, top_k
        self.dispatch, self.capacity_factor = dispatch, capacity_factor
        self.router = Router(dim, n_experts, top_k, router_jitter, routed_scale)
        self.experts = SwiGLUExperts(dim, expert_hidden, n_experts)
        self.shared_expert = SwiGLU(dim, shared_expert_hidden) if shared_expert_hidden > 0 else None

    def dispatch_path(self, device: torch.device, dtype: torch.dtype, compiled: bool = False) -> str:
        """What computes the experts here: ``capacity`` (padded bmm) or the dropless path (:func:`dropless_path`)."""
        if self.dispatch == "capacity":
            return "capacity" if self.experts.ep is None else "capacity, expert parallel"
        if self.experts.ep is not None:  # all-to-all, then this rank's experts through forward_sorted
            grouped = _use_grouped_mm(torch.device(device), dtype, self.dim, self.experts.hidden)
            return f"{'grouped_mm' if grouped else 'loop'}, expert parallel"
        return dropless_path(torch.device(device), dtype, self.dim, self.experts.hidden, compiled)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        shape = x.shape
        x = x.reshape(-1, self.dim)
        r = self.router(x)
        counts = expert_counts(r.experts, self.n_experts)
        if self.dispatch == "dropless":
            y, dropped = self._dropless(x, r, counts), counts.new_zeros(())
        else:
            y, dropped = self._capacity(x, r, counts)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        aux = load_balancing_loss(r.probs, r.experts, self.n_experts)
        return y.reshape(shape), aux, router_z_loss(r.logits), counts, dropped

    def _dropless(self, x: Tensor, r: Routing, counts: Tensor) -> Tensor:
        n_tokens, k = r.experts.shape
        # Stable sort: within an expert, pairs stay in token order (same priority as capacity mode).
        order = torch.argsort(r.experts.reshape(-1), stable=True)
        ex, dtype = self.experts, _compute_dtype(x)
        if ex.ep is not None:  # expert parallel: rows travel to their experts' ranks and back
            token = order // k
            y_sorted = ep_dispatch.dropless(x.to(dtype).index_select(0, token), counts, ex.ep, ex.forward_sorted)
            w_sorted = r.weights.reshape(-1).index_select(0, order).to(y_sorted.dtype)
            return y_sorted.new_zeros(n_tokens, self.dim).index_add(0, token, y_sorted * w_sorted.unsqueeze(-1))
        if not torch.compiler.is_compiling() and (
            x.device.type == "cpu" or not _use_grouped_mm(x.device, dtype, self.dim, ex.hidden)
        ):
            w1, w3, w2, weights = (t.to(dtype) for t in (ex.w1, ex.w3, ex.w2, r.weights))
            return _DroplessExperts.apply(x.to(dtype), weights, w1, w3, w2, order, counts.tolist())
        token = order // k
        y_sorted = self.experts.forward_sorted(x.index_select(0, token), counts)
        w_sorted = r.weights.reshape(-1).index_select(0, order).to(y_sorted.dtype)
        return y_sorted.new_zeros(n_tokens, self.dim).index_add(0, token, y_sorted * w_sorted.unsqueeze(-1))

    def _capacity(self, x: Tensor, r: Routing, counts: Tensor) -> tuple[Tensor, Tensor]:
        n_tokens, k = r.experts.shape
        cap = capacity(n_tokens, k, self.n_experts, self.capacity_factor)
        order = torch.argsort(r.experts.reshape(-1), stable=True)
        starts = counts.cumsum(0) - counts
        # Buffer slot (e, c) holds the c-th pair routed to e in token order, if there is one.
        slot = torch.arange(cap, device=x.device)
        valid = slot.unsqueeze(0) < counts.unsqueeze(1)  # [E, C]
        src = torch.where(valid, starts.unsqueeze(1) + slot.unsqueeze(0), 0)
        pair = order.index_select(0, src.reshape(-1))  # [E*C] (token, slot) pair ids
        token = pair // k
        mask = valid.reshape(-1, 1)
        xb = (x.index_select(0, token) * mask).view(self.n_experts, cap, self.dim)
        ex = self.experts
        if ex.ep is None:
            yb = ex.forward_padded(xb).reshape(-1, self.dim)
        else:  # expert parallel: the static buffer travels in equal splits, no count exchange
            yb = ep_dispatch.padded(xb.to(_compute_dtype(x)), ex.ep, ex.forward_padded).reshape(-1, self.dim)
        w = (r.weights.reshape(-1).index_select(0, pair) * mask.squeeze(1)).to(yb.dtype).unsqueeze(-1)
        y = yb.new_zeros(n_tokens, self.dim).index_add(0, token, yb * w)
        return y, (counts - cap).clamp(min=0).sum()
