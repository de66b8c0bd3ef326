"""The loader's plan: a dataset split as flat member arrays, and each worker's events.

The loader in five modules: which sample each global position holds (``data_order``), the sources
and each worker's plan of windows and batches (here), the two-thread pipeline that reads and
gathers them (``data_pipeline``), reading and checking shard members (``shard_reader``), indexing
shards that other tools wrote (``shard_scan``); ``data`` holds the dataset and the trainer's handle.

Why a plan separate from the reads: planning is pure computation on the index (which rows of which
member each batch of this rank and worker takes), so it can be tested and reasoned about without
any I/O; the pipeline consumes its events and does the reading.
"""
from __future__ import annotations

import os
import pickle
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from shardflow.storage import Storage
from shardflow.storage.shards import INDEX_REF, TAR_BLOCK, read_index, shard_ref, validate_index
from shardflow.storage.store import digest_json

from .data_order import _EpochOrder

GROUP_TOKENS = 1 << 21
MAX_GROUP = 64
"""Default size of a group of batches planned together (see ShardDataset): about GROUP_TOKENS
tokens -- planning costs a few microseconds per group, and from DataLoader workers each group is
one hand-over between processes (a socket round trip and a shared-memory segment) -- and at most
MAX_GROUP batches (short rows must not make the first batch wait)."""


