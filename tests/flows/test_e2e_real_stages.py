"""The real data-preparation stages through the CLI and the Prefect flows, on a slice of the demo
corpus (real text with malformed lines): every stage runs, `status` and `verify` agree, a re-run
does nothing, and a corrupted tar shard makes exactly the pack stage run again."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from shardflow.flows.cli import main

from .conftest import ran_shards

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def real_config(tmp_path):
    from shardflow.dataprep.demo_corpus import read_demo_corpus

    raw = read_demo_corpus()
    lines = raw.split(b"\n")[:450]
    for i in range(3):
        (tmp_path / f"part-{i}.jsonl").write_bytes(b"\n".join(lines[i::3]) + b"\n")
    cfg = {
        "storage": {"root": str(tmp_path / "root")},
        "prep": {
            "inputs": [str(tmp_path / "part-*.jsonl")], "workers": 2,
            # Technical documentation: relax the web-boilerplate rules as the demo does.
            "filter": {"c4": {"filter_curly_bracket": False, "filter_no_terminal_punct": False, "min_num_sentences": 2},
                       "fineweb": {"line_punct_thr": 0.0, "short_line_thr": 0.9},
                       "gopher_quality": {"max_symbol_word_ratio": 0.3}},
            "tokenizer": {"vocab_size": 600, "sample_docs": 1000},
            "tokenize": {"seq_len": 64, "samples_per_shard": 256},
        },
        "flows": {"runner": "thread"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_flow_run_id() -> str:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            resp = await client._client.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1, "offset": 0})
            return resp.json()[0]["id"]

    return asyncio.run(read())


def test_real_stages_end_to_end(real_config, capsys):
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    from .conftest import flow_artifacts

    dedup_art = [a for k, a in flow_artifacts(last_flow_run_id()).items() if k.endswith("dedup-report")]
    assert len(dedup_art) == 1 and "# Dedup clusters" in dedup_art[0].data
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(real_config)]) == 0
    status = json.loads(capsys.readouterr().out)
    stages = {r["stage"]: r for r in status["stages"]}
    assert list(stages) == ["clean", "filter", "dedup_signatures", "dedup_buckets", "dedup_clusters", "dedup",
                            "tokenizer", "tokenize", "pack"]
    assert all(r["shards"] > 0 and r["done"] == r["shards"] for r in stages.values()), stages
    assert stages["clean"]["docs_in"] > stages["filter"]["docs_out"] > 0
    assert status["shards"]["train"]["tokens"] > 0
    assert main(["verify", "--config", str(real_config)]) == 0

    # Nothing to do: planned from the manifests, no flow starts.
    first_run = last_flow_run_id()
    capsys.readouterr()
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # The same by the root alone (the config it recorded), as the demo's hints do for status/train.
    assert main(["prep", "all", "--root", yaml.safe_load(real_config.read_text())["storage"]["root"]]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert last_flow_run_id() == first_run
    # A --force run of one stage goes through the flow again.
    assert main(["prep", "tokenizer", "--force", "--config", str(real_config)]) == 0
    assert ran_shards(last_flow_run_id(), 1) == ["tokenizer-_all"]

    root = yaml.safe_load(real_config.read_text())["storage"]["root"]
    tar = os.path.join(root, "shards", "train-000000.tar")
    data = bytearray(open(tar, "rb").read())
    data[len(data) // 3] ^= 0x10
    open(tar, "wb").write(bytes(data))
    capsys.readouterr()
    assert main(["verify", "--config", str(real_config)]) == 1
    assert "train-000000.tar" in capsys.readouterr().out
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    assert ran_shards(last_flow_run_id(), 1) == ["pack-_all"]
    assert main(["verify", "--config", str(real_config)]) == 0


@pytest.mark.slow  # ~40 s idle, two more full flow runs; the fast suite has the toy-stage version (test_status.py)
def test_appended_input_status_predicts_and_run_redoes_only_its_shards(real_config, capsys):
    """Issue 14 end to end: a new input file; `status` says what the next run does and why; the
    run does exactly that (new shards in per-shard stages, the global dedup phases and pack; the
    tokenizer is kept); a removed file is retired downstream."""
    from shardflow.dataprep.demo_corpus import read_demo_corpus
    from shardflow.dataprep.stage import shard_id_for

    assert main(["prep", "all", "--config", str(real_config)]) == 0
    new = real_config.parent / "part-3.jsonl"
    new.write_bytes(b"\n".join(read_demo_corpus().split(b"\n")[450:560]) + b"\n")
    sid = shard_id_for(str(new))
    capsys.readouterr()
    assert main(["status", "--json", "--config", str(real_config)]) == 0
    status = json.loads(capsys.readouterr().out)
    work = {r["stage"]: {(w["shard"], w["reason"]) for w in r["work"]} for r in status["stages"]}
    for stage in ("clean", "filter", "dedup_signatures", "dedup", "tokenize"):
        assert work[stage] == {(sid, "missing")}, (stage, work[stage])
    assert work["tokenizer"] == set()  # trained once, kept
    assert work["dedup_clusters"] == {("_all", "upstream changed")} and work["pack"] == {("_all", "upstream changed")}
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    ran = ran_shards(last_flow_run_id())
    per_shard = sorted(r for r in ran if not r.endswith("_all") and not r.startswith("dedup_buckets-"))
    assert per_shard == sorted(f"{st}-{sid}" for st in ("clean", "filter", "dedup_signatures", "dedup", "tokenize")), ran
    assert "tokenizer-_all" not in ran and "pack-_all" in ran
    capsys.readouterr()
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    assert "nothing to do" in capsys.readouterr().out

    (real_config.parent / "part-1.jsonl").unlink()
    gone = shard_id_for(str(real_config.parent / "part-1.jsonl"))
    assert main(["prep", "all", "--config", str(real_config)]) == 0
    root = yaml.safe_load(real_config.read_text())["storage"]["root"]
    for stage in ("clean", "filter", "dedup_signatures", "dedup", "tokenize"):
        assert not any(gone in name for name in os.listdir(os.path.join(root, "stages", stage, "_manifest"))), stage
    assert main(["verify", "--config", str(real_config)]) == 0
