"""Which sample every global position of the stream holds: a pure function of (seed, index, position).

Why the order is a function of the *global position* and nothing else: a checkpoint must resume on
another world size or worker count, so neither may enter the order. The stream is one infinite
sequence of samples: position ``P`` goes (through the mixing schedule) to dataset ``d`` and to the
``q``-th sample of that dataset's own stream; ``q`` splits into an epoch ``e = q // N_d`` and a place
``p`` in that epoch's permutation. An epoch's permutation is cheap to reach anywhere: the members
(tar blocks of ~1 MiB) are permuted with a generator seeded by (seed, dataset, epoch), then the rows
of each window of ``shuffle_window`` consecutive members are permuted (seeded also by the window).
Locating ``p`` is a ``searchsorted`` on the cumulative row counts plus one window permutation, and
index.json gives the byte offset of every row, so a resumed loader reads only rows that it will
deliver -- never anything before its position.

Why mixing is a fixed periodic schedule: weights are turned into integer quotas per period and the
period is laid out by smooth weighted round robin, so dataset and per-dataset index of any position
are O(1) (``period * quota + prefix count``), proportions are exact at every period boundary, and the
resume state stays the global position alone.
"""
from __future__ import annotations

import bisect
import collections

import numpy as np

ORDER_VERSION = 1
"""Bump when the mapping from (seed, index, position) to samples changes: old states are refused."""

MIX_PERIOD = 4096
"""Period of the mixing schedule when weights are not small integers (proportions exact to 1/4096)."""


class _EpochOrder:
    """Epoch ``epoch`` of one dataset: members permuted, rows permuted within windows of members."""

    def __init__(self, rows: np.ndarray, seed: int, slot: int, epoch: int, shuffle: bool, window: int):
        n = len(rows)
        self.key = (seed, slot, epoch)
        self.shuffle = shuffle
        self.window = window
        self.perm = np.random.default_rng([seed, slot, epoch, 0]).permutation(n) if shuffle else np.arange(n)
        self.cum = np.zeros(n + 1, np.int64)
        np.cumsum(rows[self.perm], out=self.cum[1:])
        self.bounds = self.cum[np.r_[np.arange(0, n, window), n]]
        self._bounds_list = self.bounds.tolist()
        self._wperm: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def window_of(self, p: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, p, side="right") - 1

    def window_index(self, p: int) -> int:
        return bisect.bisect_right(self._bounds_list, p) - 1

    def window_range(self, w: int) -> tuple[int, int]:
        return int(self.bounds[w]), int(self.bounds[w + 1])

    def _window_perm(self, w: int) -> np.ndarray:
        perm = self._wperm.get(w)
        if perm is None:
            lo, hi = self.window_range(w)
            seed, slot, epoch = self.key
            perm = np.random.default_rng([seed, slot, epoch, 1 + w]).permutation(hi - lo)
            self._wperm[w] = perm
            if len(self._wperm) > 4:
                self._wperm.popitem(last=False)
        return perm

    def offsets(self, w: int, p: np.ndarray) -> np.ndarray:
        """Where epoch places ``p`` (inside window ``w``) are in the window's rows, which are its
        members' rows concatenated in permuted member order."""
        o = p - self.bounds[w]
        return self._window_perm(w)[o] if self.shuffle else o

    def members(self, w: int, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(member, row) of window offsets ``o``."""
        m0 = w * self.window
        m1 = min(m0 + self.window, len(self.perm))
        local = self.cum[m0 : m1 + 1] - self.cum[m0]
        j = np.searchsorted(local, o, side="right") - 1
        return self.perm[m0 + j], o - local[j]

    def locate(self, w: int, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(member, row) of epoch places ``p``, all inside window ``w``."""
        return self.members(w, self.offsets(w, p))


class _MixSchedule:
    """Which dataset, and which sample of it, each global position holds (O(1) both ways)."""

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"dataset weights must be positive numbers, got {weights}")
        if np.all(w == np.round(w)) and w.sum() <= MIX_PERIOD:
            q = w.astype(np.int64)
            q //= np.gcd.reduce(q)
        else:
            ideal = w / w.sum() * MIX_PERIOD
            q = np.floor(ideal).astype(np.int64)
            rest = MIX_PERIOD - int(q.sum())
            q[np.argsort(-(ideal - q), kind="stable")[:rest]] += 1
            while np.any(q == 0):  # a tiny weight still gets one slot per period
                q[np.argmax(q)] -= 1
                q[np.argmin(q)] += 1
        self.quota = q
        self.period = int(q.sum())
        quota = q.tolist()
        cur = [0] * len(quota)
        sched = []
        for _ in range(self.period):  # smooth weighted round robin: each dataset spread evenly
            cur = [c + qd for c, qd in zip(cur, quota)]
            d = cur.index(max(cur))
            sched.append(d)
            cur[d] -= self.period
        self.sched = np.asarray(sched, np.int64)
        sched = self.sched
        self.prefix = np.zeros((len(q), self.period + 1), np.int64)
        for d in range(len(q)):
            np.cumsum(sched == d, out=self.prefix[d, 1:])
        self.occ = [np.flatnonzero(sched == d) for d in range(len(q))]

    def split(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per, k = np.divmod(pos, self.period)
        d = self.sched[k]
        return d, per * self.quota[d] + self.prefix[d, k]

    def positions(self, d: int, q: np.ndarray) -> np.ndarray:
        per, j = np.divmod(q, self.quota[d])
        return per * self.period + self.occ[d][j]

    def consumed(self, d: int, pos: int) -> int:
        """Samples of dataset ``d`` among the first ``pos`` global positions."""
        per, k = divmod(pos, self.period)
        return per * int(self.quota[d]) + int(self.prefix[d, k])
