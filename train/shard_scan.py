"""Indexing WebDataset tars that other tools wrote, so that the loader can train on them.

Only tar and .npy headers are read (the data is skipped by seeking), and every member is checked on
the way: names that could escape the root, links and devices, and pickled formats are refused, so a
hostile tar is an error naming it rather than an index that points anywhere.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Any

import numpy as np

from shardflow.storage import Storage
from shardflow.storage.shards import SHARDS_DIR, make_index, member_size_problem, validate_member_name

from .shard_reader import NO_DIGEST, _TOKEN_EXT, ShardDataError, _npy_header_length, _parse_npy_header

_ALLOWED_EXT = {"tokens.npy", "docs.npy", "meta.json"}


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
    shard_bytes = storage.size(ref)
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
            problem = member_size_problem(info.offset_data, info.size, shard_bytes)
            if problem:
                raise ShardDataError(f"{where}: {problem}; refused before reading")
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
    return members, seq_len, dtype, shard_bytes


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
