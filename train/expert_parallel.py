"""Expert parallelism (``train.trainer.expert_parallel: N``): the dp × ep mesh, expert sharding,
expert-gradient reduction, global gradient clipping and checkpoint-side global views.

Layout. ``world = dp × ep`` ranks on a 2-D mesh ``("dp", "ep")``; rank ``r`` sits at
``(r // ep, r % ep)``, so an EP group is ``ep`` consecutive ranks — inside one node whenever
``nproc_per_node`` is a multiple of ``ep`` (all-to-all stays on the fast intra-node links). Every
rank reads its own data (the loader is sharded over the whole world, as without EP).

* Expert stacks (``w1``/``w3``/``w2`` of every ``SwiGLUExperts``) are cut on dim 0: rank ``j`` of an
  EP group keeps experts ``j·E/ep … (j+1)·E/ep - 1``. The ``dp`` ranks with the same ep coordinate
  hold the same slice.
* Everything else (attention, norms, router, embeddings, shared expert) is replicated and reduced
  over the whole world by DDP (or sharded over it by FSDP2), exactly as without EP; both are told
  to ignore the expert stacks, which stay plain fp32 tensors (cast where used).
* An expert slice's gradient already sums the contributions of every rank of its EP group (the
  all-to-all backward brings them home); adding the ``dp`` replicas (all-reduce over the dp group)
  and dividing by the world size gives DDP's average over all ranks — the gradient an EP=1 run
  computes. This happens in a post-accumulate-grad hook on the final micro-batch only.
* The gradient norm for clipping adds the expert slices' squared norms over the EP group to the
  replicated part's, so clipping equals EP=1's.
* Router statistics need nothing: each rank routes its own tokens over all ``E`` experts as
  without EP, so aux/z losses and expert counts are per-rank values the trainer all-reduces, equal
  to the EP=1 run's.

Checkpoints see expert slices as ``DTensor``s ``Shard(0)`` over the ep mesh (``global_view``), so
DCP stores each expert once under its global position and a run resumes at any EP degree (or in a
single process for evaluation).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ep_dispatch import EPGroup
from .moe import SwiGLUExperts

EXPERT_PARAMS = ("w1", "w3", "w2")


@dataclass
class ExpertParallel:
    """EP state attached to the (unwrapped) model as ``model.expert_parallel``."""

    mesh: Any  # DeviceMesh ("dp", "ep")
    ep: EPGroup
    dp_group: dist.ProcessGroup
    dp_size: int
    world_size: int
    expert_fqns: list[str] = field(default_factory=list)  # "blocks.0.ffn.experts.w1", …
    sync: bool = True  # False on non-final micro-batches (``distributed.set_grad_sync``)

    @property
    def ep_mesh(self) -> Any:
        return self.mesh["ep"]

    def _reduce_grad(self, p: Tensor) -> None:
        if not self.sync or p.grad is None:
            return
        if self.dp_size > 1:
            dist.all_reduce(p.grad, group=self.dp_group)
        p.grad.div_(self.world_size)


def check_degree(ep: int, world_size: int, n_experts: int) -> None:
    """One-line errors for degrees that cannot shard (before any collective is started)."""
    if ep < 1:
        raise ValueError(f"trainer.expert_parallel must be >= 1, got {ep}")
    if world_size % ep:
        raise ValueError(f"trainer.expert_parallel={ep} must divide the number of processes ({world_size}); "
                         "launch with --nproc (x --nnodes) a multiple of it")
    if n_experts % ep:
        raise ValueError(f"trainer.expert_parallel={ep} must divide model.n_experts={n_experts}")


def build_mesh(device_type: str, world_size: int, ep: int) -> Any:
    """The ``(dp, ep)`` device mesh; every rank must call it (it creates the subgroups)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def expert_modules(model: nn.Module) -> Iterator[tuple[str, SwiGLUExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, SwiGLUExperts):
            yield name, m


def shard_experts(model: nn.Module, mesh: Any, world_size: int) -> ExpertParallel:
    """Keep this rank's slice of every expert stack, hook the expert-gradient reduction, attach the state.

    ``model`` must hold the full, identically initialized stacks on every rank (the trainer seeds
    all ranks alike), so the slices equal the EP=1 model's experts.
    """
    ep_mesh, dp_mesh = mesh["ep"], mesh["dp"]
    n_experts = next((m.n_experts for _, m in expert_modules(model)), 0)
    group = EPGroup(ep_mesh.get_group(), ep_mesh.size(), ep_mesh.get_local_rank(), n_experts)
    state = ExpertParallel(mesh, group, dp_mesh.get_group(), dp_mesh.size(), world_size)
    for name, m in expert_modules(model):
        if m.n_experts != n_experts:
            raise ValueError("expert parallelism needs the same n_experts in every MoE layer")
        lo, hi = group.first, group.first + group.n_local
        for pname in EXPERT_PARAMS:
            full = getattr(m, pname)
            local = nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad)
            setattr(m, pname, local)
            local.register_post_accumulate_grad_hook(state._reduce_grad)
            state.expert_fqns.append(f"{name}.{pname}" if name else pname)
        m.ep = group
    model.expert_parallel = state
    return state


