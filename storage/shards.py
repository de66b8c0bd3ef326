"""WebDataset tar shards of packed token blocks, and the index that lets a loader seek into them.

This module *is* the on-disk contract between data preparation and training; the streaming loader
is written against it, so every number in ``shards/index.json`` must be exact.

Why stock tar, written by hand: any WebDataset tool must read our shards with no custom code, and
writing the 512-byte ustar headers ourselves (through :meth:`tarfile.TarInfo.tobuf`, so the header
format is the stdlib's) is what makes member data offsets known *while* writing — the index is a
by-product of the write, not a second pass over the bytes. Every header field that could vary
(mtime, uid/gid, names, mode) is fixed, so the same rows give byte-identical shards.

Why a member holds a *block* of K sequences (``<key>.tokens.npy``, shape (K, seq_len+1)): one
sequence per member costs ~25 % in tar headers and makes every read a tiny one; a ~1 MiB block is
one range request on S3 and still lets the loader start at any row: row r of a member begins at
``offset + npy_header + r * (seq_len + 1) * itemsize``.

Why no pickle anywhere: shards come from object stores that other people can write to; a .npy with
``allow_pickle=False`` and a JSON index are data, never code.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any

import numpy as np

from .store import Storage, StorageError

SHARDS_DIR = "shards"
INDEX_REF = f"{SHARDS_DIR}/index.json"
INDEX_VERSION = 1
SPLITS = ("train", "val")
TARGET_MEMBER_BYTES = 1 << 20
"""Aim of a member's size when ``rows_per_member`` is 0 (see the module docstring for why ~1 MiB)."""

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
"""GNU/BSD tar and Python's tarfile pad archives to whole 10 KiB records; so do we, to be stock."""

MAX_MEMBER_BYTES = 1 << 31
"""Largest tar member a reader accepts (ours are ~1 MiB): a header claiming more is refused unread."""


def member_size_problem(offset_data: int, size: int, shard_bytes: int) -> str | None:
    """Why a tar member that claims ``size`` bytes at ``offset_data`` cannot be real, or None.

    Checked on the header alone, before any of the member is read: a foreign tar whose header
    claims terabytes must cost a refusal, not a read of that size.
    """
    if size < 0 or size > MAX_MEMBER_BYTES:
        return f"claims {size} bytes, over the {MAX_MEMBER_BYTES}-byte limit for a member"
    if offset_data + size > shard_bytes:
        return f"claims {size} bytes at offset {offset_data}, past the end of the {shard_bytes}-byte shard"
    return None


_MEMBER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_SHARD_NAME = re.compile(r"(?P<split>[a-z]+)-(?P<num>\d{6})\.tar")


class ShardIndexError(ValueError):
    """index.json is missing, unreadable, or inconsistent; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype the contract allows for a vocabulary: uint16 up to 65536 ids, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token dtype must be uint16 or uint32, got {dt}")
    return dt


def rows_per_member_for(seq_len: int, dtype: Any, target_bytes: int = TARGET_MEMBER_BYTES) -> int:
    return max(1, target_bytes // ((seq_len + 1) * _dtype(dtype).itemsize))


def member_key(j: int) -> str:
    return f"{j:06d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def validate_member_name(name: str) -> str:
    """Return ``name`` if it is a safe relative name (tar member or shard file), else raise.

    Names come from tar headers and index files that may have been written by someone else, and
    end up joined to a root or a cache directory: absolute paths, ``..``, backslashes, empty
    segments and anything outside ``[A-Za-z0-9_.-]`` are refused rather than sanitised.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid member name {name!r}: empty or not a string")
    if len(name) > 255:
        raise ValueError(f"invalid member name {name[:40]!r}...: longer than 255 characters")
    if name.startswith("/") or "\\" in name or ":" in name:
        raise ValueError(f"invalid member name {name!r}: absolute paths, drive letters and backslashes are not allowed")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"invalid member name {name!r}: empty, '.' or '..' path segment")
        if not _MEMBER_NAME.fullmatch(part):
            raise ValueError(f"invalid member name {name!r}: only letters, digits, '_', '-' and '.' are allowed")
    return name


