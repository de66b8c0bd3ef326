"""Token dispatch for expert parallelism: all-to-all to the experts' ranks and back, with autograd.

An EP group of ``ep`` ranks holds ``E`` experts, ``E / ep`` consecutive ones per rank (rank ``j``
holds experts ``j·E/ep … (j+1)·E/ep - 1``). Every rank routes its own tokens over all ``E``
experts exactly as without EP; only where an expert's matmuls run changes:

* **dropless**: the (token, slot) rows, already sorted by expert, are contiguous per destination
  rank. The per-expert row counts are exchanged first (one small ``all_to_all_single``), then the
  rows travel with uneven splits, are grouped by local expert, run through the local experts, and
  travel back by the reverse all-to-all into the sender's sorted order.
* **capacity**: the ``[E, C, dim]`` buffer of each rank has static shape, so it travels in equal
  splits with no count exchange and no host sync; the expert rank sees ``[E/ep, ep·C, dim]``.

Both directions are differentiable (``_AllToAll``: the backward of a dispatch is the reverse
dispatch of the gradients), so each rank's loss reaches the experts on other ranks. This module
holds no model code (``train.moe`` calls it; ``train.expert_parallel`` sets the groups up).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class EPGroup:
    """Where a sharded expert stack sits: its EP process group, size, and this rank's place in it."""

    group: dist.ProcessGroup
    size: int
    rank: int
    n_experts: int  # global expert count E

    @property
    def n_local(self) -> int:
        return self.n_experts // self.size

    @property
    def first(self) -> int:
        """Global id of this rank's first expert."""
        return self.rank * self.n_local


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x: Tensor, out_splits: list[int] | None, in_splits: list[int] | None, group: dist.ProcessGroup) -> Tensor:
    x = x.contiguous()
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_to_all(x: Tensor, out_splits: list[int] | None, in_splits: list[int] | None, ep: EPGroup) -> Tensor:
    """Differentiable all-to-all along dim 0 (``None`` splits = equal)."""
    return _AllToAll.apply(x, out_splits, in_splits, ep.group)


def dropless(xs: Tensor, counts: Tensor, ep: EPGroup, experts: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Expert outputs for rows ``xs`` sorted by global expert (``counts[e]`` rows of expert ``e``).

    ``experts(rows, local_counts)`` applies this rank's experts to rows grouped by local expert.
    Returns rows in ``xs``'s order. One host sync: the split sizes, which the all-to-all needs.
    """
    send = counts.view(ep.size, ep.n_local)  # [dest rank, its local expert]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.reshape(-1).contiguous(), group=ep.group)  # recv[src, local expert]
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    xr = all_to_all(xs, recv_splits, send_splits, ep)  # [src0: e0 e1 …, src1: e0 e1 …, …]
    # Group the received rows by local expert (stable: within an expert, source rank order).
    local_id = torch.arange(ep.n_local, device=xs.device).repeat(ep.size).repeat_interleave(recv.reshape(-1))
    perm = torch.argsort(local_id, stable=True)
    y_local = experts(xr.index_select(0, perm), recv.sum(0))
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    yr = y_local.index_select(0, inv)  # back to received order: a gather both ways, as in train.moe
    return all_to_all(yr, send_splits, recv_splits, ep)


def padded(xb: Tensor, ep: EPGroup, experts: Callable[[Tensor], Tensor]) -> Tensor:
    """Expert outputs for a static ``[E, C, dim]`` buffer; ``experts`` maps ``[E/ep, ep·C, dim]`` likewise."""
    e, c, dim = xb.shape
    xr = all_to_all(xb, None, None, ep)  # [src, local expert, C, dim], flattened along dim 0
    xr = xr.view(ep.size, ep.n_local, c, dim).transpose(0, 1).reshape(ep.n_local, ep.size * c, dim)
    yl = experts(xr)
    yr = yl.view(ep.n_local, ep.size, c, dim).transpose(0, 1).reshape(e, c, dim)
    return all_to_all(yr, None, None, ep)
