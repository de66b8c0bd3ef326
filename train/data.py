"""Streaming, exactly resumable loader over WebDataset token shards on any storage.

The loader in four modules: which sample each global position holds (``data_order``), reading and
checking shard members (``shard_reader``), indexing shards that other tools wrote (``shard_scan``),
and here the datasets, each worker's plan and pipeline, and the trainer's handle. This module stays
the public entry point: ``ShardDataError`` and ``build_index`` are re-exported from here.

Why ranks take contiguous B-sized chunks: with the stream cut into chunks of ``batch_size`` samples
(counted from the position the iteration started at), rank ``r`` of ``w`` takes chunks
``r, r + w, r + 2w, ...``; the rank's batches go in groups of ``group_batches`` to its DataLoader
workers in turn, which the DataLoader's in-order round robin reassembles. One optimizer step therefore
consumes exactly ``batch_size * world_size`` consecutive samples, the state is a single number, and
every rank gets the same number of batches whatever the number of shards. The stream wraps into the
next epoch (with a new permutation) instead of truncating, so no sample is skipped and none is
repeated within an epoch; a finite loader (``epochs=k``) stops at the last whole step before
``k * samples_per_epoch`` so that ranks still agree.

Why the reads look like this: a worker opens a window when its first batch needs it, computes which
rows of the window it will deliver (the others belong to other ranks/workers or lie before the
start), and fetches them per member (``shard_reader``). A reader thread reads ahead (bounded by
``prefetch_members``; through a pool of ``io_threads`` on object stores, where latency must be
overlapped) into window buffers; the thread that iterates gathers each batch from them as it asks
for it. The two halves of the CPU work -- ``readinto`` from the page cache and the gather +
widening into the output -- both release the GIL, so they run on two cores, and the threads exchange
a few events per window rather than a queue item per batch.

What bounds throughput: batches are int64 by default (what the model takes), i.e. 8 bytes written
per 2-byte token read, so the widening, not I/O, dominates on local disk. ``out_dtype`` int32 or
native (the shards' uint16/uint32) writes 4 or 2 bytes per token instead; ``tokens_to`` widens
such batches on the device. bench/loader.py measures each against the plain-read limit.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardflow.storage import Storage
from shardflow.storage.shards import INDEX_REF, TAR_BLOCK, read_index, shard_ref, validate_index
from shardflow.storage.store import digest_json

from .config import LoaderConfig
from .data_order import ORDER_VERSION, _EpochOrder, _MixSchedule
from .shard_reader import ShardDataError, _MemberCache, _Reader  # noqa: F401 - ShardDataError re-exported
from .shard_scan import build_index  # noqa: F401 - re-exported: the loader's public entry point

STATE_VERSION = 1
_MAX_PENDING_EVENTS = 1024
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


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------

class ShardDataset(IterableDataset):
    """One rank's slice of the global stream.

    Planned in *groups* of ``n`` (at most ``group_batches``, fewer only at the end of a finite
    stream) consecutive batches of this rank; rank batch ``t`` goes to worker ``(t // group) % n``.
    In the trainer's process it yields single ``(batch_size, seq_len + 1)`` batches of
    ``out_dtype``, gathered on demand (see :class:`_Pipeline`). In a DataLoader worker process it
    yields one ``(n, batch_size, seq_len + 1)`` tensor of the shards' dtype per group -- per-batch
    hand-over (DataLoader IPC, shared-memory segments) would cost more than reading the bytes,
    and the shards' dtype is 4x less to pass than int64 -- which :class:`StatefulLoader` converts.
    ``start``/``stop`` are global positions; ``stop=None`` streams forever (epochs roll over).
    """

    def __init__(
        self,
        sources: list[_Source],
        weights: list[float],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        group_batches: int | None = None,
        prefetch_members: int = 8,
        prefetch_batches: int = 4,
        io_threads: int | None = None,
        coalesce_gap_bytes: int | None = None,
        verify_digests: bool = False,
        cache_dir: str | None = None,
        cache_limit_bytes: int = 1 << 30,
        out_dtype: str = "int64",
        start: int = 0,
        stop: int | None = None,
    ):
        super().__init__()
        if not sources or len(sources) != len(weights):
            raise ValueError("need one weight per dataset and at least one dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1 or shuffle_window < 1 or seed < 0 or (group_batches is not None and group_batches < 1):
            raise ValueError("batch_size, shuffle_window and group_batches must be positive, seed non-negative")
        first = sources[0]
        for src in sources[1:]:
            a, b = first.index, src.index
            if (src.seq_len, src.dtype) != (first.seq_len, first.dtype) or a["vocab_size"] != b["vocab_size"] \
                    or a["tokenizer_digest"] != b["tokenizer_digest"]:
                raise ValueError(f"datasets to mix must share seq_len, dtype, vocab_size and tokenizer: "
                                 f"{first.storage.uri(INDEX_REF)} vs {src.storage.uri(INDEX_REF)}")
        self.sources = sources
        self.weights = [float(w) for w in weights]
        self.mix = _MixSchedule(self.weights)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window
        self.group = group_batches or default_group(batch_size, first.row_len, 0)
        self.prefetch_members = prefetch_members
        self.prefetch_batches = prefetch_batches
        self.io_threads = io_threads
        self.coalesce_gap_bytes = coalesce_gap_bytes
        self.verify_digests = verify_digests
        self.cache_dir = cache_dir
        self.cache_limit_bytes = cache_limit_bytes
        _out_dtype(out_dtype, first.dtype)
        self.out_dtype = out_dtype
        self.start = start
        self.stop = stop
        self.pin_memory = False
        self._pid = os.getpid()

    # -- facts ------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    @property
    def samples_per_epoch(self) -> int:
        """Samples of all datasets together (one dataset: its sample count)."""
        return sum(src.samples for src in self.sources)

    def fingerprint(self) -> str:
        """What the order depends on; a resume state is only meaningful under the same fingerprint."""
        return digest_json({"order": ORDER_VERSION, "seed": self.seed, "shuffle": self.shuffle,
                            "window": self.shuffle_window if self.shuffle else 0,
                            "quota": self.mix.quota.tolist(),
                            "datasets": [src.content_digest for src in self.sources]})

    def with_range(self, start: int, stop: int | None) -> "ShardDataset":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.start, clone.stop = start, stop
        return clone

    # -- order --------------------------------------------------------------------------------------
    def _order(self, cache: dict, d: int, epoch: int) -> _EpochOrder:
        order = cache.get((d, epoch))
        if order is None:
            order = _EpochOrder(self.sources[d].m_rows, self.seed, d, epoch, self.shuffle, self.shuffle_window)
            cache[(d, epoch)] = order
            for key in [k for k in cache if k[0] == d and k[1] < epoch - 1]:
                del cache[key]
        return order

    def _by_dataset(self, d_all: np.ndarray) -> list[tuple[int, slice | np.ndarray]]:
        if len(self.sources) == 1:
            return [(0, slice(0, len(d_all)))]
        return [(int(d), np.flatnonzero(d_all == d)) for d in np.unique(d_all)]

    def locate(self, positions: Iterable[int]) -> list[tuple[int, str, str, int]]:
        """(dataset slot, shard name, member key, row) of global positions: which sample each is."""
        pos = np.asarray(list(positions), dtype=np.int64)
        d_all, q_all = self.mix.split(pos)
        out: list[Any] = [None] * len(pos)
        cache: dict = {}
        for d in np.unique(d_all):
            src = self.sources[int(d)]
            sel = np.flatnonzero(d_all == d)
            e_all, p_all = np.divmod(q_all[sel], src.samples)
            for e in np.unique(e_all):
                order = self._order(cache, int(d), int(e))
                s2 = sel[e_all == e]
                p2 = p_all[e_all == e]
                w_all = order.window_of(p2)
                for w in np.unique(w_all):
                    members, rows = order.locate(int(w), p2[w_all == w])
                    for i, mem, row in zip(s2[w_all == w], members, rows):
                        out[i] = (int(d), src.shard_names[int(src.m_shard[mem])], src.m_key[mem], int(row))
        return out

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        sources = self.sources
        if os.getpid() != self._pid:  # a forked worker must not share the parent's connections
            sources = [_fresh_source(src) for src in sources]
        pipe = _Pipeline(self, sources, worker, nworkers, wide=info is None)
        try:
            yield from pipe
        finally:
            pipe.close()


class _Planner:
    """One worker's events, in order: open a window (its rows can be fetched), assemble a group,
    drop a window. Pure computation on the index; whoever consumes the events does the reading."""

    def __init__(self, ds: "ShardDataset", worker: int, nworkers: int):
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


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _InlineExecutor:
    """``submit`` runs the call at once: local reads from the page cache are memory copies, and
    handing them to other threads costs more (GIL hand-offs) than it overlaps."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like a pool
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


OUT_DTYPES = ("int64", "int32", "native")


def _out_dtype(name: str, shard_dtype: np.dtype) -> np.dtype:
    if name not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {name!r}")
    if name == "native":
        return shard_dtype
    if name == "int32" and shard_dtype.itemsize >= 4:
        raise ValueError("out_dtype int32 cannot hold uint32 token ids; use int64 or native")
    return np.dtype(name)


def _empty(shape: tuple[int, ...], dtype: np.dtype, pin: bool) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh output array, never a reused one: the consumer may keep a batch as long as it likes.
    Pinned memory comes from torch's caching host allocator, which recycles a block only after its
    tensor is freed and the copies recorded on it are done."""
    if pin:
        t = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        return t, t.numpy()
    a = np.empty(shape, dtype)
    return torch.from_numpy(a), a


class _Pipeline:
    """One worker's loader, in two threads.

    The reader thread walks the plan and fetches each window's rows into a window buffer ahead of
    need (at most ``prefetch_members`` members of windows the batches have not reached; through a
    pool of ``io_threads`` on object stores, itself for local files). It hands over *events*
    (window ready, group of batches, window done) -- a few per window, not per batch.

    The consuming thread (iterating this object) gathers each batch from the window buffers
    straight into a fresh output array as it is asked for one. Why there: the gather + widening
    is the bulk of the CPU work and numpy releases the GIL for it, so it runs on one core while
    the reader's ``readinto`` runs on another; an assembled-batch queue between them would add a
    hand-off per batch and keep more output memory in flight (out of cache) for nothing.

    In the trainer's process (``wide``) it yields single ``(B, seq_len + 1)`` batches of the output
    dtype; in a DataLoader worker it yields one ``(n, B, seq_len + 1)`` group of the shards' dtype
    (one object, 4x less than int64, to pass between processes), which StatefulLoader converts.
    """

    def __init__(self, ds: ShardDataset, sources: list[_Source], worker: int, nworkers: int, wide: bool):
        self.ds = ds
        self.wide = wide
        self.row_len = ds.seq_len + 1
        self.dtype = sources[0].dtype
        self.out_dtype = _out_dtype(ds.out_dtype, self.dtype) if wide else self.dtype
        cache = _MemberCache(ds.cache_dir, ds.cache_limit_bytes) if ds.cache_dir else None
        self.reader = _Reader(sources, ds.verify_digests, ds.coalesce_gap_bytes, cache)
        self.events: queue.Queue = queue.Queue(maxsize=_MAX_PENDING_EVENTS)
        self.halt = threading.Event()
        self._budget = threading.Condition()
        self._ahead = 0  # members read for windows that no batch has reached yet (under _budget)
        self._spare: list[np.ndarray] = []  # buffers of finished windows (under _budget)
        threads = ds.io_threads if ds.io_threads is not None else (0 if all(s.storage.is_local for s in sources) else 4)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardflow-read") if threads else _InlineExecutor()
        self.thread = threading.Thread(target=self._run, args=(iter(_Planner(ds, worker, nworkers)),),
                                       name="shardflow-loader", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.halt.set()
        with self._budget:
            self._budget.notify_all()
        with contextlib.suppress(queue.Empty):
            while True:
                self.events.get_nowait()
        self.thread.join(timeout=30)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.reader.close()

    # -- reader thread -----------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        while not self.halt.is_set():
            try:
                self.events.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, plan: Iterator[_Window | _Batch | _Drop]) -> None:
        try:
            for ev in plan:
                if isinstance(ev, _Window) and not self._start(ev):
                    return
                if not self._put(ev):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(exc))

    def _start(self, win: _Window) -> bool:
        """Wait for read-ahead budget, then fetch the window's rows (or submit the fetches)."""
        with self._budget:
            self._budget.wait_for(lambda: self.halt.is_set() or self._ahead < self.ds.prefetch_members)
            if self.halt.is_set():
                return False
            self._ahead += len(win.units)
            win.buf = self._window_buffer(win.n_rows)
        win.futures = [self.pool.submit(self.reader.fetch, u, win.buf) for u in win.units]
        return True

    def _window_buffer(self, n: int) -> np.ndarray:
        """Reuse the buffers of finished windows (all about the same size): fresh multi-MiB arrays
        are page-faulted in on first touch, which costs as much as the copy into them."""
        for i in range(len(self._spare) - 1, -1, -1):  # the most recently freed first: likely still in cache
            buf = self._spare[i]
            if buf.shape[0] >= n:
                del self._spare[i]
                return buf[:n]
        return np.empty((max(n, 1), self.row_len), dtype=self.dtype)[:n]

    # -- consuming thread ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor]:
        windows: dict[tuple[int, int, int], _Window] = {}
        while True:
            ev = self.events.get()
            if ev is None:
                return
            if isinstance(ev, _Failure):
                raise ev.exc
            if isinstance(ev, _Window):
                windows[ev.key] = ev
                with self._budget:
                    self._ahead -= len(ev.units)
                    self._budget.notify_all()
            elif isinstance(ev, _Drop):
                self._recycle(windows.pop(ev.key))
            else:
                wins = [windows[key] for key, _, _ in ev.parts]
                for win in wins:
                    for fut in win.futures:
                        fut.result()
                if self.wide:
                    yield from self._batches(ev, wins)
                else:
                    yield self._group(ev, wins)

    def _recycle(self, win: _Window) -> None:
        """A window no later batch reads: its buffer may be refilled. Every batch gathered from it
        was copied out already (outputs are never views of a window buffer)."""
        if win.buf is not None and all(f.done() for f in win.futures):
            with self._budget:
                if len(self._spare) < 4:
                    self._spare.append(win.buf.base if win.buf.base is not None else win.buf)
        win.buf = None

    def _batches(self, ev: _Batch, wins: list[_Window]) -> Iterator[torch.Tensor]:
        B = self.ds.batch_size
        pin = self.ds.pin_memory
        if len(wins) == 1 and isinstance(ev.parts[0][1], slice):  # the common case: one window, in order
            buf, slots = wins[0].buf, ev.parts[0][2]
            for i in range(ev.n):
                t, out = _empty((B, self.row_len), self.out_dtype, pin)
                _gather(out, buf, slots[i * B : (i + 1) * B])
                yield t
            return
        # Several windows (a window or epoch boundary inside the group, or mixing): each part
        # fills some rows of some batches; cut each part at batch boundaries once.
        cuts = []
        for win, (_, idx, slots) in zip(wins, ev.parts):
            rows = np.arange(idx.start, idx.stop) if isinstance(idx, slice) else idx
            cuts.append((win.buf, rows, slots, np.searchsorted(rows, np.arange(ev.n + 1) * B).tolist()))
        for i in range(ev.n):
            t, out = _empty((B, self.row_len), self.out_dtype, pin)
            for buf, rows, slots, at in cuts:
                a, b = at[i], at[i + 1]
                if a < b:
                    out[rows[a:b] - i * B] = buf[slots[a:b]]
            yield t

    def _group(self, ev: _Batch, wins: list[_Window]) -> torch.Tensor:
        B = self.ds.batch_size
        group = np.empty((ev.n * B, self.row_len), dtype=self.dtype)
        for win, (_, idx, slots) in zip(wins, ev.parts):
            if isinstance(idx, slice):
                np.take(win.buf, slots, axis=0, out=group[idx], mode="clip")
            else:
                group[idx] = win.buf[slots]
        return torch.from_numpy(group).view(ev.n, B, self.row_len)


_GATHER_BYTES = 256 << 10


def _gather(out: np.ndarray, buf: np.ndarray, slots: np.ndarray) -> None:
    """out[:] = buf[slots], converting; in cache-sized chunks so that the gathered rows are still
    in cache when they are converted (one pass over memory instead of two)."""
    if out.dtype == buf.dtype:
        np.take(buf, slots, axis=0, out=out, mode="clip")  # clip: raise mode copies twice
        return
    step = max(1, _GATHER_BYTES // (buf.shape[1] * buf.itemsize))
    if len(slots) <= step:
        np.copyto(out, buf[slots])
        return
    for a in range(0, len(slots), step):
        np.copyto(out[a : a + step], buf[slots[a : a + step]])


# ---------------------------------------------------------------------------------------------------
# The trainer's handle
# ---------------------------------------------------------------------------------------------------

class StatefulLoader:
    """Batches of one rank, int64 ``(batch_size, seq_len + 1)``, that know their global position.

    Worker processes cannot report what the trainer consumed, so the position is counted here:
    every batch handed out advances it by ``batch_size * world_size``. ``state_dict()`` is plain
    JSON data; ``load_state_dict()`` sets the position the next ``iter()`` starts from, on any world
    size, worker count or batch size (the position is in samples). Each ``iter()`` continues from the
    current position; loading a state invalidates a running iterator. With ``num_workers=0`` (the
    default) no DataLoader is involved: a reader thread in this process does the work.
    """

    def __init__(self, dataset: ShardDataset, num_workers: int = 0, pin_memory: bool = False, epochs: int | None = None):
        if epochs is not None and epochs < 1:
            raise ValueError("epochs must be >= 1 or None (endless)")
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.epochs = epochs
        self._position = 0
        self._generation = 0

    # -- facts the trainer needs ------------------------------------------------------------------
    @property
    def index(self) -> dict[str, Any]:
        return self.dataset.sources[0].index

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size

    @property
    def world_size(self) -> int:
        return self.dataset.world_size

    @property
    def rank(self) -> int:
        return self.dataset.rank

    @property
    def samples_per_epoch(self) -> int:
        return self.dataset.samples_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Whole optimizer steps in one epoch's worth of samples (the stream itself wraps)."""
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    @property
    def position(self) -> int:
        return self._position

    @property
    def epoch(self) -> int:
        return self._position // self.samples_per_epoch

    def _stop(self, start: int) -> int | None:
        if self.epochs is None:
            return None
        step = self.batch_size * self.world_size
        end = self.epochs * self.samples_per_epoch
        return start + max(0, (end - start) // step) * step

    def _batches(self, item: torch.Tensor) -> Iterator[torch.Tensor]:
        if item.dim() == 2:  # a batch from this process's pipeline
            yield item
            return
        # A group from a worker process, in the shards' dtype: convert here, one batch at a time
        # (batch-sized allocations are recycled by malloc; a fresh multi-MiB array is page-faulted
        # in), with numpy: torch's uint16 -> int64 conversion has no vectorized kernel (~500x slower).
        dtype = _out_dtype(self.dataset.out_dtype, self.dataset.sources[0].dtype)
        for rows in item.numpy():
            if self.pin_memory:
                t, out = _empty(rows.shape, dtype, True)
                np.copyto(out, rows)
                yield t
            elif rows.dtype == dtype:
                yield torch.from_numpy(rows)  # a view of the group, which nothing else writes
            else:
                yield torch.from_numpy(rows.astype(dtype))

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._generation += 1
        generation = self._generation
        start = self._position
        ds = self.dataset.with_range(start, self._stop(start))
        if self.num_workers:
            # forkserver, not fork: the trainer's process holds threads (prefetch, Prefect, Ray,
            # NCCL) and forking a threaded process can leave a worker with a held lock, dead at start.
            prefetch = max(2, -(-ds.prefetch_batches // ds.group))
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=prefetch,
                                     pin_memory=False, multiprocessing_context="forkserver",
                                     persistent_workers=False))
        else:
            ds.pin_memory = self.pin_memory
            source = iter(ds)
        step = self.batch_size * self.world_size
        try:
            for group in source:
                for batch in self._batches(group):
                    if generation != self._generation:
                        return
                    self._position += step
                    yield batch
        finally:
            shutdown = getattr(source, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            else:
                source.close()

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "position": self._position,
            "epoch": self.epoch,
            "fingerprint": ds.fingerprint(),
            "datasets": [
                {"root": src.storage.root, "split": src.split, "weight": wt, "samples": src.samples,
                 "consumed": ds.mix.consumed(i, self._position),
                 "epoch": ds.mix.consumed(i, self._position) // src.samples}
                for i, (src, wt) in enumerate(zip(ds.sources, ds.weights))
            ],
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state["position"]``; with ``strict`` refuse a state of another order."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state (version {state.get('version') if isinstance(state, dict) else None!r})")
        pos = state.get("position")
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise ValueError(f"loader state: position must be a non-negative integer, got {pos!r}")
        if strict and state.get("fingerprint") != self.dataset.fingerprint():
            raise ValueError("loader state was saved for another sample order (seed, shuffle, datasets, weights or "
                             "shard contents differ); resuming would not continue the same stream. "
                             "Pass strict=False to take its position anyway.")
        self._position = pos
        self._generation += 1


def inputs_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs of a ``(B, seq_len + 1)`` batch: ``(batch[:, :-1], batch[:, 1:])``."""
    return batch[:, :-1], batch[:, 1:]


def tokens_to(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch as the int64 tokens the model takes, on ``device``.

    A compact batch (``out_dtype`` int32 or native) crosses to the device as it is (pinned, so
    asynchronously, and 2-4x fewer bytes) and is widened there. On the CPU, unsigned batches are
    widened by numpy: torch has no vectorized uint16/uint32 -> int64 conversion (~500x slower)."""
    if batch.dtype in (torch.uint16, torch.uint32) and torch.device(device).type == "cpu":
        return torch.from_numpy(batch.numpy().astype(np.int64))
    return batch.to(device, non_blocking=True).long()


def _dataset_storage(storage: Storage, root: str | None) -> Storage:
    """The storage of a dataset root, inheriting endpoint and credentials from the pipeline's."""
    if root is None:
        return storage
    return Storage(root, storage.config.model_copy(update={"root": root}))


def build_loader(
    cfg: LoaderConfig,
    storage: Storage,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    *,
    epochs: int | None = None,
    indexes: list[dict[str, Any]] | None = None,
) -> StatefulLoader:
    """The loader of one rank. ``epochs=None`` streams forever; ``indexes`` overrides index.json."""
    sources = []
    for i, spec in enumerate(cfg.datasets):
        st = _dataset_storage(storage, spec.root)
        sources.append(_Source.load(st, split, i, indexes[i] if indexes is not None else None))
    ds = ShardDataset(
        sources, [spec.weight for spec in cfg.datasets], cfg.batch_size, rank, world_size,
        seed=cfg.seed, shuffle=cfg.shuffle, shuffle_window=cfg.shuffle_window,
        group_batches=cfg.group_batches or default_group(cfg.batch_size, sources[0].row_len, cfg.num_workers),
        prefetch_members=cfg.prefetch_members, prefetch_batches=cfg.prefetch_batches, io_threads=cfg.io_threads,
        coalesce_gap_bytes=cfg.coalesce_gap_bytes, verify_digests=cfg.verify_digests,
        cache_dir=cfg.cache_dir, cache_limit_bytes=cfg.cache_limit_bytes, out_dtype=cfg.out_dtype,
    )
    return StatefulLoader(ds, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, epochs=epochs)
