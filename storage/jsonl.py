"""Streaming JSONL (plain, .gz, .zst) and Parquet I/O.

Readers hand back raw lines with their numbers rather than parsed objects: deciding whether a line
is a good record (and quarantining it with file, line and reason if not) is the read stage's job,
and it needs the bytes to do it. A line longer than ``max_line_bytes`` is skipped in bounded memory
and reported as a :class:`TooLong` holding only the line's first bytes (for the quarantine
excerpt) and its length, so a 20 MB document can never exhaust memory.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any

import zstandard

from .store import Storage, digest_bytes

class TooLong(bytes):
    """Yielded in place of a line over the limit: the line's first bytes, and its full length.

    A ``bytes`` subclass so an excerpt can be taken from it like from any line, while
    ``isinstance(raw, TooLong)`` tells callers not to parse it.
    """

    size: int

    def __new__(cls, head: bytes, size: int) -> "TooLong":
        obj = super().__new__(cls, head)
        obj.size = size
        return obj


TOO_LONG_HEAD = 4096
"""Bytes of an over-limit line kept for its quarantine excerpt."""

_READ_CHUNK = 1 << 20

_ZSTD_STEP = 256
"""Compressed bytes fed to zstd per call: bounds one call's output to 8 MiB (see ``_ZstdReader``)."""


class CorruptInputError(RuntimeError):
    """A compressed stream ended early or is not in the format its name claims."""

    def __init__(self, uri: str, line: int, reason: str):
        super().__init__(f"{uri}: line {line}: {reason}")
        self.uri, self.line, self.reason = uri, line, reason


def compression_of(name: str) -> str | None:
    if name.endswith(".zst") or name.endswith(".zstd"):
        return "zstd"
    if name.endswith(".gz"):
        return "gzip"
    return None


@contextlib.contextmanager
def open_decompressed(storage: Storage, ref: str) -> Iterator[IO[bytes]]:
    with storage.open_read(ref) as raw:
        kind = compression_of(ref)
        if kind == "zstd":
            yield io.BufferedReader(_ZstdReader(raw), buffer_size=_READ_CHUNK)
        elif kind == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="rb") as r:
                yield r
        else:
            yield raw


