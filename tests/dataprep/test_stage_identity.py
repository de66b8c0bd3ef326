"""Reprocessing at corpus scale (issue 14): stable shard identity, metadata-only planning with
fingerprints (size + mtime locally, size + ETag on the real S3 endpoint), config digests by meaning.

Real clean and filter stages on a few small files; data reads are counted by wrapping the one
storage method every content read goes through.
"""
from __future__ import annotations

import json
import os

import pytest

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.doc_stages import CleanStage, FilterStage
from shardflow.dataprep.stage import Reason, input_shards, plan, run_stage, shard_id_for
from shardflow.storage import Storage
from shardflow.storage.manifest import ShardState, list_records, read_record

WORDS = ("the river keeps a record of every stone that the water has moved over the long years and that is why "
         "the valley looks the way it does today with the old mill and the bridge").split()


def doc(i: int, n: int = 80) -> str:
    return json.dumps({"id": f"d{i}", "text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n)) + "."})


def write_files(storage: Storage, names, docs_per_file: int = 3, prefix: str = "in") -> None:
    for j, name in enumerate(names):
        storage.write_text(f"{prefix}/{name}", "\n".join(doc(100 * j + i) for i in range(docs_per_file)) + "\n")


class ReadCounter:
    """Counts calls that read object contents (opens and whole-object reads of non-manifest refs)."""

    def __init__(self, monkeypatch):
        self.reads: list[str] = []
        for name in ("open_read", "read_bytes", "read_range"):
            orig = getattr(Storage, name)

            def wrapped(storage, ref, *a, _orig=orig, **kw):
                if "/_manifest/" not in str(ref) and not str(ref).endswith("pipeline.yaml"):
                    self.reads.append(str(ref))
                return _orig(storage, ref, *a, **kw)

            monkeypatch.setattr(Storage, name, wrapped)


def run(cfg: PrepConfig, storage: Storage) -> dict[str, dict]:
    return {st.name: run_stage(st, storage) for st in (CleanStage(cfg), FilterStage(cfg))}


def test_shard_id_is_the_file_not_its_position():
    a = shard_id_for("/data/in/part-0001.jsonl.zst")
    assert a == shard_id_for("/data/in/part-0001.jsonl.zst")  # deterministic
    assert a.startswith("part-0001-") and len(a) == len("part-0001-") + 10
    odd = shard_id_for("s3://bucket/crawl 2024/some.file.v2 (copy).json.gz")
    assert odd.startswith("some_file_v2_copy-") and all(c.isalnum() or c in "_-" for c in odd)
    assert shard_id_for("/x/a.jsonl") != shard_id_for("/y/a.jsonl")      # same name, other folder
    assert shard_id_for("/x/a.jsonl") != shard_id_for("/x/a.jsonl.gz")   # same stem, other file
    assert shard_id_for("/x/a.jsonl", part=2).endswith("-p2")            # a file split into parts
    assert "." not in shard_id_for("/x/" + "v1.2.3." * 20 + "jsonl") and len(shard_id_for("/x/" + "y" * 300)) <= 51


def test_glob_or_list_same_ids_same_digests_and_adding_files_adds_only_shards(local_storage):
    write_files(local_storage, ["b.jsonl", "d.jsonl"])
    cfg = PrepConfig(inputs=[local_storage.uri("in/*.jsonl")])
    ran = run(cfg, local_storage)
    ids = ran["clean"]["ran"]
    listed = PrepConfig(inputs=[local_storage.uri("in/d.jsonl"), "in/b.jsonl"])  # other spelling, same files
    assert [s.shard_id for s in input_shards(local_storage, listed.inputs)] == ids
    assert CleanStage(listed).config_digest() == CleanStage(cfg).config_digest()
    assert run(listed, local_storage)["clean"] == {"stage": "clean", "ran": [], "skipped": ids, "failed": {}, "retired": []}

    # New files sort before, between and after the old ones: only their shards are new.
    before = {sid: read_record(local_storage, "filter", sid).outputs["docs"].digest for sid in ids}
    write_files(local_storage, ["a.jsonl", "c.jsonl", "e.jsonl"], prefix="in")
    ran = run(cfg, local_storage)
    new = sorted(shard_id_for(local_storage.uri(f"in/{n}.jsonl")) for n in "ace")
    assert ran["clean"]["ran"] == ran["filter"]["ran"] == new
    assert ran["clean"]["skipped"] == ran["filter"]["skipped"] == ids
    assert {sid: read_record(local_storage, "filter", sid).outputs["docs"].digest for sid in ids} == before


def test_removing_a_file_retires_only_its_shards_downstream(local_storage):
    write_files(local_storage, ["a.jsonl", "b.jsonl", "c.jsonl"])
    cfg = PrepConfig(inputs=["in/*.jsonl"])
    run(cfg, local_storage)
    gone = shard_id_for(local_storage.uri("in/b.jsonl"))
    outputs = [o.ref for st in ("clean", "filter") for o in read_record(local_storage, st, gone).outputs.values()]
    assert outputs and all(local_storage.exists(r) for r in outputs)
    local_storage.remove("in/b.jsonl")
    ran = run(cfg, local_storage)
    assert ran["clean"]["retired"] == ran["filter"]["retired"] == [gone]
    assert ran["clean"]["ran"] == ran["filter"]["ran"] == [] and len(ran["filter"]["skipped"]) == 2
    assert not any(local_storage.exists(r) for r in outputs)
    assert gone not in list_records(local_storage, "clean") and gone not in list_records(local_storage, "filter")


def test_touch_redoes_nothing_and_refreshes_the_fingerprint(local_storage, monkeypatch):
    write_files(local_storage, ["a.jsonl", "b.jsonl"])
    cfg = PrepConfig(inputs=["in/*.jsonl"])
    run(cfg, local_storage)
    clean = CleanStage(cfg)
    sid = shard_id_for(local_storage.uri("in/a.jsonl"))
    recorded = read_record(local_storage, "clean", sid).fingerprints
    path = local_storage.uri("in/a.jsonl")
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 5_000_000_000))  # touch

    counter = ReadCounter(monkeypatch)
    assert {p.state for p in plan(clean, local_storage)} == {ShardState.DONE}
    assert counter.reads == [path]  # the touched file is re-hashed, once, and nothing else is read
    assert read_record(local_storage, "clean", sid).fingerprints != recorded  # refreshed ...
    counter.reads.clear()
    assert {p.state for p in plan(clean, local_storage)} == {ShardState.DONE}
    assert counter.reads == []  # ... so the next plan reads nothing

    # Same size, new bytes: the re-hash tells, and only that shard is stale.
    data = local_storage.read_bytes("in/a.jsonl")
    local_storage.write_bytes("in/a.jsonl", data.replace(b"river", b"rivet"))
    states = {p.spec.shard_id: (p.state, p.reason) for p in plan(clean, local_storage)}
    assert states[sid] == (ShardState.STALE, Reason.INPUT)
    assert [v for k, v in states.items() if k != sid] == [(ShardState.DONE, "")]


