"""Multi-node training from the CLI and the Prefect train flow: node 0 runs the flow, node 1 joins."""
from __future__ import annotations

import threading

import pytest

from shardflow.flows import train_flows
from shardflow.flows.cli import build_parser
from shardflow.flows.config import load_config
from shardflow.storage import Storage
from shardflow.train.metrics import read_metrics

from ..train.test_trainer import build_dataset, free_port, metrics_ref, tiny_cfg


def test_cli_flags_and_rendezvous_defaults_from_the_environment(tmp_path, monkeypatch):
    args = build_parser().parse_args(["train", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:29400",
                                      "--rdzv-id", "job-1", "--nproc", "8"])
    assert (args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.nproc) == (2, 1, "head:29400", "job-1", 8)
    cfg = load_config(None, [f"storage.root={tmp_path}", "train.run=r1"])
    assert train_flows.node_args(cfg) == []
    with pytest.raises(ValueError, match="needs --rdzv-endpoint"):
        train_flows.node_args(cfg, 2, 1)
    monkeypatch.setenv(train_flows.RDZV_ENDPOINT_ENV, "job-abc-0.shardflow-rdzv:29400")
    assert train_flows.node_args(cfg, 2, 1)[-2:] == ["--rdzv-endpoint=job-abc-0.shardflow-rdzv:29400", "--rdzv-id=r1"]
    monkeypatch.setenv(train_flows.RDZV_ID_ENV, "job-abc")
    assert train_flows.node_args(cfg, 2, 0, rdzv_id="explicit")[-1] == "--rdzv-id=explicit"
    assert train_flows.node_args(cfg, 2, 0)[-1] == "--rdzv-id=job-abc"


@pytest.mark.slow  # a Prefect server and two torchrun launches
@pytest.mark.usefixtures("prefect_server")
def test_train_flow_on_node_0_and_a_follower_node_train_one_run(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    build_dataset(storage)
    cfg = load_config(None, [f"storage.root={tmp_path / 'root'}"]).model_copy(
        update={"train": tiny_cfg("two-nodes", trainer={"steps": 4, "expert_parallel": 2})})
    endpoint = f"127.0.0.1:{free_port()}"
    follower: dict = {}
    t = threading.Thread(target=lambda: follower.update(train_flows.run_train(cfg, nproc=1, nnodes=2, node_rank=1,
                                                                             rdzv_endpoint=endpoint)))
    t.start()
    out = train_flows.run_train(cfg, nproc=1, evaluate=False, nnodes=2, node_rank=0, rdzv_endpoint=endpoint)
    t.join(timeout=300)
    assert out["ok"] and follower["ok"], (out, follower)
    assert out["train"]["world_size"] == 2 and follower["train"]["world_size"] == 2 and out["train"]["step"] == 4
    assert [r["step"] for r in read_metrics(storage, metrics_ref("two-nodes"))] == [1, 2, 3, 4]


def test_gpu_job_template_renders_an_indexed_multi_node_job(tmp_path):
    """Prefect's own template rendering with nodes=2; then the pod script as each index runs it."""
    import json
    import os
    import stat
    import subprocess
    from pathlib import Path

    from prefect.utilities.templating import apply_values

    tpl = json.loads((Path(__file__).parents[2] / "flows" / "gpu-job-template.json").read_text())
    values = {k: v.get("default") for k, v in tpl["variables"]["properties"].items()} | {"nodes": 2, "command": "echo flow-run"}
    job = apply_values(tpl["job_configuration"], values)["job_manifest"]
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 2, 2)
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == "shardflow-rdzv" == pod["metadata"]["labels"]["shardflow.io/rdzv"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SHARDFLOW_RDZV_ENDPOINT"] == "$(JOB_NAME)-0.shardflow-rdzv:29400" and env["SHARDFLOW_RDZV_ID"] == "$(JOB_NAME)"
    # The pod script: index 0 runs the worker's command, others `shardflow train` as node R (a stub records argv).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "shardflow"
    stub.write_text('#!/bin/sh\necho "shardflow $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SHARDFLOW_CONFIG="/etc/shardflow/p.yaml")
    argv = container["command"] + container["args"].split()
    out0 = subprocess.run(argv, env=run_env | {"JOB_COMPLETION_INDEX": "0"}, capture_output=True, text=True, check=True)
    out1 = subprocess.run(argv, env=run_env | {"JOB_COMPLETION_INDEX": "1"}, capture_output=True, text=True, check=True)
    assert out0.stdout.strip() == "flow-run"
    assert out1.stdout.strip() == "shardflow train --config /etc/shardflow/p.yaml --nproc 0 --nnodes 2 --node-rank 1"
