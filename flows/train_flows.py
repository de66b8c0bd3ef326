"""Prefect flows of training and evaluation.

``train``: runs the trainer for the configured run: in this process when one process trains
(``train.trainer.train``), else through ``torchrun`` (``python -m torch.distributed.run … -m
shardflow.train --config-json FILE``). The launch file holds the resolved ``train`` and ``storage``
sections, credentials included, so it is a fresh 0600 file in a private 0700 directory, deleted when
torchrun exits; the command is an argv list (no shell ever sees a user string). Rank 0 prints the
run summary as the last stdout line; everything else is streamed into the flow's log.

``evaluate``: ``train.evaluate.run_evaluation`` on a checkpoint (default: the run's latest), its
report and tables published as artifacts. It runs after training in two ways: the pipeline flow
calls it as a subflow when training completes, and the served ``evaluate`` deployment has an event
trigger on the ``train`` deployment's ``prefect.flow-run.Completed`` (see flows/deploy.py).

Training holds the dataset root's lock (as data preparation does), so a prep run cannot rewrite the
shards under a running trainer.

Multi-node: every node launches torchrun with the same ``nnodes``, ``rdzv_endpoint`` and
``rdzv_id`` and its own ``node_rank`` (``train.launch.rendezvous_args``: torchrun's c10d
rendezvous). Node 0 runs the train flow (root lock, artifacts, evaluation); the other nodes only
join (``follow_training``, no Prefect run, no lock: node 0's launcher holds it for the job). In a
Kubernetes Job the node count, endpoint and id come from ``SHARDFLOW_NNODES``,
``SHARDFLOW_RDZV_ENDPOINT`` / ``SHARDFLOW_RDZV_ID``
(flows/gpu-job-template.json sets them per Job), since a deployment's parameters are fixed before
the Job's name exists.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from shardflow.flows import artifacts
from shardflow.flows.config import PipelineConfig
from shardflow.flows.prep_flows import flow_outcome, resolve_config
from shardflow.flows.runners import prefect_api
from shardflow.storage.lock import RootLock
from shardflow.train.launch import (
    LAUNCHER_LOCK_ENV,
    credentials_env,
    die_with_parent,
    rendezvous_args,
    torchrun_command,
    write_launch_config,
)

NNODES_ENV, RDZV_ENDPOINT_ENV, RDZV_ID_ENV = "SHARDFLOW_NNODES", "SHARDFLOW_RDZV_ENDPOINT", "SHARDFLOW_RDZV_ID"


class TrainingFailed(RuntimeError):
    """torchrun (or the in-process trainer) failed; the message holds the exit status and the last output."""


def resolve_nproc(nproc: int) -> int:
    """``nproc`` processes; 0 = one per visible GPU (at least one)."""
    if nproc > 0:
        return nproc
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except Exception:  # noqa: BLE001
        return 1


def node_args(cfg: PipelineConfig, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
              rdzv_id: str | None = None) -> list[str]:
    """torchrun rendezvous options of this node ([] for one node); endpoint and id fall back to
    ``$SHARDFLOW_RDZV_ENDPOINT`` / ``$SHARDFLOW_RDZV_ID``, the id then to the run name."""
    return rendezvous_args(nnodes, node_rank, rdzv_endpoint or os.environ.get(RDZV_ENDPOINT_ENV) or None,
                           rdzv_id or os.environ.get(RDZV_ID_ENV) or cfg.train.run)


class TrainingProgress:
    """The train flow's progress artifact, advanced from rank 0's progress lines (``step 40/300 | …``).

    Lines come from the in-process trainer's logger or from torchrun's streamed stdout: the same
    text either way, so one parser serves both. The artifact is created at the first line.
    """

    def __init__(self, key: str, description: str):
        self.key, self.description = key, description
        self._progress: artifacts.Progress | None = None
        self.last_step = 0

    def line(self, text: str) -> None:
        from shardflow.train.metrics import STEP_LINE

        m = STEP_LINE.search(text)
        if not m:
            return
        step, total = int(m.group(1)), int(m.group(2))
        if self._progress is None:
            self._progress = artifacts.Progress(self.key, total, self.description)
        self.last_step = step
        self._progress.set(step)


class _ForwardTrainingLog(logging.Handler):
    """Rank 0's ``shardflow.train`` lines into the flow run's log (and the progress artifact)."""

    def __init__(self, logger, on_line: Callable[[str], None] | None):
        super().__init__(logging.INFO)
        self.logger, self.on_line = logger, on_line

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            self.logger.log(record.levelno, "%s", msg)
            if self.on_line is not None:
                self.on_line(msg)
        except Exception:  # noqa: BLE001 - logging must never stop training
            self.handleError(record)


@contextlib.contextmanager
def forward_training_log(logger, on_line: Callable[[str], None] | None = None) -> Iterator[None]:
    """While training runs in this process, its progress lines go to ``logger`` (the Prefect run
    logger) instead of the console; train/ itself only uses standard logging."""
    from shardflow.train.metrics import LOGGER_NAME

    train_log = logging.getLogger(LOGGER_NAME)
    handler = _ForwardTrainingLog(logger, on_line)
    saved = train_log.level, train_log.propagate
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    train_log.propagate = False  # the run logger prints to the console itself: no second copy
    try:
        yield
    finally:
        train_log.removeHandler(handler)
        train_log.setLevel(saved[0])
        train_log.propagate = saved[1]


def launch_torchrun(cfg: PipelineConfig, nproc: int, logger=None, env: dict[str, str] | None = None,
                    rendezvous: list[str] | None = None, on_line: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run training under torchrun; returns rank 0's summary (its last stdout line).

    Every output line of the ranks goes into ``logger`` as it comes (the ranks' stdout is a pipe,
    so they are told to write unbuffered) and to ``on_line`` (the progress artifact).

    The launch file holds no credential (they go to the ranks in the environment, see
    ``shardflow.train.launch``), torchrun gets SIGTERM if this process dies (and its ranks die
    with it), and the ranks are told that this process holds the root lock.
    """
    config_json = write_launch_config(cfg.train, cfg.storage)
    tail: collections.deque[str] = collections.deque(maxlen=60)
    argv = torchrun_command(config_json, nproc, torchrun_args=[*cfg.flows.torchrun_args, *(rendezvous or [])])
    if logger is not None:
        logger.info("launching: %s", " ".join(argv))
    proc = None
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **credentials_env(cfg.storage), LAUNCHER_LOCK_ENV: "1", **(env or {})},
                                preexec_fn=die_with_parent())
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if logger is not None and line:
                logger.info("%s", line)
            if on_line is not None and line:
                on_line(line)
        rc = proc.wait()
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: do not leave ranks behind
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(os.path.dirname(config_json), ignore_errors=True)
    if rc != 0:
        raise TrainingFailed(f"torchrun exited with status {rc}; last output:\n" + "\n".join(list(tail)[-25:]))
    for line in reversed(tail):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise TrainingFailed("torchrun finished but rank 0 printed no summary line; last output:\n" + "\n".join(list(tail)[-25:]))


