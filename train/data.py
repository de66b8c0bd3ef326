"""Streaming, exactly resumable loader over WebDataset token shards on any storage.

The loader in six modules: which sample each global position holds (``data_order``), the sources
and each worker's plan of windows and batches (``data_plan``), the two-thread pipeline that reads
ahead and gathers batches (``data_pipeline``), reading and checking shard members
(``shard_reader``), indexing shards that other tools wrote (``shard_scan``), and here the dataset
(one rank's slice of the stream) and the trainer's handle. This module is the public entry point:
``ShardDataError`` and ``build_index`` are re-exported from here.

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

import os
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardflow.storage import Storage
from shardflow.storage.shards import INDEX_REF
from shardflow.storage.store import digest_json

from .config import LoaderConfig
from .data_order import ORDER_VERSION, _EpochOrder, _MixSchedule
from .data_pipeline import _empty, _out_dtype, _Pipeline
from .data_plan import _fresh_source, _Source, default_group
from .shard_reader import ShardDataError  # noqa: F401 - re-exported: the loader's public error
from .shard_scan import build_index  # noqa: F401 - re-exported: the loader's public entry point

STATE_VERSION = 1


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
                             "shard contents differ, e.g. data was appended and packed since); resuming would not "
                             "continue the same stream")
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


def dataset_storage(storage: Storage, root: str | None) -> Storage:
    """The Storage of one ``train.data.datasets`` entry: the pipeline root, or another root that
    inherits the pipeline's endpoint, credentials and options."""
    if root is None:
        return storage
    return Storage.from_config(storage.config.model_copy(update={"root": root}))


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
        st = dataset_storage(storage, spec.root)
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
