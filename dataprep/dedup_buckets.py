"""Dedup phase 2, ``dedup_buckets``: per bucket, the groups of documents sharing a key.

Why buckets are *key columns* rather than partition files written per signature shard: a signature
file is Parquet with one column per key (``exact``, ``band_00`` …), so "the bucket of band 3" is
a column projection — the bucket phase reads just its columns of every signature file (a
byte-range read per column chunk on object stores) and nothing is written twice. With more
buckets than key columns each column is further split by ``key mod P`` (:func:`bucket_of`), so
``num_buckets`` bounds the memory of one bucket to ``docs × columns / num_buckets`` keys (16 bytes
each with their document reference) however large the corpus, and buckets run in parallel.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import read_parquet_if_intact, read_parquet_table, write_parquet_table
from shardflow.storage.manifest import read_record

from .config import PrepConfig
from .dedup_common import (BUCKETS, FORMAT_VERSION, META_KEY, bucket_ids, bucket_of, bucket_ref, check_sig_params,
                           columns_of_bucket, concat, dumps, index_ref, key_columns, shard_of_ref, signature_inputs,
                           table_meta)
from .stage import ShardOutput, ShardSpec


class DedupBucketsStage:
    """Per bucket: the groups of documents sharing a key (exact key or one band's hash) among the
    bucket's keys of all signature files. Output rows ``(column, key, shard, idx)`` for every
    member of a group of two or more, sorted; singletons are not written."""

    name = BUCKETS
    per_shard = False
    appends = True  # new signature shards leave the earlier shards' dedup results as they are (status)

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.columns = key_columns(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs = signature_inputs(storage)
        return [ShardSpec(b, dict(inputs)) for b in bucket_ids(self.cfg.dedup)]

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "num_buckets": self.cfg.dedup.num_buckets,
                            "columns": self.columns})

    def _previous_index(self, storage: Storage, spec: ShardSpec) -> tuple[pa.Table, set[str]] | None:
        """The key index this bucket wrote last time, if every signature file it covers is still an
        input with the same digest (then those files need not be read again)."""
        rec = read_record(storage, self.name, spec.shard_id)
        out = rec.outputs.get("index") if rec is not None and rec.status == "done" else None
        if out is None or not storage.exists(out.ref):
            return None
        table = read_parquet_if_intact(storage, out.ref, out.digest)
        if table is None:                             # altered since it was written: rebuild
            return None
        info = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
        covers = info.get("covers") or {}
        if info.get("columns") != self.columns or info.get("num_buckets") != self.cfg.dedup.num_buckets \
                or any(spec.inputs.get(r) != dg for r, dg in covers.items()):
            return None
        return table, set(covers)

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        d = self.cfg.dedup
        bucket = bucket_ids(d).index(spec.shard_id)
        mine = columns_of_bucket(bucket, len(self.columns), d.num_buckets)
        refs = sorted(spec.inputs, key=shard_of_ref)
        shards = [shard_of_ref(r) for r in refs]
        keys: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        nodes: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        counters: Counter = Counter()
        prev = self._previous_index(storage, spec)
        reused: set[str] = set()
        if prev is not None:
            table, reused = prev
            cols = pc.index_in(table.column("column"), value_set=pa.array(self.columns)).to_numpy()
            ords = pc.index_in(table.column("shard"), value_set=pa.array(shards)).to_numpy().astype(np.uint64)
            node = (ords << np.uint64(32)) | table.column("idx").to_numpy().astype(np.uint64)
            key = table.column("key").to_numpy()
            for c in mine:
                sel = cols == c
                keys[c].append(key[sel])
                nodes[c].append(node[sel])
            counters["files_reused"] = len(reused)
        for ordinal, ref in enumerate(refs):
            if ref in reused:
                continue
            table = read_parquet_table(storage, ref, [self.columns[c] for c in mine])   # one open per file
            check_sig_params(storage, ref, table_meta(storage, ref, table), d)
            counters["files_read"] += 1
            for c in mine:
                col = table.column(self.columns[c]).to_numpy()
                idx = np.flatnonzero(bucket_of(c, col, len(self.columns), d.num_buckets) == bucket)
                keys[c].append(col[idx])
                nodes[c].append((np.uint64(ordinal) << np.uint64(32)) | idx.astype(np.uint64))
        groups: list[tuple[str, np.ndarray, np.ndarray]] = []
        every: list[tuple[str, np.ndarray, np.ndarray]] = []
        for c in mine:
            k, v = concat(keys[c], np.uint64), concat(nodes[c], np.uint64)
            order = np.lexsort((v, k))            # by key, members in (shard, idx) order
            k, v = k[order], v[order]
            member, n_groups = in_groups(k)
            counters["keys"] += len(k)
            counters["groups"] += n_groups
            counters["members"] += int(member.sum())
            groups.append((self.columns[c], k[member], v[member]))
            every.append((self.columns[c], k, v))
        out, index = bucket_ref(spec.shard_id), index_ref(spec.shard_id)
        write_parquet_table(storage, out, _key_table(groups, shards))
        info = {"covers": dict(sorted(spec.inputs.items())), "columns": self.columns, "num_buckets": d.num_buckets}
        write_parquet_table(storage, index, _key_table(every, shards).replace_schema_metadata({META_KEY: dumps(info)}))
        return ShardOutput(outputs={"groups": out, "index": index}, counts=dict(counters))


def _key_table(parts: list[tuple[str, np.ndarray, np.ndarray]], shards: list[str]) -> pa.Table:
    """Rows ``(column, key, shard, idx)`` from (column name, keys, node codes) parts."""
    node = concat([v for _, _, v in parts], np.uint64)
    return pa.table({
        "column": pa.array([name for name, k, _ in parts for _ in range(len(k))], type=pa.string()),
        "key": pa.array(concat([k for _, k, _ in parts], np.uint64)),
        "shard": pa.array([shards[o] for o in (node >> np.uint64(32)).tolist()], type=pa.string()),
        "idx": pa.array((node & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
    })


def in_groups(sorted_keys: np.ndarray) -> tuple[np.ndarray, int]:
    """(mask of entries whose key occurs at least twice, number of such keys); input sorted."""
    n = len(sorted_keys)
    if n < 2:
        return np.zeros(n, dtype=bool), 0
    same = sorted_keys[1:] == sorted_keys[:-1]
    member = np.zeros(n, dtype=bool)
    member[1:] |= same
    member[:-1] |= same
    group_start = member.copy()
    group_start[1:] &= ~same
    return member, int(group_start.sum())
