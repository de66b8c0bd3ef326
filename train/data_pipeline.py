"""The loader's pipeline: one worker's reader thread and the gathering of batches.

See :class:`_Pipeline`. The plan it executes comes from ``data_plan``; the member reads and their
checks from ``shard_reader``.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from .data_plan import _Batch, _Drop, _Planner, _Source, _Window
from .shard_reader import _MemberCache, _Reader

_MAX_PENDING_EVENTS = 1024


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
    """One worker's loader, in two threads (``ds`` is the ShardDataset of train/data.py).

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

    def __init__(self, ds: Any, sources: list[_Source], worker: int, nworkers: int, wide: bool):
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