@task(name="train", cache_policy=NO_CACHE, persist_result=False)
def train_task(cfg: PipelineConfig, nproc: int = 1, rendezvous: list[str] | None = None) -> dict[str, Any]:
    """Train run ``cfg.train.run`` (resuming from its latest checkpoint if there is one)."""
    logger = get_run_logger()
    nproc = resolve_nproc(nproc)
    launcher = cfg.flows.train_launcher
    if launcher == "auto":
        launcher = "inprocess" if nproc == 1 and not cfg.flows.torchrun_args and not rendezvous else "torchrun"
    if launcher == "inprocess" and (nproc != 1 or rendezvous):
        raise ValueError(f"flows.train_launcher=inprocess runs one process, but nproc={nproc}"
                         + (" on several nodes" if rendezvous else ""))
    logger.info("training run %r on %s: %s, %d process(es)", cfg.train.run, cfg.storage.root, launcher, nproc)
    progress = TrainingProgress(artifacts.artifact_key(cfg.name, "train", cfg.train.run, "progress"),
                                f"Training run {cfg.train.run}: steps done")
    if launcher == "inprocess":
        from shardflow.train.trainer import train

        with forward_training_log(logger, progress.line):
            return dict(train(cfg.train, cfg.storage_handle()))
    return launch_torchrun(cfg, nproc, logger, rendezvous=rendezvous, on_line=progress.line)


def follow_training(cfg: PipelineConfig, nproc: int, rendezvous: list[str]) -> dict[str, Any]:
    """Join a multi-node run as a node other than 0: torchrun only, no Prefect run and no root lock
    (node 0's train flow holds it for the whole job); returns this node's copy of the summary."""
    return launch_torchrun(cfg, resolve_nproc(nproc), rendezvous=rendezvous)


def _train_markdown(run: str, summary: dict[str, Any]) -> str:
    lines = [f"# Training run `{run}`", "", "| | |", "|---|---|"]
    for key in ("step", "steps", "loss", "val_loss", "tokens", "world_size", "params", "active_params", "wall_time_s",
                "checkpoint"):
        if summary.get(key) is not None:
            value = summary[key]
            lines.append(f"| {key} | {round(value, 4) if isinstance(value, float) else value} |")
    return "\n".join(lines) + "\n"


