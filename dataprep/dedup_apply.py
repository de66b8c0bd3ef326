"""Dedup phase 4, ``dedup``: each filter shard's documents minus the ones its drop list removes.

Kept documents are copied as raw JSONL lines (no re-serialization), so dedup never changes a kept
document's bytes. The shard's inputs are the filter output and its drop list, so a changed drop
list makes exactly the affected shards stale; a drop list computed from other documents than
the ones now upstream is refused rather than applied to the wrong lines.
"""
from __future__ import annotations

import json
from collections import Counter

import zstandard

from shardflow.storage import Storage, digest_bytes, digest_json
from shardflow.storage.jsonl import iter_lines, parquet_metadata, read_parquet_table
from shardflow.storage.layout import stage_docs_ref
from shardflow.storage.manifest import read_record

from .config import PrepConfig
from .dedup_common import CLUSTERS, FORMAT_VERSION, FILTER, GLOBAL_SHARD, META_KEY, UPSTREAM, drop_ref
from .stage import ShardOutput, ShardSpec, upstream_shards

_WRITE_CHUNK = 1 << 20


class DedupFilterStage:
    """Per filter shard: its documents minus the dropped ones (see the module docstring)."""

    name = FILTER
    per_shard = True  # one shard per filter shard (for status predictions)

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.enabled = cfg.dedup.exact or cfg.dedup.near

    def shards(self, storage: Storage) -> list[ShardSpec]:
        specs = upstream_shards(storage, UPSTREAM)
        if not self.enabled:
            return specs
        rec = read_record(storage, CLUSTERS, GLOBAL_SHARD)
        outs = rec.outputs if rec is not None and rec.status == "done" else {}
        result = []
        for s in specs:
            out = outs.get(f"drops.{s.shard_id}")
            drops = {out.ref: out.digest} if out else {drop_ref(s.shard_id): ""}
            result.append(ShardSpec(s.shard_id, {**s.inputs, **drops}))
        return result

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "enabled": self.enabled})

    def _drop_list(self, storage: Storage, spec: ShardSpec, docs_ref: str, docs_digest: str) -> tuple[dict[int, str], int]:
        drops_key = drop_ref(spec.shard_id)
        if not spec.inputs.get(drops_key) or not storage.exists(drops_key):
            raise RuntimeError(f"no drop list for shard {spec.shard_id} ({storage.uri(drops_key)}) in the last "
                               f"dedup_clusters run: run dedup_signatures … dedup_clusters first")
        if digest_bytes(storage.read_bytes(drops_key)) != spec.inputs[drops_key]:
            raise RuntimeError(f"{storage.uri(drops_key)} changed since this run was planned: plan again")
        info = json.loads(parquet_metadata(storage, drops_key)[META_KEY])
        if info["docs"]["digest"] != docs_digest:
            raise RuntimeError(
                f"drop list {storage.uri(drops_key)} was computed from {info['docs']['digest']} but "
                f"{storage.uri(docs_ref)} is now {docs_digest}: re-run dedup_signatures … dedup_clusters")
        t = read_parquet_table(storage, drops_key, ["idx", "kind"])
        return dict(zip(t.column("idx").to_pylist(), t.column("kind").to_pylist())), info["docs"]["count"]

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        drops_key = drop_ref(spec.shard_id)
        docs = {r: dg for r, dg in spec.inputs.items() if r != drops_key}
        ((docs_ref, docs_digest),) = docs.items()
        drop: dict[int, str] = {}
        expected = None
        if self.enabled:
            drop, expected = self._drop_list(storage, spec, docs_ref, docs_digest)
        counters: Counter = Counter()
        out = stage_docs_ref(self.name, spec.shard_id)
        n_in = n_out = 0
        with storage.atomic_write(out) as raw:
            cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)   # as JsonlWriter
            with cctx.stream_writer(raw, closefd=False) as w:
                pending: list[bytes] = []
                size = 0
                for _, line in iter_lines(storage, docs_ref):
                    kind = drop.get(n_in)
                    n_in += 1
                    if kind is not None:
                        counters[f"dropped.{kind}"] += 1
                        continue
                    pending.append(line)
                    size += len(line)
                    n_out += 1
                    if size >= _WRITE_CHUNK:
                        w.write(b"\n".join(pending) + b"\n")
                        pending, size = [], 0
                if pending:
                    w.write(b"\n".join(pending) + b"\n")
            if expected is not None and n_in != expected:  # raising here publishes nothing
                raise RuntimeError(f"{storage.uri(docs_ref)} has {n_in} documents, its drop list expects {expected}")
        counters["docs_in"], counters["docs_out"] = n_in, n_out
        return ShardOutput(outputs={"docs": out}, counts=dict(counters))
