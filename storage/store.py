"""One handle on bytes at rest, local or remote.

Every read and write of the project goes through :class:`Storage` so that the rules hold in one
place: URIs resolve through fsspec, writes are published atomically (temporary name + rename on
local disk, one PUT or a completed multipart upload on object stores), and credentials never leave
the filesystem object. A ``Storage`` is picklable (the fsspec filesystem is rebuilt lazily), so it
can be shipped to worker processes, Ray tasks and DataLoader workers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from .config import StorageConfig

LOCAL_PROTOCOLS = ("file", "local")


TEMP_PREFIX = ".sftmp-"
"""Local temporaries are hidden files with this prefix, skipped by listings until published."""


def split_protocol(uri: str) -> tuple[str, str]:
    """Return (protocol, path) with plain paths and file:// mapped to an absolute local path."""
    uri = os.fspath(uri)
    if "://" in uri:
        proto, path = uri.split("://", 1)
        proto = proto.lower()
        if proto in LOCAL_PROTOCOLS:
            return "file", os.path.abspath(path)
        return proto, path.rstrip("/") if path not in ("", "/") else path
    return "file", os.path.abspath(os.path.expanduser(uri))


def is_absolute_uri(ref: str) -> bool:
    ref = os.fspath(ref)
    return "://" in ref or os.path.isabs(ref)


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and never holds credentials."""


class Storage:
    """A dataset root plus the options to reach it.

    Methods take a *ref*: a path relative to the root (``"stages/clean/000001.jsonl.zst"``) or an
    absolute URI/path (input corpora live outside the root). Relative refs always use ``/``.
    """

    def __init__(self, root: str | os.PathLike[str] = "./shardflow-data", config: StorageConfig | None = None):
        self.config = config or StorageConfig(root=os.fspath(root))
        self.protocol, self.root_path = split_protocol(os.fspath(root))
        self._fs_cache: dict[str, fsspec.AbstractFileSystem] = {}

    @classmethod
    def from_config(cls, config: StorageConfig) -> "Storage":
        return cls(config.root, config)

    # -- pickling: drop live filesystem objects (sockets, event loops) -------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- resolution -----------------------------------------------------------------------------
    @property
    def root(self) -> str:
        return self.root_path if self.protocol == "file" else f"{self.protocol}://{self.root_path}"

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def fs_for(self, protocol: str) -> fsspec.AbstractFileSystem:
        fs = self._fs_cache.get(protocol)
        if fs is None:
            if protocol == "file":
                fs = fsspec.filesystem("file")
            else:
                # A fresh instance per Storage (not fsspec's global instance cache): forked
                # processes must not share an s3 session, and options differ between roots.
                fs = fsspec.filesystem(protocol, skip_instance_cache=True, **self.config.fsspec_options(protocol))
            self._fs_cache[protocol] = fs
        return fs

    def resolve(self, ref: str = "") -> tuple[fsspec.AbstractFileSystem, str]:
        """(filesystem, path within it) for a ref."""
        ref = os.fspath(ref)
        if is_absolute_uri(ref):
            proto, path = split_protocol(ref)
        else:
            proto = self.protocol
            path = posixpath.join(self.root_path, ref) if ref else self.root_path
            if proto == "file":
                path = os.path.normpath(path)
        return self.fs_for(proto), path

    def uri(self, ref: str = "") -> str:
        """Full URI of a ref, for messages and manifests (never holds credentials)."""
        ref = os.fspath(ref)
        if is_absolute_uri(ref):
            proto, path = split_protocol(ref)
        else:
            proto, path = self.protocol, posixpath.join(self.root_path, ref) if ref else self.root_path
            if proto == "file":
                path = os.path.normpath(path)
        return path if proto == "file" else f"{proto}://{path}"

    def _wrap(self, exc: BaseException, what: str, ref: str) -> StorageError:
        msg = f"{what} {self.uri(ref)}: {type(exc).__name__}: {exc}"
        for secret in self.config.secrets():
            msg = msg.replace(secret, "***")
        return StorageError(msg)

    # -- queries --------------------------------------------------------------------------------
    def exists(self, ref: str) -> bool:
        fs, path = self.resolve(ref)
        return fs.exists(path)

    def size(self, ref: str) -> int:
        fs, path = self.resolve(ref)
        return int(fs.size(path))

    def list(self, ref: str = "", suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly under ``ref``, sorted; [] when it is absent."""
        fs, path = self.resolve(ref)
        try:
            entries = fs.ls(path, detail=True, refresh=True) if not self.is_local else fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001 - re-raised with the URI and without secrets
            raise self._wrap(exc, "cannot list", ref) from None
        names = []
        for e in entries:
            if e.get("type") == "directory":
                continue
            name = posixpath.basename(e["name"].rstrip("/"))
            if name.endswith(suffix) and not name.startswith(".sftmp-"):
                names.append(name)
        return sorted(names)

    def glob(self, pattern: str) -> list[str]:
        """Absolute URIs matching a glob (relative patterns are under the root), sorted."""
        fs, path = self.resolve(pattern)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found = sorted(fs.glob(path))
        if proto in ("file", "local"):
            return found
        return [f"{proto}://{p}" for p in found]

    # -- reads ----------------------------------------------------------------------------------
    def open_read(self, ref: str, block_size: int | None = None) -> IO[bytes]:
        fs, path = self.resolve(ref)
        try:
            if block_size is not None and not self.is_local:
                return fs.open(path, "rb", block_size=block_size)
            return fs.open(path, "rb")
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the URI and without secrets
            raise self._wrap(exc, "cannot open", ref) from None

    def read_bytes(self, ref: str) -> bytes:
        fs, path = self.resolve(ref)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot read", ref) from None

    def read_range(self, ref: str, start: int, length: int) -> bytes:
        """``length`` bytes at ``start``: a byte-range GET on object stores, a seek locally."""
        fs, path = self.resolve(ref)
        try:
            data = fs.cat_file(path, start=start, end=start + length)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot read range of", ref) from None
        if len(data) != length:
            raise StorageError(f"short read of {self.uri(ref)}: wanted {length} bytes at {start}, got {len(data)} (truncated?)")
        return data

    def read_many(self, refs: list[str]) -> dict[str, bytes]:
        """ref -> bytes of every ref that exists (absent ones are left out). Object stores fetch
        them concurrently in one call (fsspec's batched ``cat``); local files are read in turn."""
        if not refs:
            return {}
        if all(self.protocol_of(r) == "file" for r in refs):
            out = {}
            for ref in refs:
                try:
                    out[ref] = self.read_bytes(ref)
                except FileNotFoundError:
                    pass
            return out
        resolved = {ref: self.resolve(ref) for ref in refs}
        fs = next(iter(resolved.values()))[0]
        if any(f is not fs for f, _ in resolved.values()):
            return {k: v for ref in refs for k, v in self.read_many([ref]).items()}
        try:
            got = fs.cat([p for _, p in resolved.values()], on_error="omit")
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot read", refs[0]) from None
        return {ref: got[p] for ref, (_, p) in resolved.items() if isinstance(got.get(p), bytes)}

    def read_text(self, ref: str) -> str:
        return self.read_bytes(ref).decode("utf-8")

    def read_json(self, ref: str) -> Any:
        return json.loads(self.read_bytes(ref))

    def stat(self, ref: str) -> "Stat":
        """Size and metadata fingerprint of one object (one ``stat`` locally, one HEAD remotely).

        Raises FileNotFoundError when it is absent. See :func:`fingerprint_of` for what the
        fingerprint holds and why.
        """
        fs, path = self.resolve(ref)
        if self.protocol_of(ref) == "file":
            st = os.stat(path)
            return Stat(st.st_size, f"size={st.st_size};mtime_ns={st.st_mtime_ns}")
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot stat", ref) from None
        return stat_of(info)

    def stat_dir(self, ref: str) -> dict[str, "Stat"]:
        """Name -> :class:`Stat` of every file directly under ``ref`` from ONE listing ({} if absent).

        On an object store a listing carries size and ETag of up to 1000 keys per request, so
        fingerprinting a stage's outputs costs a request per thousand files instead of one each.
        """
        fs, path = self.resolve(ref)
        if self.protocol_of(ref) == "file":
            out = {}
            try:
                with os.scandir(path) as it:
                    for e in it:
                        if e.is_file() and not e.name.startswith(TEMP_PREFIX):
                            st = e.stat()
                            out[e.name] = Stat(st.st_size, f"size={st.st_size};mtime_ns={st.st_mtime_ns}")
            except (FileNotFoundError, NotADirectoryError):
                return {}
            return out
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot list", ref) from None
        return {posixpath.basename(e["name"].rstrip("/")): stat_of(e) for e in entries if e.get("type") != "directory"}

    def glob_stats(self, pattern: str) -> dict[str, "Stat"]:
        """Absolute URI -> :class:`Stat` of every file matching a glob, from the listing itself."""
        fs, path = self.resolve(pattern)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if proto in ("file", "local"):
            return {p: self.stat(p) for p in sorted(fs.glob(path)) if os.path.isfile(p)}
        fs.invalidate_cache()  # a long-lived process (serve) must see files that arrived since
        try:
            found = fs.glob(path, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise self._wrap(exc, "cannot list", pattern) from None
        return {f"{proto}://{name}": stat_of(info) for name, info in sorted(found.items()) if info.get("type") != "directory"}

    def digest(self, ref: str) -> str:
        """sha256 of a stored object, streamed."""
        h = hashlib.sha256()
        with self.open_read(ref) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    # -- writes ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_write(self, ref: str) -> Iterator[IO[bytes]]:
        """Yield a binary file; publish it under ``ref`` only if the block exits cleanly.

        Local: a hidden temporary file in the same directory, fsync'd, then ``os.replace`` (atomic
        on POSIX). Remote: spooled to a local temporary file and uploaded with ``put_file`` (one PUT,
        or a multipart upload completed only at the end), so a crash leaves nothing under ``ref``.
        """
        fs, path = self.resolve(ref)
        if self.protocol_of(ref) == "file":
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.path.basename(path)}.{uuid.uuid4().hex[:12]}")
            f = open(tmp, "wb")
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, path)
            except BaseException:
                f.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return
        spool = tempfile.NamedTemporaryFile(prefix="shardflow-upload-", delete=False)
        try:
            yield spool
            spool.flush()
            spool.close()
            try:
                fs.put_file(spool.name, path)
            except Exception as exc:  # noqa: BLE001
                raise self._wrap(exc, "cannot upload", ref) from None
        finally:
            spool.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool.name)

    def sweep_temporaries(self, older_than_s: float) -> list[str]:
        """Remove temporaries that killed writers left under the root; return their paths.

        Only a local root can hold them (remote writes spool outside the root and publish in one
        PUT). Safe while holding the root lock: nothing else writes here, and a temporary untouched
        for ``older_than_s`` (the lock's lease) cannot belong to a live writer of this run.
        """
        if not self.is_local:
            return []
        _, root = self.resolve("")
        cutoff = time.time() - older_than_s
        removed = []
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed.append(path)
        return removed

    def protocol_of(self, ref: str) -> str:
        return split_protocol(ref)[0] if is_absolute_uri(ref) else self.protocol

    def write_bytes(self, ref: str, data: bytes) -> None:
        with self.atomic_write(ref) as f:
            f.write(data)

    def write_text(self, ref: str, text: str) -> None:
        self.write_bytes(ref, text.encode("utf-8"))

    def write_json(self, ref: str, obj: Any) -> None:
        self.write_bytes(ref, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))

    def put_file(self, local_path: str, ref: str) -> None:
        """Publish a local file under ``ref`` atomically (copy + rename locally, upload remotely)."""
        with open(local_path, "rb") as src, self.atomic_write(ref) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    def get_file(self, ref: str, local_path: str) -> None:
        fs, path = self.resolve(ref)
        fs.get_file(path, local_path)

    def remove(self, ref: str, recursive: bool = False) -> None:
        fs, path = self.resolve(ref)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    def makedirs(self, ref: str) -> None:
        fs, path = self.resolve(ref)
        if self.protocol_of(ref) == "file":
            os.makedirs(path, exist_ok=True)


