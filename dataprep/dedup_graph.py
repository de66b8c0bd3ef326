"""The graph side of near-duplicate clustering, in numpy: candidate pairs from LSH groups, their
verification on MinHash signatures, greedy star clustering, and connected components.

Why stars and not connected components: union-find over candidate pairs joins A~B~C~…~Z although
A and Z share little, and removes all of them but one survivor — on templated text (generated CLI
man pages) that deleted thousands of distinct documents. A star cluster is a kept *centre* plus
the documents verified similar to that centre itself, so every removal is justified by its own
pair: :func:`star_clusters` is greedy in a fixed rank order (lowest rank first: it becomes a centre
if no verified neighbour of lower rank is a centre; otherwise it is removed in favour of the
lowest-ranked such centre). That is the lexicographically first maximal independent set of the
verified graph, a function of the graph and the ranks alone, so it does not depend on worker count
or shard order. It is computed in rounds (each round decides every node whose lower-ranked
neighbours are all decided), so the work is proportional to the edges times the rounds, and
rounds grow with the longest rank-increasing chain (logarithmic for content-hash ranks).
"""
from __future__ import annotations

import numpy as np

_PAIR_CHUNK = 1 << 18


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
            order = by_rank[np.lexsort(sig[by_rank].T[::-1])]
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


def star_clusters(n: int, rank: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy star clustering of ``n`` nodes with distinct ``rank`` over edges ``u``–``v``.

    Returns ``(centre, edge)``: ``centre[x]`` is ``x`` for a centre (kept) and otherwise the
    lowest-ranked centre among ``x``'s neighbours of lower rank (``x`` is removed in its favour);
    ``edge[x]`` is the index of that edge in ``u``/``v`` (-1 for centres). Equal to visiting the
    nodes in rank order and letting each unclaimed node claim all its unclaimed neighbours.
    """
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    lower = rank[u] < rank[v]
    lo, hi = np.where(lower, u, v), np.where(lower, v, u)
    state = np.zeros(n, dtype=np.int8)        # 0 undecided, 1 centre, 2 removed
    e_lo, e_hi = lo, hi
    active = np.unique(np.concatenate([lo, hi]))
    state[np.setdiff1d(np.arange(n), active, assume_unique=True)] = 1   # no neighbour: a centre
    while len(active):
        keep = state[e_hi] == 0
        e_lo, e_hi = e_lo[keep], e_hi[keep]
        s_lo = state[e_lo]
        claimed = np.zeros(n, dtype=bool)
        claimed[e_hi[s_lo == 1]] = True
        blocked = np.zeros(n, dtype=bool)
        blocked[e_hi[s_lo == 0]] = True
        und = active[state[active] == 0]
        state[und[claimed[und]]] = 2
        state[und[~claimed[und] & ~blocked[und]]] = 1
        active = und[state[und] == 0]
    centre = np.arange(n, dtype=np.int64)
    edge = np.full(n, -1, dtype=np.int64)
    sel = np.flatnonzero((state[lo] == 1) & (state[hi] == 2))
    if len(sel):
        best = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(best, hi[sel], rank[lo[sel]])
        win = sel[rank[lo[sel]] == best[hi[sel]]]
        centre[hi[win]] = lo[win]
        edge[hi[win]] = win
    return centre, edge
