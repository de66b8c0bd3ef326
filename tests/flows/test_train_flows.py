"""Training and evaluation flows: the pipeline evaluates after training (as a subflow), and the
torchrun launcher hands the ranks their config safely and reports failures with their output.

The trainer and evaluator are replaced by stand-ins here (their own tests train real models); the
stand-ins write what the real ones write (a checkpoint pointer, a report) so that ordering is
checked through the files and through the Prefect API.
"""
from __future__ import annotations

import asyncio
import os
import sys
import textwrap

import pytest

from shardflow.flows import train_flows
from shardflow.flows.pipeline import run_pipeline

from .conftest import FACTORY, flow_artifacts, toy_config


async def _child_runs(parent_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        resp = await client._client.post("/flow_runs/filter", json={
            "flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}, "sort": "START_TIME_ASC", "limit": 50, "offset": 0})
        resp.raise_for_status()
        runs = resp.json()
        flows = {}
        for r in runs:
            if r["flow_id"] not in flows:
                flows[r["flow_id"]] = (await client.read_flow(r["flow_id"])).name
            r["flow_name"] = flows[r["flow_id"]]
        return runs


@pytest.mark.usefixtures("prefect_server")
def test_pipeline_prepares_trains_then_evaluates_as_subflows(tmp_path, corpus, monkeypatch):
    import shardflow.train.evaluate as evaluate_mod
    import shardflow.train.trainer as trainer_mod

    calls = []

    def fake_train(cfg, storage, **kw):
        assert storage.exists("merged/all.jsonl.zst"), "training started before data preparation finished"
        storage.write_text(f"runs/{cfg.run}/checkpoints/latest", "step-3")
        calls.append("train")
        return {"run": cfg.run, "step": 3, "loss": 4.2, "checkpoint": storage.uri(f"runs/{cfg.run}/checkpoints/step-3")}

    def fake_eval(train_cfg, eval_cfg, storage, checkpoint=None):
        assert storage.read_text(f"runs/{train_cfg.run}/checkpoints/latest") == "step-3", "evaluation before training"
        calls.append("eval")
        return {"results": {"val_ppl": 12.5}, "report_md": "# Report\n\nval ppl 12.5\n",
                "tables": {"perplexity": [{"split": "val", "ppl": 12.5}]}, "files": [f"runs/{train_cfg.run}/eval/results.json"]}

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    monkeypatch.setattr(evaluate_mod, "run_evaluation", fake_eval)
    cfg = toy_config(tmp_path / "root", corpus, "train.run=r1")
    out = run_pipeline(cfg, stage_factory=FACTORY)
    assert out["ok"], out
    assert calls == ["train", "eval"]
    assert out["train"]["step"] == 3 and out["eval"]["results"] == {"val_ppl": 12.5}
    children = asyncio.run(_child_runs(out["flow_run_id"]))
    assert [c["flow_name"] for c in children] == ["prep", "train", "evaluate"]
    assert all(c["state_type"] == "COMPLETED" for c in children)
    assert children[1]["end_time"] <= children[2]["start_time"]
    arts = flow_artifacts(children[2]["id"])
    assert "val ppl 12.5" in arts["shardflow-eval-report-r1"].data and "shardflow-eval-r1-perplexity" in arts
    assert "| step | 3 |" in flow_artifacts(children[1]["id"])["shardflow-train-r1"].data


@pytest.mark.usefixtures("prefect_server")
def test_failed_training_fails_the_pipeline_and_skips_evaluation(tmp_path, corpus, monkeypatch):
    import shardflow.train.evaluate as evaluate_mod
    import shardflow.train.trainer as trainer_mod

    def broken_train(cfg, storage, **kw):
        raise RuntimeError("shards/index.json not found")

    monkeypatch.setattr(trainer_mod, "train", broken_train)
    monkeypatch.setattr(evaluate_mod, "run_evaluation", lambda *a, **k: pytest.fail("evaluated a failed run"))
    out = run_pipeline(toy_config(tmp_path / "root", corpus), stage_factory=FACTORY)
    assert not out["ok"] and "shards/index.json not found" in out["error"]


FAKE_RANKS = textwrap.dedent('''
    import json, os, stat, sys
    path = sys.argv[-1]
    st, dst = os.stat(path), os.stat(os.path.dirname(path))
    assert stat.S_IMODE(st.st_mode) == 0o600 and stat.S_IMODE(dst.st_mode) == 0o700, (oct(st.st_mode), oct(dst.st_mode))
    cfg = json.load(open(path))
    print("rank 0: step 1 loss 5.0", flush=True)
    if os.environ.get("FAKE_FAIL"):
        print("RuntimeError: NCCL timeout", flush=True)
        sys.exit(3)
    creds = json.loads(os.environ["SHARDFLOW_STORAGE_CREDENTIALS"])
    print(json.dumps({"run": cfg["train"]["run"], "step": 2, "secret_in_file": cfg["storage"]["secret"],
                      "secret_seen": creds["secret"], "lock_held": os.environ.get("SHARDFLOW_ROOT_LOCK_HELD"), "path": path}))
''')


def test_torchrun_launch_config_file_summary_and_failure(tmp_path, monkeypatch):
    from shardflow.flows.config import load_config

    cfg = load_config(None, [f"storage.root={tmp_path}/root", "storage.key=AKIA_TEST", "storage.secret=s3cr3t", "train.run=tr"])

    def fake_command(config_json, nproc, **kw):
        return [sys.executable, "-c", FAKE_RANKS, config_json]

    real_command = train_flows.torchrun_command
    monkeypatch.setattr(train_flows, "torchrun_command", fake_command)
    summary = train_flows.launch_torchrun(cfg, 2)
    assert summary["run"] == "tr" and summary["step"] == 2 and summary["secret_seen"] == "s3cr3t"
    assert summary["secret_in_file"] == "**********" and summary["lock_held"] == "1"  # the file holds no credential
    assert not os.path.exists(os.path.dirname(summary["path"]))  # and is gone
    with pytest.raises(train_flows.TrainingFailed, match=r"status 3[\s\S]*NCCL timeout"):
        train_flows.launch_torchrun(cfg, 2, env={"FAKE_FAIL": "1"})
    # The real command: torchrun as a module of this interpreter, an argv list, single node by default.
    argv = real_command("/tmp/x/launch.json", 4)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=4" in argv
    assert "--standalone" in argv and argv[-4:] == ["-m", "shardflow.train", "--config-json", "/tmp/x/launch.json"]
    multi = real_command("/tmp/x/launch.json", 8, torchrun_args=["--nnodes=2", "--rdzv-endpoint=head:29400"])
    assert "--standalone" not in multi and "--nnodes=2" in multi
    assert multi.index("--nnodes=2") < multi.index("shardflow.train")
    fixed = real_command("/tmp/x/launch.json", 2, master_port=29555, extra=["--max-steps", "3"])
    assert "--master_port=29555" in fixed and "--standalone" not in fixed and fixed[-2:] == ["--max-steps", "3"]


def test_nproc_zero_means_every_visible_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert train_flows.resolve_nproc(0) == 4 and train_flows.resolve_nproc(2) == 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert train_flows.resolve_nproc(0) == 1
