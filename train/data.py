"""Streaming, exactly resumable loader over WebDataset token shards on any storage.

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

Why ranks take contiguous B-sized chunks: with the stream cut into chunks of ``batch_size`` samples
(counted from the position the iteration started at), rank ``r`` of ``w`` takes chunks
``r, r + w, r + 2w, ...``; the rank's batches go in groups of ``group_batches`` to its DataLoader
workers in turn, which the DataLoader's in-order round robin reassembles. One optimizer step therefore
consumes exactly ``batch_size * world_size`` consecutive samples, the state is a single number, and
every rank gets the same number of batches whatever the number of shards. The stream wraps into the
next epoch (with a new permutation) instead of truncating, so no sample is skipped and none is
repeated within an epoch; a finite loader (``epochs=k``) stops at the last whole step before
``k * samples_per_epoch`` so that ranks still agree.

Why mixing is a fixed periodic schedule: weights are turned into integer quotas per period and the
period is laid out by smooth weighted round robin, so dataset and per-dataset index of any position
are O(1) (``period * quota + prefix count``), proportions are exact at every period boundary, and the
resume state stays the global position alone.

Why the reads look like this: a worker opens a window when its first batch needs it, computes which
rows of the window it will deliver (the others belong to other ranks/workers or lie before the
start), and fetches them per member: on object stores with byte-range reads merged across gaps
under ``coalesce_gap_bytes`` (a range GET costs far more than a few KiB), locally by reading straight
into the window's buffer. Each fetch also reads the member's 512-byte tar header and its .npy
header and checks both against the index, so a stale index, a shifted offset, a foreign member name
or a pickled array is an error naming the shard and the member, not garbage tokens. A reader
thread reads ahead (bounded by ``prefetch_members``; through a pool of ``io_threads`` on object
stores, where latency must be overlapped) into window buffers; the thread that iterates gathers each
batch from them as it asks for it. The two halves of the CPU work -- ``readinto`` from the page
cache and the gather + widening into the output -- both release the GIL, so they run on two cores,
and the threads exchange a few events per window rather than a queue item per batch.

What bounds throughput: batches are int64 by default (what the model takes), i.e. 8 bytes written
per 2-byte token read, so the widening, not I/O, dominates on local disk. ``out_dtype`` int32 or
native (the shards' uint16/uint32) writes 4 or 2 bytes per token instead; ``tokens_to`` widens
such batches on the device. bench/loader.py measures each against the plain-read limit.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import io
import os
import pickle
import posixpath
import queue
import tarfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shardflow.storage import Storage
from shardflow.storage.shards import INDEX_REF, SHARDS_DIR, make_index, read_index, shard_ref, validate_index, validate_member_name
from shardflow.storage.store import StorageError, digest_json

from .config import LoaderConfig

ORDER_VERSION = 1
"""Bump when the mapping from (seed, index, position) to samples changes: old states are refused."""

STATE_VERSION = 1
TAR_BLOCK = 512
MIX_PERIOD = 4096
"""Period of the mixing schedule when weights are not small integers (proportions exact to 1/4096)."""
NO_DIGEST = "sha256:unknown"
_TOKEN_EXT = "tokens.npy"
_ALLOWED_EXT = {"tokens.npy", "docs.npy", "meta.json"}
_MAX_PENDING_EVENTS = 1024
GROUP_TOKENS = 1 << 21
MAX_GROUP = 64
"""Default size of a group of batches planned together (see ShardDataset): about GROUP_TOKENS
tokens -- planning costs a few microseconds per group, and from DataLoader workers each group is
one hand-over between processes (a socket round trip and a shared-memory segment) -- and at most
MAX_GROUP batches (short rows must not make the first batch wait)."""


def default_group(batch_size: int, row_len: int, num_workers: int = 0) -> int:
    return min(MAX_GROUP, max(1, GROUP_TOKENS // (batch_size * row_len)))


class ShardDataError(RuntimeError):
    """A shard does not match its index (missing, truncated, corrupt, foreign member); names it."""


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
# Order: epoch permutation of one dataset, and the mixing schedule
# ---------------------------------------------------------------------------------------------------

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
# Reading members
# ---------------------------------------------------------------------------------------------------

def _parse_npy_header(buf: bytes, where: str) -> tuple[int, tuple[int, ...], np.dtype]:
    """(header length, shape, dtype) of an .npy prefix; refuses object (pickled) and Fortran arrays."""
    try:
        return _parse_npy_header_cached(buf)
    except ShardDataError as exc:
        raise ShardDataError(f"{where}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _parse_npy_header_cached(buf: bytes) -> tuple[int, tuple[int, ...], np.dtype]:
    """Members of a shard share a few header shapes; numpy parses headers with literal_eval (slow)."""
    bio = io.BytesIO(buf)
    try:
        major, minor = np.lib.format.read_magic(bio)
        if (major, minor) == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(bio)
        elif (major, minor) in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(bio)
        else:
            raise ValueError(f"unsupported .npy format version {major}.{minor}")
    except ValueError as exc:
        raise ShardDataError(f"not a valid .npy header ({exc})") from None
    if dtype.hasobject:
        raise ShardDataError(".npy holds Python objects (pickle); refused")
    if fortran:
        raise ShardDataError("Fortran-ordered .npy; token blocks must be C order")
    return bio.tell(), tuple(shape), dtype


def _npy_header_length(prefix: bytes, where: str) -> int:
    if len(prefix) < 10 or prefix[:6] != b"\x93NUMPY":
        raise ShardDataError(f"{where}: not an .npy file (bad magic)")
    if prefix[6] == 1:
        return 10 + int.from_bytes(prefix[8:10], "little")
    if len(prefix) < 12:
        raise ShardDataError(f"{where}: truncated .npy header")
    return 12 + int.from_bytes(prefix[8:12], "little")


class _MemberCache:
    """Members of remote shards kept on local disk, bounded, least recently used evicted first.

    Content-addressed by the shard's sha256 from the index (a rewritten shard gets new entries), so
    processes and runs share it safely; files are published by rename, so a reader never sees half.
    """

    def __init__(self, root: str, limit: int):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.limit = limit
        self._total: int | None = None
        self._lock = threading.Lock()

    def namespace(self, src: _Source, s: int) -> str:
        sha = src.shard_sha[s]
        if sha != NO_DIGEST and sha.startswith("sha256:"):
            return sha[7:47]
        return digest_json([src.shard_uri(s), src.shard_bytes[s]])[7:47]

    def path(self, src: _Source, m: int) -> str:
        s = int(src.m_shard[m])
        return os.path.join(self.root, self.namespace(src, s), f"{src.m_key[m]}.member")

    def verified_marker(self, src: _Source, s: int) -> str | None:
        sha = src.shard_sha[s]
        return os.path.join(self.root, sha[7:47] + ".verified") if sha != NO_DIGEST else None

    def touch(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)

    def put(self, path: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        self._account(len(data))

    def mark(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb"):
            pass

    def _scan(self) -> list[tuple[float, int, str]]:
        found = []
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if not name.endswith(".member"):
                    continue
                p = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(p)
                    found.append((st.st_mtime, st.st_size, p))
        return found

    def _account(self, n: int) -> None:
        with self._lock:
            if self._total is None:
                self._total = sum(size for _, size, _ in self._scan())
            else:
                self._total += n
            if self._total <= self.limit:
                return
            files = sorted(self._scan())  # other processes share the directory: recount
            total = sum(size for _, size, _ in files)
            target = int(self.limit * 0.9)
            for _, size, p in files:
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    total -= size
            self._total = total


class _FileMember:
    """A member read from an open file (seek + readinto: no intermediate bytes object)."""

    def __init__(self, f, base: int, uri: str, owned: bool = True):
        self.f, self.base, self.uri, self.owned = f, base, uri, owned

    def __enter__(self) -> "_FileMember":
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.f.close()

    def _short(self, start: int, want: int, got: int) -> StorageError:
        return StorageError(f"short read of {self.uri}: wanted {want} bytes at {self.base + start}, got {got} (truncated?)")

    def read(self, start: int, n: int) -> bytes:
        self.f.seek(self.base + start)
        data = self.f.read(n)
        if len(data) != n:
            raise self._short(start, n, len(data))
        return data

    def read_into(self, start: int, dst: np.ndarray) -> None:
        self.f.seek(self.base + start)
        view = memoryview(dst).cast("B")
        got = 0
        while got < len(view):
            n = self.f.readinto(view[got:])
            if not n:
                raise self._short(start, len(view), got)
            got += n


class _BlobMember:
    """A member of which the wanted ranges were fetched already (range GETs or a cache fill)."""

    def __init__(self, blobs: list[tuple[int, bytes]], uri: str):
        self.blobs, self.uri = blobs, uri

    def __enter__(self) -> "_BlobMember":
        return self

    def __exit__(self, *exc) -> None:
        self.blobs = []

    def read(self, start: int, n: int) -> memoryview:
        for at, blob in self.blobs:
            if at <= start and start + n <= at + len(blob):
                return memoryview(blob)[start - at : start - at + n]
        raise AssertionError(f"{self.uri}: bytes {start}+{n} were not fetched")  # a planning bug, not bad data

    def read_into(self, start: int, dst: np.ndarray) -> None:
        memoryview(dst).cast("B")[:] = self.read(start, dst.nbytes)


class _Reader:
    """Fetches a unit's rows into its window buffer, checking the shard and the member headers."""

    def __init__(self, sources: list[_Source], verify: bool, gap: int | None, cache: _MemberCache | None):
        self.sources = sources
        self.verify = verify
        self.gap = gap
        self.cache = cache
        self._checked: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._files: list[Any] = []

    _OPEN_FILES = 16

    def _file(self, src: _Source, s: int):
        """A shard kept open per reading thread (the most recent few): an open through fsspec costs
        about as much as reading a few hundred KiB from the page cache."""
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = collections.OrderedDict()
        key = (src.slot, s)
        f = files.get(key)
        if f is not None:
            files.move_to_end(key)
            return f
        f = files[key] = src.storage.open_read(src.shard_refs[s])
        with self._lock:
            self._files.append(f)
        if len(files) > self._OPEN_FILES:
            _, old = files.popitem(last=False)
            with self._lock:
                self._files.remove(old)
            old.close()
        return f

    def close(self) -> None:
        """Close the shards left open (after the reading threads have stopped)."""
        with self._lock:
            files, self._files = self._files, []
        for f in files:
            with contextlib.suppress(Exception):
                f.close()

    def _gap(self, src: _Source) -> int:
        if self.gap is not None:
            return self.gap
        return 64 << 10 if src.storage.is_local else 4 << 20

    # -- whole-shard checks, once per process --------------------------------------------------
    def check_shard(self, src: _Source, s: int) -> None:
        with self._lock:
            fut = self._checked.get((src.slot, s))
            owner = fut is None
            if owner:
                fut = self._checked[(src.slot, s)] = Future()
        if owner:
            try:
                self._check_shard(src, s)
                fut.set_result(None)
            except BaseException as exc:
                fut.set_exception(exc)
        fut.result()

    def _check_shard(self, src: _Source, s: int) -> None:
        uri = src.shard_uri(s)
        ref = src.shard_refs[s]
        try:
            size = src.storage.size(ref)
        except FileNotFoundError:
            raise ShardDataError(f"{uri}: shard listed in the index is missing") from None
        except StorageError as exc:
            raise ShardDataError(f"{uri}: cannot stat shard: {exc}") from None
        if size != src.shard_bytes[s]:
            raise ShardDataError(f"{uri}: {size} bytes but the index says {src.shard_bytes[s]} (truncated or replaced shard)")
        if not self.verify:
            return
        want = src.shard_sha[s]
        if want == NO_DIGEST:
            raise ShardDataError(f"{uri}: the index records no sha256 (built without digests); "
                                 "rebuild it with build_index(..., digests=True) or turn verify_digests off")
        marker = self.cache.verified_marker(src, s) if self.cache is not None and not src.storage.is_local else None
        if marker is not None and os.path.exists(marker):
            return
        got = src.storage.digest(ref)
        if got != want:
            raise ShardDataError(f"{uri}: sha256 {got} does not match the index ({want}): corrupt shard")
        if marker is not None:
            self.cache.mark(marker)

    # -- one unit --------------------------------------------------------------------------------
    def fetch(self, unit: _Unit, buf: np.ndarray) -> None:
        """Read the unit's rows into its slots of the window buffer (straight into it where a run of
        rows is wanted whole), after checking the member's tar and .npy headers."""
        src = self.sources[unit.src]
        m = unit.member
        self.check_shard(src, int(src.m_shard[m]))
        row_bytes = src.row_bytes
        head = TAR_BLOCK + int(src.m_header[m])  # tar header + npy header, before row 0
        rows = unit.rows
        gap = self._gap(src)
        n = len(rows)
        if int(rows[-1]) - int(rows[0]) + 1 == n:  # rows are sorted and unique: one run, no gaps
            runs = [(int(rows[0]), int(rows[0]) + n, 0, n)]
        else:
            cut = (np.flatnonzero(np.diff(rows) - 1 > gap // row_bytes) + 1).tolist()
            bounds = [0, *cut, n]
            runs = [(int(rows[i]), int(rows[j - 1]) + 1, i, j) for i, j in zip(bounds[:-1], bounds[1:])]
        member = self._open_member(src, m, head, [(head + a * row_bytes, (b - a) * row_bytes) for a, b, _, _ in runs], gap)
        with member:
            self._check_headers(src, m, member.read(0, head))
            for a, b, i, j in runs:
                dst = buf[unit.slot0 + i : unit.slot0 + j]
                if j - i == b - a:
                    member.read_into(head + a * row_bytes, dst)
                else:
                    arr = np.frombuffer(member.read(head + a * row_bytes, (b - a) * row_bytes), dtype=src.dtype)
                    np.take(arr.reshape(b - a, src.row_len), rows[i:j] - a, axis=0, out=dst)

    def _open_member(self, src: _Source, m: int, head: int, ranges: list[tuple[int, int]], gap: int):
        """Byte access to one member relative to its tar header: a local file, a cached copy, or the
        wanted ranges fetched up front by range reads (merged across small gaps, header included)."""
        ref = src.shard_refs[int(src.m_shard[m])]
        base = int(src.m_offset[m]) - TAR_BLOCK
        uri = src.shard_uri(int(src.m_shard[m]))
        if src.storage.is_local:
            return _FileMember(self._file(src, int(src.m_shard[m])), base, uri, owned=False)
        if self.cache is not None:
            path = self.cache.path(src, m)
            with contextlib.suppress(FileNotFoundError):
                member = _FileMember(open(path, "rb", buffering=0), 0, path)
                self.cache.touch(path)
                return member
            size = head + int(src.m_rows[m]) * src.row_bytes
            whole = src.storage.read_range(ref, base, size)
            self._check_headers(src, m, whole[:head])
            self.cache.put(path, whole)
            return _BlobMember([(0, whole)], uri)
        merged: list[list[int]] = [[0, head]]
        for start, n in ranges:
            if start - merged[-1][1] <= gap:
                merged[-1][1] = start + n
            else:
                merged.append([start, start + n])
        return _BlobMember([(a, src.storage.read_range(ref, base + a, b - a)) for a, b in merged], uri)

    def _check_headers(self, src: _Source, m: int, head: bytes) -> None:
        s = int(src.m_shard[m])
        key = src.m_key[m]
        where = f"{src.shard_uri(s)} member {key}"
        try:
            info = tarfile.TarInfo.frombuf(bytes(head[:TAR_BLOCK]), "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ShardDataError(f"{where}: no valid tar header at offset {int(src.m_offset[m]) - TAR_BLOCK} ({exc}); "
                                 "the shard is corrupt or the index does not describe it") from None
        expected = f"{key}.{_TOKEN_EXT}"
        if info.name != expected:
            raise ShardDataError(f"{where}: tar member is {info.name!r}, expected {expected!r}")
        size = int(src.m_header[m]) + int(src.m_rows[m]) * src.row_bytes
        if not info.isreg() or info.size != size:
            raise ShardDataError(f"{where}: tar member is not a regular file of {size} bytes")
        hlen, shape, dtype = _parse_npy_header(bytes(head[TAR_BLOCK:]), where)
        if hlen != int(src.m_header[m]) or dtype != src.dtype or shape != (int(src.m_rows[m]), src.row_len):
            raise ShardDataError(f"{where}: .npy header says {dtype}{shape} in {hlen} bytes, the index says "
                                 f"{src.dtype}({int(src.m_rows[m])}, {src.row_len}) in {int(src.m_header[m])} bytes")


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


# ---------------------------------------------------------------------------------------------------
# Indexing shards that someone else wrote
# ---------------------------------------------------------------------------------------------------

def _expand(storage: Storage, pattern_or_urls: str | list[str]) -> list[str]:
    if isinstance(pattern_or_urls, (list, tuple)):
        return list(pattern_or_urls)
    if "{" in pattern_or_urls:
        import braceexpand

        return list(braceexpand.braceexpand(pattern_or_urls))
    if any(ch in pattern_or_urls for ch in "*?["):
        found = storage.glob(pattern_or_urls)
        if not found:
            raise FileNotFoundError(f"no shards match {storage.uri(pattern_or_urls)}")
        return found
    return [pattern_or_urls]


def _scan_tar(storage: Storage, ref: str) -> tuple[list[dict[str, Any]], int, np.dtype | None, int]:
    """Member entries of one tar from its headers (data is skipped by seeking), checked for safety."""
    uri = storage.uri(ref)
    members: list[dict[str, Any]] = []
    seq_len, dtype = -1, None
    keys: set[str] = set()
    with storage.open_read(ref, block_size=1 << 16) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as exc:
            raise ShardDataError(f"{uri}: not a readable uncompressed tar ({exc})") from None
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as exc:
                raise ShardDataError(f"{uri}: corrupt tar after {len(members)} members ({exc})") from None
            if info is None:
                break
            where = f"{uri} member {info.name!r}"
            try:
                validate_member_name(info.name)
            except ValueError as exc:
                raise ShardDataError(f"{uri}: {exc}") from None
            if not info.isreg():
                raise ShardDataError(f"{where}: not a regular file (links, devices and directories are refused)")
            key, _, ext = posixpath.basename(info.name).partition(".")
            if "/" in info.name or not key or not all(ch.isalnum() or ch in "_-" for ch in key):
                raise ShardDataError(f"{where}: sample keys must be dot-free names of letters, digits, '_' and '-'")
            if ext not in _ALLOWED_EXT:
                raise ShardDataError(f"{where}: unsupported member type {ext!r}; only {sorted(_ALLOWED_EXT)} are read "
                                     "(pickled formats such as .pyd/.pickle/.pth are refused)")
            if ext != _TOKEN_EXT:
                continue
            if key in keys:
                raise ShardDataError(f"{where}: key {key!r} repeated")
            keys.add(key)
            f.seek(info.offset_data)
            prefix = f.read(min(info.size, 16))
            hlen_guess = _npy_header_length(prefix, where)
            f.seek(info.offset_data)
            hlen, shape, dt = _parse_npy_header(f.read(min(info.size, hlen_guess)), where)
            if dt not in (np.dtype("<u2"), np.dtype("<u4")) or len(shape) != 2 or shape[1] < 2:
                raise ShardDataError(f"{where}: token blocks must be 2-D little-endian uint16/uint32, got {dt}{shape}")
            if info.size != hlen + shape[0] * shape[1] * dt.itemsize:
                raise ShardDataError(f"{where}: {info.size} bytes do not hold a {dt}{shape} array")
            if dtype is None:
                seq_len, dtype = shape[1] - 1, dt
            elif (shape[1] - 1, dt) != (seq_len, dtype):
                raise ShardDataError(f"{where}: {dt}{shape} differs from earlier members ({dtype}, seq_len {seq_len})")
            members.append({"key": key, "offset": info.offset_data, "size": info.size, "rows": shape[0], "npy_header": hlen})
    return members, seq_len, dtype, storage.size(ref)


def build_index(
    storage: Storage,
    pattern_or_urls: str | list[str],
    split: str = "train",
    *,
    vocab_size: int | None = None,
    eos_id: int = 0,
    tokenizer_digest: str = "unknown",
    digests: bool = False,
) -> dict[str, Any]:
    """index.json for WebDataset shards written by other tools (``<key>.tokens.npy`` members).

    Reads tar and .npy headers only (seeking past the data), unless ``digests`` also hashes each
    shard for ``verify_digests``. Tars under ``<root>/shards/`` are named as the index contract
    says; others are recorded with their absolute ``uri``. ``vocab_size`` defaults to the dtype's
    range (pass the tokenizer's). Publish it with ``storage.shards.write_index`` to train on it.
    """
    entries = []
    seq_len, dtype = -1, None
    for ref in _expand(storage, pattern_or_urls):
        name = posixpath.basename(ref.rstrip("/"))
        members, sl, dt, nbytes = _scan_tar(storage, ref)
        if dt is not None:
            if dtype is None:
                seq_len, dtype = sl, dt
            elif (sl, dt) != (seq_len, dtype):
                raise ShardDataError(f"{storage.uri(ref)}: {dt} seq_len {sl} differs from other shards ({dtype}, {seq_len})")
        rows = sum(m["rows"] for m in members)
        entry: dict[str, Any] = {"name": name, "bytes": nbytes, "sha256": storage.digest(ref) if digests else NO_DIGEST,
                                 "samples": rows, "tokens": rows * (seq_len + 1), "members": members}
        if storage.uri(ref) != storage.uri(f"{SHARDS_DIR}/{name}"):
            entry["uri"] = storage.uri(ref)
        entries.append(entry)
    if dtype is None:
        raise ShardDataError(f"no {_TOKEN_EXT} members in {pattern_or_urls!r}")
    for e in entries:
        e["tokens"] = e["samples"] * (seq_len + 1)
    vocab = vocab_size if vocab_size is not None else int(np.iinfo(dtype).max) + 1
    return make_index(seq_len, dtype, vocab, tokenizer_digest, eos_id, {split: entries})
