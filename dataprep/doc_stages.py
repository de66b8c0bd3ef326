"""The two document stages that turn raw input files into filtered documents: ``clean`` and ``filter``.

``clean`` maps each input file (one shard per file) through read → clean and is the only place
raw input is parsed: its output is trusted JSONL that every later stage reads without checks.
``filter`` maps each clean shard through language ID → Gopher quality → Gopher repetition → C4 →
FineWeb. Stage objects hold only their config and plain filter objects, so they pickle (process
pools, Prefect/Ray task runners); compiled steps are built inside :meth:`process`. They are separate stages so that tuning a filter threshold re-runs only ``filter`` (its
config digest covers the filter section alone), never the parse of the raw corpus.
"""
from __future__ import annotations

import logging
from collections import Counter

from shardflow.storage import Storage, digest_json
from shardflow.storage import layout
from shardflow.storage.jsonl import JsonlWriter, iter_jsonl
from shardflow.storage.layout import dropped_docs_ref, stage_docs_ref

from .clean import Cleaner, clean_step
from .config import PrepConfig
from .langid import language_step
from .quality import OnDrop, filter_step, quality_filters
from .read import read_documents, utf8_len
from .stage import Document, ShardOutput, ShardSpec, input_shards, upstream_shards

log = logging.getLogger(__name__)

CLEAN_FORMAT_VERSION = 1
FILTER_FORMAT_VERSION = 1
_LOGGED_QUARANTINES = 20


def _write_docs(writer: JsonlWriter, docs, counters: Counter) -> None:
    n = n_bytes = 0
    write = writer.write
    for doc in docs:
        write(doc)
        n += 1
        n_bytes += utf8_len(doc["text"])
    counters["docs_out"] += n
    counters["bytes_out"] += n_bytes


class CleanStage:
    """read → clean, one shard per input file.

    Outputs: ``docs`` = ``stages/clean/<shard>.jsonl.zst``; ``quarantine`` =
    ``quarantine/clean/<shard>.jsonl.zst`` (records ``{file, line, reason, excerpt}``), always
    written, empty when the input was clean, so that its digest is part of the shard's record.
    """

    name = "clean"
    per_shard = True  # one shard per input file (for status predictions)

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        if cfg.clean.enabled:
            Cleaner(cfg.clean)  # fail now on a bad config, not in the first shard

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return input_shards(storage, self.cfg.inputs)

    def config_digest(self) -> str:
        # The input list is not here: each shard's input (its file's URI and digest) is already in
        # its input digest, so a glob and a list naming the same files plan the same, and adding a
        # file adds a shard instead of making every other one stale.
        return digest_json({
            "stage": self.name, "version": CLEAN_FORMAT_VERSION,
            "read": self.cfg.read.model_dump(mode="json"), "clean": self.cfg.clean.model_dump(mode="json"),
        })

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        (uri,) = spec.inputs
        docs_ref = stage_docs_ref(self.name, spec.shard_id)
        quarantine_ref = layout.quarantine_ref(self.name, spec.shard_id)
        counters: Counter = Counter()
        with JsonlWriter(storage, quarantine_ref) as qw, JsonlWriter(storage, docs_ref) as dw:
            logged = 0

            def quarantine(file: str, line: int, reason: str, excerpt: str) -> None:
                nonlocal logged
                qw.write({"file": file, "line": line, "reason": reason, "excerpt": excerpt})
                if logged < _LOGGED_QUARANTINES:
                    logged += 1
                    log.warning("quarantined %s:%d: %s", file, line, reason)

            docs = read_documents(storage, uri, self.cfg.read, counters, quarantine)
            if self.cfg.clean.enabled:
                docs = clean_step(self.cfg.clean)(docs, counters)
            _write_docs(dw, docs, counters)
        if logged >= _LOGGED_QUARANTINES:
            log.warning("%s: %d records quarantined in all (see %s)", uri, qw.count, quarantine_ref)
        return ShardOutput(outputs={"docs": docs_ref, "quarantine": quarantine_ref}, counts=dict(counters))


class FilterStage:
    """language → Gopher quality → Gopher repetition → C4 → FineWeb over each clean shard.

    Outputs: ``docs`` = ``stages/filter/<shard>.jsonl.zst``; with ``filter.write_dropped`` also
    ``dropped`` = ``stages/filter/_dropped/<shard>.jsonl.zst``: each dropped document (as it was
    when dropped) with ``filter`` and ``reason`` fields.
    """

    name = "filter"
    per_shard = True
    upstream = "clean"

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        f = cfg.filter
        self._filters = quality_filters(f.gopher_quality, f.gopher_repetition, f.c4, f.fineweb)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return upstream_shards(storage, self.upstream)

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": FILTER_FORMAT_VERSION,
                            "filter": self.cfg.filter.model_dump(mode="json")})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        (ref,) = spec.inputs
        f = self.cfg.filter
        docs_ref = stage_docs_ref(self.name, spec.shard_id)
        dropped_ref = dropped_docs_ref(self.name, spec.shard_id)
        counters: Counter = Counter()
        outputs = {"docs": docs_ref}
        dropped_writer = JsonlWriter(storage, dropped_ref) if f.write_dropped else None
        on_drop: OnDrop | None = None
        if dropped_writer is not None:
            outputs["dropped"] = dropped_ref

            def write_dropped(doc: Document, filter_name: str, reason: str) -> None:
                dropped_writer.write({**doc, "filter": filter_name, "reason": reason})

            on_drop = write_dropped

        try:
            with JsonlWriter(storage, docs_ref) as dw:
                docs = _counted(iter_jsonl(storage, ref), counters)
                if f.language.enabled:
                    docs = language_step(f.language, on_drop)(docs, counters)
                for check in self._filters:
                    docs = filter_step(check, on_drop)(docs, counters)
                _write_docs(dw, docs, counters)
        except BaseException as exc:
            if dropped_writer is not None:
                dropped_writer.abort(exc)
            raise
        if dropped_writer is not None:
            dropped_writer.close()
        return ShardOutput(outputs=outputs, counts=dict(counters))


def _counted(docs, counters: Counter):
    n = n_bytes = 0
    try:
        for doc in docs:
            n += 1
            n_bytes += utf8_len(doc["text"])
            yield doc
    finally:
        counters["docs_in"] += n
        counters["bytes_in"] += n_bytes
