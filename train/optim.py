"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule.

Why no decay on norms, biases and embeddings: decay pulls weights toward zero, which for a norm's
gain or a bias is a bias toward a degenerate function rather than regularization, and for an
embedding table it shrinks rare tokens' rows (updated rarely, decayed every step) — GPT-3/LLaMA
practice. Expert and router weights are matrices and are decayed.

Why the schedule is a pure function of the step rather than a stateful torch scheduler: the
learning rate of step ``n`` is then identical whether the run was interrupted or not, and the
checkpointed "scheduler state" is just the step (plus the shape, to notice a changed schedule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (≥2-D weights but embeddings) and ``no_decay`` (the rest).

    A tied LM head shares the embedding's parameter; ``named_parameters`` yields it once, as the
    embedding, so it is not decayed either.
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embedding_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; fused kernels when ``cfg.fused`` allows and the device has them.

    ``fused=None`` tries the fused implementation (one kernel over all parameters: CUDA and, in
    recent torch, CPU) and falls back to ``foreach`` when this torch/device/param type refuses it.
    Either is deterministic; they differ from each other in the last bits, so a run keeps one.
    """
    groups = param_groups(model, cfg.weight_decay)
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if len({hasattr(p, "full_tensor") for p in model.parameters()}) > 1:
        # FSDP2 DTensors next to plain tensors (expert-parallel slices): the fused and foreach
        # kernels take one kind per call, so update parameter by parameter.
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)
    if cfg.fused is False:
        return torch.optim.AdamW(groups, foreach=True, **kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError) as exc:
        if cfg.fused:
            raise RuntimeError(f"optim.fused=true but fused AdamW is unavailable on {device}: {exc}") from exc
        return torch.optim.AdamW(groups, foreach=True, **kw)


@dataclass
class WarmupCosine:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, cosine decay to ``min_lr_ratio·peak`` at ``total_steps``.

    Steps are 1-based optimizer steps: ``lr_at(1)`` is the learning rate of the first update.
    After ``total_steps`` (a run extended past its schedule) the floor is kept.
    """

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    @classmethod
    def from_config(cls, cfg: OptimConfig, total_steps: int) -> WarmupCosine:
        return cls(cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)

    def lr_at(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"optimizer steps are 1-based, got {step}")
        if self.warmup_steps > 0 and step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        floor = self.peak_lr * self.min_lr_ratio
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        return floor + (self.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr_ratio": self.min_lr_ratio}

    def differs_from(self, saved: dict[str, Any]) -> list[str]:
        """Schedule fields that differ from a checkpoint's (resuming with a new schedule is allowed, but said)."""
        mine = self.state_dict()
        return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
