"""The graph side of near-duplicate clustering, in numpy: candidate pairs from LSH groups, their
verification on MinHash signatures, greedy star clustering, and connected components.

Why stars and not connected components: union-find over candidate pairs joins A~B~C~…~Z although
A and Z share little, and removes all of them but one survivor — on templated text (generated CLI
man pages) that deleted thousands of distinct documents. A star cluster is a kept *centre* plus
the documents verified similar to that centre itself, so every removal is justified by its own
pair. :func:`star_clusters` is greedy over the verified edges by decreasing similarity (ties by the
content ranks of their ends): a pair of unclaimed documents makes the lower-ranked one a centre
and the other its member, a centre claims an unclaimed neighbour, and members claim nothing. It
is a function of the verified graph, the similarities and the content ranks alone, so it does not
depend on worker count or shard order, and edges of different connected components never
interact, so components are independent units of work.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_PAIR_CHUNK = 1 << 18
_SORT_COLUMNS = 8
"""Leading signature values that order a large group (documents sharing them are adjacent)."""


@dataclass
class Groups:
    """Candidate groups over compact node ids (node = one document: shard ordinal << 32 | idx)."""

    nodes: np.ndarray       # sorted unique node codes (uint64)
    members: np.ndarray     # node id of each member, groups contiguous
    starts: np.ndarray      # first member of each group
    sizes: np.ndarray       # members per group
    exact: np.ndarray       # the group is an exact-key group


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` nodes (the smallest node of its component) given edges ``u``–``v``.

    Hook-and-compress in numpy: every round hooks each edge's larger root under the smaller one,
    then pointer-jumps to the roots; the number of rounds grows with log(component diameter).
    Used for reporting (how large the candidate components are, i.e. what union-find would have
    removed) and as the unit of work when the cluster phase is sharded (docs/dedup.md).
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


def group_pairs(starts: np.ndarray, sizes: np.ndarray, members: np.ndarray, rank: np.ndarray,
                sig: np.ndarray | None, all_pairs_up_to: int, window: int) -> np.ndarray:
    """Candidate pairs (k, 2) of node ids, each row sorted, unique, from LSH groups.

    Groups up to ``all_pairs_up_to`` members give every pair (vectorized per group size). A larger
    group (a band value shared by many templated documents) gives each member paired with the
    group's first ``window`` members by rank — the likely centres, since stars are built in rank
    order — and with its ``window`` neighbours when the group is sorted by signature (documents
    sharing leading MinHash values are adjacent): ``O(size × window)`` pairs instead of
    ``O(size²)``. A true near-duplicate pair shares several bands, so a pair missed in one large
    group is usually complete in a small one.
    """
    out = [np.zeros((0, 2), dtype=np.int64)]
    small = sizes <= all_pairs_up_to
    for g in np.unique(sizes[small]).tolist():
        sel = starts[small & (sizes == g)]
        grp = members[sel[:, None] + np.arange(g)[None, :]]          # (groups, g)
        i, j = np.triu_indices(g, 1)
        out.append(np.stack([grp[:, i].reshape(-1), grp[:, j].reshape(-1)], axis=1))
    for s, g in zip(starts[~small].tolist(), sizes[~small].tolist()):
        grp = members[s:s + g]
        by_rank = grp[np.argsort(rank[grp], kind="stable")]
        heads = by_rank[:window]
        out.append(np.stack([np.repeat(heads, g), np.tile(grp, len(heads))], axis=1))
        if sig is not None and sig.shape[1]:
            order = by_rank[np.lexsort(sig[by_rank, :_SORT_COLUMNS].T[::-1])]
        else:
            order = by_rank
        for k in range(1, min(window, g - 1) + 1):
            out.append(np.stack([order[:-k], order[k:]], axis=1))
    pairs = np.concatenate(out)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def signature_similarity(pairs: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """MinHash Jaccard estimate (share of equal signature values) of each pair, in chunks."""
    out = np.empty(len(pairs), dtype=np.float64)
    if not sig.shape[1]:
        out[:] = 1.0
        return out
    for c in range(0, len(pairs), _PAIR_CHUNK):
        p = pairs[c:c + _PAIR_CHUNK]
        out[c:c + len(p)] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def sorted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique arrays: one ``searchsorted`` of the smaller into the larger
    (a few µs; ``numpy.intersect1d`` sorts both again)."""
    if len(a) > len(b):
        a, b = b, a
    if not len(a):
        return 1.0 if not len(b) else 0.0
    pos = np.searchsorted(b, a)
    np.minimum(pos, len(b) - 1, out=pos)
    inter = int(np.count_nonzero(b[pos] == a))
    return inter / (len(a) + len(b) - inter)


