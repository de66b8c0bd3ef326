"""Turn input files (JSONL plain/.gz/.zst, Parquet) into documents, quarantining what is malformed.

Real corpora have broken lines: a truncated download, a Latin-1 record among UTF-8 ones, a
``"text": null``. One bad record must not cost the file, and silently skipping it hides data loss,
so every rejected record is handed to a ``quarantine`` callback with the file, the line (row for
Parquet), a reason from a fixed vocabulary and a bounded excerpt, and counted under
``quarantined.<reason>``; reading then goes on with the next record. A broken compressed stream
keeps every record before the break and quarantines one record naming the line it reached.

Reasons: ``invalid_utf8``, ``invalid_json``, ``not_an_object``, ``missing_text``, ``null_text``,
``non_string_text``, ``empty_text``, ``too_long``, ``truncated_stream``, ``corrupt_stream``.
"""
from __future__ import annotations

import json
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

from shardflow.storage import Storage
from shardflow.storage.jsonl import CorruptInputError, TooLong, iter_lines, iter_parquet

from .config import ReadConfig
from .stage import Document

Quarantine = Callable[[str, int, str, str], None]
"""``quarantine(file_uri, line, reason, excerpt)``; the excerpt is at most :data:`EXCERPT_BYTES`."""

EXCERPT_BYTES = 1024

REASONS = (
    "invalid_utf8", "invalid_json", "not_an_object", "missing_text", "null_text", "non_string_text",
    "empty_text", "too_long", "truncated_stream", "corrupt_stream",
)

_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_json_loads = json.loads


