"""Training checkpoints with torch.distributed.checkpoint (DCP) under the dataset root.

Layout (``<root>`` is any fsspec URI the Storage reaches)::

    <root>/runs/<run>/checkpoints/step-<n>/.metadata         DCP metadata (rank 0)
    <root>/runs/<run>/checkpoints/step-<n>/__<r>_0.distcp    DCP tensor data, one file per rank
    <root>/runs/<run>/checkpoints/step-<n>/meta.json         step, model config + digest, loader,
                                                             schedule, optimizer hyper-parameters
    <root>/runs/<run>/checkpoints/step-<n>/rng-rank<r>.json  RNG states of rank r
    <root>/runs/<run>/checkpoints/latest                     "step-<n>", written last

Why a pointer written last: DCP writes many files and no object store renames a directory
atomically, so a step directory is never trusted by itself. ``latest`` is published (one atomic
write) only after every rank's files and ``meta.json`` are complete, and older step directories
are pruned only after that; a crash at any point leaves the previous ``latest`` valid. Directories
that no pointer ever named are leftovers and get replaced or pruned.

Why only tensors go through DCP: DCP stores non-tensor values with ``torch.save`` and loads them
with ``torch.load(weights_only=False)``, i.e. unpickles them. Everything that is not a tensor
(optimizer hyper-parameters, loader position, RNG states, the schedule) is JSON here, tensor data
is read by DCP with ``weights_only=True``, and DCP's own ``.metadata`` (a pickle by design) is read
with an unpickler that only admits DCP's metadata classes — a checkpoint on a shared bucket is
data, never code.

Why model and optimizer go through ``get_state_dict``/``set_state_dict``: they produce
fully-qualified, wrapper-free keys and sharded (DTensor) values under FSDP2, so a checkpoint saved
by DDP on 2 ranks loads on FSDP2 on 4, or in one process for evaluation.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import random
import re
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import StorageMeta

from shardflow.storage import Storage
from shardflow.storage.layout import run_ref
from shardflow.storage.lock import LockHeld, LockLost
from shardflow.storage.store import StorageError

from .distributed import DistEnv
from .expert_parallel import global_view, local_view
from .model_config import model_config_digest

FORMAT_VERSION = 1
LATEST = "latest"
META = "meta.json"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or belongs to another configuration; the message names it."""


def checkpoints_ref(run: str) -> str:
    return f"{run_ref(run)}/checkpoints"


def step_name(step: int) -> str:
    return f"step-{step}"


# -- DCP readers/writers over Storage ----------------------------------------------------------------

_DCP_MODULES = {"torch.distributed.checkpoint.metadata"}
_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes DCP metadata is made of, torch dtypes/sizes and paths; anything else is refused.

    From DCP's metadata module only classes defined there are taken (not, say, the ``torch`` or
    ``os`` modules it imports, whose attributes a crafted pickle could then overwrite).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata references {module}.{name}, which is not DCP metadata")


def _safe_read_metadata(reader: Any, rank: int | None) -> Any:
    path = reader._get_metadata_path(rank)
    with reader.fs.create_stream(path, "rb") as f:
        metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


class _SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        return _safe_read_metadata(self, kwargs.get("rank"))