def test_noop_plan_reads_no_data_and_verify_reads_everything(local_storage, monkeypatch):
    write_files(local_storage, ["a.jsonl", "b.jsonl", "c.jsonl"])
    cfg = PrepConfig(inputs=["in/*.jsonl"])
    run(cfg, local_storage)
    counter = ReadCounter(monkeypatch)
    for stage in (CleanStage(cfg), FilterStage(cfg)):
        assert all(p.state is ShardState.DONE for p in plan(stage, local_storage))
    assert counter.reads == []
    # --verify re-hashes every input and output; a corrupted output with its old fingerprint
    # restored (same size, same mtime) is only caught that way.
    sid = shard_id_for(local_storage.uri("in/a.jsonl"))
    ref = read_record(local_storage, "filter", sid).outputs["docs"].ref
    path, st = local_storage.uri(ref), os.stat(local_storage.uri(ref))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert {p.state for p in plan(FilterStage(cfg), local_storage)} == {ShardState.DONE}
    deep = {p.spec.shard_id: p.reason for p in plan(FilterStage(cfg), local_storage, deep_verify=True)}
    assert deep[sid] == Reason.CORRUPT and sum(r == "" for r in deep.values()) == 2
    # Every filter output was read once (its inputs are clean's outputs: clean's plan checks them).
    assert sorted(counter.reads) == sorted(r.outputs["docs"].ref for r in list_records(local_storage, "filter").values())
    counter.reads.clear()
    assert {p.state for p in plan(CleanStage(cfg), local_storage, deep_verify=True)} == {ShardState.DONE}
    assert len(counter.reads) == 3 + 6  # each raw input, each docs and quarantine output


def test_s3_inputs_are_fingerprinted_by_etag(s3_storage, monkeypatch):
    """On the real S3 endpoint: listing gives size + ETag; a re-upload of the same bytes (new
    LastModified, same ETag) plans without reading, new bytes of the same size are caught."""
    write_files(s3_storage, ["a.jsonl", "b.jsonl"])
    cfg = PrepConfig(inputs=[s3_storage.uri("in/*.jsonl")])
    assert run(cfg, s3_storage)["clean"]["failed"] == {}
    sid = shard_id_for(s3_storage.uri("in/a.jsonl"))
    fp = read_record(s3_storage, "clean", sid).fingerprints[s3_storage.uri("in/a.jsonl")]
    assert "etag=" in fp
    out = read_record(s3_storage, "clean", sid).outputs["docs"]
    assert "etag=" in out.fingerprint

    data = s3_storage.read_bytes("in/a.jsonl")
    s3_storage.write_bytes("in/a.jsonl", data)  # same bytes uploaded again
    counter = ReadCounter(monkeypatch)
    for stage in (CleanStage(cfg), FilterStage(cfg)):
        assert all(p.state is ShardState.DONE for p in plan(stage, s3_storage))
    assert counter.reads == []

    s3_storage.write_bytes("in/a.jsonl", data.replace(b"river", b"rivet"))  # same size, new ETag
    states = {p.spec.shard_id: p.reason for p in plan(CleanStage(cfg), s3_storage)}
    assert states[sid] == Reason.INPUT and list(states.values()).count("") == 1
    ran = run(cfg, s3_storage)
    assert ran["clean"]["ran"] == ran["filter"]["ran"] == [sid]


def test_missing_input_is_an_error_naming_it(local_storage):
    with pytest.raises(FileNotFoundError, match="in/nope.jsonl"):
        input_shards(local_storage, ["in/nope.jsonl"])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        input_shards(local_storage, ["in/*.parquet"])
