"""The one shape every data-preparation stage has, and the shard bookkeeping around it.

A stage maps input shards to output shards. It declares its shards (:meth:`Stage.shards`: each with
the refs and digests of its inputs), the digest of the configuration that affects its output
(:meth:`Stage.config_digest`) and a pure per-shard function (:meth:`Stage.process`) that publishes
its outputs atomically and returns their refs and counters. :func:`run_shard` wraps that function
with the manifest protocol (record written last, a failed record on error) and :func:`plan` decides,
from the manifests alone, which shards need work. Nothing here knows about Prefect: ``flows/`` maps
one task per shard over :func:`plan`'s result, and the CLI can call :func:`run_stage` directly.

Planning reads metadata only. Raw inputs and outputs are compared by size + mtime (local) or
size + ETag (object stores) against the fingerprints in the records; only a changed fingerprint
leads to a re-hash, and only a changed hash makes a shard stale (a ``touch`` redoes nothing and
refreshes the record). ``deep_verify`` (``--verify``) re-hashes everything.

Shard identity: an input shard's id comes from its input file (:func:`shard_id_for`), never from
its position among the inputs, so adding files adds shards and removing one retires only its
shards (:func:`retire_orphans`) and, stage by stage, their downstream outputs.
"""
from __future__ import annotations

import hashlib
import re
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

from shardflow.storage import Storage, digest_json
from shardflow.storage.manifest import (
    OutputRef,
    ShardRecord,
    ShardState,
    StatCache,
    check_outputs,
    list_records,
    output_ref,
    record_session,
    refresh_index,
    remove_record,
    write_record,
)

Document = dict[str, Any]
"""A document: ``{"id": str, "text": str, "source": str, "meta": dict}``."""

Step = Callable[[Iterable[Document], Counter], Iterator[Document]]
"""A pipeline step: documents in, documents out, counters updated in place (datatrove's shape)."""


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: a shard id and its inputs (ref -> digest).

    ``fingerprints`` (raw input files only: ref -> size + mtime/ETag) let a plan reuse the digest
    recorded for an unchanged file instead of reading it; such an input's digest is '' until the
    plan (or, for a shard never run, :func:`run_shard`) fills it in.
    """

    shard_id: str
    inputs: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict, compare=False)
    pinned_digest: str = ""
    """Set by a stage that stays done while its inputs change (a tokenizer trained once on a
    growing corpus): the plan compares this instead of the inputs' digest."""

    @property
    def input_digest(self) -> str:
        return self.pinned_digest or self.actual_digest

    @property
    def actual_digest(self) -> str:
        return digest_json(sorted(self.inputs.items()))

    def hashed(self, storage: Storage) -> "ShardSpec":
        """This spec with every raw input's missing digest computed (reads those inputs)."""
        missing = [r for r in self.fingerprints if not self.inputs.get(r)]
        if not missing:
            return self
        return replace(self, inputs={**self.inputs, **{r: storage.digest(r) for r in missing}})


@dataclass
class ShardOutput:
    """What :meth:`Stage.process` returns: published output refs (name -> ref) and counters.

    ``kept``: outputs of the shard's previous record that this run left untouched (an append-only
    pack's earlier tars), carried into the new record as they were instead of being hashed again.
    The stage must have checked them against their fingerprints first.
    """

    outputs: dict[str, str]
    counts: dict[str, int]
    kept: dict[str, OutputRef] = field(default_factory=dict)


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
        spec = spec.hashed(storage)  # a new input is hashed here, in the worker, not while planning
        result = stage.process(storage, spec)
    except Exception as exc:  # noqa: BLE001 - recorded then re-raised
        record = ShardRecord(
            stage=stage.name, shard_id=spec.shard_id, status="failed", inputs=dict(spec.inputs),
            fingerprints=dict(spec.fingerprints), input_digest=spec.actual_digest, config_digest=config_digest,
            wall_time_s=time.perf_counter() - t0,
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"[:8000],
        )
        write_record(storage, record)
        raise ShardFailed(stage.name, spec.shard_id, exc) from exc
    record = ShardRecord(
        stage=stage.name, shard_id=spec.shard_id, status="done", inputs=dict(spec.inputs),
        fingerprints=dict(spec.fingerprints), input_digest=spec.actual_digest, config_digest=config_digest,
        outputs=dict(sorted({**result.kept,
                             **{name: output_ref(storage, ref) for name, ref in result.outputs.items()}}.items())),
        counts={k: int(v) for k, v in sorted(result.counts.items())},
        wall_time_s=round(time.perf_counter() - t0, 4),
    )
    write_record(storage, record)
    return record


class Reason:
    """Why a shard needs work, as ``status`` shows it and a run logs it."""

    MISSING = "missing"
    FAILED = "failed"
    INPUT = "input changed"
    CONFIG = "config changed"
    UPSTREAM = "upstream changed"
    CORRUPT = "corrupt"
    SELECTED = "selected"


@dataclass
class PlannedShard:
    spec: ShardSpec
    state: ShardState
    record: ShardRecord | None
    reason: str = ""
    detail: str = ""

    @property
    def needs_work(self) -> bool:
        return self.state is not ShardState.DONE


