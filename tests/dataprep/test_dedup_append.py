"""Incremental dedup (issue 14): new input shards are checked against the documents kept earlier
and against each other; earlier decisions and drop lists stay as they are, earlier signatures are
not recomputed, and the new documents removed are those a full recompute removes (apart from the
documented case where a full recompute would let a new document replace an earlier survivor)."""
from __future__ import annotations

import random

from shardflow.dataprep import dedup as dd
from shardflow.dataprep.config import PrepConfig
from shardflow.storage import Storage
from shardflow.storage.manifest import list_records

from .test_dedup import distinct, dropped, edit_words, records, run_dedup, write_filter_shards  # noqa: F401


def cfg(mode: str) -> PrepConfig:
    c = PrepConfig()
    c.dedup.incremental = mode
    return c


def test_new_shard_is_checked_against_kept_documents_and_itself(tmp_path, distinct):
    rng = random.Random(5)
    old = [distinct[:25] + [dict(distinct[0], id="zz-old-exact-0")],
           distinct[25:45] + [dict(distinct[1], id="old-near-1", text=edit_words(distinct[1]["text"], 0.02, rng))]]
    x = distinct[50]
    new = [dict(distinct[0], id="zz-new-exact-0"),                                      # exact twin of an old survivor
           dict(distinct[2], id="new-near-2", text=edit_words(distinct[2]["text"], 0.02, rng)),   # near an old kept doc
           x, dict(x, id="new-near-x", text=edit_words(x["text"], 0.02, rng)),           # a new near pair
           distinct[60]]                                                                  # new and unique
    storage = Storage(str(tmp_path / "append"))
    write_filter_shards(storage, old)
    run_dedup(storage, cfg("append"))
    before = dropped(storage)
    old_lists = {s: storage.read_bytes(dd.drop_ref(s)) for s in ("000000", "000001")}
    assert storage.read_json(dd.REPORT_REF)["mode"] == "full" and len(before) == 2

    write_filter_shards(storage, old + [new])
    results = run_dedup(storage, cfg("append"))
    assert results["dedup_signatures"]["ran"] == ["000002"]          # earlier signatures not recomputed
    assert results["dedup"]["ran"] == ["000002"]                     # earlier outputs untouched
    assert {s: storage.read_bytes(dd.drop_ref(s)) for s in old_lists} == old_lists
    report = storage.read_json(dd.REPORT_REF)
    assert report["mode"] == "append" and report["new_shards"] == ["000002"] and report["dropped_earlier"] == 2
    now = dropped(storage)
    assert {k: v for k, v in now.items() if k in before} == before  # earlier decisions kept
    added = {k: v for k, v in now.items() if k not in before}
    survivor0 = before["zz-old-exact-0"][1]
    assert added["zz-new-exact-0"] == ("exact", survivor0)
    assert added["new-near-2"] == ("near", distinct[2]["id"])
    assert set(added) == {"zz-new-exact-0", "new-near-2", sorted([x["id"], "new-near-x"])[0]} or \
        set(added) == {"zz-new-exact-0", "new-near-2", x["id"]} or set(added) == {"zz-new-exact-0", "new-near-2", "new-near-x"}
    assert len(added) == 3 and distinct[60]["id"] not in added
    counts = list_records(storage, "dedup_clusters")["_all"].counts
    assert counts["nodes"] <= 10                                     # only groups holding a new document
    buckets = list_records(storage, "dedup_buckets")
    assert all(r.counts["files_read"] == 1 and r.counts["files_reused"] == 2 for r in buckets.values())
    assert report["kept"] == sum(len(s) for s in old) + len(new) - len(now)

    full = Storage(str(tmp_path / "full"))
    write_filter_shards(full, old + [new])
    run_dedup(full, cfg("full"))
    full_drops = dropped(full)
    for b in buckets:                      # the bucket index gives the groups a full run gives
        assert storage.read_bytes(dd.bucket_ref(b)) == full.read_bytes(dd.bucket_ref(b))
    new_ids = {d["id"] for d in new}
    full_new = {k for k in full_drops if k in new_ids}
    if distinct[2]["id"] in full_drops:     # the documented difference: full lets the new copy survive
        assert full_new == set(added) - {"new-near-2"}
    else:
        assert full_new == set(added)


def test_changed_or_removed_earlier_shard_means_a_full_recluster(local_storage, distinct):
    shards = [distinct[:20], distinct[20:40] + [dict(distinct[3], id="copy-3")]]
    write_filter_shards(local_storage, shards)
    run_dedup(local_storage, cfg("append"))
    shards[0] = shards[0][1:]                                         # an earlier shard changed
    write_filter_shards(local_storage, shards + [[dict(distinct[5], id="copy-5")]])
    run_dedup(local_storage, cfg("append"))
    assert local_storage.read_json(dd.REPORT_REF)["mode"] == "full"
    assert set(dropped(local_storage)) in ({"copy-3", "copy-5"}, {"copy-3", distinct[5]["id"]},
                                           {distinct[3]["id"], "copy-5"}, {distinct[3]["id"], distinct[5]["id"]})


def test_altered_bucket_index_is_rebuilt_not_trusted(local_storage, distinct):
    from shardflow.dataprep.dedup_common import index_ref
    from shardflow.dataprep.stage import run_stage

    shards = [distinct[:20], distinct[20:40] + [dict(distinct[3], id="copy-3")]]
    write_filter_shards(local_storage, shards)
    run_dedup(local_storage, cfg("append"))
    groups = {b: local_storage.read_bytes(dd.bucket_ref(b)) for b in list_records(local_storage, "dedup_buckets")}
    path = local_storage.uri(index_ref("b0000"))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    run_stage(dd.DedupBucketsStage(cfg("append")), local_storage, force=True)
    rec = list_records(local_storage, "dedup_buckets")
    assert rec["b0000"].counts["files_read"] == 2 and "files_reused" not in rec["b0000"].counts
    assert rec["b0001"].counts["files_reused"] == 2
    assert {b: local_storage.read_bytes(dd.bucket_ref(b)) for b in groups} == groups


def test_earlier_drop_lists_are_checked_by_fingerprint_touched_is_fine_rewritten_is_not(local_storage, distinct):
    """previous_state checks the earlier drop lists as the manifest checks outputs: a touch (new
    mtime, same bytes) still appends, with the record carrying the new fingerprint; other bytes
    under the same name mean a full re-cluster."""
    import os

    shards = [distinct[:20], distinct[20:40] + [dict(distinct[3], id="copy-3")]]
    write_filter_shards(local_storage, shards)
    run_dedup(local_storage, cfg("append"))
    path = os.path.join(local_storage.root, dd.drop_ref("000001"))
    os.utime(path, ns=(1, 1))                                         # touched: same bytes
    write_filter_shards(local_storage, shards + [[dict(distinct[5], id="copy-5")]])
    run_dedup(local_storage, cfg("append"))
    assert local_storage.read_json(dd.REPORT_REF)["mode"] == "append"
    kept = list_records(local_storage, "dedup_clusters")["_all"].outputs["drops.000001"]
    assert kept.fingerprint.endswith(f"mtime_ns={os.stat(path).st_mtime_ns}")

    raw = local_storage.read_bytes(dd.drop_ref("000001"))            # rewritten with other bytes
    local_storage.write_bytes(dd.drop_ref("000001"), raw + b"\0")
    write_filter_shards(local_storage, shards + [[dict(distinct[5], id="copy-5")], [dict(distinct[7], id="copy-7")]])
    run_dedup(local_storage, cfg("append"))
    assert local_storage.read_json(dd.REPORT_REF)["mode"] == "full"
