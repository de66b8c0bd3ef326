"""The per-stage record index (storage/record_index.py): one read per stage for a plan, and never
trusted past its record files (issue 14: a no-op plan's requests and bytes must not grow with the
number of files × stages). Runs on local disk and on the real S3 endpoint (ETag fingerprints)."""
from __future__ import annotations

import pytest

from shardflow.storage import Storage
from shardflow.storage.manifest import (
    ShardRecord,
    index_ref,
    list_records,
    record_ref,
    record_session,
    remove_record,
    write_record,
)


class RecordReads:
    """Record files and index objects fetched, by counting the two read paths records go through
    (local ``read_many`` reads through ``read_bytes``: compare sets of refs)."""

    def __init__(self, monkeypatch):
        self.files: list[str] = []
        self.index = 0
        orig_many, orig_bytes = Storage.read_many, Storage.read_bytes

        def read_many(storage, refs):
            self.files.extend(refs)
            return orig_many(storage, refs)

        def read_bytes(storage, ref):
            if str(ref).endswith("_index.json.zst"):
                self.index += 1
            elif "/_manifest/" in str(ref):
                self.files.append(ref)
            return orig_bytes(storage, ref)

        monkeypatch.setattr(Storage, "read_many", read_many)
        monkeypatch.setattr(Storage, "read_bytes", read_bytes)

    def reset(self) -> None:
        self.files, self.index = [], 0


def rec(shard_id: str, n: int = 1, stage: str = "clean") -> ShardRecord:
    return ShardRecord(stage=stage, shard_id=shard_id, status="done", input_digest=f"sha256:{n:064x}",
                       config_digest="sha256:" + "c" * 64, counts={"docs": n})


@pytest.fixture
def stage_with_records(storage):
    for i in range(12):
        write_record(storage, rec(f"part-{i}", i))
    list_records(storage, "clean", update_index=True)
    return storage


def test_a_plan_reads_one_index_instead_of_every_record(stage_with_records, monkeypatch):
    storage = stage_with_records
    reads = RecordReads(monkeypatch)
    got = list_records(storage, "clean")
    assert sorted(got) == sorted(f"part-{i}" for i in range(12))
    assert got["part-7"].counts == {"docs": 7}
    assert reads.index == 1 and reads.files == []


def test_records_changed_after_the_index_are_read_from_their_files(stage_with_records, monkeypatch):
    storage = stage_with_records
    write_record(storage, rec("part-3", 333))        # rewritten by a later run (another size: another fingerprint)
    remove_record(storage, "clean", "part-5")         # retired
    write_record(storage, rec("part-new", 99))        # added
    reads = RecordReads(monkeypatch)
    got = list_records(storage, "clean")
    assert got["part-3"].counts == {"docs": 333}
    assert "part-5" not in got and got["part-new"].counts == {"docs": 99}
    assert sorted(set(reads.files)) == sorted([record_ref("clean", "part-3"), record_ref("clean", "part-new")])

    # The lock holder brings the index up to date; the next plan is back to one read.
    list_records(storage, "clean", update_index=True)
    reads.reset()
    again = list_records(storage, "clean")
    assert again == got and reads.files == [] and reads.index == 1


def test_a_damaged_or_foreign_index_is_ignored(stage_with_records, monkeypatch):
    storage = stage_with_records
    expected = list_records(storage, "clean")
    for junk in (b"not zstd at all", storage.read_bytes(index_ref("clean"))[:20]):
        storage.write_bytes(index_ref("clean"), junk)
        reads = RecordReads(monkeypatch)
        assert list_records(storage, "clean") == expected
        assert len(set(reads.files)) == 12
    # Another stage's index under this stage's folder is not taken for this stage's.
    for i in range(3):
        write_record(storage, rec(f"part-{i}", 50 + i, stage="filter"))
    list_records(storage, "filter", update_index=True)
    storage.write_bytes(index_ref("clean"), storage.read_bytes(index_ref("filter")))
    assert list_records(storage, "clean") == expected


def test_update_index_writes_only_when_behind(stage_with_records, monkeypatch):
    storage = stage_with_records
    writes = []
    orig = Storage.write_bytes

    def write_bytes(s, ref, data):
        writes.append(ref)
        return orig(s, ref, data)

    monkeypatch.setattr(Storage, "write_bytes", write_bytes)
    list_records(storage, "clean", update_index=True)
    assert writes == []
    with record_session():  # records written in a session are indexed too
        write_record(storage, rec("part-1", 1001))
        list_records(storage, "clean", update_index=True)
    assert writes == [record_ref("clean", "part-1"), index_ref("clean")]
    assert list_records(storage, "clean")["part-1"].counts == {"docs": 1001}


def test_the_index_is_not_listed_as_a_record(stage_with_records):
    assert storage_names(stage_with_records) == {f"part-{i}" for i in range(12)}


def storage_names(storage: Storage) -> set[str]:
    return set(list_records(storage, "clean"))


def test_index_entries_equal_their_record_files_derived_digests_included(storage, monkeypatch):
    from shardflow.storage.manifest import read_record
    from shardflow.storage.store import digest_json

    inputs = {"stages/clean/a.jsonl.zst": "sha256:" + "a" * 64}
    derived = ShardRecord(stage="clean", shard_id="derived", status="done", inputs=inputs,
                          input_digest=digest_json(sorted(inputs.items())))
    pinned = ShardRecord(stage="clean", shard_id="pinned", status="done", inputs=inputs,
                         input_digest="sha256:" + "p" * 64)  # a pinned digest is kept as it is
    for r in (derived, pinned):
        write_record(storage, r)
    list_records(storage, "clean", update_index=True)
    reads = RecordReads(monkeypatch)
    from_index = list_records(storage, "clean")
    assert reads.files == [] and reads.index == 1
    assert from_index == {"derived": read_record(storage, "clean", "derived"),
                          "pinned": read_record(storage, "clean", "pinned")}
