import io
import json
import os
import tarfile

import numpy as np
import pytest

from shardflow.storage import Storage
from shardflow.storage.shards import (
    INDEX_REF,
    ShardIndexError,
    ShardWriter,
    make_index,
    read_index,
    read_member_rows,
    rows_per_member_for,
    token_dtype,
    validate_index,
    validate_member_name,
    verify_shard,
    write_index,
)

SEQ = 16


def _rows(n: int, dtype=np.uint16, seed: int = 0, vocab: int = 8000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, SEQ + 1)).astype(dtype)


def _write(storage, rows, dtype=np.uint16, chunks=(7, 50, 1), **kw):
    """Feed rows in uneven chunks (the writer must not care how its input is cut)."""
    kw = {"rows_per_member": 32, "samples_per_shard": 100, **kw}
    with ShardWriter(storage, "train", SEQ, dtype, **kw) as w:
        i, c = 0, 0
        while i < len(rows):
            n = chunks[c % len(chunks)]
            w.write(rows[i : i + n])
            i += n
            c += 1
    return w.shards


def _index(entries, dtype="uint16", vocab=8000):
    return make_index(SEQ, dtype, vocab, "sha256:" + "0" * 64, 2, {"train": entries, "val": []})


def test_shards_members_and_index_offsets_are_exact(storage: Storage):
    rows = _rows(250)
    entries = _write(storage, rows)
    assert [e["name"] for e in entries] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # 100 rows per shard cut into members of 32: 32, 32, 32, 4 (a shard's last member is short).
    assert [m["rows"] for m in entries[0]["members"]] == [32, 32, 32, 4]
    assert [m["rows"] for m in entries[2]["members"]] == [32, 18]
    write_index(storage, _index(entries))
    index = read_index(storage)
    assert index["splits"]["train"]["samples"] == 250
    assert index["splits"]["train"]["tokens"] == 250 * (SEQ + 1)

    seen = 0
    for entry in index["splits"]["train"]["shards"]:
        blob = storage.read_bytes(f"shards/{entry['name']}")
        assert len(blob) == entry["bytes"] and len(blob) % 10240 == 0
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            infos = tf.getmembers()
            assert [i.name for i in infos] == [f"{m['key']}.tokens.npy" for m in entry["members"]]
            for info, m in zip(infos, entry["members"]):
                assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o644)
                assert info.offset_data == m["offset"] and info.size == m["size"]
                member = np.load(io.BytesIO(tf.extractfile(info).read()), allow_pickle=False)
                assert member.dtype == np.uint16 and member.flags.c_contiguous
                np.testing.assert_array_equal(member, rows[seen : seen + m["rows"]])
                # The index alone locates every row: a range read equals np.load's rows.
                raw = storage.read_range(f"shards/{entry['name']}", m["offset"], m["size"])
                assert raw == tf.extractfile(info).read()
                for a, b in [(0, m["rows"]), (m["rows"] - 1, m["rows"]), (1, min(3, m["rows"]))]:
                    got = read_member_rows(storage, entry, m, a, b, SEQ, "uint16")
                    np.testing.assert_array_equal(got, member[a:b])
                seen += m["rows"]
    assert seen == 250
    with pytest.raises(IndexError):
        read_member_rows(storage, entry, m, 0, m["rows"] + 1, SEQ, "uint16")


def test_member_is_exactly_what_numpy_writes():
    """The contract says np.lib.format.write_array(version 1.0, allow_pickle=False): check the bytes."""
    from shardflow.storage.shards import _npy_header

    for dtype in (np.uint16, np.uint32):
        block = _rows(5, dtype)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, block, version=(1, 0), allow_pickle=False)
        assert _npy_header(block.shape, np.dtype(dtype)) + block.tobytes() == buf.getvalue()


def test_stock_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    storage = Storage(str(tmp_path / "root"))
    rows = _rows(130, np.uint32, vocab=100_000)
    entries = _write(storage, rows, dtype=np.uint32)
    urls = [str(tmp_path / "root" / "shards" / e["name"]) for e in entries]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [m["key"] for e in entries for m in e["members"]]
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {"tokens.npy"} for s in samples)
    got = np.concatenate([s["tokens.npy"] for s in samples])
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, rows)


def test_output_is_byte_identical_whatever_the_input_chunking(tmp_path):
    rows = _rows(300)
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    ea = _write(a, rows, chunks=(300,))
    eb = _write(b, rows, chunks=(1, 2, 3, 64))
    assert ea == eb
    for e in ea:
        assert a.read_bytes(f"shards/{e['name']}") == b.read_bytes(f"shards/{e['name']}")


def test_default_member_size_is_about_one_mib(tmp_path):
    assert rows_per_member_for(256, np.uint16) == (1 << 20) // (257 * 2)
    assert rows_per_member_for(1 << 22, np.uint32) == 1
    storage = Storage(str(tmp_path))
    rows = np.zeros((2 * rows_per_member_for(255, np.uint16) + 3, 256), np.uint16)
    with ShardWriter(storage, "val", 255, np.uint16, samples_per_shard=10**6) as w:
        w.write(rows)
    sizes = [m["size"] for m in w.shards[0]["members"]]
    assert len(sizes) == 3 and (1 << 20) - 512 < sizes[0] <= (1 << 20) + 128 and w.shards[0]["name"] == "val-000000.tar"


