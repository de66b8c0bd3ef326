"""Reading members: corrupt, truncated and mismatched shards are errors naming them; the member cache."""
import pytest

from shardflow.storage.shards import read_index
from shardflow.train.data import ShardDataError, build_loader

from .conftest import SEQ, CountReads, Ranks, loader_cfg, write_dataset


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_shard_with_verify_names_it(ds250, workers):
    storage, _ = ds250
    entry = read_index(storage)["splits"]["train"]["shards"][1]
    m = entry["members"][2]
    _flip(storage.uri(f"shards/{entry['name']}"), m["offset"] + m["npy_header"] + 40)
    with pytest.raises(ShardDataError, match=r"train-000001\.tar.*sha256"):
        list(build_loader(loader_cfg(verify_digests=True, num_workers=workers), storage, epochs=1))
    # Without verification the flipped token is data like any other: it loads.
    assert len(list(build_loader(loader_cfg(), storage, epochs=1))) == 62


def test_truncated_shard_names_it(storage):
    write_dataset(storage, 120, rows_per_member=8, samples_per_shard=40)
    name = "shards/train-000001.tar"
    blob = storage.read_bytes(name)
    storage.write_bytes(name, blob[: len(blob) // 2])
    with pytest.raises(ShardDataError, match=r"train-000001\.tar.*truncated"):
        list(build_loader(loader_cfg(), storage, epochs=1))


def test_header_mismatch_names_shard_and_member(ds250):
    storage, _ = ds250
    index = read_index(storage)
    entry = index["splits"]["train"]["shards"][0]
    m = entry["members"][1]
    _flip(storage.uri(f"shards/{entry['name']}"), m["offset"] + 12)  # inside the .npy header dict
    with pytest.raises(ShardDataError, match=r"train-000000\.tar member 000001"):
        list(build_loader(loader_cfg(), storage, epochs=1))
    # An index whose keys do not match the tar is refused at the first read of the member.
    write_dataset(storage, 250)
    index = read_index(storage)
    members = index["splits"]["train"]["shards"][2]["members"]
    members[0]["key"], members[1]["key"] = members[1]["key"], members[0]["key"]
    with pytest.raises(ShardDataError, match=r"train-000002\.tar member 00000[01].*expected"):
        list(build_loader(loader_cfg(), storage, epochs=1, indexes=[index]))


@pytest.mark.s3
def test_member_cache_serves_second_pass_and_respects_limit(s3_storage, tmp_path, monkeypatch):
    expect = {0: write_dataset(s3_storage, 120, rows_per_member=8, samples_per_shard=40)}
    cache = tmp_path / "cache"
    cfg = loader_cfg(cache_dir=str(cache), verify_digests=True)
    run = Ranks(s3_storage, cfg, 1, expect=expect)
    first = run.steps(30)
    run.close()
    counter = CountReads(monkeypatch)
    run = Ranks(s3_storage, cfg, 1, expect=expect)
    assert run.steps(30) == first
    run.close()
    assert counter.calls == []  # every member and the digest check came from the cache
    member_bytes = 512 + 128 + 8 * (SEQ + 1) * 2
    limited = loader_cfg(cache_dir=str(tmp_path / "small"), cache_limit_bytes=3 * member_bytes)
    run = Ranks(s3_storage, limited, 1, expect=expect)
    run.steps(30)
    run.close()
    total = sum(f.stat().st_size for f in (tmp_path / "small").rglob("*.member"))
    assert 0 < total <= 3 * member_bytes