def _resolve_inputs(storage: Storage, spec: ShardSpec, record: ShardRecord | None, deep: bool) -> tuple[ShardSpec, bool]:
    """Fill in raw input digests: the recorded one while the fingerprint is unchanged, else a re-hash.

    Returns the spec and whether the record's input fingerprints need refreshing (bytes unchanged
    although the fingerprint changed). A shard without a done record gets no digest here: it will
    be (re)done anyway, and :func:`run_shard` hashes its input in the worker.
    """
    if not spec.fingerprints:
        return spec, False
    if record is None or record.status != "done":
        return spec, False
    inputs = dict(spec.inputs)
    refresh = False
    for ref, fp in spec.fingerprints.items():
        if inputs.get(ref):
            continue
        recorded = record.inputs.get(ref)
        if recorded and fp and record.fingerprints.get(ref) == fp and not deep:
            inputs[ref] = recorded
            continue
        inputs[ref] = storage.digest(ref)
        if inputs[ref] == recorded and record.fingerprints.get(ref) != fp:
            refresh = True
    return replace(spec, inputs=inputs), refresh


def assess(
    storage: Storage, spec: ShardSpec, record: ShardRecord | None, config_digest: str, deep: bool = False,
    stats: StatCache | None = None,
) -> tuple[PlannedShard, ShardRecord | None]:
    """Classify one shard: ``(planned shard with state and reason, refreshed record or None)``.

    The refreshed record carries current fingerprints where bytes were re-hashed and found
    unchanged; writing it back spares the next plan the re-hash.
    """
    spec, refresh_inputs = _resolve_inputs(storage, spec, record, deep)
    if record is None:
        return PlannedShard(spec, ShardState.MISSING, None, Reason.MISSING), None
    if record.status != "done":
        first = (record.error or "").splitlines()[0] if record.error else ""
        return PlannedShard(spec, ShardState.FAILED, record, Reason.FAILED, first), None
    if record.config_digest != config_digest:
        return PlannedShard(spec, ShardState.STALE, record, Reason.CONFIG), None
    if record.input_digest != spec.input_digest:
        changed = sorted(set(record.inputs.items()) ^ set(spec.inputs.items()))
        detail = ", ".join(dict.fromkeys(storage.uri(r) if "://" in r or r.startswith("/") else r for r, _ in changed))
        return PlannedShard(spec, ShardState.STALE, record, Reason.INPUT, detail[:300]), None
    problems, outputs = check_outputs(storage, record, deep=deep, stats=stats)
    if problems:
        return PlannedShard(spec, ShardState.CORRUPT, record, Reason.CORRUPT, "; ".join(problems)[:300]), None
    refreshed = None
    if refresh_inputs or outputs is not None:
        refreshed = record.model_copy(update={
            "fingerprints": {**record.fingerprints, **spec.fingerprints} if refresh_inputs else record.fingerprints,
            "outputs": outputs if outputs is not None else record.outputs})
    return PlannedShard(spec, ShardState.DONE, record, ""), refreshed


def plan(
    stage: Stage,
    storage: Storage,
    only: Iterable[str] | None = None,
    force: bool = False,
    deep_verify: bool = False,
    refresh: bool = True,
    specs: list[ShardSpec] | None = None,
    records: dict[str, ShardRecord] | None = None,
) -> list[PlannedShard]:
    """Classify every shard of a stage against its manifest record, from metadata.

    ``only``: restrict to these shard ids (and redo them); ``force``: redo every selected shard;
    ``deep_verify``: re-hash every input and output instead of trusting unchanged fingerprints;
    ``refresh``: write back records whose fingerprints changed over unchanged bytes (a read-only
    caller such as ``status`` passes False). ``specs``/``records``: already listed by the caller.
    """
    specs = stage.shards(storage) if specs is None else specs
    wanted = set(only) if only else None
    if wanted is not None:
        unknown = wanted - {s.shard_id for s in specs}
        if unknown:
            raise ValueError(f"stage {stage.name!r} has no shard(s) {sorted(unknown)}; known: {[s.shard_id for s in specs][:20]}")
    config_digest = stage.config_digest()
    records = list_records(storage, stage.name) if records is None else records
    stats = StatCache(storage)
    out = []
    for spec in specs:
        if wanted is not None and spec.shard_id not in wanted:
            continue
        p, refreshed = assess(storage, spec, records.get(spec.shard_id), config_digest, deep_verify, stats)
        if refreshed is not None and refresh:
            write_record(storage, refreshed)
        if (force or wanted is not None) and p.state is ShardState.DONE:
            p.state, p.reason = ShardState.STALE, Reason.SELECTED
        out.append(p)
    return out


def orphans(specs: list[ShardSpec], records: dict[str, ShardRecord]) -> list[str]:
    """Shard ids with a record but no longer in the stage's shard list (their input is gone).

    An empty shard list retires nothing: it means "upstream has nothing yet" (or everything
    failed) far more often than "every input was deleted", and deleting on a guess is not undoable.
    """
    if not specs:
        return []
    live = {s.shard_id for s in specs}
    return sorted(set(records) - live)