class Stat(tuple):
    """``(size, fingerprint)`` of a stored object, from metadata only."""

    __slots__ = ()

    def __new__(cls, size: int, fingerprint: str):
        return super().__new__(cls, (int(size), fingerprint))

    @property
    def size(self) -> int:
        return self[0]

    @property
    def fingerprint(self) -> str:
        return self[1]


def fingerprint_of(info: dict[str, Any]) -> str:
    """A metadata fingerprint from an fsspec ``info()``/listing entry; '' when it has none.

    Size plus the object store's ETag (a content hash for single-part uploads, a hash of the part
    hashes for multipart ones: it changes whenever the object is rewritten with other bytes), else
    size plus modification time. Equal fingerprints mean "unchanged" without reading a byte; a
    different one only means "look again": the caller re-hashes before calling anything stale.
    """
    size = info.get("size", info.get("Size"))
    etag = info.get("ETag") or info.get("etag") or info.get("e_tag")
    if etag:
        return f"size={size};etag={str(etag).strip(chr(34))}"
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(key)
        if value:
            return f"size={size};{key}={value}"
    return ""


def stat_of(info: dict[str, Any]) -> Stat:
    return Stat(int(info.get("size", info.get("Size")) or 0), fingerprint_of(info))


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_json(obj: Any) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    return digest_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))