def input_format(uri: str, cfg: ReadConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    return "parquet" if uri.lower().endswith(_PARQUET_SUFFIXES) else "jsonl"


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 without encoding it when it is ASCII (``isascii`` is O(1))."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def excerpt(raw: bytes | str) -> str:
    """A JSON-safe prefix of a bad record: at most 1 KiB, undecodable bytes as ``\\xNN``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    return raw[:EXCERPT_BYTES].decode("utf-8", "backslashreplace")


_TRUNCATION_MARKS = ("truncated", "ended before", "end-of-stream", "eoferror", "ends inside", "unexpected end")


# Decoder errors that mean the bytes are bad (as opposed to an I/O failure reading them).
_DATA_ERRORS = ("ZstdError", "BadGzipFile", "error", "EOFError")
_CAUSE = re.compile(r"\((\w+): ")


def stream_error_reason(exc: CorruptInputError) -> str | None:
    """``truncated_stream`` when the data just stops, ``corrupt_stream`` when it is not what it
    claims, None when the cause was an I/O error (network, disk), which must fail the shard so it
    is retried rather than record a good file as damaged.

    iter_lines reports the cause in its message, "corrupt or truncated <kind> stream (<Type>: ...)";
    only that part is looked at.
    """
    m = _CAUSE.search(exc.reason)
    if m is None or m.group(1) not in _DATA_ERRORS:
        return None
    detail = exc.reason[m.start():].lower()
    return "truncated_stream" if any(t in detail for t in _TRUNCATION_MARKS) else "corrupt_stream"


class _Builder:
    """Validates one parsed record and turns it into a document (one instance per file)."""

    __slots__ = ("uri", "base", "id_field", "text_field", "source_field", "max_bytes", "counters", "quarantine")

    def __init__(self, uri: str, cfg: ReadConfig, counters: Counter, quarantine: Quarantine):
        self.uri = uri
        self.base = posixpath.basename(uri.rstrip("/"))
        self.id_field, self.text_field, self.source_field = cfg.id_field, cfg.text_field, cfg.source_field
        self.max_bytes = cfg.max_doc_bytes
        self.counters, self.quarantine = counters, quarantine

    def reject(self, line: int, reason: str, raw: Any) -> None:
        if isinstance(raw, dict):  # a Parquet row: its JSON stands in for the raw line
            raw = json.dumps(raw, ensure_ascii=False, default=str)[:EXCERPT_BYTES]
        self.counters["quarantined." + reason] += 1
        self.quarantine(self.uri, line, reason, excerpt(raw))

    def build(self, obj: Any, line: int, raw: Any) -> Document | None:
        if type(obj) is not dict:
            self.reject(line, "not_an_object", raw)
            return None
        text_field = self.text_field
        text = obj.get(text_field, _MISSING)
        if type(text) is not str:
            reason = "missing_text" if text is _MISSING else "null_text" if text is None else "non_string_text"
            self.reject(line, reason, raw)
            return None
        if not text or text.isspace():
            self.reject(line, "empty_text", raw)
            return None
        doc_id = obj.get(self.id_field)
        if doc_id is None or doc_id == "":
            doc_id = f"{self.base}:{line}"
        elif type(doc_id) is not str:
            doc_id = str(doc_id)
        source = obj.get(self.source_field) if self.source_field else None
        if source is None or source == "":
            source = self.base
        elif type(source) is not str:
            source = str(source)
        meta: dict[str, Any] = {}
        for key, value in obj.items():
            if key == text_field or key == self.id_field or key == self.source_field:
                continue
            if key == "meta" and type(value) is dict:
                for k, v in value.items():
                    meta.setdefault(k, v)
            else:
                meta[key] = value
        return {"id": doc_id, "text": text, "source": source, "meta": meta}


_MISSING = object()


def read_documents(
    storage: Storage, uri: str, cfg: ReadConfig, counters: Counter, quarantine: Quarantine,
) -> Iterator[Document]:
    """Documents of one input file, in file order; malformed records go to ``quarantine``.

    Counters: ``records_in`` (records seen, good or bad), ``docs_in`` (documents yielded),
    ``bytes_in`` (UTF-8 bytes of their text), ``quarantined.<reason>``, ``empty_files``.
    A document keeps ``id`` (generated as ``<file name>:<line>`` when absent), ``text``,
    ``source`` (``cfg.source_field`` or the file's base name) and, in ``meta``, every other field
    (the items of a ``meta`` object are lifted into it).
    """
    uri = storage.uri(uri)
    builder = _Builder(uri, cfg, counters, quarantine)
    records = _jsonl_documents(storage, uri, builder) if input_format(uri, cfg) == "jsonl" else _parquet_documents(storage, uri, builder)
    n_records = n_docs = n_bytes = 0
    try:
        for n_records, doc in records:
            if doc is not None:
                n_docs += 1
                n_bytes += utf8_len(doc["text"])
                yield doc
    finally:
        counters["records_in"] += n_records
        counters["docs_in"] += n_docs
        counters["bytes_in"] += n_bytes
        if n_records == 0:
            counters["empty_files"] += 1


def _jsonl_documents(storage: Storage, uri: str, builder: _Builder) -> Iterator[tuple[int, Document | None]]:
    """(records seen so far, document or None) per non-blank line."""
    n = 0
    loads, build, reject = _json_loads, builder.build, builder.reject
    try:
        for lineno, raw in iter_lines(storage, uri, builder.max_bytes):
            n += 1
            if isinstance(raw, TooLong):
                reject(lineno, "too_long", raw)
                yield n, None
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                reject(lineno, "invalid_utf8", raw)
                yield n, None
                continue
            try:
                obj = loads(line)
            except ValueError:
                reject(lineno, "invalid_json", raw)
                yield n, None
                continue
            yield n, build(obj, lineno, raw)
    except CorruptInputError as exc:
        reason = stream_error_reason(exc)
        if reason is None:
            raise
        n += 1
        reject(exc.line, reason, str(exc))
        yield n, None


def _parquet_documents(storage: Storage, uri: str, builder: _Builder) -> Iterator[tuple[int, Document | None]]:
    import pyarrow as pa

    n = row = 0
    max_bytes, text_field = builder.max_bytes, builder.text_field
    rows = iter_parquet(storage, uri)
    while True:
        try:
            row, rec = next(rows)
        except StopIteration:
            return
        except (pa.ArrowException, ValueError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            n += 1
            detail = str(exc).lower()
            reason = "truncated_stream" if any(t in detail for t in _TRUNCATION_MARKS) or "eof" in detail else "corrupt_stream"
            builder.reject(row + 1, reason, f"{uri}: row {row + 1}: {type(exc).__name__}: {exc}")
            yield n, None
            return
        n += 1
        text = rec.get(text_field)
        if type(text) is str and len(text) > max_bytes // 4 and utf8_len(text) > max_bytes:
            builder.reject(row, "too_long", text[:EXCERPT_BYTES])  # the head only, as for a JSONL line
            yield n, None
            continue
        yield n, builder.build(rec, row, rec)
