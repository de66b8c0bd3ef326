"""The one shape every data-preparation stage has, and the shard bookkeeping around it.

A stage maps input shards to output shards. It declares its shards (:meth:`Stage.shards`: each with
the refs and digests of its inputs), the digest of the configuration that affects its output
(:meth:`Stage.config_digest`) and a pure per-shard function (:meth:`Stage.process`) that publishes
its outputs atomically and returns their refs and counters. :func:`run_shard` wraps that function
with the manifest protocol (record written last, a failed record on error) and :func:`plan` decides,
from the manifests alone, which shards need work. Nothing here knows about Prefect: ``flows/`` maps
one task per shard over :func:`plan`'s result, and the CLI can call :func:`run_stage` directly.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from shardflow.storage import Storage, digest_json
from shardflow.storage.manifest import (
    ShardRecord,
    ShardState,
    classify,
    output_ref,
    read_record,
    write_record,
)

Document = dict[str, Any]
"""A document: ``{"id": str, "text": str, "source": str, "meta": dict}``."""

Step = Callable[[Iterable[Document], Counter], Iterator[Document]]
"""A pipeline step: documents in, documents out, counters updated in place (datatrove's shape)."""


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: a shard id and its inputs (ref -> digest, digest may be '' = compute)."""

    shard_id: str
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def input_digest(self) -> str:
        return digest_json(sorted(self.inputs.items()))


@dataclass
class ShardOutput:
    """What :meth:`Stage.process` returns: published output refs (name -> ref) and counters."""

    outputs: dict[str, str]
    counts: dict[str, int]


class Stage(Protocol):
    name: str

    def shards(self, storage: Storage) -> list[ShardSpec]:
        """The shards of this stage, with their inputs resolved to digests."""

    def config_digest(self) -> str:
        """Digest of everything in the config that changes this stage's output."""

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        """Do one shard: publish outputs atomically (never under a final name half-written)."""


class ShardFailed(RuntimeError):
    def __init__(self, stage: str, shard_id: str, cause: BaseException):
        super().__init__(f"stage {stage!r} shard {shard_id}: {type(cause).__name__}: {cause}")
        self.stage, self.shard_id, self.cause = stage, shard_id, cause


def run_shard(stage: Stage, storage: Storage, spec: ShardSpec) -> ShardRecord:
    """Process one shard and record the result; on error write a failed record and raise."""
    t0 = time.perf_counter()
    config_digest = stage.config_digest()
    try:
        result = stage.process(storage, spec)
    except Exception as exc:  # noqa: BLE001 - recorded then re-raised
        record = ShardRecord(
            stage=stage.name, shard_id=spec.shard_id, status="failed", inputs=dict(spec.inputs),
            input_digest=spec.input_digest, config_digest=config_digest,
            wall_time_s=time.perf_counter() - t0,
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"[:8000],
        )
        write_record(storage, record)
        raise ShardFailed(stage.name, spec.shard_id, exc) from exc
    record = ShardRecord(
        stage=stage.name, shard_id=spec.shard_id, status="done", inputs=dict(spec.inputs),
        input_digest=spec.input_digest, config_digest=config_digest,
        outputs={name: output_ref(storage, ref) for name, ref in sorted(result.outputs.items())},
        counts={k: int(v) for k, v in sorted(result.counts.items())},
        wall_time_s=round(time.perf_counter() - t0, 4),
    )
    write_record(storage, record)
    return record


@dataclass
class PlannedShard:
    spec: ShardSpec
    state: ShardState
    record: ShardRecord | None

    @property
    def needs_work(self) -> bool:
        return self.state is not ShardState.DONE


def plan(
    stage: Stage,
    storage: Storage,
    only: Iterable[str] | None = None,
    force: bool = False,
    deep_verify: bool = True,
) -> list[PlannedShard]:
    """Classify every shard of a stage against its manifest record.

    ``only``: restrict to these shard ids (and redo them); ``force``: redo every selected shard.
    """
    specs = stage.shards(storage)
    wanted = set(only) if only else None
    if wanted is not None:
        unknown = wanted - {s.shard_id for s in specs}
        if unknown:
            raise ValueError(f"stage {stage.name!r} has no shard(s) {sorted(unknown)}; known: {[s.shard_id for s in specs][:20]}")
    config_digest = stage.config_digest()
    out = []
    for spec in specs:
        if wanted is not None and spec.shard_id not in wanted:
            continue
        record = read_record(storage, stage.name, spec.shard_id)
        state = classify(storage, record, spec.input_digest, config_digest, deep=deep_verify)
        if (force or wanted is not None) and state is ShardState.DONE:
            state = ShardState.STALE
        out.append(PlannedShard(spec, state, record))
    return out


def run_stage(stage: Stage, storage: Storage, only: Iterable[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run a stage's pending shards in this process (no orchestration); used by tests and benches."""
    done, failed, skipped = [], {}, []
    for p in plan(stage, storage, only=only, force=force):
        if not p.needs_work:
            skipped.append(p.spec.shard_id)
            continue
        try:
            run_shard(stage, storage, p.spec)
            done.append(p.spec.shard_id)
        except ShardFailed as exc:
            failed[p.spec.shard_id] = str(exc)
    return {"stage": stage.name, "ran": done, "skipped": skipped, "failed": failed}


def input_shards(storage: Storage, inputs: list[str]) -> list[ShardSpec]:
    """One shard per input file (globs expanded, sorted, de-duplicated).

    The shard id is the file's position in the sorted list, zero-padded: stable while the input
    set is, and dot-free so it can be used in WebDataset keys and file names.
    """
    uris: list[str] = []
    for pattern in inputs:
        if any(c in pattern for c in "*?["):
            found = storage.glob(pattern)
            if not found:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
            uris.extend(found)
        else:
            if not storage.exists(pattern):
                raise FileNotFoundError(f"input {pattern!r} does not exist")
            uris.append(storage.uri(pattern))
    uris = sorted(dict.fromkeys(uris))
    return [ShardSpec(f"{i:06d}", {u: storage.digest(u)}) for i, u in enumerate(uris)]


def upstream_shards(storage: Storage, upstream: str, output: str = "docs") -> list[ShardSpec]:
    """One shard per done shard of ``upstream``, its input being that shard's ``output``.

    Digests come from the upstream manifest (no re-hashing): when an upstream shard is redone with a
    different result, its digest changes and this stage's shard becomes stale.
    """
    from shardflow.storage.manifest import list_records

    specs = []
    for shard_id, rec in sorted(list_records(storage, upstream).items()):
        if rec.status != "done" or output not in rec.outputs:
            continue
        out = rec.outputs[output]
        specs.append(ShardSpec(shard_id, {out.ref: out.digest}))
    return specs
