import gzip
import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import zstandard

from shardflow.storage import Storage, StorageError, digest_bytes
from shardflow.storage.jsonl import CorruptInputError, TooLong, JsonlWriter, iter_lines, iter_parquet, write_jsonl, write_parquet


def test_bytes_round_trip(storage: Storage):
    payload = os.urandom(3 << 20) + b"tail"
    storage.write_bytes("a/b/blob.bin", payload)
    assert storage.read_bytes("a/b/blob.bin") == payload
    assert storage.size("a/b/blob.bin") == len(payload)
    assert storage.digest("a/b/blob.bin") == digest_bytes(payload)
    assert storage.read_range("a/b/blob.bin", 1000, 77) == payload[1000:1077]
    assert storage.list("a/b") == ["blob.bin"]
    with pytest.raises(StorageError, match="short read"):
        storage.read_range("a/b/blob.bin", len(payload) - 2, 10)


def test_failed_atomic_write_leaves_nothing(storage: Storage):
    storage.write_bytes("x.bin", b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write("x.bin") as f:
            f.write(b"new partial")
            raise RuntimeError("crash mid-write")
    assert storage.read_bytes("x.bin") == b"old"
    with pytest.raises(RuntimeError):
        with storage.atomic_write("y.bin") as f:
            f.write(b"partial")
            raise RuntimeError("crash")
    assert not storage.exists("y.bin")
    assert storage.list("") == ["x.bin"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_round_trip_is_byte_identical(storage: Storage, suffix):
    records = [{"id": str(i), "text": f"doc {i} – ünïcode ✓", "meta": {"n": i}} for i in range(500)]
    n = write_jsonl(storage, "docs" + suffix, records)
    assert n == 500
    back = [json.loads(line) for _, line in iter_lines(storage, "docs" + suffix)]
    assert back == records
    first = storage.read_bytes("docs" + suffix)
    write_jsonl(storage, "again" + suffix, records)
    assert storage.read_bytes("again" + suffix) == first  # deterministic bytes


def test_parquet_round_trip(storage: Storage):
    records = [{"id": str(i), "text": "t" * i} for i in range(1, 50)]
    write_parquet(storage, "p.parquet", records)
    assert [r for _, r in iter_parquet(storage, "p.parquet")] == records


def test_local_and_s3_store_identical_bytes(local_storage: Storage, s3_storage: Storage):
    records = [{"id": str(i), "text": "x" * (i % 97)} for i in range(2000)]
    for st in (local_storage, s3_storage):
        write_jsonl(st, "stages/clean/000000.jsonl.zst", records)
    assert local_storage.read_bytes("stages/clean/000000.jsonl.zst") == s3_storage.read_bytes("stages/clean/000000.jsonl.zst")


def test_long_line_is_skipped_in_bounded_memory(local_storage: Storage):
    big = json.dumps({"id": "big", "text": "y" * (3 << 20)}).encode()
    data = b'{"id":"1","text":"a"}\n' + big + b'\n{"id":"2","text":"b"}\n'
    local_storage.write_bytes("in.jsonl", data)
    got = list(iter_lines(local_storage, "in.jsonl", max_line_bytes=1 << 20))
    assert [n for n, _ in got] == [1, 2, 3]
    assert isinstance(got[1][1], TooLong)
    assert got[1][1].size == len(big) and big.startswith(got[1][1]) and 0 < len(got[1][1]) <= 4096
    assert json.loads(got[2][1])["id"] == "2"


def test_truncated_zst_names_file_and_line(local_storage: Storage):
    lines = b"".join(json.dumps({"id": str(i), "text": "hello world " * 20}).encode() + b"\n" for i in range(2000))
    comp = zstandard.ZstdCompressor(level=3).compress(lines)
    local_storage.write_bytes("cut.jsonl.zst", comp[: len(comp) // 2])
    seen = []
    with pytest.raises(CorruptInputError) as ei:
        for n, _ in iter_lines(local_storage, "cut.jsonl.zst"):
            seen.append(n)
    assert "cut.jsonl.zst" in str(ei.value) and "line" in str(ei.value)
    assert len(seen) > 100  # records before the cut were delivered


def test_not_compressed_as_named(local_storage: Storage):
    local_storage.write_bytes("plain.jsonl.gz", b'{"id":"1","text":"not gzip"}\n')
    with pytest.raises(CorruptInputError, match="plain.jsonl.gz"):
        list(iter_lines(local_storage, "plain.jsonl.gz"))


def test_storage_is_picklable(s3_storage: Storage):
    import pickle

    s3_storage.write_bytes("p.bin", b"123")
    clone = pickle.loads(pickle.dumps(s3_storage))
    assert clone.read_bytes("p.bin") == b"123"


def test_errors_do_not_leak_secrets(s3_endpoint):
    from shardflow.storage import StorageConfig

    cfg = StorageConfig(root="s3://no-such-bucket-xyz/r", endpoint_url=s3_endpoint, key="AKIAPLANTEDKEY", secret="planted-secret-value")
    st = Storage.from_config(cfg)
    with pytest.raises(Exception) as ei:
        st.write_bytes("f.bin", b"1")
    assert "planted-secret-value" not in str(ei.value)
    assert "planted-secret-value" not in repr(cfg) and "planted-secret-value" not in json.dumps(cfg.model_dump(mode="json"))


def _slow_writer(root: str, ref: str, started):
    st = Storage(root)
    with st.atomic_write(ref) as f:
        started.set()
        while True:  # keeps writing until killed
            f.write(b"z" * 65536)
            f.flush()
            time.sleep(0.001)


def _slow_jsonl_writer(root: str, ref: str, started):
    st = Storage(root)
    with JsonlWriter(st, ref) as w:
        i = 0
        while True:
            w.write({"id": str(i), "text": "q" * 1000})
            i += 1
            if i == 100:
                started.set()


@pytest.mark.parametrize("target", [_slow_writer, _slow_jsonl_writer])
def test_sigkill_mid_write_leaves_no_final_file(tmp_path, target):
    root = str(tmp_path / "root")
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=target, args=(root, "out/final.jsonl.zst", started))
    p.start()
    assert started.wait(60)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    st = Storage(root)
    assert not st.exists("out/final.jsonl.zst")
    assert st.list("out") == []  # temp files are hidden from listings


def test_sigkill_mid_upload_leaves_no_s3_object(tmp_path, s3_endpoint, s3_bucket):
    from tests.conftest import s3_storage_config

    cfg = s3_storage_config(s3_endpoint, s3_bucket)
    ctx = mp.get_context("spawn")
    started, uploading = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_s3_writer, args=(cfg.model_dump(mode="json") | {"key": "testing", "secret": "testing"}, started,
                                             uploading))
    p.start()
    assert started.wait(60)
    assert uploading.wait(120)  # well into the write (12.5 MiB spooled), whatever the machine's speed
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    st = Storage.from_config(cfg)
    assert not st.exists("big/final.bin")


def _s3_writer(cfg_data, started, uploading):
    from shardflow.storage import StorageConfig

    st = Storage.from_config(StorageConfig(**cfg_data))
    with st.atomic_write("big/final.bin") as f:
        for i in range(10_000):
            f.write(os.urandom(1 << 16))
            started.set()
            if i == 200:
                uploading.set()
            time.sleep(0.01)
