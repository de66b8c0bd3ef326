"""The stage registry: which stages make up data preparation, in which order, under which CLI names.

Orchestration (``flows/``), ``shardflow status`` and the benchmarks all need "the stages of this
config, in pipeline order"; keeping that list here means a new stage is wired in one place. Stage
modules are imported inside :func:`build_stages`, so importing the registry stays cheap and a stage
module that fails to import is reported by name instead of breaking every command.

A CLI name (``shardflow prep dedup``) may stand for several stages: dedup runs in four phases,
tokenize in two (per-shard tokenize, then the global pack). :data:`STAGE_GROUPS` maps each CLI name
to the names of its stages; :func:`select_stages` resolves a CLI name, a single stage name or
``all`` against a built stage list.
"""
from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from shardflow.storage import Storage, StorageError, digest_json

from .config import PrepConfig
from .stage import ShardFailed, ShardSpec, Stage, run_shard

STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "clean": ("clean",),
    "filter": ("filter",),
    "dedup": ("dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"),
    "tokenizer": ("tokenizer",),
    "tokenize": ("tokenize", "pack"),
}
"""CLI name -> the stages it runs, in order. The keys, in order, are the pipeline."""

PIPELINE_GROUPS: tuple[str, ...] = tuple(STAGE_GROUPS)

DEFAULT_FACTORY = "shardflow.dataprep.stages:build_stages"
"""Import path of the stage-list factory the flows use unless told otherwise (tests pass their own)."""


class StageImportError(ImportError):
    """A stage module could not be imported (named in the message)."""


def _stage_module(name: str):
    try:
        return importlib.import_module(f"shardflow.dataprep.{name}")
    except ImportError as exc:
        raise StageImportError(f"stage module shardflow.dataprep.{name} cannot be imported: {exc}") from exc


def build_stages(cfg: PrepConfig) -> list[Stage]:
    """Every data-preparation stage for ``cfg``, in the order they must run."""
    doc_stages = _stage_module("doc_stages")
    dedup = _stage_module("dedup")
    tokenizer = _stage_module("tokenizer")
    tokenize = _stage_module("tokenize")
    stages: list[Stage] = [doc_stages.CleanStage(cfg), doc_stages.FilterStage(cfg)]
    stages.extend(dedup.dedup_stages(cfg))
    stages.append(tokenizer.TokenizerStage(cfg))
    if hasattr(tokenize, "tokenize_stages"):
        stages.extend(tokenize.tokenize_stages(cfg))
    else:
        stages.append(tokenize.TokenizeStage(cfg))
    _check_names(stages)
    return stages


def _check_names(stages: Sequence[Stage]) -> None:
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")


def load_factory(path: str) -> Callable[[PrepConfig], list[Stage]]:
    """Resolve ``"module:function"`` to a stage-list factory (so task parameters stay strings)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"stage factory {path!r} must look like 'package.module:function'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"stage factory {path!r} is not callable")
    return obj


def select_stages(stages: Sequence[Stage], selection: str | Sequence[str] = "all") -> list[Stage]:
    """The stages named by ``selection`` (``all``, CLI group names or stage names), in pipeline order.

    Unknown names raise ``ValueError`` listing what is available.
    """
    names = [selection] if isinstance(selection, str) else list(selection)
    by_name = {s.name: s for s in stages}
    wanted: set[str] = set()
    for name in names:
        if name == "all":
            wanted.update(by_name)
        elif name in STAGE_GROUPS and any(n in by_name for n in STAGE_GROUPS[name]):
            wanted.update(n for n in STAGE_GROUPS[name] if n in by_name)
        elif name in by_name:
            wanted.add(name)
        else:
            groups = [g for g in STAGE_GROUPS if any(n in by_name for n in STAGE_GROUPS[g])]
            raise ValueError(f"unknown stage {name!r}; choose one of: all, {', '.join(dict.fromkeys(groups + list(by_name)))}")
    return [s for s in stages if s.name in wanted]


def group_of(stage_name: str) -> str:
    """The CLI name a stage belongs to (itself when it is in no group)."""
    for group, members in STAGE_GROUPS.items():
        if stage_name in members:
            return group
    return stage_name


# -- running one shard of a registered stage, in whatever process a runner chose ----------------------

_STAGE_CACHE: dict[tuple[str, str], dict[str, Stage]] = {}
_STAGE_CACHE_LOCK = threading.Lock()


def stage_objects(factory: str, prep: PrepConfig) -> dict[str, Stage]:
    """The stages of ``prep`` by name, built once per process and config (regexes compiled once)."""
    key = (factory, digest_json(prep.model_dump(mode="json")))
    with _STAGE_CACHE_LOCK:
        stages = _STAGE_CACHE.get(key)
        if stages is None:
            stages = {s.name: s for s in load_factory(factory)(prep)}
            if len(_STAGE_CACHE) > 8:
                _STAGE_CACHE.clear()
            _STAGE_CACHE[key] = stages
    return stages


class ShardTaskError(RuntimeError):
    """A shard failed. Unlike ``ShardFailed`` it pickles (failures cross process boundaries with
    process pools and Ray), and it carries the retry decision, made where the cause is known."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message, transient)
        self.message, self.transient = message, transient

    def __str__(self) -> str:
        return self.message


_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_PERMANENT_WORDS = ("FileNotFoundError", "PermissionError", "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "NoSuchKey", "IsADirectoryError")
_TRANSIENT_NAMES = ("Timeout", "Connection", "Throttl", "SlowDown", "ServiceUnavailable", "TemporarilyUnavailable",
                    "ServerDisconnected", "ClientPayloadError", "IncompleteRead")


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.cause if isinstance(exc, ShardFailed) else exc.__cause__


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: storage/network trouble yes, data or code errors no."""
    if isinstance(exc, ShardTaskError):
        return exc.transient
    chain = list(_chain(exc))
    if any(isinstance(e, _PERMANENT_OS_ERRORS) for e in chain):
        return False
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(n in cls.__name__ for cls in type(e).__mro__ for n in _TRANSIENT_NAMES):
            return True
        if isinstance(e, StorageError):
            return not any(w in str(e) for w in _PERMANENT_WORDS)
        if isinstance(e, OSError):
            return True
    return False


def run_named_shard(factory: str, prep: PrepConfig, stage: str, spec: ShardSpec, storage: Storage) -> dict[str, Any]:
    """Run shard ``spec`` of stage ``stage`` (outputs, then its manifest record), in this process.

    Everything it needs is small and picklable, so a thread, a process pool or a Ray worker can
    call it; it returns the record's counters, or raises :class:`ShardTaskError`.
    """
    try:
        record = run_shard(stage_objects(factory, prep)[stage], storage, spec)
    except ShardFailed as exc:  # the failed record is written; report the cause, picklably
        raise ShardTaskError(f"{type(exc.cause).__name__}: {exc.cause}", is_transient(exc)) from None
    return {"shard_id": spec.shard_id, "counts": record.counts, "wall_time_s": record.wall_time_s}
