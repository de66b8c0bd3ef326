"""`shardflow status` / `verify` over real manifests and real tar shards (no Prefect needed)."""
from __future__ import annotations

import json
import os

import numpy as np

from shardflow.dataprep.stage import run_stage
from shardflow.flows.status import collect_status, format_status, print_status, verify
from shardflow.storage import Storage
from shardflow.storage.manifest import read_record
from shardflow.storage.shards import ShardWriter, make_index, write_index

from .conftest import FACTORY, sid, toy_config, write_corpus
from .toy_stages import build


def run_all(cfg):
    storage = Storage(cfg.storage.root)
    return [run_stage(stage, storage) for stage in build(cfg.prep)]


def by_stage(status):
    return {r["stage"]: r for r in status["stages"]}


def test_status_counts_every_state_with_its_reason_and_carries_it_downstream(tmp_path):
    inputs = tmp_path / "in"
    write_corpus(inputs, n_files=4)
    cfg = toy_config(tmp_path / "root", inputs)
    s = [sid(inputs, i) for i in (0, 1, 2, 3, 9)]
    st = by_stage(collect_status(cfg, FACTORY))
    # Nothing has run: upper's four shards are missing, and so (predicted) are words' and merge's.
    assert (st["upper"]["shards"], st["upper"]["pending"], st["words"]["pending"], st["merge"]["pending"]) == (4, 4, 4, 1)
    run_all(cfg)
    assert collect_status(cfg, FACTORY)["next_run"] == {}
    root = cfg.storage.root
    os.remove(os.path.join(root, f"stages/upper/{s[0]}.jsonl.zst"))               # corrupt (missing output)
    with open(inputs / "part-1.jsonl", "a") as f:                                  # stale (input changed)
        f.write(json.dumps({"id": "x", "text": "one more document for the second file"}) + "\n")
    rec = json.load(open(os.path.join(root, f"stages/upper/_manifest/{s[2]}.json")))
    rec.update(status="failed", error="ValueError: boom")                          # failed
    json.dump(rec, open(os.path.join(root, f"stages/upper/_manifest/{s[2]}.json"), "w"))
    write_corpus(tmp_path / "extra", n_files=1)
    os.rename(tmp_path / "extra" / "part-0.jsonl", inputs / "part-9.jsonl")        # pending (new input)
    os.utime(inputs / "part-3.jsonl", (1, 1))                                      # touched only: still done
    status = collect_status(cfg, FACTORY)
    up = by_stage(status)["upper"]
    assert {k: up[k] for k in ("shards", "done", "pending", "stale", "failed", "corrupt")} == \
        {"shards": 5, "done": 1, "pending": 1, "stale": 1, "failed": 1, "corrupt": 1}
    assert up["reasons"] == {"missing": 1, "input changed": 1, "failed": 1, "corrupt": 1}
    assert up["failed_shards"] == [s[2]]
    # Transitive: words redoes what upper redoes (upstream changed) and gains the new shard;
    # only part-3's shard stays done; merge, a global stage, will run again.
    words, merge = by_stage(status)["words"], by_stage(status)["merge"]
    assert {w["shard"]: w["reason"] for w in words["work"]} == {
        s[0]: "upstream changed", s[1]: "upstream changed", s[2]: "missing", s[4]: "missing"}
    assert (words["done"], words["stale"], words["pending"]) == (1, 2, 2)
    assert merge["stale"] == 1 and merge["reasons"] == {"upstream changed": 1}
    text = format_status(status)
    assert f"failed shards {s[2]}" in text and "upstream changed" in text and "next run: upper (" in text
    # Status only reads: the touched file's record still holds the old fingerprint.
    assert read_record(Storage(root), "upper", s[3]).fingerprints != {}
    before = read_record(Storage(root), "upper", s[3]).fingerprints
    collect_status(cfg, FACTORY)
    assert read_record(Storage(root), "upper", s[3]).fingerprints == before


def test_status_names_a_config_change_and_its_downstream(tmp_path, corpus):
    cfg = toy_config(tmp_path / "root", corpus)
    run_all(cfg)
    changed = toy_config(tmp_path / "root", corpus, "prep.clean.min_chars=25")  # upper's knob
    st = by_stage(collect_status(changed, FACTORY))
    assert st["upper"]["reasons"] == {"config changed": 3}
    assert st["words"]["reasons"] == {"upstream changed": 3} and st["merge"]["reasons"] == {"upstream changed": 1}


def test_status_json_is_machine_readable(tmp_path, corpus, capsys):
    cfg = toy_config(tmp_path / "root", corpus)
    run_all(cfg)
    print_status(cfg, as_json=True, stage_factory=FACTORY)
    data = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in data["stages"]] == ["upper", "words", "merge"]
    assert data["stages"][0]["docs_in"] == 15 and data["stages"][0]["done"] == 3


def write_tar_shards(storage: Storage) -> None:
    rows = np.arange(40 * 9, dtype=np.uint16).reshape(40, 9)
    entries = {}
    for split, data in (("train", rows[:32]), ("val", rows[32:])):
        with ShardWriter(storage, split, seq_len=8, dtype=np.uint16, rows_per_member=4, samples_per_shard=16) as w:
            w.write(data)
        entries[split] = w.shards
    write_index(storage, make_index(8, np.uint16, 1000, "sha256:tok", 2, entries))


def test_verify_rehashes_stage_outputs_and_tar_shards(tmp_path, corpus, capsys):
    cfg = toy_config(tmp_path / "root", corpus)
    run_all(cfg)
    storage = Storage(cfg.storage.root)
    write_tar_shards(storage)
    assert verify(cfg, FACTORY) == []
    assert "no problem" in capsys.readouterr().out

    def flip(rel):
        path = os.path.join(storage.root, rel)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x01
        open(path, "wb").write(bytes(data))

    flip(f"stages/words/{sid(corpus, 1)}.jsonl.zst")
    flip("shards/train-000001.tar")
    storage.write_bytes("shards/train-000009.tar", b"\0" * 1024)
    problems = verify(cfg, FACTORY)
    assert len(problems) == 3, problems
    assert any(f"words shard {sid(corpus, 1)}" in p and "digest" in p for p in problems)
    assert any("train-000001.tar" in p and "sha256" in p for p in problems)
    assert any("train-000009.tar" in p and "not listed" in p for p in problems)
    assert capsys.readouterr().out.count("PROBLEM") == 3