@flow(name="train", log_prints=True)
def train_flow(config: PipelineConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None,
               nproc: int = 1, evaluate: bool = False, nnodes: int | None = None, rdzv_endpoint: str | None = None,
               rdzv_id: str | None = None) -> dict[str, Any]:
    """Train (or resume) the configured run; with ``evaluate``, run the evaluation flow after it.

    ``nnodes > 1`` (default ``$SHARDFLOW_NNODES``, else 1): this is node 0 of a multi-node job (the
    others run ``shardflow train --node-rank R``, i.e. :func:`follow_training`); ``rdzv_endpoint`` ``HOST:PORT`` is where the
    c10d rendezvous store runs (default ``$SHARDFLOW_RDZV_ENDPOINT``), ``rdzv_id`` the job's name
    (default ``$SHARDFLOW_RDZV_ID``, else the run name).
    """
    cfg = resolve_config(config, config_path, overrides)
    nnodes = nnodes if nnodes is not None else int(os.environ.get(NNODES_ENV) or 1)
    rendezvous = node_args(cfg, nnodes, 0, rdzv_endpoint, rdzv_id)
    storage = cfg.storage_handle()
    with RootLock(storage, purpose=f"shardflow train {cfg.train.run}", wait_s=cfg.flows.lock_wait_s, ttl_s=cfg.flows.lock_ttl_s):
        summary = train_task(cfg, nproc, rendezvous)
    artifacts.publish_markdown(artifacts.artifact_key(cfg.name, "train", cfg.train.run), _train_markdown(cfg.train.run, summary),
                               f"Training run {cfg.train.run}")
    out = {"ok": True, "train": summary}
    if evaluate:
        out["eval"] = eval_flow(config=cfg)
    return out


@flow(name="evaluate", log_prints=True)
def eval_flow(config: PipelineConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None,
              checkpoint: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint (default: the configured one, else the run's latest) and publish the report."""
    cfg = resolve_config(config, config_path, overrides)
    logger = get_run_logger()
    if not cfg.eval.enabled:
        logger.info("evaluation disabled (eval.enabled=false)")
        return {"ok": True, "skipped": True}
    from shardflow.train.evaluate import run_evaluation

    storage = cfg.storage_handle()
    # Evaluation writes under runs/<run>/eval/: it holds the root lock like every writer.
    with RootLock(storage, purpose=f"shardflow eval {cfg.train.run}", wait_s=cfg.flows.lock_wait_s, ttl_s=cfg.flows.lock_ttl_s):
        result = run_evaluation(cfg.train, cfg.eval, storage, checkpoint or cfg.eval.checkpoint)
    artifacts.publish_eval(result, cfg.train.run, pipeline=cfg.name, storage=storage)
    logger.info("evaluation of run %r: %s", cfg.train.run, json.dumps(result.get("results", {}), default=str)[:2000])
    return {"ok": True, "results": result.get("results", {}), "files": list(result.get("files", []))}


def run_train(cfg: PipelineConfig, nproc: int = 1, evaluate: bool = True, nnodes: int = 1, node_rank: int = 0,
              rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> dict[str, Any]:
    """``shardflow train``: the train flow (then evaluation unless ``evaluate`` is false).

    On node ``node_rank > 0`` of a multi-node job: only joins the torchrun rendezvous (no flow)."""
    if node_rank > 0:
        try:
            out = {"ok": True, "train": follow_training(cfg, nproc, node_args(cfg, nnodes, node_rank, rdzv_endpoint, rdzv_id))}
        except (TrainingFailed, ValueError) as exc:
            out = {"ok": False, "error": str(exc)}
        _print(out)
        return out
    with prefect_api():
        out = flow_outcome(train_flow(config=cfg, nproc=nproc, evaluate=evaluate, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                      rdzv_id=rdzv_id, return_state=True))
    _print(out)
    return out


def run_eval(cfg: PipelineConfig, checkpoint: str | None = None) -> dict[str, Any]:
    """``shardflow eval``: the evaluation flow on ``checkpoint`` (default: the run's latest)."""
    with prefect_api():
        out = flow_outcome(eval_flow(config=cfg, checkpoint=checkpoint, return_state=True))
    _print(out)
    return out


def _print(out: dict[str, Any]) -> None:
    import sys

    if not out.get("ok"):
        print(f"error: {out.get('error')}", file=sys.stderr)
        return
    summary = out.get("train")
    if summary:
        print("train: " + ", ".join(f"{k}={summary[k]}" for k in ("run", "step", "loss", "val_loss", "checkpoint") if k in summary))
    results = (out.get("eval") or out).get("results")
    if results:
        print("eval: " + json.dumps(results, default=str)[:2000])
