"""Per-stage, per-shard manifest records: the source of truth for what is done.

A stage re-run trusts nothing but these records and the bytes they point at (not an orchestrator's
cache): a shard is *done* only when its record says so, its input and config digests still match,
and its outputs still hash to what the record holds. The record is written last, after every output
is published, so a crash at any moment leaves either the old state or the new one.

Why records also hold metadata fingerprints (size + mtime locally, size + ETag on object stores):
hashing every input and output to plan a no-op run reads the whole corpus. A plan compares
fingerprints (one listing per directory) and re-hashes only what changed; a changed fingerprint
with unchanged bytes (a ``touch``, a re-upload of the same bytes) redoes nothing, and the record's
fingerprint is refreshed. Full re-hashing is ``shardflow verify``'s job and a run's ``--verify``.
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import json
import time
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .layout import stage_dir
from .record_index import INDEX_NAME, decode_index, encode_index
from .store import Stat, Storage, StorageError


def code_version() -> str:
    try:
        return metadata.version("shardflow")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class OutputRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ref: str
    digest: str
    bytes: int
    fingerprint: str = Field("", description="size + mtime/ETag when published ('' = unknown: re-hash to check)")


class ShardRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    shard_id: str
    status: str = Field(description="'done' or 'failed'")
    inputs: dict[str, str] = Field(default_factory=dict, description="input URI -> digest")
    fingerprints: dict[str, str] = Field(default_factory=dict, description="raw input URI -> size + mtime/ETag when read")
    input_digest: str = ""
    config_digest: str = ""
    code_version: str = Field(default_factory=code_version)
    outputs: dict[str, OutputRef] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    wall_time_s: float = 0.0
    error: str | None = None
    finished_at: float = Field(default_factory=time.time)


class ShardState(str, enum.Enum):
    DONE = "done"
    MISSING = "missing"      # never run (no record)
    FAILED = "failed"        # last run failed
    STALE = "stale"          # input or config changed since
    CORRUPT = "corrupt"      # an output is gone or no longer matches its digest


def manifest_dir(stage: str) -> str:
    return f"{stage_dir(stage)}/_manifest"


def record_ref(stage: str, shard_id: str) -> str:
    return f"{manifest_dir(stage)}/{shard_id}.json"


_SESSION: contextvars.ContextVar[dict[str, ShardRecord | None] | None] = contextvars.ContextVar(
    "shardflow_record_session", default=None)


@contextlib.contextmanager
def record_session() -> Iterator[None]:
    """Within the block, each manifest record is read at most once.

    Planning a pipeline lists the same stage's records several times (a stage's own plan, the
    next stage's inputs, the dedup phases, pack); on an object store each is a GET. Only for a
    caller that is the only writer of the root (it holds the root lock) or that only reads; the
    records it writes or removes through this module update the session. Nested blocks share it.
    """
    if _SESSION.get() is not None:
        yield
        return
    token = _SESSION.set({})
    try:
        yield
    finally:
        _SESSION.reset(token)


def _encode(record: ShardRecord) -> bytes:
    # Compact: a no-op plan reads every record of every stage, so their size is its cost.
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_record(storage: Storage, record: ShardRecord) -> None:
    ref = record_ref(record.stage, record.shard_id)
    storage.write_bytes(ref, _encode(record) + b"\n")
    cache = _SESSION.get()
    if cache is not None:
        cache[storage.uri(ref)] = record


def remove_record(storage: Storage, stage: str, shard_id: str) -> None:
    ref = record_ref(stage, shard_id)
    storage.remove(ref)
    cache = _SESSION.get()
    if cache is not None:
        cache[storage.uri(ref)] = None


def read_record(storage: Storage, stage: str, shard_id: str) -> ShardRecord | None:
    """One record. Within a :func:`record_session` a miss lists the whole stage instead (one
    listing and its index, which a plan needs anyway), so a plan never fetches a record file the
    index already holds."""
    ref = record_ref(stage, shard_id)
    cache = _SESSION.get()
    if cache is not None:
        if storage.uri(ref) not in cache:
            list_records(storage, stage)
            cache.setdefault(storage.uri(ref), None)  # not listed: absent
        return cache[storage.uri(ref)]
    try:
        rec = ShardRecord.model_validate(storage.read_json(ref))
    except FileNotFoundError:
        rec = None
    if cache is not None:
        cache[storage.uri(ref)] = rec
    return rec


def index_ref(stage: str) -> str:
    return f"{manifest_dir(stage)}/{INDEX_NAME}"


def _from_index(entry: dict) -> ShardRecord | None:
    try:
        return ShardRecord.model_validate(entry)
    except ValueError:  # an index of another schema: read the file instead
        return None


def list_records(storage: Storage, stage: str, update_index: bool = False) -> dict[str, ShardRecord]:
    """Every record of a stage by shard id, from one listing and the stage's record index.

    A record comes from the index (storage/record_index.py) while its file's listed fingerprint
    is the indexed one, else from its file: those are fetched concurrently on object stores (one
    batch of GETs instead of one round trip each). ``update_index``: rewrite the index when it is
    behind the files; only for the root lock's holder.
    """
    cache = _SESSION.get()
    listed = {name[: -len(".json")]: st for name, st in storage.stat_dir(manifest_dir(stage)).items()
              if name.endswith(".json") and name != INDEX_NAME}
    if not listed:
        return {}
    out: dict[str, ShardRecord] = {}
    todo = []
    for shard_id in listed:
        uri = storage.uri(record_ref(stage, shard_id))
        if cache is not None and uri in cache:
            if cache[uri] is not None:
                out[shard_id] = cache[uri]
        else:
            todo.append(shard_id)
    indexed: dict = {}
    if todo or update_index:
        try:
            indexed = decode_index(stage, storage.read_bytes(index_ref(stage)))
        except FileNotFoundError:
            indexed = {}
    fetch = []
    for shard_id in todo:
        entry = indexed.get(shard_id)
        rec = _from_index(entry[1]) if entry is not None and entry[0] == listed[shard_id].fingerprint else None
        if rec is None:
            fetch.append(shard_id)
            continue
        out[shard_id] = rec
        if cache is not None:
            cache[storage.uri(record_ref(stage, shard_id))] = rec
    data = storage.read_many([record_ref(stage, s) for s in fetch])
    for shard_id in fetch:
        raw = data.get(record_ref(stage, shard_id))
        rec = ShardRecord.model_validate(json.loads(raw)) if raw is not None else None
        if cache is not None:
            cache[storage.uri(record_ref(stage, shard_id))] = rec
        if rec is not None:
            out[shard_id] = rec
    if update_index:
        current = {sid: listed[sid].fingerprint for sid in out if listed[sid].fingerprint}
        if {sid: entry[0] for sid, entry in indexed.items()} != current:
            write_index(storage, stage, out, listed)
    return dict(sorted(out.items()))


def write_index(storage: Storage, stage: str, records: dict[str, ShardRecord], listed: dict[str, Stat]) -> None:
    """Publish the stage's record index: each record beside its file's listed fingerprint."""
    entries = {sid: (listed[sid].fingerprint, rec.model_dump(mode="json"))
               for sid, rec in records.items() if sid in listed and listed[sid].fingerprint}
    storage.write_bytes(index_ref(stage), encode_index(stage, entries))


def refresh_index(storage: Storage, stage: str) -> None:
    """Bring a stage's record index up to date with its record files (the lock holder, after a stage)."""
    list_records(storage, stage, update_index=True)


