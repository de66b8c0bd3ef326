"""Reading shard members into window buffers, and checking that they are what the index says.

Why the reads look like this: the rows a worker will deliver from a window are fetched per member:
on object stores with byte-range reads merged across gaps under ``coalesce_gap_bytes`` (a range GET
costs far more than a few KiB), locally by reading straight into the window's buffer. Each fetch
also reads the member's 512-byte tar header and its .npy header and checks both against the index,
so a stale index, a shifted offset, a foreign member name or a pickled array is an error naming the
shard and the member, not garbage tokens.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import tarfile
import threading
import uuid
from concurrent.futures import Future
from typing import Any

import numpy as np

from shardflow.storage.shards import TAR_BLOCK
from shardflow.storage.store import StorageError, digest_json

from .data_plan import _Source, _Unit

NO_DIGEST = "sha256:unknown"
_TOKEN_EXT = "tokens.npy"


class ShardDataError(RuntimeError):
    """A shard does not match its index (missing, truncated, corrupt, foreign member); names it."""


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