def _fsspec_classes():
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    class _SafeFsspecReader(FsspecReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return _safe_read_metadata(self, kwargs.get("rank"))

    return FsspecWriter, _SafeFsspecReader


def _writer(storage: Storage, ref: str):
    uri = storage.uri(ref)
    proto = storage.protocol_of(ref)
    if proto == "file":
        return dcp.FileSystemWriter(uri, single_file_per_rank=True, sync_files=True, overwrite=True)
    writer_cls, _ = _fsspec_classes()
    return writer_cls(uri, single_file_per_rank=True, sync_files=False, overwrite=True,
                      **storage.config.fsspec_options(proto))


def _reader(storage: Storage, ref: str):
    uri = storage.uri(ref)
    proto = storage.protocol_of(ref)
    if proto == "file":
        return _SafeFileSystemReader(uri)
    _, reader_cls = _fsspec_classes()
    return reader_cls(uri, **storage.config.fsspec_options(proto))


def _no_dist() -> bool:
    """DCP runs without collectives in a plain process (the supported single-process mode)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load even when told ``no_dist``; that is our normal case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        yield


# -- RNG state as JSON --------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def capture_rng() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states, JSON-able."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- listing ---------------------------------------------------------------------------------------

def _subdirs(storage: Storage, ref: str) -> list[str]:
    fs, path = storage.resolve(ref)
    try:
        entries = fs.ls(path, detail=True, refresh=True) if not storage.is_local else fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    raise TypeError(f"not JSON-serializable in a checkpoint: {type(o).__name__}")


def _to_json(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=_json_default))


def _dict_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _dict_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {a!r} vs config {b!r}"]


def read_meta(storage: Storage, ckpt_ref: str) -> dict[str, Any]:
    """``meta.json`` of a step directory; a clear error if it is absent or unreadable."""
    ref = f"{ckpt_ref.rstrip('/')}/{META}"
    try:
        meta = storage.read_json(ref)
    except FileNotFoundError:
        raise CheckpointError(f"{storage.uri(ckpt_ref)}: not a complete checkpoint ({META} is missing)") from None
    except (ValueError, OSError, StorageError) as exc:
        raise CheckpointError(f"{storage.uri(ref)}: unreadable checkpoint metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{storage.uri(ref)}: unsupported checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def check_model_config(meta: dict[str, Any], model_config: dict[str, Any], where: str) -> None:
    """Refuse to load weights into a model of another shape: name every field that differs."""
    if meta.get("model_config_digest") == model_config_digest(model_config):
        return
    diffs = _dict_diff(meta.get("model_config", {}), model_config) or ["(digest differs)"]
    raise CheckpointError(f"{where}: checkpoint was written for a different model config: " + "; ".join(diffs))


class Checkpointer:
    """Save, commit, find and load the checkpoints of one run. Every rank constructs one.

    ``save`` is collective (all ranks call it); ``commit`` publishes ``latest`` and prunes (rank 0
    does the writing). Callers make anything else durable between the two — the trainer flushes
    the metrics log there so that it always covers the committed step.
    """

    def __init__(self, storage: Storage, run: str, keep_last: int = 3, env: DistEnv | None = None):
        self.storage = storage
        self.run = run
        self.keep_last = keep_last
        self.env = env or DistEnv()
        self.dir_ref = checkpoints_ref(run)
        self.fence: Any = None  # set on every rank: raises on rank 0 once the run lease is lost (train/lease.py)

    def _check_fence(self) -> None:
        """Stop every rank together, before anything is written, if rank 0's run lease is lost."""
        if self.fence is None:
            return
        error = None
        if self.env.is_main:
            try:
                self.fence()
            except LockHeld as exc:
                error = str(exc)
        error = self.env.broadcast_object(error)
        if error:
            raise LockLost(error)

    def step_ref(self, step: int) -> str:
        return f"{self.dir_ref}/{step_name(step)}"

    # -- discovery ----------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The committed step ``latest`` names, or None when the run has no checkpoint yet."""
        ref = f"{self.dir_ref}/{LATEST}"
        try:
            text = self.storage.read_text(ref).strip()
        except FileNotFoundError:
            return None
        m = _STEP_DIR.fullmatch(text)
        if not m:
            raise CheckpointError(f"{self.storage.uri(ref)}: expected 'step-<n>', found {text[:60]!r}")
        step = int(m.group(1))
        if not self.storage.exists(f"{self.step_ref(step)}/{META}"):
            raise CheckpointError(f"{self.storage.uri(ref)} names {text} but {self.storage.uri(self.step_ref(step))} "
                                  f"is not a complete checkpoint (no {META}); restore it or remove the pointer")
        return step

    def step_dirs(self) -> list[int]:
        """Steps that have a directory (committed or not), ascending."""
        steps = []
        for name in _subdirs(self.storage, self.dir_ref):
            m = _STEP_DIR.fullmatch(name)
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    # -- save ---------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
             rank_state: dict[str, Any] | None = None) -> str:
        """Write step ``step``'s directory (not yet visible as ``latest``); returns its ref."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        ref = self.step_ref(step)
        self._check_fence()
        if self.env.is_main:
            self.storage.remove(ref, recursive=True)  # leftovers of an uncommitted attempt
        self.env.barrier()
        msd, osd = get_state_dict(model, optimizer)
        # Expert-parallel slices as global DTensors: each expert is stored once at its global position.
        tensors = {"model": global_view(msd, model), "optim": global_view(osd["state"], model, optimizer=True)}
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=_writer(self.storage, ref), no_dist=_no_dist())
        if rank_state is not None:
            self.storage.write_json(f"{ref}/rng-rank{self.env.rank}.json", rank_state)
        self.env.barrier()
        if self.env.is_main:
            full = dict(meta, format=FORMAT_VERSION, step=step, run=self.run, world_size=self.env.world_size,
                        optimizer_param_groups=osd["param_groups"])
            self.storage.write_json(f"{ref}/{META}", _to_json(full))
        self.env.barrier()
        return ref

    def commit(self, step: int) -> None:
        """Publish ``latest`` = step (atomically), then prune; rank 0 only does the writing."""
        if not self.env.is_main:
            return
        if self.fence is not None:
            self.fence()  # a trainer that lost its run lease never publishes a step
        self.storage.write_text(f"{self.dir_ref}/{LATEST}", step_name(step) + "\n")
        self.prune(step)

    def prune(self, current: int) -> list[int]:
        """Delete committed steps beyond the newest ``keep_last`` and any uncommitted dir past ``current``."""
        steps = self.step_dirs()
        older = [s for s in steps if s <= current]
        doomed = [s for s in steps if s > current]
        if self.keep_last > 0:
            doomed += older[: max(0, len(older) - self.keep_last)]
        for s in sorted(doomed):
            if s != current:
                self.storage.remove(self.step_ref(s), recursive=True)
        return sorted(s for s in doomed if s != current)

    # -- load ---------------------------------------------------------------------------------------
    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             model_config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore model (and optimizer) in place from step ``step``; returns (meta, this rank's RNG state)."""
        ref = self.step_ref(step)
        meta = read_meta(self.storage, ref)
        check_model_config(meta, model_config, self.storage.uri(ref))
        load_state(self.storage, ref, model, optimizer, meta)
        rng_ref = f"{ref}/rng-rank{self.env.rank}.json"
        rank_state = None
        if meta.get("world_size") == self.env.world_size and self.storage.exists(rng_ref):
            rank_state = self.storage.read_json(rng_ref)
        return meta, rank_state


