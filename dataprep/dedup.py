"""Exact and MinHash-LSH near-duplicate removal across all shards, in four resumable phases.

======================  ==========  ============================================================
phase (stage name)      shards      does
======================  ==========  ============================================================
``dedup_signatures``    per input   per document: exact key, raw-text hash, LSH band hashes →
                        shard       ``dedup/signatures/<shard>.parquet`` (no text)
``dedup_buckets``       per bucket  reads its key columns of every signature file, groups equal
                                    keys → ``dedup/buckets/<bucket>.parquet`` (candidate groups)
``dedup_clusters``      ``_all``    union-find over the groups (optionally Jaccard-verified),
                                    survivor per cluster → ``dedup/drops/<shard>.json`` and
                                    ``dedup/clusters_report.json``
``dedup``               per input   the filter stage's documents minus the dropped ones →
                        shard       ``stages/dedup/<shard>.jsonl.zst``
======================  ==========  ============================================================

Why buckets are *key columns* rather than partition files written per signature shard: a signature
file is Parquet with one column per key (``exact``, ``band_00`` … ``band_13``), so "the bucket of
band 3" is a column projection — the bucket phase reads just its columns of every signature file
(a byte-range read per column chunk on object stores) and nothing is written twice. With more
buckets than key columns each column is further split by ``key mod P``
(:func:`bucket_of`), so ``num_buckets`` bounds the memory of one bucket to
``docs × columns / num_buckets`` keys (16 bytes each with their document reference) however
large the corpus, and buckets run in parallel. Each phase has its own manifest records, and each
phase's inputs are the digests of the previous one's outputs, so a changed input shard redoes its
signatures, then (only if the signature bytes changed) the buckets, the clusters, and the
``dedup`` shards whose drop list or documents changed.

Why the survivor is the member with the smallest (exact key, raw-text hash, document id): it is a
function of the cluster's content alone, so it does not depend on shard numbering, processing
order or the number of workers — "first seen" would. Ties beyond that (the same text *and* id in
two shards) fall back to (shard, index).

Memory never holds text, except with ``jaccard_threshold``: then the documents at the ends of
candidate pairs that do not already share their exact key — and only those — are re-read to
compute their shingle sets, so false LSH candidates are removed before clustering.
"""
from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
import zstandard

from shardflow.storage import Storage, digest_bytes, digest_json
from shardflow.storage.jsonl import iter_lines
from shardflow.storage.manifest import list_records, read_record

from .config import DedupConfig, PrepConfig
from .minhash import MinHasher, jaccard
from .stage import ShardOutput, ShardSpec, upstream_shards

FORMAT_VERSION = 1
NORMALIZATION_VERSION = 1
"""Bump when minhash.py's normalization or hashing changes: every signature becomes stale."""

UPSTREAM = "filter"
SIGNATURES, BUCKETS, CLUSTERS, FILTER = "dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup"
GLOBAL_SHARD = "_all"
SIG_DIR, BUCKET_DIR, DROP_DIR = "dedup/signatures", "dedup/buckets", "dedup/drops"
REPORT_REF = "dedup/clusters_report.json"
EXACT_COLUMN = "exact"
_META_KEY = b"shardflow.dedup"
_SIG_BATCH_BYTES = 4 << 20
_WRITE_CHUNK = 1 << 20
_HISTOGRAM_CAP = 10
_REPORT_LARGEST = 10
_REPORT_MEMBERS = 20


def sig_ref(shard_id: str) -> str:
    return f"{SIG_DIR}/{shard_id}.parquet"


def bucket_ref(bucket_id: str) -> str:
    return f"{BUCKET_DIR}/{bucket_id}.parquet"


def drop_ref(shard_id: str) -> str:
    return f"{DROP_DIR}/{shard_id}.json"


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


