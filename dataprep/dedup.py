"""Exact and MinHash-LSH near-duplicate removal across all shards, in four resumable phases.

======================  ==========  ============================================================
phase (stage name)      shards      does (module)
======================  ==========  ============================================================
``dedup_signatures``    per input   per document: exact key, raw-text hash, LSH band hashes and
                        shard       MinHash signature → ``dedup/signatures/<shard>.parquet``
                                    (no text) — ``dedup_signatures.py``
``dedup_buckets``       per bucket  reads its key columns of every signature file, groups equal
                                    keys → ``dedup/buckets/<bucket>.parquet`` (candidate groups)
                                    — ``dedup_buckets.py``
``dedup_clusters``      ``_all``    exact twins collapse; candidate pairs verified; greedy star
                                    clusters (no chaining) → ``dedup/drops/<shard>.parquet``
                                    (drop list = audit) and ``dedup/clusters_report.json`` —
                                    ``dedup_clusters.py``, ``dedup_graph.py``
``dedup``               per input   the filter stage's documents minus the dropped ones →
                        shard       ``stages/dedup/<shard>.jsonl.zst`` — ``dedup_apply.py``
======================  ==========  ============================================================

Each phase has its own manifest records, and each phase's inputs are the digests of the previous
one's outputs, so a changed input shard redoes its signatures, then (only if the signature bytes
changed) the buckets, the clusters, and the ``dedup`` shards whose drop list or documents changed.
docs/dedup.md describes the options, the chaining problem and the measured trade-offs.
"""
from __future__ import annotations

from typing import Any

from .config import PrepConfig
from .dedup_apply import DedupFilterStage
from .dedup_buckets import DedupBucketsStage
from .dedup_clusters import DedupClustersStage
from .dedup_common import (BUCKET_DIR, BUCKETS, CLUSTERS, DROP_DIR, FILTER, GLOBAL_SHARD, REPORT_REF, SIG_DIR,
                           SIGNATURES, bucket_of, bucket_ref, columns_of_bucket, drop_ref, key_columns, sig_ref)
from .dedup_graph import connected_components, star_clusters
from .dedup_signatures import DedupSignaturesStage

__all__ = [
    "BUCKET_DIR", "BUCKETS", "CLUSTERS", "DROP_DIR", "FILTER", "GLOBAL_SHARD", "REPORT_REF", "SIG_DIR", "SIGNATURES",
    "DedupBucketsStage", "DedupClustersStage", "DedupFilterStage", "DedupSignaturesStage", "bucket_of", "bucket_ref",
    "columns_of_bucket", "connected_components", "dedup_stages", "drop_ref", "key_columns", "sig_ref", "star_clusters",
]


def dedup_stages(cfg: PrepConfig) -> list[Any]:
    """The dedup phases in run order (only the pass-through ``dedup`` when exact and near are off)."""
    if not (cfg.dedup.exact or cfg.dedup.near):
        return [DedupFilterStage(cfg)]
    return [DedupSignaturesStage(cfg), DedupBucketsStage(cfg), DedupClustersStage(cfg), DedupFilterStage(cfg)]
