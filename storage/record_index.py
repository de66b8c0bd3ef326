"""A stage's manifest records in one object: the plan's one read per stage.

Why: a no-op plan must look at every record of every stage. One object per record costs one GET
each (about 1,800 for 200 input files over nine stages) and the records' full bytes; on an object
store that request count, not the bytes, is most of a no-op run's time. The index holds every
record of a stage, zstd-compressed, each beside the fingerprint (size + mtime/ETag) its record file
had when it was indexed.

It is a cache, never the truth: the per-shard record files stay the source of truth (each is still
written last, after its shard's outputs). A reader lists the manifest folder (one listing, which
it needs anyway to know which records exist) and takes a record from the index only while the
listed fingerprint of its file equals the indexed one; any other record is read from its file.
A record written, rewritten or removed after the index (a crashed run, a run of an older version,
a hand edit) is therefore seen exactly as before, and a damaged or foreign index is ignored.

Only the root lock's holder writes it (after a stage's shards finish, and when a locked plan finds
it behind), so two writers never race on it.
"""
from __future__ import annotations

import io
import json
from typing import Any

import zstandard

from .store import digest_json

INDEX_NAME = "_index.json.zst"
"""Not a record's name: records are ``<shard_id>.json``."""

INDEX_VERSION = 2
MAX_INDEX_BYTES = 1 << 30
"""Decompressed size past which an index is ignored (it is a cache; the records are still there)."""


def _derived_input_digest(rec: dict[str, Any]) -> str:
    """What a record's ``input_digest`` is unless its stage pinned it (dataprep.stage.ShardSpec)."""
    return digest_json(sorted((rec.get("inputs") or {}).items()))


def encode_index(stage: str, entries: dict[str, tuple[str, dict[str, Any]]]) -> bytes:
    """``entries``: shard id -> (record file fingerprint, record as JSON-ready dict).

    Compact, because a no-op plan reads every index: an ``input_digest`` that is the digest of the
    record's own inputs (all but pinned ones) is left out and recomputed on reading, and zstd runs
    at its highest level (the index is written once per stage run, read by every plan).
    """
    records = {}
    for sid, (fp, rec) in sorted(entries.items()):
        if rec.get("input_digest") == _derived_input_digest(rec):
            rec = {k: v for k, v in rec.items() if k != "input_digest"}
        records[sid] = [fp, rec]
    body = {"version": INDEX_VERSION, "stage": stage, "records": records}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return zstandard.ZstdCompressor(level=19).compress(raw)


def _decompress_bounded(data: bytes, limit: int) -> bytes | None:
    out = io.BytesIO()
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
        while True:
            chunk = reader.read(1 << 20)
            if not chunk:
                return out.getvalue()
            out.write(chunk)
            if out.tell() > limit:
                return None


def decode_index(stage: str, data: bytes, limit: int = MAX_INDEX_BYTES) -> dict[str, tuple[str, dict[str, Any]]]:
    """The entries of an index, or {} when it is unreadable, too large, of another version or
    another stage's (any of which only costs reading the records one by one)."""
    try:
        raw = _decompress_bounded(data, limit)
        body = json.loads(raw) if raw is not None else None
    except (zstandard.ZstdError, ValueError):
        return {}
    if not isinstance(body, dict) or body.get("version") != INDEX_VERSION or body.get("stage") != stage:
        return {}
    records = body.get("records")
    if not isinstance(records, dict):
        return {}
    out = {}
    for sid, entry in records.items():
        if (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
                and isinstance(entry[1], dict) and isinstance(entry[1].get("inputs", {}), dict)):
            rec = entry[1]
            if "input_digest" not in rec:
                rec = {**rec, "input_digest": _derived_input_digest(rec)}
            out[sid] = (entry[0], rec)
    return out
