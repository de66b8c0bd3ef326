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

from collections import Counter

import numpy as np
import pyarrow as pa

from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import read_parquet_table, write_parquet_table

from .config import PrepConfig
from .dedup_common import (BUCKETS, FORMAT_VERSION, bucket_ids, bucket_of, bucket_ref, check_sig_params,
                           columns_of_bucket, concat, key_columns, shard_of_ref, signature_inputs, table_meta)
from .stage import ShardOutput, ShardSpec


class DedupBucketsStage:
    """Per bucket: the groups of documents sharing a key (exact key or one band's hash) among the
    bucket's keys of all signature files. Output rows ``(column, key, shard, idx)`` for every
    member of a group of two or more, sorted; singletons are not written."""

    name = BUCKETS

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.columns = key_columns(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs = signature_inputs(storage)
        return [ShardSpec(b, dict(inputs)) for b in bucket_ids(self.cfg.dedup)]

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "num_buckets": self.cfg.dedup.num_buckets,
                            "columns": self.columns})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        d = self.cfg.dedup
        bucket = bucket_ids(d).index(spec.shard_id)
        mine = columns_of_bucket(bucket, len(self.columns), d.num_buckets)
        refs = sorted(spec.inputs, key=shard_of_ref)
        shards = [shard_of_ref(r) for r in refs]
        keys: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        nodes: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        for ordinal, ref in enumerate(refs):
            table = read_parquet_table(storage, ref, [self.columns[c] for c in mine])   # one open per file
            check_sig_params(storage, ref, table_meta(storage, ref, table), d)
            for c in mine:
                col = table.column(self.columns[c]).to_numpy()
                idx = np.flatnonzero(bucket_of(c, col, len(self.columns), d.num_buckets) == bucket)
                keys[c].append(col[idx])
                nodes[c].append((np.uint64(ordinal) << np.uint64(32)) | idx.astype(np.uint64))
        counters: Counter = Counter()
        names: list[str] = []
        out_keys: list[np.ndarray] = []
        out_nodes: list[np.ndarray] = []
        for c in mine:
            k, v = concat(keys[c], np.uint64), concat(nodes[c], np.uint64)
            order = np.argsort(k, kind="stable")  # members stay in (shard, idx) order
            k, v = k[order], v[order]
            member, n_groups = in_groups(k)
            counters["keys"] += len(k)
            counters["groups"] += n_groups
            counters["members"] += int(member.sum())
            names += [self.columns[c]] * int(member.sum())
            out_keys.append(k[member])
            out_nodes.append(v[member])
        node = concat(out_nodes, np.uint64)
        table = pa.table({
            "column": pa.array(names, type=pa.string()),
            "key": pa.array(concat(out_keys, np.uint64)),
            "shard": pa.array([shards[o] for o in (node >> np.uint64(32)).tolist()], type=pa.string()),
            "idx": pa.array((node & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
        })
        out = bucket_ref(spec.shard_id)
        write_parquet_table(storage, out, table)
        return ShardOutput(outputs={"groups": out}, counts=dict(counters))


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