def test_token_dtype_follows_vocab_size():
    assert token_dtype(8000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError):
        ShardWriter(Storage("/tmp/unused"), "train", SEQ, np.int64)


@pytest.mark.parametrize("name", ["000000.tokens.npy", "train-000001.tar", "a/b_c-d.e", "x"])
def test_valid_member_names(name):
    assert validate_member_name(name) == name


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.tar", "a/../b", "a//b", "./a", "a\\b", "c:x", "sp ace",
                                  "new\nline", "", "é.npy", "a/", "x" * 300, None])
def test_invalid_member_names(name):
    with pytest.raises(ValueError):
        validate_member_name(name)


def test_index_with_a_hostile_shard_name_is_rejected(local_storage):
    entries = _write(local_storage, _rows(10))
    index = _index(entries)
    index["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    with pytest.raises(ShardIndexError, match="invalid member name"):
        validate_index(index)


def test_verify_shard_detects_corruption(storage: Storage):
    entries = _write(storage, _rows(150))
    assert all(verify_shard(storage, e) == [] for e in entries)
    ref = f"shards/{entries[0]['name']}"
    blob = bytearray(storage.read_bytes(ref))
    blob[entries[0]["members"][1]["offset"] + 200] ^= 0x01  # one bit in one token
    storage.write_bytes(ref, bytes(blob))
    problems = verify_shard(storage, entries[0])
    assert len(problems) == 1 and "sha256" in problems[0] and entries[0]["name"] in problems[0]
    assert verify_shard(storage, entries[0], deep=False) == []  # same size: only the hash sees it
    storage.write_bytes(ref, bytes(blob[:-512]))
    assert "bytes" in verify_shard(storage, entries[0], deep=False)[0]
    storage.remove(ref)
    assert "missing" in verify_shard(storage, entries[0])[0]
    assert verify_shard(storage, entries[1]) == []


def test_nothing_is_published_when_writing_fails_mid_shard(storage: Storage):
    rows = _rows(160)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(storage, "train", SEQ, np.uint16, rows_per_member=32, samples_per_shard=100) as w:
            w.write(rows[:130])  # shard 0 complete, shard 1 has one member written
            raise RuntimeError("boom")
    assert storage.list("shards") == ["train-000000.tar"]
    assert verify_shard(storage, w.shards[0]) == []
    if storage.is_local:
        assert sorted(os.listdir(os.path.join(storage.root, "shards"))) == ["train-000000.tar"]  # no temp file left


def test_doc_boundaries_member(tmp_path):
    storage = Storage(str(tmp_path))
    eos = 2
    stream = np.array([5, 6, eos, 7, eos, 8, 9, 10, 11, eos, 12, 13] * 17, np.uint16)
    n = stream.size // (SEQ + 1)
    rows = stream[: n * (SEQ + 1)].reshape(n, SEQ + 1)
    with ShardWriter(storage, "train", SEQ, np.uint16, rows_per_member=4, samples_per_shard=100, doc_boundaries_eos=eos) as w:
        w.write(rows)
    entry = w.shards[0]
    flat_pos = 0
    with tarfile.open(str(tmp_path / "shards" / entry["name"])) as tf:
        assert [i.name for i in tf.getmembers()][:2] == ["000000.tokens.npy", "000000.docs.npy"]
        for m in entry["members"]:
            starts = np.load(io.BytesIO(tf.extractfile(f"{m['key']}.docs.npy").read()), allow_pickle=False)
            assert starts.dtype == np.int32 and starts.shape[1] == 2
            block = stream[flat_pos : flat_pos + m["rows"] * (SEQ + 1)]
            expected = [p for p in range(block.size) if flat_pos + p == 0 or stream[flat_pos + p - 1] == eos]
            assert [r * (SEQ + 1) + c for r, c in starts.tolist()] == expected
            raw = storage.read_range(f"shards/{entry['name']}", m["docs"]["offset"], m["docs"]["size"])
            assert raw == tf.extractfile(f"{m['key']}.docs.npy").read()
            flat_pos += block.size


def test_read_index_errors_name_the_file(storage: Storage):
    with pytest.raises(ShardIndexError, match="index.json.*not found"):
        read_index(storage)
    storage.write_bytes(INDEX_REF, b'{"version": 1, "seq_len": ')
    with pytest.raises(ShardIndexError, match="index.json.*not valid JSON"):
        read_index(storage)
    entries = _write(storage, _rows(120))
    index = _index(entries)
    bad = json.loads(json.dumps(index))
    members = bad["splits"]["train"]["shards"][0]["members"]
    members[1]["offset"] = members[0]["offset"]  # overlapping members: a loader would read wrong rows
    storage.write_json(INDEX_REF, bad)
    with pytest.raises(ShardIndexError, match=r"index\.json.*train-000000\.tar.*member 000001"):
        read_index(storage)
    bad = json.loads(json.dumps(index))
    bad["splits"]["train"]["samples"] += 1
    with pytest.raises(ShardIndexError, match="samples"):
        write_index(storage, bad)
    bad = json.loads(json.dumps(index))
    bad["dtype"] = "uint16"
    bad["vocab_size"] = 70_000
    with pytest.raises(ShardIndexError, match="does not fit"):
        validate_index(bad)
    write_index(storage, index)
    assert read_index(storage) == index