def retire_orphans(stage: Stage, storage: Storage, specs: list[ShardSpec] | None = None,
                   records: dict[str, ShardRecord] | None = None) -> list[str]:
    """Delete the outputs, then the record, of every shard whose input is gone; return their ids.

    Outputs go first: a crash in between leaves a record that is retired again next time, never
    a live record pointing at nothing. The next stage then no longer lists the shard, and retires
    its own outputs for it when it is planned.
    """
    specs = stage.shards(storage) if specs is None else specs
    records = list_records(storage, stage.name) if records is None else records
    gone = orphans(specs, records)
    for shard_id in gone:
        for out in records[shard_id].outputs.values():
            storage.remove(out.ref)
        remove_record(storage, stage.name, shard_id)
    return gone


def run_stage(stage: Stage, storage: Storage, only: Iterable[str] | None = None, force: bool = False,
              deep_verify: bool = False) -> dict[str, Any]:
    """Run a stage's pending shards in this process (no orchestration); used by tests and benches."""
    done, failed, skipped = [], {}, []
    with record_session():
        specs = stage.shards(storage)
        records = list_records(storage, stage.name)
        retired = retire_orphans(stage, storage, specs, records)
        planned = plan(stage, storage, only=only, force=force, deep_verify=deep_verify, specs=specs, records=records)
    for p in planned:
        if not p.needs_work:
            skipped.append(p.spec.shard_id)
            continue
        try:
            run_shard(stage, storage, p.spec)
            done.append(p.spec.shard_id)
        except ShardFailed as exc:
            failed[p.spec.shard_id] = str(exc)
    refresh_index(storage, stage.name)
    return {"stage": stage.name, "ran": done, "skipped": skipped, "failed": failed, "retired": retired}


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_INPUT_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".parq", ".txt")


def shard_id_for(uri: str, part: int | None = None) -> str:
    """The id of the shard made from input ``uri`` (and ``part``, where one file yields several).

    ``<name>-<hash>``: the file name without format suffixes, made safe for file names, URIs and
    WebDataset keys (letters, digits, ``_`` and ``-``; no dots), cut to 40 characters, then 10 hex
    digits of the sha256 of the canonical URI (which keeps ids unique when names collide after
    sanitizing or live in different folders). It depends on that one file only: adding or
    removing other inputs, or spelling the input list differently (a glob, a list, ``file://``),
    leaves it unchanged. Moving the corpus to another URI makes new shards, as it makes new inputs.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    lowered = name.lower()
    stripped = True
    while stripped:
        stripped = False
        for suffix in _INPUT_SUFFIXES:
            if lowered.endswith(suffix) and len(lowered) > len(suffix):
                name, lowered = name[: -len(suffix)], lowered[: -len(suffix)]
                stripped = True
    stem = _ID_UNSAFE.sub("_", name).strip("_-")[:40].rstrip("_-") or "input"
    sid = f"{stem}-{hashlib.sha256(uri.encode('utf-8')).hexdigest()[:10]}"
    return sid if part is None else f"{sid}-p{part}"


class InputError(FileNotFoundError):
    """An input named in the config does not exist (or a pattern matches nothing)."""


def resolve_inputs(storage: Storage, inputs: list[str]) -> dict[str, str]:
    """Canonical URI -> fingerprint of every input file (globs expanded), from listings/stat only."""
    found: dict[str, str] = {}
    for pattern in inputs:
        if any(c in pattern for c in "*?["):
            matches = storage.glob_stats(pattern)
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no file")
            for uri, st in matches.items():
                found[storage.uri(uri)] = st.fingerprint
        else:
            try:
                st = storage.stat(pattern)
            except FileNotFoundError:
                raise InputError(f"input {pattern!r} does not exist") from None
            found[storage.uri(pattern)] = st.fingerprint
    return dict(sorted(found.items()))


def input_shards(storage: Storage, inputs: list[str]) -> list[ShardSpec]:
    """One shard per input file (globs expanded, sorted by id, de-duplicated), with fingerprints.

    Ids come from :func:`shard_id_for` (the file, not its position). Digests are left '' for
    :func:`plan` to fill from the records (unchanged fingerprint) or by hashing.
    """
    specs = {}
    for uri, fp in resolve_inputs(storage, inputs).items():
        sid = shard_id_for(uri)
        specs[sid] = ShardSpec(sid, {uri: ""}, {uri: fp})
    return [specs[sid] for sid in sorted(specs)]


def upstream_shards(storage: Storage, upstream: str, output: str = "docs") -> list[ShardSpec]:
    """One shard per done shard of ``upstream``, its input being that shard's ``output``.

    Digests come from the upstream manifest (no re-hashing): when an upstream shard is redone with a
    different result, its digest changes and this stage's shard becomes stale.
    """
    specs = []
    for shard_id, rec in sorted(list_records(storage, upstream).items()):
        if rec.status != "done" or output not in rec.outputs:
            continue
        out = rec.outputs[output]
        specs.append(ShardSpec(shard_id, {out.ref: out.digest}))
    return specs
