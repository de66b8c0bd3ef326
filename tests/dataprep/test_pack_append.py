"""Append-only packing (dataprep/pack_append.py, issue 14): a new upstream shard is packed into new
tars after the earlier ones, which stay byte-for-byte and record-for-record untouched; anything but
"the same pack plus new streams" repacks, and a repack equals a from-scratch pack."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from shardflow.dataprep.stage import run_stage
from shardflow.dataprep.tokenize import PackStage, read_stream, stream_ref, tokenize_stages
from shardflow.storage import Storage
from shardflow.storage.manifest import ShardRecord, output_ref, read_record, remove_record, write_record
from shardflow.storage.shards import INDEX_REF, read_index, read_member_rows, verify_shard

from .test_tokenize import all_files, cfg_with, run_all, template  # noqa: F401 - the module fixture is shared
from .test_tokenize import docs  # noqa: F401


def hide_upstream(storage: Storage, shard_id: str) -> ShardRecord:
    rec = read_record(storage, "dedup", shard_id)
    remove_record(storage, "dedup", shard_id)
    return rec


def restore_upstream(storage: Storage, shard_id: str) -> None:
    ref = f"stages/dedup/{shard_id}.jsonl.zst"
    write_record(storage, ShardRecord(stage="dedup", shard_id=shard_id, status="done",
                                      outputs={"docs": output_ref(storage, ref)}))


def split_rows(storage: Storage, split: str) -> np.ndarray:
    index = read_index(storage)
    L = index["seq_len"]
    rows = [read_member_rows(storage, s, m, 0, m["rows"], L, index["dtype"])
            for s in index["splits"][split]["shards"] for m in s["members"]]
    return np.concatenate(rows) if rows else np.empty((0, L + 1), np.uint16)


@pytest.fixture
def grown(template, tmp_path):  # noqa: F811
    """A root packed over shards 000000 and 000001, then given 000002 (an arriving input)."""
    shutil.copytree(template, tmp_path / "root")
    storage = Storage(str(tmp_path / "root"))
    hide_upstream(storage, "000002")
    run_all(storage, cfg_with())
    before = {"files": all_files(storage, "shards"), "index": read_index(storage),
              "record": read_record(storage, "pack", "_all")}
    restore_upstream(storage, "000002")
    return storage, before


def test_new_streams_go_into_new_tars_and_earlier_ones_are_untouched(grown, monkeypatch):
    storage, before = grown
    hashed = []
    orig = Storage.digest
    monkeypatch.setattr(Storage, "digest", lambda s, ref: hashed.append(ref) or orig(s, ref))
    res = run_all(storage, cfg_with())
    assert res["tokenize"]["ran"] == ["000002"] and res["pack"]["ran"] == ["_all"]
    after = all_files(storage, "shards")
    old_tars = {k: v for k, v in before["files"].items() if k.endswith(".tar")}
    assert old_tars and all(after[k] == v for k, v in old_tars.items())
    new_tars = sorted(set(after) - set(before["files"]))
    assert new_tars and all(k.endswith(".tar") for k in new_tars)
    assert not any(r in hashed for r in (f"shards/{k.split('/')[-1]}" for k in old_tars))  # carried, not re-hashed

    index = read_index(storage)
    record = read_record(storage, "pack", "_all")
    for split in ("train", "val"):
        earlier = before["index"]["splits"][split]["shards"]
        assert index["splits"][split]["shards"][: len(earlier)] == earlier
        for s in index["splits"][split]["shards"]:
            assert verify_shard(storage, s) == []
        # The new tars hold exactly the new stream cut into rows, as a pack of that stream alone would.
        stream = read_stream(storage, stream_ref("000002", split), np.uint16)
        L1 = index["seq_len"] + 1
        n_old = before["index"]["splits"][split]["samples"]
        rows = split_rows(storage, split)
        n_new = stream.size // L1
        assert rows.shape[0] == n_old + n_new == index["splits"][split]["samples"]
        np.testing.assert_array_equal(rows[n_old:], stream[: n_new * L1].reshape(n_new, L1))
        assert record.counts[f"rows.{split}"] == n_old + n_new
        assert record.counts[f"shards.{split}"] == len(index["splits"][split]["shards"])
    assert set(record.outputs) == {"index"} | {k.split("/")[-1] for k in after if k.endswith(".tar")}
    for name, out in before["record"].outputs.items():
        if name != "index":
            assert record.outputs[name] == out
    # Nothing left to do: the appended pack is done under the same plan.
    again = run_all(storage, cfg_with())
    assert again["pack"]["ran"] == [] and again["tokenize"]["ran"] == []


def test_repack_mode_and_force_equal_a_from_scratch_pack(grown, template, tmp_path):  # noqa: F811
    storage, _ = grown
    scratch = Storage(str(tmp_path / "scratch"))
    shutil.copytree(template, tmp_path / "scratch")
    run_all(scratch, cfg_with())
    run_all(storage, cfg_with(pack_incremental="repack"))
    assert all_files(storage, "shards") == all_files(scratch, "shards")

    appended = Storage(str(tmp_path / "appended"))
    shutil.copytree(tmp_path / "root", tmp_path / "appended", dirs_exist_ok=True)
    # --force on an up-to-date pack compacts an appended one back to the from-scratch layout
    hide_upstream(appended, "000002")
    run_all(appended, cfg_with(pack_incremental="repack"))
    restore_upstream(appended, "000002")
    run_all(appended, cfg_with())
    assert all_files(appended, "shards") != all_files(scratch, "shards")
    run_stage(PackStage(cfg_with()), appended, force=True)
    assert all_files(appended, "shards") == all_files(scratch, "shards")


def test_a_removed_or_changed_stream_repacks(grown, template, tmp_path):  # noqa: F811
    storage, _ = grown
    run_all(storage, cfg_with())                       # appended: 0, 1, then 2
    hide_upstream(storage, "000000")                   # an input removed: its tokens must leave the tars
    res = run_all(storage, cfg_with())
    assert res["tokenize"]["retired"] == ["000000"]
    expect = Storage(str(tmp_path / "expect"))
    shutil.copytree(template, tmp_path / "expect")
    hide_upstream(expect, "000000")
    run_all(expect, cfg_with())
    assert all_files(storage, "shards") == all_files(expect, "shards")


def test_a_crash_while_appending_leaves_the_earlier_pack_whole(grown, monkeypatch):
    storage, before = grown
    import shardflow.dataprep.tokenize as tokenize

    def boom(*a, **k):
        raise OSError("disk full while publishing the index")

    monkeypatch.setattr(tokenize, "write_index", boom)
    res = run_stage(tokenize_stages(cfg_with())[0], storage)
    assert res["ran"] == ["000002"]
    res = run_stage(PackStage(cfg_with()), storage)
    assert "_all" in res["failed"]
    assert read_index(storage) == before["index"] and storage.read_bytes(INDEX_REF)
    for k, v in before["files"].items():
        if k.endswith(".tar"):
            assert storage.read_bytes(k) == v
    monkeypatch.undo()
    # An error writes a failed record, so the next run repacks (safe, and the tars verify) ...
    assert read_record(storage, "pack", "_all").status == "failed"
    # ... while a kill -9 writes none: the earlier done record is still the latest, and the
    # next run appends to the earlier pack (the unlisted tars of the dead run are overwritten).
    write_record(storage, before["record"])
    assert run_stage(PackStage(cfg_with()), storage)["ran"] == ["_all"]
    index = read_index(storage)
    for split in ("train", "val"):
        earlier = before["index"]["splits"][split]["shards"]
        assert index["splits"][split]["shards"][: len(earlier)] == earlier
        assert index["splits"][split]["samples"] > before["index"]["splits"][split]["samples"]
        assert all(verify_shard(storage, s) == [] for s in index["splits"][split]["shards"])