def star_clusters(n: int, rank: np.ndarray, u: np.ndarray, v: np.ndarray, weight: np.ndarray | None = None,
                  check: Callable[[int, int], float] | None = None, threshold: float = 0.0,
                  fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy star clustering of ``n`` nodes with distinct ``rank`` over candidate edges ``u``–``v``.

    Edges are visited by decreasing ``weight`` (their estimated similarity; ties by the ranks of
    their ends). An edge between two unclaimed nodes makes the lower-ranked one a centre and the
    other its member; an edge between a centre and an unclaimed node makes that node a member;
    any other edge is skipped — a member never claims anything, so nothing is removed through a
    chain. With ``check``, an edge that would change something is first verified:
    ``check(a, b)`` gives the pair's true similarity and the edge is used only if it is at least
    ``threshold`` (lazy verification: edges whose ends are already settled are never checked,
    which on dense templated families skips most of them). Nodes left unclaimed are centres.
    ``fixed`` marks nodes that are centres from the start (documents kept by an earlier run, in
    append mode): they claim but are never claimed. Most-similar pairs first means a document joins the most similar centre available — a copy
    stays with its original instead of the original being taken by a template sibling that only
    shares boilerplate with it.

    Returns ``(centre, edge, sim)``: ``centre[x]`` is ``x`` for a centre (kept), else the centre
    it is removed in favour of; ``edge[x]`` the index in ``u``/``v`` of the edge joining them
    (-1 for centres); ``sim[e]`` the verified similarity of edge ``e`` (NaN where never checked).
    Sequential over edges, but edges of different connected components never interact, so
    components can be processed independently (docs/dedup.md).
    """
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    weight = np.ones(len(u)) if weight is None else np.asarray(weight, dtype=np.float64)
    sim = weight.copy() if check is None else np.full(len(u), np.nan)
    centre = np.arange(n, dtype=np.int64)
    edge = np.full(n, -1, dtype=np.int64)
    if not len(u):
        return centre, edge, sim
    lower = rank[u] < rank[v]
    lo, hi = np.where(lower, u, v), np.where(lower, v, u)
    order = np.lexsort((rank[hi], rank[lo], -weight))
    role = bytearray(n)                       # 0 unclaimed, 1 centre, 2 member
    if fixed is not None:
        for x in np.flatnonzero(fixed).tolist():
            role[x] = 1
    cen = centre.tolist()
    edg = edge.tolist()
    for e, a, b in zip(order.tolist(), lo[order].tolist(), hi[order].tolist()):
        ra, rb = role[a], role[b]
        if ra == 2 or rb == 2 or (ra and rb):
            continue
        if check is not None:
            s = check(a, b)
            sim[e] = s
            if s < threshold:
                continue
        if not ra and not rb:
            role[a], role[b] = 1, 2
            cen[b], edg[b] = a, e
        elif ra == 1:
            role[b] = 2
            cen[b], edg[b] = a, e
        else:
            role[a] = 2
            cen[a], edg[a] = b, e
    return np.asarray(cen, dtype=np.int64), np.asarray(edg, dtype=np.int64), sim
