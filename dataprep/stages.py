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
from collections.abc import Callable, Sequence
from typing import Any

from .config import PrepConfig
from .stage import Stage

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
