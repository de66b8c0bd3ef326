"""Expert statistics of an evaluation: per-layer router entropy and expert load.

Why a forward hook: the router's probabilities are not part of the model's output, so a hook on
each MoE block's router reads the :class:`Routing` it returns; nothing in the model changes.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .model import MoETransformer
from .moe import MoEBlock, Routing


class ExpertStats:
    """Accumulates, over the batches it is enabled for, per-layer router entropy and expert load.

    The router's probabilities are not part of the model's output, so a forward hook on each MoE
    block's router reads the :class:`Routing` it returns; nothing in the model changes.
    """

    def __init__(self, model: MoETransformer):
        self.blocks = [(i, b.ffn) for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoEBlock)]
        n_exp = model.cfg.n_experts
        self.layers = [i for i, _ in self.blocks]
        self.entropy_sum = [0.0] * len(self.blocks)
        self.prob_sum = torch.zeros(len(self.blocks), n_exp, dtype=torch.float64)
        self.tokens = [0] * len(self.blocks)
        self.counts = torch.zeros(len(self.blocks), n_exp, dtype=torch.long)
        self.dropped = 0
        self.top_k = model.cfg.top_k
        self.n_experts = n_exp
        self.enabled = False
        self._handles = [blk.router.register_forward_hook(self._hook(j)) for j, (_, blk) in enumerate(self.blocks)]

    def _hook(self, j: int):
        def hook(_module, _inputs, out: Routing) -> None:
            if not self.enabled:
                return
            p = out.probs.detach().double()
            self.entropy_sum[j] += float(-(p * p.clamp_min(1e-30).log()).sum())
            self.prob_sum[j] += p.sum(0).cpu()
            self.tokens[j] += p.shape[0]
        return hook

    def add_output(self, expert_counts: torch.Tensor, dropped: torch.Tensor) -> None:
        if self.enabled and expert_counts.numel():
            self.counts += expert_counts.detach().cpu()
            self.dropped += int(dropped)

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def summary(self) -> dict[str, Any]:
        counts = self.counts.double()
        mean = counts.mean(dim=1)
        cv = (counts.std(dim=1, unbiased=False) / mean.clamp_min(1e-12)).tolist() if counts.numel() else []
        ent = [s / t if t else math.nan for s, t in zip(self.entropy_sum, self.tokens)]
        slots = sum(self.tokens) * self.top_k
        return {
            "layers": self.layers,
            "tokens_per_expert": self.counts.tolist(),
            "cv": cv,
            "router_entropy": ent,
            "router_entropy_norm": [e / math.log(self.n_experts) if self.n_experts > 1 else math.nan for e in ent],
            "mean_router_prob": [(self.prob_sum[j] / max(1, t)).tolist() for j, t in enumerate(self.tokens)],
            "dropped_slots": self.dropped,
            "dropped_fraction": self.dropped / slots if slots else 0.0,
        }


@contextmanager
def collecting(stats: ExpertStats) -> Iterator[None]:
    stats.enabled = True
    try:
        yield
    finally:
        stats.enabled = False
