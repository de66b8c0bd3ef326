"""Training is visible in the Prefect UI: rank 0's progress lines (loss, lr, grad norm, tokens/s, memory,
expert imbalance) land in the flow run's log — at least one per 5 % of the steps — and a progress
artifact follows them; in-process (real trainer, real server) and from torchrun's streamed stdout."""
from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import uuid

import pytest

from shardflow.flows import train_flows
from shardflow.flows.config import load_config
from shardflow.train.metrics import STEP_LINE

from .conftest import flow_artifacts


async def _logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        resp = await client._client.post("/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200, "offset": 0})
        resp.raise_for_status()
        return [entry["message"] for entry in resp.json()]


def _wait_logs(flow_run_id: str, needle: str, timeout: float = 60.0) -> list[str]:
    import time

    deadline = time.monotonic() + timeout
    logs = asyncio.run(_logs(flow_run_id))
    while not any(needle in m for m in logs) and time.monotonic() < deadline:
        time.sleep(0.5)
        logs = asyncio.run(_logs(flow_run_id))
    return logs


@pytest.fixture
def info_run_logs():
    """The suite runs with PREFECT_LOGGING_LEVEL=WARNING; the UI's default is INFO, which this is about."""
    names = ("prefect.flow_runs", "prefect.task_runs")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.INFO)
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.usefixtures("prefect_server", "info_run_logs")
def test_in_process_training_logs_into_the_flow_run_and_updates_progress(tmp_path, monkeypatch):
    """The trainer's own Progress (train/metrics.py) under the train flow; the optimizer steps are
    stood in for (tests/train trains real models and checks the same lines through logging)."""
    import shardflow.train.trainer as trainer_mod
    from shardflow.train.metrics import Progress

    def stand_in(cfg, storage, **kw):
        tc = cfg.trainer
        progress = Progress(tc.steps, 0, tc.log_every, enabled=tc.progress, device="cpu", flops_per_token=1e6)
        for step in range(1, tc.steps + 1):
            progress.update(step, {"loss": 6.0 - step / 20, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 2048.0,
                                   "expert_tokens": [[30, 10, 20, 20]]})
        progress.close()
        return {"run": cfg.run, "step": tc.steps, "loss": 4.0}

    monkeypatch.setattr(trainer_mod, "train", stand_in)
    run = f"ui-{uuid.uuid4().hex[:6]}"
    cfg = load_config(None, [f"storage.root={tmp_path / 'root'}", f"train.run={run}", "train.trainer.steps=60",
                             "train.trainer.log_every=10", "name=tlog"])
    state = train_flows.train_flow(config=cfg, return_state=True)
    assert state.is_completed(), state
    flow_run_id = str(state.state_details.flow_run_id)
    logs = _wait_logs(flow_run_id, "step 60/60")
    steps = [int(m.group(1)) for line in logs if (m := STEP_LINE.search(line))]
    gaps = [b - a for a, b in zip([0, *steps], steps)]
    assert steps and steps[-1] == 60 and max(gaps) <= 3, steps  # 5 % of 60 steps
    line = next(x for x in logs if "step 60/60" in x)
    for part in ("loss 3.0000", "lr 1.00e-03", "gnorm 0.500", "2.0k tok/s", "mem ", "imb 1.50"):
        assert part in line, line
    arts = flow_artifacts(flow_run_id)
    assert float(arts[f"tlog-train-{run}-progress"].data) == 100.0
    assert f"tlog-train-{run}" in arts  # the run summary, namespaced by the pipeline


FAKE_RANK0 = textwrap.dedent("""
    import json, sys
    for step in range(1, 11):
        print(f"step {step}/10 | loss {5 - step / 10:.4f} | lr 1.00e-03 | gnorm 0.500 | 1.0k tok/s", flush=True)
    print(json.dumps({"run": "tr", "step": 10}), flush=True)
""")


def test_torchrun_output_lines_reach_the_logger_and_the_progress(tmp_path, monkeypatch):
    cfg = load_config(None, [f"storage.root={tmp_path}/root", "train.run=tr"])
    monkeypatch.setattr(train_flows, "torchrun_command", lambda config_json, nproc, **kw: [sys.executable, "-c", FAKE_RANK0])

    class Collect:
        def __init__(self):
            self.lines = []

        def info(self, fmt, *args):
            self.lines.append(fmt % args)

    seen: list[str] = []
    logger = Collect()
    progress = train_flows.TrainingProgress("k", "d")
    monkeypatch.setattr(progress, "line", lambda text: (seen.append(text), train_flows.TrainingProgress.line(progress, text)))
    monkeypatch.setattr(train_flows.artifacts, "Progress", _FakeProgress)
    summary = train_flows.launch_torchrun(cfg, 2, logger, on_line=progress.line)
    assert summary == {"run": "tr", "step": 10}
    assert sum(x.startswith("step ") for x in logger.lines) == 10 and len(seen) == 11
    assert progress.last_step == 10 and _FakeProgress.last == (10, 10)


class _FakeProgress:
    last = None

    def __init__(self, key, total, description):
        self.total = total

    def set(self, done):
        _FakeProgress.last = (done, self.total)
