"""Process-group lifecycle, device choice and model wrapping (DDP or FSDP2) for the trainer.

The same code path serves a plain ``python`` process (world of one, no process group: nothing to
launch, nothing to tear down, usable from a Prefect task or a test) and ``torchrun`` (``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment → one process group, gloo on CPU, NCCL on GPU).
Collective helpers degrade to no-ops in a world of one so the trainer never branches on it.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Parallelism = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, its device, and whether it created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives (no-ops in a world of one) -----------------------------------------------------
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks; returns ``t``."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from ``src`` on every rank (pickled by torch within the job only, never stored)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def check_same_on_all_ranks(env: DistEnv, value: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value`` (e.g. a config digest).

    Each node of a multi-node launch reads its own copy of the config; ranks that differ (another
    file version, different ``--set`` overrides) would train different models into one checkpoint.
    """
    if not env.distributed:
        return
    values: list[Any] = [None] * env.world_size
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(str(v), []).append(rank)
        raise ValueError(f"ranks were started with different {what}: " +
                         "; ".join(f"ranks {r} have {v[:16]}" for v, r in groups.items()))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is usable, else CPU. ``cuda`` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but no CUDA device is available")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join the torchrun process group if there is one; otherwise a world of one.

    A group that already exists (a caller initialized it) is used as is and left alone at
    teardown. gloo on CPU, NCCL on CUDA (each device's native collective backend); CUDA ranks
    bind their ``LOCAL_RANK`` device first so NCCL and allocations land on it.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = select_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (``auto``), fp32 on CPU: CPU bf16 matmuls are slow and change the numerics tests pin."""
    if dtype == "fp32":
        return None
    if dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def wrap_model(model: nn.Module, env: DistEnv, parallelism: Parallelism,
               param_dtype: torch.dtype | None = None, expert_parallel: int = 1) -> nn.Module:
    """DDP (replicated weights, gradient all-reduce) or FSDP2 (``fully_shard`` per block, then root).

    ``expert_parallel > 1`` first cuts every expert stack over a ``(dp, ep)`` mesh
    (``train.expert_parallel``); DDP or FSDP2 then handles only the other parameters (FSDP2 leaves
    the slices in fp32; they are cast to the compute dtype where used).
    In a world of one the model is returned as is. FSDP2 takes mixed precision through its own
    policy (bf16 all-gathers and compute, fp32 gradient reduction), so the trainer does not also
    autocast it. Blocks are sharded one by one so their parameters are gathered just in time and
    freed after use, which is where FSDP's memory saving comes from.
    """
    if parallelism not in ("ddp", "fsdp"):
        raise ValueError(f"parallelism must be 'ddp' or 'fsdp', got {parallelism!r}")
    if expert_parallel > 1:
        from .expert_parallel import build_mesh, check_degree, expert_modules, shard_experts

        n_experts = next((m.n_experts for _, m in expert_modules(model)), 0)
        check_degree(expert_parallel, env.world_size, n_experts)
        state = shard_experts(model, build_mesh(env.device.type, env.world_size, expert_parallel), env.world_size)
        # The expert slices are reduced by their own hooks (over dp only): DDP / FSDP2 leave them alone.
        ignored = {p for n, p in model.named_parameters() if n in set(state.expert_fqns)}
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, state.expert_fqns)
    else:
        ignored = None
    if not env.distributed:
        return model
    if parallelism == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (RoPE tables) are identical on every rank by construction: no per-step broadcast.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None, **no_buffer_sync)
    if parallelism == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        if param_dtype is not None and param_dtype != torch.float32:
            # Modules that must compute in fp32 (the MoE router: top-k on bf16-rounded gate weights
            # differs from fp32 on a few % of tokens) become units of their own whose parameters
            # are gathered in fp32; their block then manages only the remaining parameters.
            fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
            for m in model.modules():
                if getattr(m, "keep_fp32", False):
                    fully_shard(m, mesh=mesh, mp_policy=fp32, reshard_after_forward=False)
        blocks = list(getattr(model, "blocks", []))
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again right away by backward: keep them.
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1, ignored_params=ignored)
        fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
        return model
    raise ValueError(f"parallelism must be 'ddp' or 'fsdp', got {parallelism!r}")


def set_grad_sync(model: nn.Module, enabled: bool):
    """Context manager that skips the gradient reduction on non-final micro-batches.

    DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync``; otherwise nothing. Expert-parallel
    expert gradients (reduced outside DDP) follow the same switch.
    """
    ep = getattr(getattr(model, "module", model), "expert_parallel", None)
    if ep is not None:
        ep.sync = enabled
    if hasattr(model, "no_sync") and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