class _ZstdReader(io.RawIOBase):
    """Multi-frame zstd decompression that, unlike ``stream_reader``, notices a truncated frame, and
    whose output per call is bounded whatever the input (a decompression bomb).

    ``decompressobj().decompress`` has no output limit, so input is fed in slices of
    :data:`_ZSTD_STEP` bytes: one zstd block of at most 128 KiB needs at least 4 bytes of input
    (an RLE block), so one slice yields at most ``_ZSTD_STEP / 4 * 128 KiB`` (8 MiB), and the next
    slice is fed only once that output has been consumed.
    """

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._pending = memoryview(b"")
        self._input = memoryview(b"")
        self._in_frame = False
        self._eof = False

    def readable(self) -> bool:
        return True

    def _feed(self) -> bytes:
        """Decompress the next slice of input (reading more input when it runs out)."""
        if not self._input:
            chunk = self._raw.read(_READ_CHUNK)
            if not chunk:
                self._eof = True
                if self._in_frame:
                    raise zstandard.ZstdError("stream ends inside a zstd frame (truncated file)")
                return b""
            self._input = memoryview(chunk)
        piece, self._input = self._input[:_ZSTD_STEP], self._input[_ZSTD_STEP:]
        self._in_frame = True
        out = self._obj.decompress(piece)
        if self._obj.eof:  # a frame ended inside this slice: the rest starts the next frame
            self._in_frame = False
            rest = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
            if rest:
                self._input = memoryview(bytes(rest) + bytes(self._input))
        return out

    def readinto(self, b) -> int:
        while not self._pending and not self._eof:
            self._pending = memoryview(self._feed())
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def iter_lines(storage: Storage, ref: str, max_line_bytes: int = 64 << 20) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, bytes) for each non-empty line; a :class:`TooLong` for over-limit lines.

    Raises :class:`CorruptInputError` naming the file and the line reached when the compressed
    stream is truncated or not what its name says; lines before that point have been yielded.
    """
    uri = storage.uri(ref)
    lineno = 0
    try:
        with open_decompressed(storage, ref) as stream:
            buf = io.BufferedReader(stream, buffer_size=_READ_CHUNK) if not isinstance(stream, io.BufferedIOBase) else stream
            while True:
                line = buf.readline(max_line_bytes + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > max_line_bytes and not line.endswith(b"\n"):
                    # Drain the rest of the line in bounded chunks, keeping only its head and length.
                    head, size = line[:TOO_LONG_HEAD], len(line)
                    while True:
                        rest = buf.readline(_READ_CHUNK)
                        size += len(rest)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield lineno, TooLong(head, size - rest.endswith(b"\n"))
                    continue
                stripped = line.rstrip(b"\r\n")
                if stripped.strip():
                    yield lineno, stripped
    except (zstandard.ZstdError, gzip.BadGzipFile, zlib.error, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptInputError(uri, lineno + 1, f"corrupt or truncated {compression_of(ref) or 'file'} stream ({type(exc).__name__}: {exc})") from None


def iter_jsonl(storage: Storage, ref: str) -> Iterator[dict]:
    """Parsed records of a JSONL file we wrote ourselves (trusted: errors propagate)."""
    for _, line in iter_lines(storage, ref):
        yield json.loads(line)


class JsonlWriter:
    """Writes records as JSONL (compressed by the name's suffix) and publishes atomically on close.

    Deterministic: the same records give the same bytes (single-threaded zstd, gzip mtime 0).
    """

    def __init__(self, storage: Storage, ref: str, zstd_level: int = 3):
        self._cm = storage.atomic_write(ref)
        self._raw = self._cm.__enter__()
        self.ref = ref
        self.count = 0
        kind = compression_of(ref)
        if kind == "zstd":
            self._cctx = zstandard.ZstdCompressor(level=zstd_level, write_checksum=True)
            self._out = self._cctx.stream_writer(self._raw, closefd=False)
        elif kind == "gzip":
            self._out = gzip.GzipFile(filename="", fileobj=self._raw, mode="wb", mtime=0)
        else:
            self._out = self._raw
        self._closed = False

    def write(self, record: dict) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        self._out.write(b"\n")
        self.count += 1

    def write_many(self, records: Iterable[dict]) -> None:
        for r in records:
            self.write(r)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._out is not self._raw:
            self._out.close()
        self._cm.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        """Discard everything written: nothing appears under the final name."""
        if self._closed:
            return
        self._closed = True
        err = exc or RuntimeError("aborted")
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(err), err, None)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
        else:
            self.abort(ev)


def write_jsonl(storage: Storage, ref: str, records: Iterable[dict]) -> int:
    with JsonlWriter(storage, ref) as w:
        w.write_many(records)
        return w.count


def iter_parquet(storage: Storage, ref: str, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[tuple[int, dict]]:
    """Yield (row_number, row dict) from a Parquet file, streaming by record batches."""
    import pyarrow.parquet as pq

    row = 0
    with storage.open_read(ref) as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec


def read_parquet_table(storage: Storage, ref: str, columns: list[str] | None = None):
    """A whole Parquet file (or just ``columns``: a byte-range read per column chunk on object stores)."""
    import pyarrow.parquet as pq

    with storage.open_read(ref) as f:
        return pq.read_table(f, columns=columns)


def read_parquet_if_intact(storage: Storage, ref: str, digest: str, columns: list[str] | None = None):
    """The Parquet file at ``ref`` if its bytes still have ``digest`` (as recorded when written),
    else None — for reusing an earlier output only when it is exactly what was published."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = storage.read_bytes(ref)
    if digest_bytes(raw) != digest:
        return None
    return pq.read_table(pa.BufferReader(raw), columns=columns)


def parquet_metadata(storage: Storage, ref: str) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file's schema (the footer only)."""
    import pyarrow.parquet as pq

    with storage.open_read(ref) as f:
        return dict(pq.ParquetFile(f).schema_arrow.metadata or {})


def write_parquet_table(storage: Storage, ref: str, table, compression: str = "zstd") -> None:
    """Publish an Arrow table as Parquet atomically (never half-written under ``ref``)."""
    import pyarrow.parquet as pq

    with storage.atomic_write(ref) as f:
        pq.write_table(table, f, compression=compression)


def write_parquet(storage: Storage, ref: str, records: list[dict]) -> None:
    import pyarrow as pa

    write_parquet_table(storage, ref, pa.Table.from_pylist(records), compression="snappy")
