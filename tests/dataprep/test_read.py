"""read_documents: good records become documents, every malformed one is quarantined with file,
line and reason, and reading goes on after it."""
from __future__ import annotations

import gzip
import json
import random
import tracemalloc
from collections import Counter

import pytest
import zstandard

from shardflow.dataprep.config import ReadConfig
from shardflow.dataprep.read import EXCERPT_BYTES, read_documents
from shardflow.storage import Storage
from shardflow.storage.jsonl import write_parquet

GOOD = {"id": "a", "text": "First good document.", "source": "web", "meta": {"url": "http://x"}, "lang": "en"}
GOOD2 = {"id": 7, "text": "Second good document.", "score": 0.5}

# (raw line, expected reason or None for a good record)
LINES: list[tuple[bytes, str | None]] = [
    (json.dumps(GOOD).encode(), None),
    (b'{"id": "b", "text": "unterminated', "invalid_json"),
    ("{'id': 'c', 'text': 'python repr'}".encode(), "invalid_json"),
    ('{"id": "d", "text": "caf\xe9 au lait"}'.encode("latin-1"), "invalid_utf8"),
    (b'["an", "array"]', "not_an_object"),
    (b"42", "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"id": "e", "body": "no text field"}', "missing_text"),
    (b'{"id": "f", "text": null}', "null_text"),
    (b'{"id": "g", "text": 12}', "non_string_text"),
    (b'{"id": "h", "text": ["a", "list"]}', "non_string_text"),
    (b'{"id": "i", "text": ""}', "empty_text"),
    (b'{"id": "j", "text": " \\n\\t "}', "empty_text"),
    (json.dumps(GOOD2).encode(), None),
]


def _jsonl_bytes(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".gz"):
        return gzip.compress(data, mtime=0)
    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor().compress(data)
    return data


def _read(storage: Storage, ref: str, cfg: ReadConfig | None = None):
    counters: Counter = Counter()
    quarantined: list[tuple[str, int, str, str]] = []
    docs = list(read_documents(storage, ref, cfg or ReadConfig(), counters,
                               lambda f, line, reason, ex: quarantined.append((f, line, reason, ex))))
    return docs, quarantined, counters


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_every_malformed_kind_is_quarantined_and_good_records_kept(local_storage, suffix):
    ref = f"in/mixed{suffix}"
    local_storage.write_bytes(ref, _compress(_jsonl_bytes([raw for raw, _ in LINES]), suffix))
    docs, quarantined, counters = _read(local_storage, ref)

    uri = local_storage.uri(ref)
    expected_bad = [(uri, i + 1, reason) for i, (_, reason) in enumerate(LINES) if reason]
    assert [(f, line, reason) for f, line, reason, _ in quarantined] == expected_bad
    # excerpts are the raw lines (bad UTF-8 shown escaped)
    assert quarantined[0][3] == LINES[1][0].decode()
    assert quarantined[2][3] == '{"id": "d", "text": "caf\\xe9 au lait"}'

    assert [d["id"] for d in docs] == ["a", "7"]
    assert docs[0] == {"id": "a", "text": "First good document.", "source": f"mixed{suffix}",
                       "meta": {"source": "web", "url": "http://x", "lang": "en"}}
    assert docs[1]["meta"] == {"score": 0.5}
    assert counters["docs_in"] == 2 and counters["records_in"] == len(LINES)
    assert counters["bytes_in"] == len(GOOD["text"]) + len(GOOD2["text"])
    for reason, n in Counter(r for _, r in LINES if r).items():
        assert counters[f"quarantined.{reason}"] == n


def test_quarantine_on_object_storage(storage):
    """The same contract on an S3 root (moto over HTTP) and a local one."""
    storage.write_bytes("in/a.jsonl.zst", _compress(_jsonl_bytes([raw for raw, _ in LINES]), ".zst"))
    docs, quarantined, _ = _read(storage, "in/a.jsonl.zst")
    assert [d["id"] for d in docs] == ["a", "7"]
    assert [q[2] for q in quarantined] == [r for _, r in LINES if r]
    assert all(q[0] == storage.uri("in/a.jsonl.zst") for q in quarantined)


def test_configured_fields_and_generated_ids(local_storage):
    lines = [
        json.dumps({"content": "Alpha text.", "origin": "forum", "x": 1}).encode(),
        b"",  # blank line: skipped, but still counts for line numbers
        json.dumps({"content": "Beta text.", "doc_id": "b-1"}).encode(),
    ]
    local_storage.write_bytes("in/data.jsonl", _jsonl_bytes(lines))
    cfg = ReadConfig(id_field="doc_id", text_field="content", source_field="origin")
    docs, quarantined, _ = _read(local_storage, "in/data.jsonl", cfg)
    assert not quarantined
    assert docs[0] == {"id": "data.jsonl:1", "text": "Alpha text.", "source": "forum", "meta": {"x": 1}}
    assert docs[1] == {"id": "b-1", "text": "Beta text.", "source": "data.jsonl", "meta": {}}
    # the generated id is stable: same file, same line, same id
    assert _read(local_storage, "in/data.jsonl", cfg)[0][0]["id"] == "data.jsonl:1"


def test_excerpt_is_bounded(local_storage):
    bad = b'{"text": "' + b"x" * 5000  # unterminated, 5 KB
    local_storage.write_bytes("in/long.jsonl", _jsonl_bytes([bad, json.dumps(GOOD).encode()]))
    docs, quarantined, _ = _read(local_storage, "in/long.jsonl")
    assert quarantined[0][2] == "invalid_json"
    assert len(quarantined[0][3].encode()) <= EXCERPT_BYTES
    assert [d["id"] for d in docs] == ["a"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_oversized_document_is_quarantined_in_bounded_memory(local_storage, tmp_path, suffix):
    """A 20 MB record with a 1 MB limit is skipped without ever being held in memory whole."""
    path = tmp_path / f"big{suffix}"
    # Text that compresses like real text does (a few x), not like a zip bomb.
    rng = random.Random(0)
    with open(path, "wb") as raw:
        out = zstandard.ZstdCompressor().stream_writer(raw) if suffix.endswith(".zst") else raw
        out.write(json.dumps(GOOD).encode() + b"\n")
        out.write(b'{"id": "big", "text": "')
        for _ in range(20):
            out.write(rng.randbytes(1 << 19).hex().encode())  # 1 MiB
        out.write(b'"}\n')
        out.write(json.dumps(GOOD2).encode() + b"\n")
        if out is not raw:
            out.close()
    cfg = ReadConfig(max_doc_bytes=1 << 20)
    tracemalloc.start()
    try:
        docs, quarantined, counters = _read(local_storage, str(path), cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(q[1], q[2]) for q in quarantined] == [(2, "too_long")]
    assert quarantined[0][3].startswith("{") and len(quarantined[0][3]) <= 1024  # the line's head, bounded
    assert [d["id"] for d in docs] == ["a", "7"]
    assert counters["quarantined.too_long"] == 1
    assert peak < 8 << 20, f"peak traced memory {peak / 2**20:.1f} MiB for a 20 MiB record"


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_stream_keeps_records_before_the_break(local_storage, suffix):
    # ~600 KB that compresses like text, so the stream has many zstd blocks / deflate blocks and
    # the cut falls after several complete ones (zstd cannot deliver a partial block).
    rng = random.Random(1)
    records = [json.dumps({"id": f"r{i}", "text": rng.randbytes(750).hex()}).encode() for i in range(400)]
    blob = _compress(_jsonl_bytes(records), suffix)
    local_storage.write_bytes(f"in/cut{suffix}", blob[: len(blob) * 6 // 10])
    docs, quarantined, counters = _read(local_storage, f"in/cut{suffix}")
    assert len(quarantined) == 1
    uri, line, reason, excerpt = quarantined[0]
    assert reason == "truncated_stream" and uri == local_storage.uri(f"in/cut{suffix}")
    assert 0 < len(docs) < 400
    assert [d["id"] for d in docs] == [f"r{i}" for i in range(len(docs))]  # every record before the break
    assert line == len(docs) + 1  # the line it reached
    assert "truncated" in excerpt or "ended" in excerpt.lower()
    assert counters["quarantined.truncated_stream"] == 1


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_file_not_compressed_as_its_name_claims(local_storage, suffix):
    local_storage.write_bytes(f"in/plain{suffix}", _jsonl_bytes([json.dumps(GOOD).encode()]))
    docs, quarantined, counters = _read(local_storage, f"in/plain{suffix}")
    assert docs == []
    assert [(q[1], q[2]) for q in quarantined] == [(1, "corrupt_stream")]
    assert counters["quarantined.corrupt_stream"] == 1


@pytest.mark.parametrize("name,data", [
    ("empty.jsonl", b""),
    ("blank.jsonl", b"\n\n  \n"),
    ("empty.jsonl.zst", zstandard.ZstdCompressor().compress(b"")),
    ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),
])
def test_empty_file_yields_nothing(local_storage, name, data):
    local_storage.write_bytes(f"in/{name}", data)
    docs, quarantined, counters = _read(local_storage, f"in/{name}")
    assert docs == [] and quarantined == []
    assert counters["empty_files"] == 1 and counters["docs_in"] == 0


def test_parquet_input(local_storage):
    rows = [
        {"id": "p1", "text": "Parquet row one.", "source": "pq", "n": 1},
        {"id": "p2", "text": None, "source": "pq", "n": 2},
        {"id": "p3", "text": "", "source": "pq", "n": 3},
        {"id": None, "text": "x" * 3000, "source": "pq", "n": 4},
        {"id": None, "text": "Parquet row five.", "source": None, "n": 5},
    ]
    write_parquet(local_storage, "in/rows.parquet", rows)
    cfg = ReadConfig(source_field="source", max_doc_bytes=2000)
    docs, quarantined, counters = _read(local_storage, "in/rows.parquet", cfg)
    assert [(q[1], q[2]) for q in quarantined] == [(2, "null_text"), (3, "empty_text"), (4, "too_long")]
    assert '"id": "p2"' in quarantined[0][3]
    assert quarantined[2][3] == "x" * 1024  # a too-long text's excerpt is its bounded head
    assert docs == [
        {"id": "p1", "text": "Parquet row one.", "source": "pq", "meta": {"n": 1}},
        {"id": "rows.parquet:5", "text": "Parquet row five.", "source": "rows.parquet", "meta": {"n": 5}},
    ]
    assert counters["records_in"] == 5


def test_parquet_missing_text_column_and_corrupt_file(local_storage):
    write_parquet(local_storage, "in/notext.parquet", [{"id": "a", "body": "b"}])
    docs, quarantined, _ = _read(local_storage, "in/notext.parquet")
    assert docs == [] and [(q[1], q[2]) for q in quarantined] == [(1, "missing_text")]

    local_storage.write_bytes("in/bad.parquet", b"PAR1 this is not really parquet")
    docs, quarantined, _ = _read(local_storage, "in/bad.parquet")
    assert docs == [] and [q[2] for q in quarantined] == ["corrupt_stream"]


def test_forced_format_overrides_extension(local_storage):
    local_storage.write_bytes("in/data.txt", _jsonl_bytes([json.dumps(GOOD).encode()]))
    docs, _, _ = _read(local_storage, "in/data.txt", ReadConfig(format="jsonl"))
    assert [d["id"] for d in docs] == ["a"]


def test_io_error_while_reading_fails_instead_of_quarantining(local_storage, monkeypatch):
    """A network/disk error is not bad data: the shard must fail (and be retried), not record the
    file as damaged."""
    import io

    from shardflow.storage.jsonl import CorruptInputError

    data = zstandard.ZstdCompressor().compress(_jsonl_bytes([json.dumps(GOOD).encode()] * 1000))
    local_storage.write_bytes("in/net.jsonl.zst", data)

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > len(data) // 2:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(n, 256) if n and n > 0 else 256)

    monkeypatch.setattr(local_storage, "open_read", lambda ref, block_size=None: Flaky(data))
    with pytest.raises(CorruptInputError, match="ConnectionResetError"):
        _read(local_storage, "in/net.jsonl.zst")