def _columns_of_bucket(bucket: int, n_columns: int, num_buckets: int) -> list[int]:
    parts = -(-num_buckets // n_columns)
    return sorted({u // parts for u in range(n_columns * parts) if u % num_buckets == bucket})


def _hasher(cfg: DedupConfig) -> MinHasher:
    return MinHasher(ngram=cfg.ngram, num_bands=cfg.num_bands if cfg.near else 0,
                     rows_per_band=cfg.rows_per_band, seed=cfg.seed)


def _sig_params(cfg: DedupConfig) -> dict[str, Any]:
    """What a signature file's contents depend on besides its documents (kept in its metadata)."""
    params: dict[str, Any] = {"normalization": NORMALIZATION_VERSION, "num_bands": cfg.num_bands if cfg.near else 0}
    if cfg.near:
        params.update(ngram=cfg.ngram, rows_per_band=cfg.rows_per_band, seed=cfg.seed)
    return params


def _check_sig_params(storage: Storage, ref: str, meta: dict[str, Any], cfg: DedupConfig) -> None:
    want = _sig_params(cfg)
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"{storage.uri(ref)} was computed with {got}, the config asks for {want}: "
                         f"run dedup_signatures first")


def _concat(arrays: list[np.ndarray], dtype: Any, width: int | None = None) -> np.ndarray:
    if arrays:
        return np.concatenate(arrays)
    return np.zeros((0, width) if width else 0, dtype=dtype)


def _shard_of_ref(ref: str) -> str:
    return posixpath.basename(ref).split(".", 1)[0]


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode("utf-8")


def _read_parquet(storage: Storage, ref: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_read(ref) as f:
        return pq.read_table(f, columns=columns)


def _sig_meta(storage: Storage, ref: str) -> dict[str, Any]:
    with storage.open_read(ref) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    if _META_KEY not in meta:
        raise ValueError(f"{storage.uri(ref)} is not a shardflow signature file (no {_META_KEY.decode()} metadata)")
    return json.loads(meta[_META_KEY])


def _write_parquet(storage: Storage, ref: str, table: pa.Table) -> None:
    with storage.atomic_write(ref) as f:
        pq.write_table(table, f, compression="zstd")


def _done_records(storage: Storage, stage: str, shard_ids: list[str]) -> dict[str, Any]:
    records = list_records(storage, stage)
    return {s: records[s] for s in shard_ids if s in records and records[s].status == "done"}


# -- phase 1: signatures -------------------------------------------------------------------------------

class DedupSignaturesStage:
    """Per filter shard: one row per document — index, id, exact key, raw-text hash, word count
    and (with ``near``) one hash per LSH band. The source documents' ref and digest go into the
    file's metadata, so later phases know what the indices refer to."""

    name = SIGNATURES

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.hasher = _hasher(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return upstream_shards(storage, UPSTREAM)

    def config_digest(self) -> str:
        d = self.cfg.dedup
        minhash = {"ngram": d.ngram, "num_bands": d.num_bands, "rows_per_band": d.rows_per_band, "seed": d.seed}
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "normalization": NORMALIZATION_VERSION,
                            "minhash": minhash if d.near else None})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        ((docs_ref, docs_digest),) = spec.inputs.items()
        counters: Counter = Counter()
        ids: list[str] = []
        parts: list[Any] = []
        texts: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal texts, size
            if texts:
                parts.append(self.hasher.sketch(texts))
                texts, size = [], 0

        loads = json.loads
        for lineno, line in iter_lines(storage, docs_ref):
            try:
                doc = loads(line)
                text, doc_id = doc["text"], doc["id"]
                if not isinstance(text, str):
                    raise TypeError(f"text is {type(text).__name__}, not str")
            except (ValueError, KeyError, TypeError) as exc:
                # upstream output is trusted; if it is broken anyway, say where
                raise ValueError(f"{storage.uri(docs_ref)}: line {lineno}: not a document "
                                 f"({type(exc).__name__}: {exc})") from None
            ids.append(doc_id if isinstance(doc_id, str) else str(doc_id))
            texts.append(text)
            size += len(line)
            if size >= _SIG_BATCH_BYTES:
                flush()
        flush()
        n = len(ids)
        bands = self.hasher.num_bands
        words = _concat([p.words for p in parts], np.int64).astype(np.uint32)
        columns: dict[str, Any] = {
            "idx": pa.array(np.arange(n, dtype=np.uint32)),
            "id": pa.array(ids, type=pa.string()),
            EXACT_COLUMN: pa.array(_concat([p.exact for p in parts], np.uint64)),
            "text_hash": pa.array(_concat([p.text_hash for p in parts], np.uint64)),
            "words": pa.array(words),
        }
        all_bands = _concat([p.bands for p in parts], np.uint64, bands)
        for i in range(bands):
            columns[band_column(i)] = pa.array(np.ascontiguousarray(all_bands[:, i]))
        meta = {"shard": spec.shard_id, "docs_ref": docs_ref, "docs_digest": docs_digest, "docs": n,
                **_sig_params(self.cfg.dedup)}
        table = pa.table(columns).replace_schema_metadata({_META_KEY: _dumps(meta)})
        out = sig_ref(spec.shard_id)
        _write_parquet(storage, out, table)
        counters["docs_in"] = n
        counters["words"] = int(words.sum())
        counters["docs_short"] = int(((words > 0) & (words < self.hasher.ngram)).sum())
        counters["docs_wordless"] = int((words == 0).sum())
        return ShardOutput(outputs={"signatures": out}, counts=dict(counters))


# -- phase 2: buckets ----------------------------------------------------------------------------------

def _signature_inputs(storage: Storage) -> dict[str, str]:
    """sig ref -> digest of every done signature shard whose filter shard still exists."""
    current = [s.shard_id for s in upstream_shards(storage, UPSTREAM)]
    return {rec.outputs["signatures"].ref: rec.outputs["signatures"].digest
            for rec in _done_records(storage, SIGNATURES, current).values() if "signatures" in rec.outputs}


class DedupBucketsStage:
    """Per bucket: the groups of documents sharing a key (exact key or one band's hash) among the
    bucket's keys of all signature files. Output rows ``(column, key, shard, idx)`` for every
    member of a group of two or more, sorted; singletons are not written."""

    name = BUCKETS

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.columns = key_columns(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs = _signature_inputs(storage)
        return [ShardSpec(b, dict(inputs)) for b in bucket_ids(self.cfg.dedup)]

    def config_digest(self) -> str:
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "num_buckets": self.cfg.dedup.num_buckets,
                            "columns": self.columns})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        d = self.cfg.dedup
        bucket = bucket_ids(d).index(spec.shard_id)
        mine = _columns_of_bucket(bucket, len(self.columns), d.num_buckets)
        refs = sorted(spec.inputs, key=_shard_of_ref)
        shards = [_shard_of_ref(r) for r in refs]
        keys: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        nodes: dict[int, list[np.ndarray]] = {c: [] for c in mine}
        for ordinal, ref in enumerate(refs):
            _check_sig_params(storage, ref, _sig_meta(storage, ref), d)
            table = _read_parquet(storage, ref, [self.columns[c] for c in mine])
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
            k, v = _concat(keys[c], np.uint64), _concat(nodes[c], np.uint64)
            order = np.argsort(k, kind="stable")  # members stay in (shard, idx) order
            k, v = k[order], v[order]
            member, n_groups = _in_groups(k)
            counters["keys"] += len(k)
            counters["groups"] += n_groups
            counters["members"] += int(member.sum())
            names += [self.columns[c]] * int(member.sum())
            out_keys.append(k[member])
            out_nodes.append(v[member])
        node = _concat(out_nodes, np.uint64)
        table = pa.table({
            "column": pa.array(names, type=pa.string()),
            "key": pa.array(_concat(out_keys, np.uint64)),
            "shard": pa.array([shards[o] for o in (node >> np.uint64(32)).tolist()], type=pa.string()),
            "idx": pa.array((node & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
        })
        out = bucket_ref(spec.shard_id)
        _write_parquet(storage, out, table)
        return ShardOutput(outputs={"groups": out}, counts=dict(counters))


def _in_groups(sorted_keys: np.ndarray) -> tuple[np.ndarray, int]:
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


# -- phase 3: clusters ---------------------------------------------------------------------------------

def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` nodes (the smallest node of its component) given edges ``u``–``v``.

    Hook-and-compress in numpy: every round hooks each edge's larger root under the smaller one,
    then pointer-jumps to the roots; the number of rounds grows with log(component diameter).
    """
    label = np.arange(n, dtype=np.int64)
    if not len(u):
        return label
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    while True:
        lu, lv = label[u], label[v]
        diff = lu != lv
        if not diff.any():
            return label
        lu, lv = lu[diff], lv[diff]
        lo, hi = np.minimum(lu, lv), np.maximum(lu, lv)
        np.minimum.at(label, hi, lo)
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt


def _pairs_of_groups(starts: np.ndarray, sizes: np.ndarray, members: np.ndarray, all_pairs_up_to: int) -> np.ndarray:
    """Candidate pairs (k, 2) of node ids: every pair in groups up to ``all_pairs_up_to`` members,
    the star from the first member plus the chain of neighbours in larger ones."""
    out = []
    small = sizes <= all_pairs_up_to
    for s, g in zip(starts[small].tolist(), sizes[small].tolist()):
        i, j = np.triu_indices(g, 1)
        out.append(np.stack([members[s + i], members[s + j]], axis=1))
    for s, g in zip(starts[~small].tolist(), sizes[~small].tolist()):
        grp = members[s:s + g]
        out.append(np.stack([np.repeat(grp[0], g - 1), grp[1:]], axis=1))
        out.append(np.stack([grp[1:-1], grp[2:]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def _star_pairs(starts: np.ndarray, sizes: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Pairs (k, 2) joining each group's first member to every other member."""
    total = int(sizes.sum())
    group_start = np.repeat(starts, sizes)
    pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes) + group_start
    keep = pos != group_start
    return np.stack([members[group_start[keep]], members[pos[keep]]], axis=1)


@dataclass
class _Groups:
    """Candidate groups over compact node ids (node = one document: shard ordinal << 32 | idx)."""

    nodes: np.ndarray       # sorted unique node codes (uint64)
    members: np.ndarray     # node id of each member, groups contiguous
    starts: np.ndarray      # first member of each group
    sizes: np.ndarray       # members per group
    exact: np.ndarray       # the group is an exact-key group


@dataclass
class _Docs:
    """What the survivor choice and the drop lists need of each node."""

    shard: np.ndarray       # shard ordinal
    idx: np.ndarray         # document index within its shard
    exact: np.ndarray       # exact key
    text_hash: np.ndarray   # raw-text hash
    ids: list[str]          # document id


def _load_groups(storage: Storage, bucket_refs: list[str], columns: list[str], ordinal: dict[str, int]) -> _Groups:
    colpos = {c: i for i, c in enumerate(columns)}
    col_idx, keys, nodes = [], [], []
    for ref in bucket_refs:
        t = _read_parquet(storage, ref)
        cols = t.column("column").to_pylist()
        shards = t.column("shard").to_pylist()
        if not set(cols) <= colpos.keys() or not set(shards) <= ordinal.keys():
            raise ValueError(f"{storage.uri(ref)} names key columns or shards this run does not have "
                             f"(stale bucket file?): run dedup_buckets first")
        col_idx.append(np.fromiter((colpos[c] for c in cols), dtype=np.int64, count=len(cols)))
        keys.append(t.column("key").to_numpy())
        nodes.append((np.fromiter((ordinal[x] for x in shards), dtype=np.uint64, count=len(shards)) << np.uint64(32))
                     | t.column("idx").to_numpy().astype(np.uint64))
    col_a, key_a, node_a = _concat(col_idx, np.int64), _concat(keys, np.uint64), _concat(nodes, np.uint64)
    order = np.lexsort((node_a, key_a, col_a))
    col_a, key_a, node_a = col_a[order], key_a[order], node_a[order]
    codes, members = np.unique(node_a, return_inverse=True)
    new_group = np.ones(len(members), dtype=bool)
    new_group[1:] = (col_a[1:] != col_a[:-1]) | (key_a[1:] != key_a[:-1])
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, len(members)))
    exact = col_a[starts] == colpos.get(EXACT_COLUMN, -1)
    return _Groups(codes, members.astype(np.int64), starts, sizes, exact)


def _load_docs(storage: Storage, codes: np.ndarray, sig_refs: list[str]) -> _Docs:
    """Attributes of the nodes, read from their signature files (codes are sorted, so each shard's
    nodes are one contiguous run)."""
    n = len(codes)
    docs = _Docs(shard=(codes >> np.uint64(32)).astype(np.int64), idx=(codes & np.uint64(0xFFFFFFFF)).astype(np.int64),
                 exact=np.zeros(n, np.uint64), text_hash=np.zeros(n, np.uint64), ids=[""] * n)
    bounds = np.searchsorted(docs.shard, np.arange(len(sig_refs) + 1))
    for o, ref in enumerate(sig_refs):
        lo, hi = int(bounds[o]), int(bounds[o + 1])
        if lo == hi:
            continue
        t = _read_parquet(storage, ref, [EXACT_COLUMN, "text_hash", "id"])
        if int(docs.idx[hi - 1]) >= t.num_rows:
            raise ValueError(f"{storage.uri(ref)} has {t.num_rows} rows, the bucket files refer to more (stale?)")
        rows = pa.array(docs.idx[lo:hi])
        docs.exact[lo:hi] = t.column(EXACT_COLUMN).take(rows).to_numpy()
        docs.text_hash[lo:hi] = t.column("text_hash").take(rows).to_numpy()
        docs.ids[lo:hi] = t.column("id").take(rows).to_pylist()
    return docs


@dataclass
class _Clusters:
    label: np.ndarray       # component label of each node
    size: np.ndarray        # size of each node's component
    survivor: np.ndarray    # survivor node of each node's component
    dropped: np.ndarray     # node is dropped
    exact: np.ndarray       # dropped node is an exact duplicate (else near)


def _choose_survivors(label: np.ndarray, docs: _Docs) -> _Clusters:
    """Survivor: the smallest (exact key, raw-text hash, id, shard, idx) of each component.

    A dropped document counts as an exact duplicate when a member of its cluster with the same
    exact key ranks before it, as a near duplicate when it is the first of its exact key.
    """
    n = len(label)
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[sorted(range(n), key=docs.ids.__getitem__)] = np.arange(n)
    order = np.lexsort((docs.idx, docs.shard, id_rank, docs.text_hash, docs.exact, label))
    lab = label[order]
    first = np.ones(n, dtype=bool)
    first[1:] = lab[1:] != lab[:-1]
    survivor = np.empty(n, dtype=np.int64)
    survivor[order] = order[first][np.cumsum(first) - 1]
    size = np.bincount(label, minlength=n)[label]
    dropped = (size > 1) & (survivor != np.arange(n))
    ex = docs.exact[order]
    first_of_key = first.copy()
    first_of_key[1:] |= ex[1:] != ex[:-1]
    exact = np.ones(n, dtype=bool)
    exact[order[first_of_key]] = False
    return _Clusters(label, size, survivor, dropped, exact & dropped)


class DedupClustersStage:
    """One global shard: clusters of duplicates, a survivor each, per-shard drop lists, a report.

    Outputs: ``drops.<shard>`` = ``dedup/drops/<shard>.json`` for every signature shard (empty
    lists included: the ``dedup`` phase depends on its digest) and ``report`` =
    ``dedup/clusters_report.json``. Memory: the group members (duplicates only) and, per node, its
    hashes and id.
    """

    name = CLUSTERS

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.columns = key_columns(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs = _signature_inputs(storage)
        ids = bucket_ids(self.cfg.dedup)
        records = _done_records(storage, BUCKETS, ids)
        for b in ids:
            rec = records.get(b)
            out = rec.outputs.get("groups") if rec is not None else None
            inputs[out.ref if out else bucket_ref(b)] = out.digest if out else ""
        return [ShardSpec(GLOBAL_SHARD, inputs)]

    def config_digest(self) -> str:
        d = self.cfg.dedup
        verify = None
        if d.near and d.jaccard_threshold is not None:
            verify = {"threshold": d.jaccard_threshold, "ngram": d.ngram, "all_pairs_up_to": d.verify_all_pairs_up_to}
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "normalization": NORMALIZATION_VERSION,
                            "columns": self.columns, "verify": verify})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        d = self.cfg.dedup
        bucket_refs = sorted((r for r in spec.inputs if r.startswith(BUCKET_DIR + "/")), key=_shard_of_ref)
        missing = [_shard_of_ref(r) for r in bucket_refs if not spec.inputs[r]]
        if missing:
            raise RuntimeError(f"dedup_buckets shard(s) {missing} are not done: run dedup_buckets first")
        sig_refs = sorted((r for r in spec.inputs if r.startswith(SIG_DIR + "/")), key=_shard_of_ref)
        shards = [_shard_of_ref(r) for r in sig_refs]
        metas = [_sig_meta(storage, r) for r in sig_refs]
        for ref, meta in zip(sig_refs, metas):
            _check_sig_params(storage, ref, meta, d)
        counters: Counter = Counter()

        groups = _load_groups(storage, bucket_refs, self.columns, {s: i for i, s in enumerate(shards)})
        docs = _load_docs(storage, groups.nodes, sig_refs)
        # Edges: exact groups always; near groups as they are, or confirmed by true Jaccard.
        trusted = groups.exact | (d.jaccard_threshold is None)
        edges = [_star_pairs(groups.starts[trusted], groups.sizes[trusted], groups.members)]
        if not trusted.all():
            cand = _pairs_of_groups(groups.starts[~trusted], groups.sizes[~trusted], groups.members,
                                    d.verify_all_pairs_up_to)
            cand = np.unique(np.sort(cand, axis=1), axis=0)
            same = docs.exact[cand[:, 0]] == docs.exact[cand[:, 1]]
            todo = cand[~same]
            ok = _verify_pairs(storage, todo, docs, metas, d.ngram, d.jaccard_threshold)
            edges += [cand[same], todo[ok]]
            counters.update({"pairs.candidate": len(cand), "pairs.verified": int(ok.sum()),
                             "pairs.rejected": int((~ok).sum())})
        edge = np.concatenate(edges)
        clusters = _choose_survivors(connected_components(len(groups.nodes), edge[:, 0], edge[:, 1]), docs)

        outputs: dict[str, str] = {}
        per_shard = _write_drop_lists(storage, shards, metas, docs, clusters)
        outputs.update({f"drops.{s}": drop_ref(s) for s in shards})
        report = _report(self.columns, d.jaccard_threshold, metas, docs, clusters, counters, per_shard)
        storage.write_bytes(REPORT_REF, (json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        outputs["report"] = REPORT_REF
        return ShardOutput(outputs=outputs, counts=dict(counters))


def _cluster_id(docs: _Docs, node: int) -> str:
    """Stable across shard numbering: a hash of the survivor's content key and id."""
    key = f"{docs.exact[node]}:{docs.text_hash[node]}:{docs.ids[node]}".encode("utf-8", "surrogatepass")
    return f"{xxhash.xxh3_64_intdigest(key):016x}"


def _write_drop_lists(storage: Storage, shards: list[str], metas: list[dict[str, Any]], docs: _Docs,
                      clusters: _Clusters) -> dict[str, int]:
    """One JSON per shard: sorted indices to drop, aligned with cluster id, kind, id, survivor id."""
    drop_nodes = np.flatnonzero(clusters.dropped)          # node codes are sorted: by shard, then idx
    bounds = np.searchsorted(docs.shard[drop_nodes], np.arange(len(shards) + 1))
    cluster_ids = {s: _cluster_id(docs, s) for s in set(clusters.survivor[drop_nodes].tolist())}
    per_shard = {}
    for o, shard in enumerate(shards):
        sel = drop_nodes[bounds[o]:bounds[o + 1]].tolist()
        surv = clusters.survivor[sel].tolist()
        meta = metas[o]
        storage.write_bytes(drop_ref(shard), _dumps({
            "format": FORMAT_VERSION, "shard": shard,
            "docs": {"ref": meta["docs_ref"], "digest": meta["docs_digest"], "count": meta["docs"]},
            "drop": docs.idx[sel].tolist(),
            "cluster": [cluster_ids[x] for x in surv],
            "kind": ["exact" if clusters.exact[i] else "near" for i in sel],
            "id": [docs.ids[i] for i in sel],
            "survivor": [docs.ids[x] for x in surv],
        }))
        per_shard[shard] = len(sel)
    return per_shard


def _report(columns: list[str], threshold: float | None, metas: list[dict[str, Any]], docs: _Docs,
            clusters: _Clusters, counters: Counter, per_shard: dict[str, int]) -> dict[str, Any]:
    """Cluster-size histogram and exact/near counts, into ``counters`` and the report."""
    is_survivor = (clusters.size > 1) & (clusters.survivor == np.arange(len(clusters.size)))
    sizes = clusters.size[is_survivor]
    hist = Counter(sizes.tolist())
    n_docs = sum(m["docs"] for m in metas)
    n_exact, n_drop = int(clusters.exact.sum()), int(clusters.dropped.sum())
    counters.update({
        "docs_in": n_docs, "clusters": len(sizes), "docs_in_clusters": int(sizes.sum()),
        "dropped": n_drop, "dropped.exact": n_exact, "dropped.near": n_drop - n_exact,
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
    })
    for size, count in hist.items():
        counters[f"cluster_size.{size}" if size < _HISTOGRAM_CAP else f"cluster_size.{_HISTOGRAM_CAP}_plus"] += count
    top = sorted(np.flatnonzero(is_survivor).tolist(), key=lambda s: (-int(clusters.size[s]), docs.ids[s]))[:_REPORT_LARGEST]
    return {
        "format": FORMAT_VERSION, "columns": columns, "jaccard_threshold": threshold,
        "shards": len(metas), "docs": n_docs, "kept": n_docs - n_drop,
        "clusters": len(sizes), "docs_in_clusters": int(sizes.sum()),
        "dropped": {"total": n_drop, "exact": n_exact, "near": n_drop - n_exact},
        "cluster_sizes": {str(k): v for k, v in sorted(hist.items())},
        "pairs": {k.split(".", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("pairs.")},
        "dropped_per_shard": per_shard,
        "largest_clusters": [
            {"size": int(clusters.size[s]), "survivor": docs.ids[s],
             "members": sorted(docs.ids[i] for i in np.flatnonzero(clusters.label == clusters.label[s]))[:_REPORT_MEMBERS]}
            for s in top],
    }


def _verify_pairs(storage: Storage, pairs: np.ndarray, docs: _Docs, metas: list[dict[str, Any]], ngram: int,
                  threshold: float) -> np.ndarray:
    """Mask of ``pairs`` whose shingle sets have Jaccard >= threshold; re-reads only their documents."""
    if not len(pairs):
        return np.zeros(0, dtype=bool)
    shingler = MinHasher(ngram=ngram, num_bands=0)
    needed = np.unique(pairs)
    sets: dict[int, np.ndarray] = {}
    for o in np.unique(docs.shard[needed]).tolist():
        here = needed[docs.shard[needed] == o]
        want = dict(zip(docs.idx[here].tolist(), here.tolist()))
        texts, which = [], []
        for idx, (_, line) in enumerate(iter_lines(storage, metas[o]["docs_ref"])):
            node = want.get(idx)
            if node is not None:
                texts.append(json.loads(line)["text"])
                which.append(node)
        if len(which) != len(want):
            raise ValueError(f"{storage.uri(metas[o]['docs_ref'])} has fewer documents than its signatures (stale?)")
        sets.update(zip(which, shingler.shingle_sets(texts)))
    return np.fromiter((jaccard(sets[a], sets[b]) >= threshold for a, b in pairs.tolist()), dtype=bool, count=len(pairs))


# -- phase 4: filter the documents ---------------------------------------------------------------------

class DedupFilterStage:
    """Per filter shard: its documents minus the dropped ones, copied as raw JSONL lines (no
    re-serialization). Inputs: the filter docs and the shard's drop list, so a changed drop list
    makes exactly the affected shards stale."""

    name = FILTER

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

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        drops_key = drop_ref(spec.shard_id)
        docs = {r: dg for r, dg in spec.inputs.items() if r != drops_key}
        ((docs_ref, docs_digest),) = docs.items()
        drop: dict[int, str] = {}
        expected = None
        if self.enabled:
            if not spec.inputs.get(drops_key) or not storage.exists(drops_key):
                raise RuntimeError(f"no drop list for shard {spec.shard_id} ({storage.uri(drops_key)}) in the last "
                                   f"dedup_clusters run: run dedup_signatures … dedup_clusters first")
            raw_list = storage.read_bytes(drops_key)
            if digest_bytes(raw_list) != spec.inputs[drops_key]:
                raise RuntimeError(f"{storage.uri(drops_key)} changed since this run was planned: plan again")
            dl = json.loads(raw_list)
            if dl["docs"]["digest"] != docs_digest:
                raise RuntimeError(
                    f"drop list {storage.uri(drops_key)} was computed from {dl['docs']['digest']} but "
                    f"{storage.uri(docs_ref)} is now {docs_digest}: re-run dedup_signatures … dedup_clusters")
            drop = dict(zip(dl["drop"], dl["kind"]))
            expected = dl["docs"]["count"]
        counters: Counter = Counter()
        out = f"stages/{self.name}/{spec.shard_id}.jsonl.zst"
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


def dedup_stages(cfg: PrepConfig) -> list[Any]:
    """The dedup phases in run order (only the pass-through ``dedup`` when exact and near are off)."""
    if not (cfg.dedup.exact or cfg.dedup.near):
        return [DedupFilterStage(cfg)]
    return [DedupSignaturesStage(cfg), DedupBucketsStage(cfg), DedupClustersStage(cfg), DedupFilterStage(cfg)]
