"""Small stages with real file I/O for the orchestration tests.

They follow dataprep/stage.py's protocol exactly like the real stages (inputs from files or from
upstream manifests, atomic outputs, counters), but do trivially cheap work, so the tests measure the
orchestration: planning, task fan-out, retries, failure reporting, resumability. A flow gets them
through ``stage_factory="tests.flows.toy_stages:build"`` (an import path, as task parameters must be
small and picklable).

Knobs are read from existing config sections so that PrepConfig needs no test-only fields:
``clean.min_chars`` (upper: documents shorter are dropped) and ``tokenize.seq_len`` (words: each
document is cut to that many words). A document whose text contains ``POISON`` makes its shard fail
with a data error; a marker file ``_flaky/<shard>`` under the root makes the next attempt of that
shard fail with a transient connection error (and removes the marker), to exercise retries.
"""
from __future__ import annotations

import json
from collections import Counter

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import ShardOutput, ShardSpec, input_shards, upstream_shards
from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import JsonlWriter, iter_jsonl, iter_lines

FACTORY = "tests.flows.toy_stages:build"


class UpperStage:
    name = "upper"
    per_shard = True

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return input_shards(storage, self.cfg.inputs)

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": 1, "min_chars": self.cfg.clean.min_chars})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        flaky = f"_flaky/{spec.shard_id}"
        if storage.exists(flaky):
            storage.remove(flaky)
            raise ConnectionError(f"simulated connection reset while reading shard {spec.shard_id}")
        (uri,) = spec.inputs
        counts: Counter = Counter()
        docs_ref = f"stages/{self.name}/{spec.shard_id}.jsonl.zst"
        q_ref = f"quarantine/{self.name}/{spec.shard_id}.jsonl.zst"
        with JsonlWriter(storage, q_ref) as qw, JsonlWriter(storage, docs_ref) as dw:
            for lineno, raw in iter_lines(storage, uri):
                counts["lines"] += 1
                try:
                    doc = json.loads(raw)
                except ValueError:
                    counts["quarantined.invalid_json"] += 1
                    qw.write({"file": uri, "line": lineno, "reason": "invalid_json", "excerpt": raw[:200].decode("utf-8", "replace")})
                    continue
                counts["docs_in"] += 1
                if "POISON" in doc["text"]:
                    raise ValueError(f"{uri}:{lineno}: poisoned document {doc['id']!r}")
                if len(doc["text"]) < self.cfg.clean.min_chars:
                    counts["dropped.length.too_short"] += 1
                    continue
                dw.write({"id": doc["id"], "text": doc["text"].upper(), "source": uri, "meta": {}})
                counts["docs_out"] += 1
        return ShardOutput({"docs": docs_ref, "quarantine": q_ref}, dict(counts))


class WordsStage:
    name = "words"
    per_shard = True

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return upstream_shards(storage, "upper")

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": 1, "max_words": self.cfg.tokenize.seq_len})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        (ref,) = spec.inputs
        counts: Counter = Counter()
        out = f"stages/{self.name}/{spec.shard_id}.jsonl.zst"
        with JsonlWriter(storage, out) as w:
            for doc in iter_jsonl(storage, ref):
                words = doc["text"].split()[: self.cfg.tokenize.seq_len]
                counts["docs_in"] += 1
                counts["tokens"] += len(words)
                w.write({**doc, "text": " ".join(words), "meta": {"words": len(words)}})
        return ShardOutput({"docs": out}, dict(counts))


class MergeStage:
    """One global shard over every words shard (like the tokenizer or pack stages)."""

    name = "merge"
    per_shard = False

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs: dict[str, str] = {}
        for spec in upstream_shards(storage, "words"):
            inputs.update(spec.inputs)
        return [ShardSpec("_all", inputs)] if inputs else []

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": 1})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        docs = [d for ref in sorted(spec.inputs) for d in iter_jsonl(storage, ref)]
        docs.sort(key=lambda d: d["id"])
        out = "merged/all.jsonl.zst"
        with JsonlWriter(storage, out) as w:
            w.write_many(docs)
        return ShardOutput({"docs": out}, {"docs_in": len(docs), "tokens": sum(d["meta"]["words"] for d in docs)})


def build(cfg: PrepConfig):
    return [UpperStage(cfg), WordsStage(cfg), MergeStage(cfg)]
