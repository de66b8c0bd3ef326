"""Dedup phase 3, ``dedup_clusters``: from LSH groups to verified star clusters, drop lists
(which are the audit) and a report.

Steps, all over *candidate* documents only (members of some group of two or more), so memory
is proportional to the candidates, never to the corpus:

1. **Rank.** Every candidate gets a rank from ``(exact key, raw-text hash, id, shard, idx)``:
   a function of content and id, so survivors do not depend on shard numbering, processing order
   or the number of workers ("first seen" would).
2. **Exact duplicates** (equal normalized text) collapse onto the lowest-ranked member of their
   exact key, as before: identical shingle sets need no verification.
3. **Candidate pairs** among those representatives from the band groups
   (:func:`~shardflow.dataprep.dedup_graph.group_pairs`), each with its MinHash Jaccard estimate.
4. **Verified star clusters** (:func:`~shardflow.dataprep.dedup_graph.star_clusters`): pairs are
   visited most similar first; a pair is used only if it joins an unclaimed document to a centre
   (or makes two unclaimed documents a centre and its member) and its similarity is at least
   ``jaccard_threshold``. ``verify`` says which similarity: ``exact`` (default) — the exact
   shingle Jaccard, computed lazily for the pairs that would change something, after pairs whose
   estimate is far below the threshold are rejected (:func:`triage_margin`); only those pairs'
   documents are re-read. ``signature`` — the MinHash estimate (no text read). ``off`` — every
   candidate. Each removed document's survivor is a kept document it is itself verified similar
   to — never a chain.
5. **Drop lists**, one Parquet file per input shard (``dedup/drops/<shard>.parquet``): one row per
   removed document with its index, id, kind (exact | near), survivor id and shard, verified
   similarity and cluster id. They are the audit (``pyarrow.dataset.dataset("<root>/dedup/drops")``)
   and what the ``dedup`` phase applies, so audit and drops cannot disagree.
6. **Report** ``dedup/clusters_report.json``: cluster-size histogram, the largest clusters with
   sample ids, similarity quantiles of near removals, and the largest connected component of the
   candidate graph (what union-find would have merged).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import iter_lines, read_parquet_table, write_parquet_table

from .config import DedupConfig, PrepConfig
from .dedup_append import earlier_drops, previous_state, restrict_to_new, write_state
from .dedup_common import (BUCKET_DIR, BUCKETS, CLUSTERS, SIGNATURES, EXACT_COLUMN, FORMAT_VERSION, GLOBAL_SHARD,
                           META_KEY, MINHASH_COLUMN, NORMALIZATION_VERSION, REPORT_REF, SIG_DIR, bucket_ids, bucket_ref,
                           check_sig_params, concat, done_records, drop_ref, dumps, key_columns, prefetched, shard_of_ref,
                           sig_meta, signature_inputs, table_meta)
from .dedup_graph import Groups, connected_components, group_pairs, signature_similarity, sorted_jaccard, star_clusters
from .dedup_signatures import read_signatures
from .minhash import MinHasher
from .stage import ShardOutput, ShardSpec

_HISTOGRAM_CAP = 10
_REPORT_LARGEST = 10
_REPORT_MEMBERS = 20


@dataclass
class Docs:
    """What ranking, verification and the drop lists need of each candidate node."""

    shard: np.ndarray       # shard ordinal
    idx: np.ndarray         # document index within its shard
    exact: np.ndarray       # exact key
    text_hash: np.ndarray   # raw-text hash
    ids: list[str]          # document id
    sig: np.ndarray | None  # (nodes, permutations) MinHash signature, with near dedup


@dataclass
class Decision:
    """The outcome for each candidate node."""

    survivor: np.ndarray    # kept node it is removed in favour of (itself when kept)
    dropped: np.ndarray     # bool
    exact: np.ndarray       # dropped as an exact duplicate (a lower-ranked twin has its normalized text)
    similarity: np.ndarray  # verified similarity to its survivor (1.0 for exact twins of a survivor)


class SignatureMetas:
    """The metadata of each signature file (source documents' ref, digest and count), read and
    checked against the config on first use: only the shards with candidates or new drop lists
    are opened, not every signature file of the corpus."""

    def __init__(self, storage: Storage, sig_refs: list[str], d: DedupConfig):
        self.storage, self.refs, self.d = storage, sig_refs, d
        self._cache: dict[int, dict[str, Any]] = {}

    def from_table(self, ordinal: int, table: Any) -> dict[str, Any]:
        """The metadata of a signature file already read (spares a second open of it)."""
        if ordinal not in self._cache:
            meta = table_meta(self.storage, self.refs[ordinal], table)
            check_sig_params(self.storage, self.refs[ordinal], meta, self.d)
            self._cache[ordinal] = meta
        return self._cache[ordinal]

    def __getitem__(self, ordinal: int) -> dict[str, Any]:
        if ordinal not in self._cache:
            ref = self.refs[ordinal]
            meta = sig_meta(self.storage, ref)
            check_sig_params(self.storage, ref, meta, self.d)
            self._cache[ordinal] = meta
        return self._cache[ordinal]


def load_groups(storage: Storage, bucket_refs: list[str], columns: list[str], ordinal: dict[str, int]) -> Groups:
    colpos = {c: i for i, c in enumerate(columns)}
    col_idx, keys, nodes = [], [], []
    col_names = pa.array(list(colpos), type=pa.string())
    shard_names = pa.array(list(ordinal), type=pa.string())
    for ref, t in prefetched(lambda r: read_parquet_table(storage, r), bucket_refs):
        cols = pc.index_in(t.column("column"), value_set=col_names)     # vectorized name -> position
        shards = pc.index_in(t.column("shard"), value_set=shard_names)
        if cols.null_count or shards.null_count:
            raise ValueError(f"{storage.uri(ref)} names key columns or shards this run does not have "
                             f"(stale bucket file?): run dedup_buckets first")
        col_idx.append(cols.to_numpy().astype(np.int64))
        keys.append(t.column("key").to_numpy())
        nodes.append((shards.to_numpy().astype(np.uint64) << np.uint64(32)) | t.column("idx").to_numpy().astype(np.uint64))
    col_a, key_a, node_a = concat(col_idx, np.int64), concat(keys, np.uint64), concat(nodes, np.uint64)
    order = np.lexsort((node_a, key_a, col_a))
    col_a, key_a, node_a = col_a[order], key_a[order], node_a[order]
    codes, members = np.unique(node_a, return_inverse=True)
    new_group = np.ones(len(members), dtype=bool)
    new_group[1:] = (col_a[1:] != col_a[:-1]) | (key_a[1:] != key_a[:-1])
    starts = np.flatnonzero(new_group)
    sizes = np.diff(np.append(starts, len(members)))
    exact = col_a[starts] == colpos.get(EXACT_COLUMN, -1)
    return Groups(codes, members.astype(np.int64).reshape(-1), starts, sizes, exact)


def load_docs(storage: Storage, codes: np.ndarray, sig_refs: list[str], perms: int, metas: SignatureMetas) -> Docs:
    """Attributes of the nodes, read from their signature files (codes are sorted, so each shard's
    nodes are one contiguous run; one signature file's columns are in memory at a time)."""
    n = len(codes)
    docs = Docs(shard=(codes >> np.uint64(32)).astype(np.int64), idx=(codes & np.uint64(0xFFFFFFFF)).astype(np.int64),
                exact=np.zeros(n, np.uint64), text_hash=np.zeros(n, np.uint64), ids=[""] * n,
                sig=np.zeros((n, perms), np.uint32) if perms else None)
    bounds = np.searchsorted(docs.shard, np.arange(len(sig_refs) + 1))
    columns = [EXACT_COLUMN, "text_hash", "id"] + ([MINHASH_COLUMN] if perms else [])
    needed = [o for o in range(len(sig_refs)) if bounds[o] < bounds[o + 1]]
    for o, t in prefetched(lambda o: read_parquet_table(storage, sig_refs[o], columns), needed):
        lo, hi, ref = int(bounds[o]), int(bounds[o + 1]), sig_refs[o]
        metas.from_table(o, t)                     # checks its parameters against the config
        if int(docs.idx[hi - 1]) >= t.num_rows:
            raise ValueError(f"{storage.uri(ref)} has {t.num_rows} rows, the bucket files refer to more (stale?)")
        rows = pa.array(docs.idx[lo:hi])
        docs.exact[lo:hi] = t.column(EXACT_COLUMN).take(rows).to_numpy()
        docs.text_hash[lo:hi] = t.column("text_hash").take(rows).to_numpy()
        docs.ids[lo:hi] = t.column("id").take(rows).to_pylist()
        if perms:
            docs.sig[lo:hi] = read_signatures(t.column(MINHASH_COLUMN).take(rows), perms)
    return docs


def ranks(docs: Docs, old: np.ndarray | None = None) -> np.ndarray:
    """Rank of each node by (exact key, raw-text hash, id, shard, idx); 0 = kept first. In append
    mode documents kept by earlier runs (``old``) come before all new ones."""
    n = len(docs.idx)
    id_rank = np.empty(n, dtype=np.int64)
    id_rank[sorted(range(n), key=docs.ids.__getitem__)] = np.arange(n)
    keys = [docs.idx, docs.shard, id_rank, docs.text_hash, docs.exact]
    if old is not None:
        keys.append(~old)
    order = np.lexsort(keys)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def exact_representatives(docs: Docs, rank: np.ndarray) -> np.ndarray:
    """The lowest-ranked node with the same exact key, per node."""
    order = np.lexsort((rank, docs.exact))
    ex = docs.exact[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ex[1:] != ex[:-1]
    rep = np.empty(len(order), dtype=np.int64)
    rep[order] = order[first][np.cumsum(first) - 1]
    return rep


def triage_margin(perms: int) -> float:
    """How far below the threshold a MinHash estimate must be for ``verify: exact`` to reject the
    pair without reading text: 4.5 standard deviations of the estimate at its widest (J = 0.5),
    0.21 with 112 permutations. Pairs above it get their exact Jaccard."""
    return 2.25 / max(perms, 1) ** 0.5


def shingle_sets(storage: Storage, nodes: np.ndarray, docs: Docs, metas: SignatureMetas,
                 ngram: int) -> dict[int, np.ndarray]:
    """Sorted unique shingle hashes of ``nodes``, re-reading only their documents, one input shard
    at a time. Shingles are kept as their top 32 bits — the values the MinHash permutations see,
    so the exact Jaccard of these sets is exactly what the signatures estimate — which halves the
    memory of the sets held."""
    shingler = MinHasher(ngram=ngram, num_bands=0)
    sets: dict[int, np.ndarray] = {}
    for o in np.unique(docs.shard[nodes]).tolist():
        here = nodes[docs.shard[nodes] == o]
        want = dict(zip(docs.idx[here].tolist(), here.tolist()))
        texts, which = [], []
        last = max(want)
        for idx, (_, line) in enumerate(iter_lines(storage, metas[o]["docs_ref"])):
            node = want.get(idx)
            if node is not None:
                texts.append(json.loads(line)["text"])
                which.append(node)
            if idx == last:              # the rest of the shard is not needed
                break
        if len(which) != len(want):
            raise ValueError(f"{storage.uri(metas[o]['docs_ref'])} has fewer documents than its signatures (stale?)")
        sets.update(zip(which, shingler.shingle_sets(texts, top32=True)))
    return sets


def _exact_stars(n: int, rank: np.ndarray, edges: np.ndarray, est: np.ndarray, docs: Docs,
                 sets_of: Callable[[np.ndarray], dict[int, np.ndarray]], t: float, old: np.ndarray | None,
                 counters: Counter) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Star clusters verified on exact Jaccard, reading only the documents of pairs the greedy pass
    actually checks. A pass whose check meets a document not read yet answers with the MinHash
    estimate and notes the document; the notes are read and the pass repeated, until a pass
    needed nothing new — that pass checked every pair on exact sets, so its result is exactly the
    one with every candidate read up front, at a fraction of the reading (in append mode: the new
    documents and the earlier ones they are checked against, not every earlier candidate)."""
    sets: dict[int, np.ndarray] = {}
    sig = docs.sig
    while True:
        missing: set[int] = set()

        def check(a: int, b: int) -> float:
            sa, sb = sets.get(a), sets.get(b)
            if sa is not None and sb is not None:
                return sorted_jaccard(sa, sb)
            missing.update(x for x in (a, b) if x not in sets)
            return float(np.mean(sig[a] == sig[b]))

        result = star_clusters(n, rank, edges[:, 0], edges[:, 1], est, check, t, old)
        counters["verify.passes"] += 1
        if not missing:
            counters["verify.docs_read"] = len(sets)
            return result
        sets.update(sets_of(np.array(sorted(missing), dtype=np.int64)))


def decide(groups: Groups, docs: Docs, d: DedupConfig, sets_of: Callable[[np.ndarray], dict[int, np.ndarray]],
           counters: Counter, old: np.ndarray | None = None) -> tuple[Decision, np.ndarray]:
    """Steps 1–4 of the module docstring. ``sets_of(nodes)`` gives shingle sets for ``verify:
    exact``. ``old`` (append mode) marks documents kept by earlier runs: they rank before every
    new document, are fixed centres and are never removed. Returns the decision and the
    candidate pairs' connected-component labels."""
    n = len(groups.nodes)
    t = d.jaccard_threshold
    rank = ranks(docs, old)
    rep = exact_representatives(docs, rank)
    if old is not None:
        rep[old] = np.flatnonzero(old)
    near = ~groups.exact
    pairs = group_pairs(groups.starts[near], groups.sizes[near], rep[groups.members], rank, docs.sig,
                        d.verify_all_pairs_up_to, d.verify_window)
    if old is not None:              # two earlier documents are both kept already: nothing to decide
        pairs = pairs[~(old[pairs[:, 0]] & old[pairs[:, 1]])]
    est = signature_similarity(pairs, docs.sig) if docs.sig is not None else np.ones(len(pairs))
    if d.verify == "off":
        keep = np.ones(len(pairs), dtype=bool)
    elif d.verify == "signature":
        keep = est >= t
    else:
        keep = est >= t - triage_margin(docs.sig.shape[1] if docs.sig is not None else 0)
    edges = pairs[keep]
    if d.verify == "exact":
        centre, edge, esim = _exact_stars(n, rank, edges, est[keep], docs, sets_of, t, old, counters)
    else:
        centre, edge, esim = star_clusters(n, rank, edges[:, 0], edges[:, 1], est[keep], None, t, old)
    checked = ~np.isnan(esim)
    counters.update({"pairs.candidate": len(pairs), "pairs.triaged_out": int((~keep).sum()),
                     "pairs.checked": int(checked.sum()), "pairs.verified": int((esim[checked] >= t).sum()),
                     "pairs.rejected": int((esim[checked] < t).sum()) + int((~keep).sum()),
                     "pairs.joined": int((edge >= 0).sum())})
    survivor = centre[rep]
    nodes = np.arange(n)
    is_twin = rep != nodes
    rep_sim = np.where(edge >= 0, esim[np.maximum(edge, 0)] if len(esim) else 1.0, 1.0)
    decision = Decision(survivor=survivor, dropped=survivor != nodes, exact=is_twin, similarity=rep_sim[rep])
    twin_edges = np.stack([nodes[is_twin], rep[is_twin]], axis=1)
    labels = connected_components(n, *np.concatenate([pairs, twin_edges]).T)
    return decision, labels


class DedupClustersStage:
    """One global shard: verified star clusters, per-shard drop lists (the audit), a report.

    Outputs: ``drops.<shard>`` = ``dedup/drops/<shard>.parquet`` for every signature shard (empty
    ones included: the ``dedup`` phase depends on its digest) and ``report`` =
    ``dedup/clusters_report.json``.
    """

    name = CLUSTERS
    per_shard = False

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.columns = key_columns(cfg.dedup)

    @property
    def appends(self) -> bool:
        """Whether a rerun for newly added shards keeps the earlier shards' drop lists (``status``
        then predicts work for the new shards only, see dedup_append.py)."""
        return self.cfg.dedup.incremental == "append"

    def shards(self, storage: Storage) -> list[ShardSpec]:
        inputs = signature_inputs(storage)
        ids = bucket_ids(self.cfg.dedup)
        records = done_records(storage, BUCKETS, ids)
        for b in ids:
            rec = records.get(b)
            out = rec.outputs.get("groups") if rec is not None else None
            inputs[out.ref if out else bucket_ref(b)] = out.digest if out else ""
        return [ShardSpec(GLOBAL_SHARD, inputs)]

    def config_digest(self) -> str:
        d = self.cfg.dedup
        verify = None
        if d.near:
            verify = {"mode": d.verify, "threshold": d.jaccard_threshold if d.verify != "off" else None,
                      "ngram": d.ngram, "all_pairs_up_to": d.verify_all_pairs_up_to, "window": d.verify_window}
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "normalization": NORMALIZATION_VERSION,
                            "columns": self.columns, "verify": verify})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        d = self.cfg.dedup
        bucket_refs = sorted((r for r in spec.inputs if r.startswith(BUCKET_DIR + "/")), key=shard_of_ref)
        missing = [shard_of_ref(r) for r in bucket_refs if not spec.inputs[r]]
        if missing:
            raise RuntimeError(f"dedup_buckets shard(s) {missing} are not done: run dedup_buckets first")
        sig_refs = sorted((r for r in spec.inputs if r.startswith(SIG_DIR + "/")), key=shard_of_ref)
        shards = [shard_of_ref(r) for r in sig_refs]
        metas = SignatureMetas(storage, sig_refs, d)
        counters: Counter = Counter()

        groups = load_groups(storage, bucket_refs, self.columns, {s: i for i, s in enumerate(shards)})
        sigs = {shard_of_ref(r): spec.inputs[r] for r in sig_refs}
        digest = self.config_digest()
        prev = previous_state(storage, digest, sigs) if d.incremental == "append" else None
        old = None
        if prev is not None:
            is_new = np.isin((groups.nodes >> np.uint64(32)).astype(np.int64),
                             [i for i, s in enumerate(shards) if s not in prev["shards"]])
            # Only groups holding a new document matter: cut to them first, so that the earlier drop
            # lists read are those of the shards sharing a candidate group with new documents.
            groups, is_new = restrict_to_new(groups, is_new, np.zeros(len(groups.nodes), dtype=bool))
            groups, is_new = restrict_to_new(groups, is_new, earlier_drops(storage, groups.nodes, shards, prev))
            old = ~is_new
        counters["nodes"] = len(groups.nodes)
        perms = d.num_bands * d.rows_per_band if d.near else 0
        docs = load_docs(storage, groups.nodes, sig_refs, perms, metas)
        sets_of = lambda nodes: shingle_sets(storage, nodes, docs, metas, d.ngram)  # noqa: E731
        decision, components = decide(groups, docs, d, sets_of, counters, old)

        outputs: dict[str, str] = {}
        write = [s for s in shards if prev is None or s not in prev["shards"]]
        per_shard = write_drop_lists(storage, shards, metas, docs, decision, set(write))
        outputs.update({f"drops.{s}": drop_ref(s) for s in write})
        # The earlier drop lists are carried as recorded (checked against their listed fingerprints
        # in previous_state), not hashed again: one read per earlier shard on an object store.
        kept = {f"drops.{s}": out for s, out in prev["drops"].items()} if prev is not None else {}
        earlier = prev["dropped_total"] if prev is not None else 0
        n_docs = sum(r.counts.get("docs_in", 0) for r in done_records(storage, SIGNATURES, shards).values())
        report = build_report(self.columns, d, len(shards), n_docs, docs, decision, components, counters, per_shard, earlier)
        report["mode"] = "append" if prev is not None else "full"
        report["new_shards"] = write if prev is not None else []
        storage.write_bytes(REPORT_REF, (json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        outputs["report"] = REPORT_REF
        outputs["state"] = write_state(storage, digest, sigs, earlier + report["dropped"]["total"])
        return ShardOutput(outputs=outputs, counts=dict(counters), kept=kept)


def cluster_id(docs: Docs, node: int) -> str:
    """Stable across shard numbering: a hash of the survivor's content key and id."""
    key = f"{docs.exact[node]}:{docs.text_hash[node]}:{docs.ids[node]}".encode("utf-8", "surrogatepass")
    return f"{xxhash.xxh3_64_intdigest(key):016x}"


DROP_SCHEMA = pa.schema([("idx", pa.uint32()), ("id", pa.string()), ("kind", pa.string()), ("survivor", pa.string()),
                         ("survivor_shard", pa.string()), ("similarity", pa.float32()), ("cluster", pa.string())])


def write_drop_lists(storage: Storage, shards: list[str], metas: SignatureMetas, docs: Docs,
                     decision: Decision, only: set[str]) -> dict[str, int]:
    """One Parquet file per shard in ``only``, rows sorted by index (module docstring, step 5)."""
    drop_nodes = np.flatnonzero(decision.dropped)          # node codes are sorted: by shard, then idx
    bounds = np.searchsorted(docs.shard[drop_nodes], np.arange(len(shards) + 1))
    cluster_ids = {s: cluster_id(docs, s) for s in set(decision.survivor[drop_nodes].tolist())}
    per_shard = {}
    for o, shard in enumerate(shards):
        if shard not in only:
            continue
        sel = drop_nodes[bounds[o]:bounds[o + 1]]
        surv = decision.survivor[sel].tolist()
        meta = metas[o]
        table = pa.table({
            "idx": pa.array(docs.idx[sel].astype(np.uint32)),
            "id": pa.array([docs.ids[i] for i in sel.tolist()], type=pa.string()),
            "kind": pa.array(np.where(decision.exact[sel], "exact", "near").tolist(), type=pa.string()),
            "survivor": pa.array([docs.ids[x] for x in surv], type=pa.string()),
            "survivor_shard": pa.array([shards[docs.shard[x]] for x in surv], type=pa.string()),
            "similarity": pa.array(decision.similarity[sel].astype(np.float32)),
            "cluster": pa.array([cluster_ids[x] for x in surv], type=pa.string()),
        }, schema=DROP_SCHEMA)
        info = {"format": FORMAT_VERSION, "shard": shard,
                "docs": {"ref": meta["docs_ref"], "digest": meta["docs_digest"], "count": meta["docs"]}}
        write_parquet_table(storage, drop_ref(shard), table.replace_schema_metadata({META_KEY: dumps(info)}))
        per_shard[shard] = len(sel)
    return per_shard


def build_report(columns: list[str], d: DedupConfig, n_shards: int, n_docs: int, docs: Docs, decision: Decision,
                 components: np.ndarray, counters: Counter, per_shard: dict[str, int], earlier: int = 0) -> dict[str, Any]:
    """Cluster-size histogram, largest clusters, similarity quantiles; totals also into ``counters``.
    In append mode the clusters are those formed or extended by this run (an earlier centre counts
    with its new members only) and ``earlier`` documents were removed by earlier runs."""
    n = len(decision.survivor)
    size = np.bincount(decision.survivor, minlength=n)
    centres = np.flatnonzero(size > 1)
    sizes = size[centres]
    hist = Counter(sizes.tolist())
    n_exact = int((decision.dropped & decision.exact).sum())
    n_drop = int(decision.dropped.sum())
    comp = np.bincount(components, minlength=n) if n else np.zeros(0, dtype=np.int64)
    counters.update({
        "docs_in": n_docs, "clusters": len(sizes), "docs_in_clusters": int(sizes.sum()),
        "dropped": n_drop, "dropped.exact": n_exact, "dropped.near": n_drop - n_exact,
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "largest_candidate_component": int(comp.max()) if len(comp) else 0,
    })
    for s, count in hist.items():
        counters[f"cluster_size.{s}" if s < _HISTOGRAM_CAP else f"cluster_size.{_HISTOGRAM_CAP}_plus"] += count
    near_sims = decision.similarity[decision.dropped & ~decision.exact]
    top = sorted(centres.tolist(), key=lambda c: (-int(size[c]), docs.ids[c]))[:_REPORT_LARGEST]
    members_of = {c: [] for c in top}
    for x in np.flatnonzero(np.isin(decision.survivor, top)).tolist():
        members_of[int(decision.survivor[x])].append(docs.ids[x])
    return {
        "format": FORMAT_VERSION, "columns": columns,
        "verify": d.verify if d.near else None, "jaccard_threshold": d.jaccard_threshold if d.near else None,
        "shards": n_shards, "docs": n_docs, "kept": n_docs - n_drop - earlier, "dropped_earlier": earlier,
        "clusters": len(sizes), "docs_in_clusters": int(sizes.sum()),
        "dropped": {"total": n_drop, "exact": n_exact, "near": n_drop - n_exact},
        "cluster_sizes": {str(k): v for k, v in sorted(hist.items())},
        "largest_candidate_component": int(comp.max()) if len(comp) else 0,
        "near_similarity": ({q: round(float(np.quantile(near_sims, p)), 4)
                             for q, p in (("min", 0.0), ("p01", 0.01), ("p10", 0.1), ("median", 0.5))}
                            if len(near_sims) else {}),
        "pairs": {k.split(".", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("pairs.")},
        "dropped_per_shard": per_shard,
        "largest_clusters": [
            {"size": int(size[c]), "survivor": docs.ids[c], "cluster": cluster_id(docs, c),
             "members": sorted(members_of[c])[:_REPORT_MEMBERS]}
            for c in top],
    }
