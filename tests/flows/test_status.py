"""`shardflow status` / `verify` over real manifests and real tar shards (no Prefect needed)."""
from __future__ import annotations

import json
import os

import numpy as np

from shardflow.dataprep.stage import run_stage
from shardflow.flows.status import collect_status, format_status, print_status, verify
from shardflow.storage import Storage
from shardflow.storage.shards import ShardWriter, make_index, write_index

from .conftest import FACTORY, toy_config, write_corpus
from .toy_stages import build


def run_all(cfg):
    storage = Storage(cfg.storage.root)
    return [run_stage(stage, storage) for stage in build(cfg.prep)]


def by_stage(status):
    return {r["stage"]: r for r in status["stages"]}


def test_status_counts_every_state_and_totals(tmp_path):
    inputs = tmp_path / "in"
    write_corpus(inputs, n_files=4)
    cfg = toy_config(tmp_path / "root", inputs)
    st = by_stage(collect_status(cfg, FACTORY))
    assert (st["upper"]["shards"], st["upper"]["pending"], st["words"]["shards"]) == (4, 4, 0)
    run_all(cfg)
    root = cfg.storage.root
    os.remove(os.path.join(root, "stages/upper/000000.jsonl.zst"))                 # corrupt (missing output)
    with open(inputs / "part-1.jsonl", "a") as f:                                  # stale (input changed)
        f.write(json.dumps({"id": "x", "text": "one more document for the second file"}) + "\n")
    rec = json.load(open(os.path.join(root, "stages/upper/_manifest/000002.json")))
    rec.update(status="failed", error="ValueError: boom")                          # failed
    json.dump(rec, open(os.path.join(root, "stages/upper/_manifest/000002.json"), "w"))
    write_corpus(tmp_path / "extra", n_files=1)
    os.rename(tmp_path / "extra" / "part-0.jsonl", inputs / "part-9.jsonl")        # pending (new input)
    status = collect_status(cfg, FACTORY)
    up = by_stage(status)["upper"]
    assert {k: up[k] for k in ("shards", "done", "pending", "stale", "failed", "corrupt")} == \
        {"shards": 5, "done": 1, "pending": 1, "stale": 1, "failed": 1, "corrupt": 1}
    assert up["failed_shards"] == ["000002"]
    # Downstream nothing has been redone yet: words lists the shards whose upstream is done (the
    # failed one drops out of its plan), merge still matches the words records it was built from.
    words, merge = by_stage(status)["words"], by_stage(status)["merge"]
    assert (words["shards"], words["done"], merge["done"]) == (3, 3, 1)
    assert words["tokens"] == 3 * merge["tokens"] // 4 > 0  # four equal files were merged, three are counted
    text = format_status(status)
    assert "upper" in text and "failed shards 000002" in text


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

    flip("stages/words/000001.jsonl.zst")
    flip("shards/train-000001.tar")
    storage.write_bytes("shards/train-000009.tar", b"\0" * 1024)
    problems = verify(cfg, FACTORY)
    assert len(problems) == 3, problems
    assert any("words shard 000001" in p and "digest" in p for p in problems)
    assert any("train-000001.tar" in p and "sha256" in p for p in problems)
    assert any("train-000009.tar" in p and "not listed" in p for p in problems)
    assert capsys.readouterr().out.count("PROBLEM") == 3