def state_of(model: nn.Module) -> ExpertParallel | None:
    """The EP state of a (possibly DDP-wrapped) model, or None without EP."""
    return getattr(getattr(model, "module", model), "expert_parallel", None)


# ------------------------------------------------------------------------------- gradient clipping


def clip_grad_norm(model: nn.Module, max_norm: float) -> Tensor:
    """``clip_grad_norm_`` over the global model: expert slices' squares summed over the EP group.

    Without EP this is ``torch.nn.utils.clip_grad_norm_`` (FSDP2's DTensor norm included).
    """
    st = state_of(model)
    if st is None:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    expert_ids = {id(p) for _, m in expert_modules(model) for p in (m.w1, m.w3, m.w2)}
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    dense = [p.grad for p in params if id(p) not in expert_ids]
    experts = [p.grad for p in params if id(p) in expert_ids]
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros(2, dtype=torch.float32, device=device)
    if dense:  # replicated (DDP) or FSDP2 shards, whose norm is a DTensor: its full value is global
        n = torch.nn.utils.get_total_norm(dense)
        sq[0] = (n.full_tensor() if hasattr(n, "full_tensor") else n).float().square()
    if experts:
        sq[1] = torch.nn.utils.get_total_norm(experts).float().square()
    part = sq[1:].clone()
    dist.all_reduce(part, group=st.ep.group)
    total = (sq[0] + part[0]).sqrt()
    if max_norm < float("inf"):
        for group in (dense, experts):  # apart: one foreach call cannot mix DTensors and tensors
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


# ------------------------------------------------------------------------------ checkpoint views


def global_view(sd: dict[str, Any], model: nn.Module, *, optimizer: bool = False) -> dict[str, Any]:
    """Expert slices of a model (or flattened optimizer ``state``) dict as global ``DTensor``s.

    The DTensors share storage with the live slices, so ``dcp.load`` into this view loads in place;
    ``local_view`` undoes the wrapping before ``set_state_dict``. Without EP, ``sd`` is returned as is.
    """
    st = state_of(model)
    if st is None:
        return sd
    from torch.distributed.tensor import DTensor, Shard

    def wrap(t: Any) -> Any:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return t  # AdamW's step counter: a replicated scalar
        shape = torch.Size((t.shape[0] * st.ep.size, *t.shape[1:]))
        return DTensor.from_local(t, st.ep_mesh, [Shard(0)], run_check=False, shape=shape, stride=_contiguous_stride(shape))

    out = dict(sd)
    for fqn in st.expert_fqns:
        if fqn in out:
            v = out[fqn]
            out[fqn] = {k: wrap(x) for k, x in v.items()} if optimizer and isinstance(v, dict) else wrap(v)
    return out


def local_view(sd: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``global_view``: every ``DTensor`` replaced by its local slice."""
    from torch.distributed.tensor import DTensor

    def unwrap(v: Any) -> Any:
        if isinstance(v, DTensor):
            return v.to_local()
        if isinstance(v, dict):
            return {k: unwrap(x) for k, x in v.items()}
        return v

    return {k: unwrap(v) for k, v in sd.items()}


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))
