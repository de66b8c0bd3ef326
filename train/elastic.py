"""The global batch across a world-size change: which gradient accumulation keeps it.

A step's global batch is ``batch_size × grad_accum × world_size`` sequences. The learning rate,
the warmup and AdamW's moments were all tuned to it, so a run resumed on fewer or more ranks with
the same per-rank settings would silently train another recipe (half the ranks: half the batch,
twice the gradient noise per step, the same learning rate). The loader's position is a count of
global samples and its order does not depend on the world size (``train.data``), so keeping the
global batch by changing the accumulation keeps even the samples of each step: rank ``r`` of ``w``
takes chunks ``r, r+w, …`` of the global stream, and ``accum × w`` chunks of ``batch_size`` cover the
same ``G`` samples whatever ``w`` is. The loss curve then continues as if nothing had changed, up to
the order in which partial gradients are summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class GlobalBatchError(ValueError):
    """The checkpoint's global batch cannot be kept on this world size with this per-rank batch."""


@dataclass(frozen=True)
class BatchPlan:
    """Per-rank batch × accumulation × ranks, as recorded in a checkpoint's ``meta.json``."""

    batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def to_json(self) -> dict[str, int]:
        return {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "world_size": self.world_size,
                "global_batch": self.global_batch}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> BatchPlan | None:
        if not d:
            return None
        return cls(int(d["batch_size"]), int(d["grad_accum"]), int(d["world_size"]))

    def describe(self) -> str:
        return (f"{self.global_batch} sequences ({self.batch_size} per rank x {self.grad_accum} accumulated "
                f"x {self.world_size} rank{'s' if self.world_size != 1 else ''})")


def resume_grad_accum(saved: BatchPlan | None, batch_size: int, grad_accum: int, world_size: int,
                      keep_global_batch: bool = True) -> tuple[int, str | None]:
    """The gradient accumulation to resume with, and a note to print when it differs from the config.

    Only a change of world size triggers an adjustment: on the same world size the configured
    ``grad_accum`` (and ``batch_size``) is the user's choice, changed or not. Where ``saved``'s global
    batch is not a multiple of ``batch_size × world_size``, raises :class:`GlobalBatchError` with the
    settings that would work.
    """
    if saved is None or not keep_global_batch or saved.world_size == world_size:
        return grad_accum, None
    g = saved.global_batch
    per_step = batch_size * world_size
    if g % per_step == 0:
        accum = g // per_step
        if accum == grad_accum:
            return accum, None
        return accum, (f"world size {saved.world_size} -> {world_size}: grad_accum {grad_accum} -> {accum} keeps the "
                       f"checkpoint's global batch of {saved.describe()}")
    raise GlobalBatchError(_impossible(saved, batch_size, world_size))


def _impossible(saved: BatchPlan, batch_size: int, world_size: int) -> str:
    g = saved.global_batch
    head = (f"the checkpoint was trained with a global batch of {saved.describe()}; on {world_size} "
            f"rank{'s' if world_size != 1 else ''} with train.data.batch_size={batch_size} no whole grad_accum gives "
            f"{g} ({g} / ({batch_size} x {world_size}) = {g / (batch_size * world_size):.3g})")
    fixes = []
    if g % world_size == 0:
        per_rank = g // world_size
        sizes = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
        near = sorted(sizes, key=lambda b: (abs(b - batch_size), -b))[:3]
        fixes.append("set " + " or ".join(f"train.data.batch_size={b} (grad_accum {per_rank // b})" for b in sorted(near)))
    else:
        worlds = [w for w in range(1, g + 1) if g % w == 0 and w <= max(2 * world_size, saved.world_size)]
        fixes.append(f"run on a world size that divides {g} (e.g. {', '.join(map(str, worlds[-4:]))})")
    fixes.append("or set train.trainer.keep_global_batch=false to continue with another global batch")
    return f"{head}: {'; '.join(fixes)}"


__all__ = ["BatchPlan", "GlobalBatchError", "resume_grad_accum"]
