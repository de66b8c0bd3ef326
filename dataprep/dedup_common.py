"""What the four dedup phases share: output locations, signature-file parameters, key columns and
bucket assignment, and the lookups of upstream shards and done records.

The phases live in ``dedup_signatures`` → ``dedup_buckets`` → ``dedup_clusters`` → ``dedup_apply``;
``dataprep/dedup.py`` is the public face (stage classes, :func:`~shardflow.dataprep.dedup.dedup_stages`).
"""
from __future__ import annotations

import json
import posixpath
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np

from shardflow.storage import Storage
from shardflow.storage.jsonl import parquet_metadata
from shardflow.storage.manifest import list_records

from .config import DedupConfig
from .minhash import MinHasher
from .stage import upstream_shards

FORMAT_VERSION = 2
"""2: star clusters over verified pairs, Parquet drop lists with survivor, similarity and cluster."""
NORMALIZATION_VERSION = 1
"""Bump when minhash.py's normalization or hashing changes: every signature becomes stale."""

UPSTREAM = "filter"
SIGNATURES, BUCKETS, CLUSTERS, FILTER = "dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"
GLOBAL_SHARD = "_all"
SIG_DIR, BUCKET_DIR, DROP_DIR = "dedup/signatures", "dedup/buckets", "dedup/drops"
INDEX_DIR = "dedup/bucket_index"
REPORT_REF = "dedup/clusters_report.json"
STATE_REF = "dedup/state.json"
EXACT_COLUMN = "exact"
MINHASH_COLUMN = "minhash"
META_KEY = b"shardflow.dedup"


def sig_ref(shard_id: str) -> str:
    return f"{SIG_DIR}/{shard_id}.parquet"


def bucket_ref(bucket_id: str) -> str:
    return f"{BUCKET_DIR}/{bucket_id}.parquet"


def index_ref(bucket_id: str) -> str:
    """A bucket's index of all its keys (singletons included), for appending new shards."""
    return f"{INDEX_DIR}/{bucket_id}.parquet"


def drop_ref(shard_id: str) -> str:
    """A shard's drop list, which is also its audit: one Parquet row per removed document."""
    return f"{DROP_DIR}/{shard_id}.parquet"


def bucket_ids(cfg: DedupConfig) -> list[str]:
    return [f"b{k:04d}" for k in range(cfg.num_buckets)]


def band_column(band: int) -> str:
    return f"band_{band:02d}"


def key_columns(cfg: DedupConfig) -> list[str]:
    """The signature columns whose equal values make documents candidates, in a fixed order."""
    cols = [EXACT_COLUMN] if cfg.exact else []
    if cfg.near:
        cols += [band_column(i) for i in range(cfg.num_bands)]
    return cols


def bucket_of(column: int, keys: np.ndarray, n_columns: int, num_buckets: int) -> np.ndarray:
    """Bucket of each key of one column: column-major units ``column * P + key mod P``, dealt
    round-robin over buckets, with ``P = ceil(num_buckets / n_columns)`` (1 when buckets are fewer
    than columns: then a bucket is a set of whole columns)."""
    parts = -(-num_buckets // n_columns)
    units = np.uint64(column * parts) + (keys % np.uint64(parts))
    return (units % np.uint64(num_buckets)).astype(np.int64)


def columns_of_bucket(bucket: int, n_columns: int, num_buckets: int) -> list[int]:
    parts = -(-num_buckets // n_columns)
    return sorted({u // parts for u in range(n_columns * parts) if u % num_buckets == bucket})


def hasher(cfg: DedupConfig) -> MinHasher:
    return MinHasher(ngram=cfg.ngram, num_bands=cfg.num_bands if cfg.near else 0,
                     rows_per_band=cfg.rows_per_band, seed=cfg.seed)


def sig_params(cfg: DedupConfig) -> dict[str, Any]:
    """What a signature file's contents depend on besides its documents (kept in its metadata)."""
    params: dict[str, Any] = {"normalization": NORMALIZATION_VERSION, "num_bands": cfg.num_bands if cfg.near else 0}
    if cfg.near:
        params.update(ngram=cfg.ngram, rows_per_band=cfg.rows_per_band, seed=cfg.seed)
    return params


def check_sig_params(storage: Storage, ref: str, meta: dict[str, Any], cfg: DedupConfig) -> None:
    want = sig_params(cfg)
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{storage.uri(ref)} was computed with {got}, the config asks for {want}: "
                         f"run dedup_signatures first")


def sig_meta(storage: Storage, ref: str) -> dict[str, Any]:
    return _parse_meta(storage, ref, parquet_metadata(storage, ref))


def table_meta(storage: Storage, ref: str, table: Any) -> dict[str, Any]:
    """The shardflow metadata of a signature file from a table already read from it."""
    return _parse_meta(storage, ref, table.schema.metadata or {})


def _parse_meta(storage: Storage, ref: str, meta: dict[bytes, bytes]) -> dict[str, Any]:
    if META_KEY not in meta:
        raise ValueError(f"{storage.uri(ref)} is not a shardflow signature file (no {META_KEY.decode()} metadata)")
    return json.loads(meta[META_KEY])


def prefetched(fn: Callable[[Any], Any], items: list[Any], depth: int = 8) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` in order, with up to ``depth`` calls in flight on threads.

    Why: the global dedup phases read one small file per shard (signature columns, drop lists).
    On an object store each read is a few round trips that cost far more than the bytes, so one
    after another they made an append's cluster phase cost 10 s for 200 shards on S3; a bounded
    window keeps the requests overlapping while only ``depth`` files are held in memory at once.
    """
    with ThreadPoolExecutor(max_workers=max(1, min(depth, len(items)))) as pool:
        pending = iter(items)
        window = deque((item, pool.submit(fn, item)) for item in islice(pending, depth))
        while window:
            item, fut = window.popleft()
            window.extend((nxt, pool.submit(fn, nxt)) for nxt in islice(pending, 1))
            yield item, fut.result()


def concat(arrays: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
    if arrays:
        return np.concatenate(arrays)
    return np.zeros((0, width) if width else 0, dtype=dtype)


def shard_of_ref(ref: str) -> str:
    return posixpath.basename(ref).split(".", 1)[0]


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def done_records(storage: Storage, stage: str, shard_ids: list[str]) -> dict[str, Any]:
    records = list_records(storage, stage)
    return {s: records[s] for s in shard_ids if s in records and records[s].status == "done"}


def signature_inputs(storage: Storage) -> dict[str, str]:
    """sig ref -> digest of every done signature shard whose filter shard still exists."""
    current = [s.shard_id for s in upstream_shards(storage, UPSTREAM)]
    return {rec.outputs["signatures"].ref: rec.outputs["signatures"].digest
            for rec in done_records(storage, SIGNATURES, current).values() if "signatures" in rec.outputs}