def load_state(storage: Storage, ckpt_ref: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               meta: dict[str, Any]) -> None:
    """DCP-load model (+ optimizer) tensors from a step directory into live (possibly wrapped) objects.

    Any failure (missing or truncated files, shape mismatch, refused metadata) becomes a
    :class:`CheckpointError` naming the checkpoint, with credentials scrubbed from the message.
    """
    try:
        with _quiet_single_process():
            _load_state(storage, ckpt_ref, model, optimizer, meta)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 — all mean "this checkpoint won't load"
        msg = _describe(exc)
        for secret in storage.config.secrets():
            msg = msg.replace(secret, "***")
        raise CheckpointError(f"{storage.uri(ckpt_ref)}: cannot load checkpoint: {msg}") from None


def _describe(exc: BaseException) -> str:
    """One line per failing rank instead of DCP's remote tracebacks."""
    if isinstance(exc, CheckpointException):
        parts = []
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {type(inner).__name__}: {inner}")
        return "; ".join(parts) or str(exc)
    return f"{type(exc).__name__}: {exc}"


def _load_state(storage: Storage, ckpt_ref: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                meta: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    reader = _reader(storage, ckpt_ref)
    if optimizer is None:
        msd = global_view(get_model_state_dict(model), model)
        dcp.load({"model": msd}, storage_reader=reader, no_dist=_no_dist())
        set_model_state_dict(model, local_view(msd), options=StateDictOptions(strict=True))
        return
    msd, osd = get_state_dict(model, optimizer)  # materializes empty optimizer state to load into
    # Expert slices are loaded through global views (any saved EP degree → this one), in place.
    msd, state = global_view(msd, model), global_view(osd["state"], model, optimizer=True)
    dcp.load({"model": msd, "optim": state}, storage_reader=reader, no_dist=_no_dist())
    msd, state = local_view(msd), local_view(state)
    groups = []
    for g in meta["optimizer_param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict={"state": state, "param_groups": groups})


def resolve_checkpoint(storage: Storage, checkpoint: str | None = None, run: str | None = None) -> str:
    """The step-directory ref for ``checkpoint``: a step dir, a run's ``checkpoints`` dir (→ its latest),
    or None with ``run`` (→ that run's latest). Refs may be relative to the root or absolute URIs."""
    if checkpoint is None:
        if run is None:
            raise ValueError("name a checkpoint or a run")
        checkpoint = checkpoints_ref(run)
    ref = checkpoint.rstrip("/")
    if _STEP_DIR.fullmatch(ref.rsplit("/", 1)[-1]):
        return ref
    pointer = f"{ref}/{LATEST}"
    try:
        text = storage.read_text(pointer).strip()
    except FileNotFoundError:
        raise CheckpointError(f"{storage.uri(ref)}: no checkpoint there (neither a step-<n> directory nor a '{LATEST}' pointer)") from None
    if not _STEP_DIR.fullmatch(text):
        raise CheckpointError(f"{storage.uri(pointer)}: expected 'step-<n>', found {text[:60]!r}")
    return f"{ref}/{text}"


def load_model_weights(model: nn.Module, storage: Storage, train_cfg: Any, checkpoint: str | None = None) -> dict[str, Any]:
    """Load a checkpoint's model weights into ``model`` (single process: evaluation, export).

    ``checkpoint``: a step directory (ref or URI), a ``checkpoints`` directory (→ its latest), or
    None for the latest of ``train_cfg.run``. ``model`` must be built from ``train_cfg.model``, and
    the checkpoint must have been written for that same config (else :class:`CheckpointError`
    naming the checkpoint and every differing field). Returns ``{"ref", "uri", "step", "meta"}``.
    """
    ref = resolve_checkpoint(storage, checkpoint, train_cfg.run)
    meta = read_meta(storage, ref)
    check_model_config(meta, train_cfg.model.model_dump(mode="json"), storage.uri(ref))
    load_state(storage, ref, model, None, meta)
    return {"ref": ref, "uri": storage.uri(ref), "step": int(meta["step"]), "meta": meta}