def shard_ref(name: str) -> str:
    """The dataset-root ref of a shard named in the index (validated: the index may be foreign)."""
    validate_member_name(name)
    if "/" in name:
        raise ValueError(f"invalid shard name {name!r}: shards live directly under {SHARDS_DIR}/")
    return f"{SHARDS_DIR}/{name}"


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    if len(buf) != TAR_BLOCK:  # a long name would need an extension header and shift every offset
        raise ValueError(f"tar member name {name!r} does not fit a single ustar header")
    return buf


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """Exactly the header ``np.lib.format.write_array(version=(1, 0))`` writes for this array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buf.getvalue()


class ShardWriter:
    """Cut a stream of packed rows into members and shards, publishing each tar atomically.

    Feed it ``(n, seq_len + 1)`` arrays in order with :meth:`write`; :meth:`close` flushes the last
    (short) member and shard and returns the per-shard index entries (also kept in ``shards``).
    A shard is streamed into :meth:`Storage.atomic_write`, so an exception before it is complete
    leaves nothing under its name; use the writer as a context manager to get that on errors.

    ``doc_boundaries_eos``: when set, every member also gets ``<key>.docs.npy``, an int32 array of
    shape (D, 2) holding the (row, column) of each position in the block where a document starts
    (the token after an EOS, or the stream's first token) — for document-masked attention.
    """

    def __init__(
        self,
        storage: Storage,
        split: str,
        seq_len: int,
        dtype: Any,
        rows_per_member: int = 0,
        samples_per_shard: int = 8192,
        start_index: int = 0,
        doc_boundaries_eos: int | None = None,
    ):
        if not re.fullmatch(r"[a-z]+", split):
            raise ValueError(f"split must be lowercase letters (train, val), got {split!r}")
        if seq_len <= 0 or samples_per_shard <= 0 or rows_per_member < 0:
            raise ValueError("seq_len and samples_per_shard must be positive, rows_per_member >= 0")
        self.storage = storage
        self.split = split
        self.seq_len = seq_len
        self.row_len = seq_len + 1
        self.dtype = _dtype(dtype)
        self.rows_per_member = rows_per_member or rows_per_member_for(seq_len, self.dtype)
        self.samples_per_shard = samples_per_shard
        self.next_index = start_index
        self.doc_boundaries_eos = doc_boundaries_eos
        self.shards: list[dict[str, Any]] = []
        self._buf = np.empty((min(self.rows_per_member, samples_per_shard), self.row_len), dtype=self.dtype)
        self._buf_rows = 0
        self._prev_token: int | None = None  # last token before the current member (doc starts)
        self._cm = None  # the open atomic_write of the current shard
        self._closed = False

    # -- public -----------------------------------------------------------------------------------
    def write(self, rows: np.ndarray) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.row_len:
            raise ValueError(f"rows must have shape (n, {self.row_len}), got {rows.shape}")
        if rows.dtype != self.dtype:
            if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids out of range for {self.dtype}")
            rows = rows.astype(self.dtype)
        i, n = 0, len(rows)
        while i < n:
            cap = self._member_capacity()
            if self._buf_rows == 0 and n - i >= cap:
                block = np.ascontiguousarray(rows[i : i + cap])  # a whole member straight from the input
                self._emit_member(block)
                i += cap
                continue
            take = min(cap - self._buf_rows, n - i)
            self._buf[self._buf_rows : self._buf_rows + take] = rows[i : i + take]
            self._buf_rows += take
            i += take
            if self._buf_rows == cap:
                self._emit_member(self._buf[:cap])
                self._buf_rows = 0

    def close(self) -> list[dict[str, Any]]:
        if not self._closed:
            if self._buf_rows:
                self._emit_member(self._buf[: self._buf_rows])
                self._buf_rows = 0
            if self._cm is not None:
                self._finish_shard()
            self._closed = True
        return self.shards

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the shard being written (nothing is published under its name)."""
        self._closed = True
        if self._cm is not None:
            err = exc or RuntimeError("ShardWriter aborted")
            cm, self._cm = self._cm, None
            try:
                cm.__exit__(type(err), err, None)
            except BaseException as raised:  # atomic_write re-raises what it was given
                if raised is not err:
                    raise

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:
            self.abort(ev)

    # -- internals --------------------------------------------------------------------------------
    def _member_capacity(self) -> int:
        left = (self.samples_per_shard - self._shard_rows) if self._cm is not None else self.samples_per_shard
        return min(self.rows_per_member, left)

    def _open_shard(self) -> None:
        self._name = shard_name(self.split, self.next_index)
        self._cm = self.storage.atomic_write(shard_ref(self._name))
        self._f = self._cm.__enter__()
        self._hash = hashlib.sha256()
        self._pos = 0
        self._shard_rows = 0
        self._members: list[dict[str, Any]] = []

    def _put(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)
        self._pos += len(memoryview(data).cast("B"))

    def _put_file(self, name: str, header: bytes, payload) -> int:
        """Append one tar member; returns the byte offset of its data."""
        size = len(header) + payload.nbytes
        self._put(_tar_header(name, size))
        data_offset = self._pos
        self._put(header)
        if payload.nbytes:
            self._put(memoryview(payload).cast("B"))
        pad = -size % TAR_BLOCK
        if pad:
            self._put(bytes(pad))
        return data_offset

    def _emit_member(self, block: np.ndarray) -> None:
        if self._cm is None:
            self._open_shard()
        key = member_key(len(self._members))
        header = _npy_header(block.shape, self.dtype)
        offset = self._put_file(f"{key}.tokens.npy", header, block)
        entry: dict[str, Any] = {"key": key, "offset": offset, "size": len(header) + block.nbytes,
                                 "rows": int(block.shape[0]), "npy_header": len(header)}
        if self.doc_boundaries_eos is not None:
            starts = self._doc_starts(block)
            dheader = _npy_header(starts.shape, starts.dtype)
            doffset = self._put_file(f"{key}.docs.npy", dheader, starts)
            entry["docs"] = {"offset": doffset, "size": len(dheader) + starts.nbytes, "npy_header": len(dheader)}
        self._prev_token = int(block[-1, -1])
        self._members.append(entry)
        self._shard_rows += block.shape[0]
        if self._shard_rows >= self.samples_per_shard:
            self._finish_shard()

    def _doc_starts(self, block: np.ndarray) -> np.ndarray:
        flat = block.reshape(-1)
        pos = np.flatnonzero(flat[:-1] == self.doc_boundaries_eos) + 1
        if self._prev_token is None or self._prev_token == self.doc_boundaries_eos:
            pos = np.concatenate([np.zeros(1, dtype=pos.dtype), pos])
        rows, cols = np.divmod(pos, self.row_len)
        return np.ascontiguousarray(np.stack([rows, cols], axis=1).astype(np.int32))

    def _finish_shard(self) -> None:
        end = 2 * TAR_BLOCK
        end += -(self._pos + end) % TAR_RECORD
        self._put(bytes(end))
        cm, self._cm = self._cm, None
        cm.__exit__(None, None, None)
        samples = sum(m["rows"] for m in self._members)
        self.shards.append({
            "name": self._name, "bytes": self._pos, "sha256": "sha256:" + self._hash.hexdigest(),
            "samples": samples, "tokens": samples * self.row_len, "members": self._members,
        })
        self.next_index += 1


# -- index.json ------------------------------------------------------------------------------------

def make_index(
    seq_len: int,
    dtype: Any,
    vocab_size: int,
    tokenizer_digest: str,
    eos_id: int,
    splits: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Assemble index.json from :class:`ShardWriter` entries (totals computed here); validated."""
    index = {
        "version": INDEX_VERSION, "seq_len": int(seq_len), "dtype": _dtype(dtype).name,
        "vocab_size": int(vocab_size), "tokenizer_digest": tokenizer_digest, "eos_id": int(eos_id),
        "splits": {
            split: {"shards": list(entries), "samples": sum(e["samples"] for e in entries),
                    "tokens": sum(e["tokens"] for e in entries)}
            for split, entries in sorted(splits.items())
        },
    }
    validate_index(index, "index")
    return index


def write_index(storage: Storage, index: dict[str, Any], ref: str = INDEX_REF) -> None:
    """Validate, then publish atomically; compact JSON, one line per shard (it grows with members)."""
    validate_index(index, storage.uri(ref))
    head = {k: v for k, v in index.items() if k != "splits"}
    lines = [json.dumps(head, sort_keys=True)[:-1] + ', "splits": {']
    for i, (split, sp) in enumerate(sorted(index["splits"].items())):
        rest = {k: v for k, v in sp.items() if k != "shards"}
        lines.append(f'{"," if i else ""}{json.dumps(split)}: {json.dumps(rest, sort_keys=True)[:-1]}, "shards": [')
        lines.extend(("," if j else "") + json.dumps(s, sort_keys=True, separators=(",", ":")) for j, s in enumerate(sp["shards"]))
        lines.append("]}")
    lines.append("}}")
    storage.write_text(ref, "\n".join(lines) + "\n")


def read_index(storage: Storage, ref: str = INDEX_REF) -> dict[str, Any]:
    """Load and validate index.json; every failure names the file and what is wrong."""
    uri = storage.uri(ref)
    try:
        raw = storage.read_bytes(ref)
    except FileNotFoundError:
        raise ShardIndexError(f"{uri}: shard index not found (run the pack stage first)") from None
    except StorageError as exc:
        raise ShardIndexError(f"{uri}: cannot read shard index: {exc}") from None
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise ShardIndexError(f"{uri}: shard index is not valid JSON ({exc})") from None
    validate_index(index, uri)
    return index


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ShardIndexError(f"{where}: {msg}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_index(index: Any, where: str = "index") -> None:
    """Check every invariant the loader relies on (O(members), no data read)."""
    _check(isinstance(index, dict), where, "shard index must be a JSON object")
    _check(index.get("version") == INDEX_VERSION, where, f"unsupported index version {index.get('version')!r} (expected {INDEX_VERSION})")
    for key in ("seq_len", "vocab_size", "eos_id"):
        _check(_is_int(index.get(key)) and index[key] >= 0, where, f"{key!r} must be a non-negative integer, got {index.get(key)!r}")
    _check(index["seq_len"] > 0, where, "'seq_len' must be positive")
    _check(index.get("dtype") in ("uint16", "uint32"), where, f"'dtype' must be uint16 or uint32, got {index.get('dtype')!r}")
    _check(index["vocab_size"] <= np.iinfo(index["dtype"]).max + 1, where, f"vocab_size {index['vocab_size']} does not fit {index['dtype']}")
    _check(isinstance(index.get("tokenizer_digest"), str), where, "'tokenizer_digest' must be a string")
    splits = index.get("splits")
    _check(isinstance(splits, dict) and splits, where, "'splits' must be a non-empty object")
    row_bytes = (index["seq_len"] + 1) * np.dtype(index["dtype"]).itemsize
    for split, sp in splits.items():
        w = f"{where}: split {split!r}"
        _check(isinstance(sp, dict) and isinstance(sp.get("shards"), list), w, "must hold a 'shards' list")
        names = set()
        total_samples = 0
        for s in sp["shards"]:
            _check(isinstance(s, dict), w, "shard entries must be objects")
            try:
                shard_ref(s.get("name"))
            except ValueError as exc:
                raise ShardIndexError(f"{w}: {exc}") from None
            ws = f"{w} shard {s['name']!r}"
            _check(s["name"] not in names, ws, "listed twice")
            names.add(s["name"])
            for key in ("bytes", "samples", "tokens"):
                _check(_is_int(s.get(key)) and s[key] >= 0, ws, f"{key!r} must be a non-negative integer")
            _check(isinstance(s.get("sha256"), str) and s["sha256"].startswith("sha256:"), ws, "'sha256' must be 'sha256:<hex>'")
            members = s.get("members")
            _check(isinstance(members, list), ws, "'members' must be a list")
            rows, end, keys = 0, 0, set()
            for m in members:
                _check(isinstance(m, dict), ws, "member entries must be objects")
                for key in ("offset", "size", "rows", "npy_header"):
                    _check(_is_int(m.get(key)) and m[key] >= 0, ws, f"member {m.get('key')!r}: {key!r} must be a non-negative integer")
                _check(isinstance(m.get("key"), str) and "." not in m["key"] and bool(_MEMBER_NAME.fullmatch(m["key"])), ws,
                       f"member key {m.get('key')!r} must be a dot-free name")
                _check(m["key"] not in keys, ws, f"member key {m['key']!r} repeated")
                keys.add(m["key"])
                _check(m["offset"] >= end + TAR_BLOCK and m["offset"] % TAR_BLOCK == 0, ws,
                       f"member {m['key']}: offset {m['offset']} is not after the previous member's data on a 512-byte boundary")
                _check(m["size"] == m["npy_header"] + m["rows"] * row_bytes, ws,
                       f"member {m['key']}: size {m['size']} != npy_header {m['npy_header']} + rows {m['rows']} x {row_bytes} bytes")
                end = m["offset"] + m["size"]
                _check(end <= s["bytes"], ws, f"member {m['key']} ends at {end}, past the shard's {s['bytes']} bytes")
                rows += m["rows"]
            _check(rows == s["samples"], ws, f"'samples' {s['samples']} != sum of member rows {rows}")
            _check(s["tokens"] == s["samples"] * (index["seq_len"] + 1), ws, "'tokens' != samples x (seq_len + 1)")
            total_samples += rows
        _check(sp.get("samples") == total_samples, w, f"'samples' {sp.get('samples')!r} != sum over shards {total_samples}")
        _check(sp.get("tokens") == total_samples * (index["seq_len"] + 1), w, "'tokens' != samples x (seq_len + 1)")


# -- reading ---------------------------------------------------------------------------------------

def read_member_rows(
    storage: Storage,
    shard_entry: dict[str, Any],
    member_entry: dict[str, Any],
    row_start: int,
    row_end: int,
    seq_len: int,
    dtype: Any,
) -> np.ndarray:
    """Rows [row_start, row_end) of one member by a single byte-range read (read-only array)."""
    dt = _dtype(dtype)
    if not 0 <= row_start <= row_end <= member_entry["rows"]:
        raise IndexError(f"rows [{row_start}, {row_end}) out of range for member {member_entry['key']} "
                         f"of {shard_entry['name']} ({member_entry['rows']} rows)")
    row_len = seq_len + 1
    if row_end == row_start:
        return np.empty((0, row_len), dtype=dt)
    row_bytes = row_len * dt.itemsize
    start = member_entry["offset"] + member_entry["npy_header"] + row_start * row_bytes
    data = storage.read_range(shard_ref(shard_entry["name"]), start, (row_end - row_start) * row_bytes)
    return np.frombuffer(data, dtype=dt).reshape(row_end - row_start, row_len)


def verify_shard(storage: Storage, entry: dict[str, Any], deep: bool = True) -> list[str]:
    """Problems with one shard against its index entry ([] = present, right size and, if deep, hash)."""
    try:
        ref = shard_ref(entry["name"])
    except (ValueError, KeyError) as exc:
        return [f"bad shard entry: {exc}"]
    uri = storage.uri(ref)
    try:
        size = storage.size(ref)
    except FileNotFoundError:
        return [f"{uri}: missing"]
    except StorageError as exc:
        return [f"{uri}: {exc}"]
    if size != entry["bytes"]:
        return [f"{uri}: {size} bytes, index says {entry['bytes']}"]
    if deep:
        digest = storage.digest(ref)
        if digest != entry["sha256"]:
            return [f"{uri}: sha256 {digest} does not match the index ({entry['sha256']})"]
    return []