def default_group(batch_size: int, row_len: int, num_workers: int = 0) -> int:
    return min(MAX_GROUP, max(1, GROUP_TOKENS // (batch_size * row_len)))

# ---------------------------------------------------------------------------------------------------
# Datasets: one index split, flattened into member arrays
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Source:
    """One (dataset root, split) as flat arrays over its members, in index order."""

    slot: int
    storage: Storage
    split: str
    index: dict[str, Any]
    shard_refs: list[str]
    shard_names: list[str]
    shard_bytes: list[int]
    shard_sha: list[str]
    m_shard: np.ndarray
    m_offset: np.ndarray
    m_header: np.ndarray
    m_rows: np.ndarray
    m_key: list[str]
    samples: int
    seq_len: int
    dtype: np.dtype
    content_digest: str

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    @property
    def row_bytes(self) -> int:
        return self.row_len * self.dtype.itemsize

    def shard_uri(self, s: int) -> str:
        return self.storage.uri(self.shard_refs[s])

    @classmethod
    def load(cls, storage: Storage, split: str, slot: int, index: dict[str, Any] | None = None) -> "_Source":
        if index is None:
            index = read_index(storage)
        else:
            validate_index(index, storage.uri(INDEX_REF))
        where = storage.uri(INDEX_REF)
        sp = index["splits"].get(split)
        if sp is None:
            raise ValueError(f"{where}: no split {split!r} (has {sorted(index['splits'])})")
        if not sp["shards"] or sp["samples"] == 0:
            raise ValueError(f"{where}: split {split!r} has no samples")
        refs, names, sizes, shas = [], [], [], []
        m_shard, m_offset, m_header, m_rows, m_key = [], [], [], [], []
        for s, entry in enumerate(sp["shards"]):
            names.append(entry["name"])
            refs.append(_entry_ref(entry))
            sizes.append(entry["bytes"])
            shas.append(entry["sha256"])
            for m in entry["members"]:
                if m["offset"] < TAR_BLOCK:
                    raise ValueError(f"{where}: shard {entry['name']!r} member {m['key']}: offset {m['offset']} leaves no room for its tar header")
                m_shard.append(s)
                m_offset.append(m["offset"])
                m_header.append(m["npy_header"])
                m_rows.append(m["rows"])
                m_key.append(m["key"])
        content = digest_json([split, index["seq_len"], index["dtype"],
                               [[e["name"], e["bytes"], e["sha256"], e["samples"]] for e in sp["shards"]]])
        return cls(slot=slot, storage=storage, split=split, index=index, shard_refs=refs, shard_names=names,
                   shard_bytes=sizes, shard_sha=shas, m_shard=np.asarray(m_shard, np.int64),
                   m_offset=np.asarray(m_offset, np.int64), m_header=np.asarray(m_header, np.int64),
                   m_rows=np.asarray(m_rows, np.int64), m_key=m_key, samples=int(sp["samples"]),
                   seq_len=int(index["seq_len"]), dtype=np.dtype(index["dtype"]), content_digest=content)


def _entry_ref(entry: dict[str, Any]) -> str:
    """Where a shard lives: ``shards/<name>``, or the absolute ``uri`` that build_index recorded for
    tars kept outside the root (restricted to .tar objects: the index may come from elsewhere)."""
    uri = entry.get("uri")
    if uri is None:
        return shard_ref(entry["name"])
    if not isinstance(uri, str) or not uri.endswith(".tar") or ("://" not in uri and not os.path.isabs(uri)):
        raise ValueError(f"shard {entry.get('name')!r}: 'uri' must be an absolute URI of a .tar, got {uri!r}")
    return uri


# ---------------------------------------------------------------------------------------------------
# The per-worker plan: windows to open, batches to assemble, windows to drop
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Unit:
    """Rows of one member that this worker needs from one window, and where they go in its buffer."""

    src: int
    member: int
    rows: np.ndarray
    slot0: int


@dataclass
class _Window:
    key: tuple[int, int, int]
    q0: int
    slot_of: np.ndarray
    units: list[_Unit]
    n_rows: int
    buf: np.ndarray | None = None
    futures: list[Future] | None = None
    ready: bool = False


@dataclass
class _Batch:
    """A group of ``n`` batches: for each window, which rows of the group come from which slots."""

    parts: list[tuple[tuple[int, int, int], np.ndarray | slice, np.ndarray]]
    n: int


@dataclass
class _Drop:
    key: tuple[int, int, int]


class _Planner:
    """One worker's events, in order: open a window (its rows can be fetched), assemble a group,
    drop a window. Pure computation on the index; whoever consumes the events does the reading.
    ``ds`` is the ShardDataset of train/data.py (its order, batch geometry and range)."""

    def __init__(self, ds: Any, worker: int, nworkers: int):
        self.ds = ds
        self.worker = worker
        self.nworkers = nworkers
        self.orders: dict = {}
        self.opened: dict[tuple[int, int, int], _Window] = {}
        self.latest: dict[int, tuple[int, int, int]] = {}

    def __iter__(self) -> Iterator[_Window | _Batch | _Drop]:
        ds = self.ds
        B, w, r, s = ds.batch_size, ds.world_size, ds.rank, ds.group
        start, stop = ds.start, ds.stop
        lanes = np.arange(B, dtype=np.int64)
        # Rank batches t .. t + size - 1 form this worker's next group. With DataLoader workers the
        # groups are fixed (the round robin depends on them); in-process they grow from one batch
        # to ``s``, so the first batch waits only for its own window, not a whole group's.
        t = self.worker * s
        size = s if self.nworkers > 1 else 1
        while True:
            chunks = r + w * (t + np.arange(size, dtype=np.int64))
            if stop is not None:
                chunks = chunks[start + (chunks + 1) * B <= stop]
                if not len(chunks):
                    return
            pos = (start + chunks[:, None] * B + lanes).reshape(-1)
            parts = self._fast(pos) if len(ds.sources) == 1 else None
            if isinstance(parts, _Window):  # the group's window has to be opened first
                yield parts
                parts = self._fast(pos)
            if parts is None:
                parts = yield from self._general(pos)
            yield _Batch(parts, len(chunks))
            for key in [k for k in self.opened if self.latest[k[0]] != k]:
                del self.opened[key]
                yield _Drop(key)
            t += s * self.nworkers if self.nworkers > 1 else size
            size = min(s, 2 * size)

    def _window(self, order: _EpochOrder, src: _Source, key: tuple[int, int, int]) -> tuple[_Window, bool]:
        window = self.opened.get(key)
        if window is not None:
            return window, False
        window = self.opened[key] = self._open(order, src, key)
        self.latest[key[0]] = key
        return window, True

    def _fast(self, pos: np.ndarray) -> list | _Window | None:
        """The common case in scalar arithmetic: one dataset and the whole group inside one window.
        Returns the parts, a window to open first, or None (take the general path)."""
        ds = self.ds
        src = ds.sources[0]
        q_lo, q_hi = int(pos[0]), int(pos[-1])
        e = q_lo // src.samples
        if q_hi // src.samples != e:
            return None
        order = ds._order(self.orders, 0, e)
        win = order.window_index(q_lo - e * src.samples)
        if order.window_index(q_hi - e * src.samples) != win:
            return None
        window, new = self._window(order, src, (0, e, win))
        if new:
            return window
        if ds.world_size == 1:  # positions are contiguous: a slice, no fancy indexing
            slots = window.slot_of[q_lo - window.q0 : q_hi + 1 - window.q0]
        else:
            slots = window.slot_of[pos - window.q0]
        return [(window.key, slice(0, len(pos)), slots)]

    def _general(self, pos: np.ndarray):
        """Any group: split by dataset, then epoch, then window (in runs: positions only increase).
        Yields the windows to open; returns the parts."""
        ds = self.ds
        d_all, q_all = ds.mix.split(pos)
        parts = []
        for d, sel in ds._by_dataset(d_all):
            src = ds.sources[d]
            q = q_all[sel]
            for e, es in _runs(q // src.samples):
                order = ds._order(self.orders, d, e)
                qe = q[es]
                for win, ws in _runs(order.window_of(qe - e * src.samples)):
                    window, new = self._window(order, src, (d, e, win))
                    if new:
                        yield window
                    slots = window.slot_of[qe[ws] - window.q0]
                    run = slice(es.start + ws.start, es.start + ws.stop)
                    parts.append((window.key, run if isinstance(sel, slice) else sel[run], slots))
        return parts

    def _open(self, order: _EpochOrder, src: _Source, key: tuple[int, int, int]) -> _Window:
        """The rows of a window that this worker will deliver, grouped per member."""
        ds = self.ds
        d, e, win = key
        lo, hi = order.window_range(win)
        places = np.arange(lo, hi, dtype=np.int64)
        q0 = e * src.samples + lo
        pos = ds.mix.positions(d, q0 + places - lo) if len(ds.sources) > 1 else q0 + places - lo
        rel = pos - ds.start
        chunk = rel // ds.batch_size
        need = (rel >= 0) & (chunk % ds.world_size == ds.rank)
        if self.nworkers > 1:
            need &= (chunk // ds.world_size // ds.group) % self.nworkers == self.worker
        if ds.stop is not None:
            need &= pos < ds.stop
        # Slots in window-offset order, which groups the rows per member (in row order) with no
        # sort: mark the wanted offsets, number them by a running count.
        if need.all():
            slot_of = order.offsets(win, places)
            wanted = np.arange(hi - lo, dtype=np.int64)
        else:
            o = order.offsets(win, places[need])
            mark = np.zeros(hi - lo, dtype=bool)
            mark[o] = True
            wanted = np.flatnonzero(mark)
            slot_of = np.full(hi - lo, -1, np.int64)
            slot_of[places[need] - lo] = (np.cumsum(mark) - 1)[o]
        members, rows = order.members(win, wanted)
        cuts = np.flatnonzero(np.diff(members)) + 1
        units = [_Unit(d, int(members[a]), rows[a:b], int(a))
                 for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(members)]) if b > a]
        return _Window(key=key, q0=q0, slot_of=slot_of, units=units, n_rows=len(wanted))


def _runs(a: np.ndarray) -> list[tuple[int, slice]]:
    """(value, slice) of each run of equal values of a non-decreasing array."""
    if a[0] == a[-1]:
        return [(int(a[0]), slice(0, len(a)))]
    cut = (np.flatnonzero(a[1:] != a[:-1]) + 1).tolist()
    bounds = [0, *cut, len(a)]
    return [(int(a[lo]), slice(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _fresh_source(src: _Source) -> _Source:
    clone = object.__new__(_Source)
    clone.__dict__.update(src.__dict__)
    clone.storage = pickle.loads(pickle.dumps(src.storage))
    return clone