def list_stages(storage: Storage) -> list[str]:
    fs, path = storage.resolve("stages")
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


class StatCache:
    """Sizes and fingerprints of stored objects, one directory listing each (see Storage.stat_dir).

    A plan looks at every output of every shard of a stage; they share a few directories, so
    listing those costs a handful of requests where a HEAD per object would cost thousands.
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._dirs: dict[str, dict[str, Stat]] = {}

    def stat(self, ref: str) -> Stat | None:
        parent, _, name = ref.rstrip("/").rpartition("/")
        if parent not in self._dirs:
            self._dirs[parent] = self.storage.stat_dir(parent)
        return self._dirs[parent].get(name)


def check_outputs(
    storage: Storage, record: ShardRecord, deep: bool = False, stats: StatCache | None = None,
) -> tuple[list[str], dict[str, OutputRef] | None]:
    """``(problems, refreshed)`` for a record's outputs.

    An output whose size and fingerprint match its record is trusted without reading it (unless
    ``deep``); one whose fingerprint changed (or was never recorded) is re-hashed. ``refreshed``
    holds the outputs with their current fingerprints when some changed but every digest still
    matches (the caller may rewrite the record so the next plan need not hash them again).
    """
    stats = stats or StatCache(storage)
    problems: list[str] = []
    refreshed = dict(record.outputs)
    changed = False
    for name, out in sorted(record.outputs.items()):
        try:
            st = stats.stat(out.ref)
        except StorageError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if st is None:
            problems.append(f"{name}: {storage.uri(out.ref)} is missing")
            continue
        if st.size != out.bytes:
            problems.append(f"{name}: {storage.uri(out.ref)} has {st.size} bytes, manifest says {out.bytes}")
            continue
        if deep or not out.fingerprint or st.fingerprint != out.fingerprint:
            if storage.digest(out.ref) != out.digest:
                problems.append(f"{name}: {storage.uri(out.ref)} does not match its digest")
                continue
            if st.fingerprint != out.fingerprint:
                refreshed[name] = out.model_copy(update={"fingerprint": st.fingerprint})
                changed = True
    return problems, (refreshed if changed and not problems else None)


def verify_outputs(storage: Storage, record: ShardRecord, deep: bool = True, stats: StatCache | None = None) -> list[str]:
    """Problems with a record's outputs ([] = all present and, if ``deep``, hashing as recorded)."""
    return check_outputs(storage, record, deep=deep, stats=stats)[0]


def classify(
    storage: Storage,
    record: ShardRecord | None,
    input_digest: str | None = None,
    config_digest: str | None = None,
    deep: bool = True,
    stats: StatCache | None = None,
) -> ShardState:
    """Where a shard stands relative to the current inputs and config. ``stats``: share one
    listing per folder across the shards of a stage (else each call lists the folder again)."""
    if record is None:
        return ShardState.MISSING
    if record.status != "done":
        return ShardState.FAILED
    if (input_digest is not None and record.input_digest != input_digest) or (
        config_digest is not None and record.config_digest != config_digest
    ):
        return ShardState.STALE
    if verify_outputs(storage, record, deep=deep, stats=stats):
        return ShardState.CORRUPT
    return ShardState.DONE


def output_ref(storage: Storage, ref: str) -> OutputRef:
    """Describe a just-published output for a manifest record (its fingerprint taken first, so a
    rewrite racing with the hash shows up as a changed fingerprint, never as a trusted one)."""
    st = storage.stat(ref)
    return OutputRef(ref=ref, digest=storage.digest(ref), bytes=st.size, fingerprint=st.fingerprint)



def summarize(records: dict[str, ShardRecord]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in records.values():
        for k, v in r.counts.items():
            counts[k] = counts.get(k, 0) + v
    return {"shards": len(records), "done": sum(r.status == "done" for r in records.values()),
            "failed": sum(r.status != "done" for r in records.values()), "counts": counts}
