"""Deployments for the Prefect UI: the pipeline, each prep stage, training and evaluation.

``shardflow serve`` serves all of them from one long-lived process (``prefect.serve``): runs start
as subprocesses of it, on this machine. ``configs/prefect.yaml`` declares the same deployments for work
pools (CPU pool for preparation, a Kubernetes GPU pool for training, see flows/gpu-job-template.json
and docs/orchestration.md).

Every deployment's parameters are the config file path and the ``--set`` overrides, never the
config itself: a run reads the file when it starts, so editing the file changes the next scheduled
run, and secrets stay in the file (or the environment), not in Prefect's database. Schedules come
from ``flows.schedules`` (deployment name -> cron). Evaluation is triggered by the completion of a
``train`` deployment run (an event trigger), besides running as the pipeline's last subflow.
"""
from __future__ import annotations

import os
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger

from shardflow.flows.config import PipelineConfig, deployment_names
from shardflow.flows.pipeline import pipeline_flow
from shardflow.flows.prep_flows import STAGE_FLOWS, prep_flow
from shardflow.flows.train_flows import eval_flow, train_flow

TAGS = ["shardflow"]

WORKDIR_ENV = "SHARDFLOW_WORKDIR"
"""Where a deployment run executes on a worker; unset = the worker's (or the image's) working directory."""


def enter_workdir(directory: str | None = None) -> dict[str, str]:
    """The pull step of configs/prefect.yaml: run in ``$SHARDFLOW_WORKDIR`` if set, else stay where the worker is.

    Why not Prefect's default: with ``pull: null`` ``prefect deploy`` records
    ``set_working_directory`` to the folder it ran from, which does not exist on another machine
    (or after a checkout is removed) and the run crashes before the flow starts. The code is the
    installed package (module-path entry points), so a run needs no checkout; only relative paths
    in the config would care where it runs, and ``SHARDFLOW_WORKDIR`` says that explicitly.
    """
    target = directory or os.environ.get(WORKDIR_ENV) or os.getcwd()
    os.makedirs(target, exist_ok=True)
    os.chdir(target)
    return {"directory": target}


def eval_after_train_trigger(parameters: dict[str, Any]) -> DeploymentEventTrigger:
    """Run the evaluate deployment when a run of the ``train`` deployment completes.

    Both related resources must match: the flow ``train`` and the deployment ``train``. A train run
    started inside the pipeline (a subflow, no deployment) does not fire it; the pipeline evaluates
    by itself.
    """
    return DeploymentEventTrigger(
        name="evaluate-after-train",
        description="Evaluate the latest checkpoint when a train deployment run completes",
        expect={"prefect.flow-run.Completed"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": "train"},
                       {"prefect.resource.role": "deployment", "prefect.resource.name": "train"}],
        parameters=parameters,
    )


def build_deployments(cfg: PipelineConfig, config_path: str | None = None,
                      overrides: list[str] | None = None) -> list[RunnerDeployment]:
    """The deployments ``serve`` serves, with schedules from ``cfg.flows.schedules``."""
    params: dict[str, Any] = {"config_path": os.path.abspath(config_path) if config_path else None,
                              "overrides": list(overrides or [])}
    where = config_path or "embedded defaults"

    def make(flow_obj, name: str, extra: dict[str, Any] | None = None, triggers=None, description: str = "") -> RunnerDeployment:
        cron = cfg.flows.schedules.get(name)
        return flow_obj.to_deployment(
            name=name, parameters={**params, **(extra or {})}, cron=cron, triggers=triggers, tags=TAGS,
            description=f"{description} (config: {where})", entrypoint_type=EntrypointType.MODULE_PATH)

    deployments = [
        make(pipeline_flow, "pipeline", description="Data preparation, training and evaluation"),
        make(prep_flow, "prep", description="Every data-preparation stage, shard-resumable"),
    ]
    deployments += [make(f, f"prep-{group}", description=f"Data-preparation stage {group}") for group, f in STAGE_FLOWS.items()]
    deployments += [
        make(train_flow, "train", {"evaluate": False}, description="Training (evaluation is triggered on completion)"),
        make(eval_flow, "evaluate", triggers=[eval_after_train_trigger(params)],
             description="Evaluation of the run's latest checkpoint"),
    ]
    return deployments


def serve(cfg: PipelineConfig, config_path: str | None = None, overrides: list[str] | None = None,
          limit: int | None = None) -> None:
    """``shardflow serve``: serve every deployment from this process until interrupted.

    Served runs are subprocesses of this one and inherit its working directory, so before serving
    every path the runs need is made absolute (the config file; a relative default root) and the
    process moves to ``$SHARDFLOW_WORKDIR`` or a private folder of its own: a run never depends on
    the folder ``serve`` was started from, which may be a checkout that is replaced or removed.
    """
    import shutil
    import tempfile

    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("warning: PREFECT_API_URL is not set; serving against a temporary local API that nothing else "
              "can see. Start `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api.")
    overrides = list(overrides or [])
    if config_path:
        config_path = os.path.abspath(config_path)
    root = cfg.storage.root
    if "://" not in root and not os.path.isabs(root):
        overrides.append(f"storage.root={os.path.abspath(root)}")
    deployments = build_deployments(cfg, config_path, overrides)
    own = None if os.environ.get(WORKDIR_ENV) else tempfile.mkdtemp(prefix="shardflow-serve-")
    enter_workdir(own)
    try:
        prefect_serve(*deployments, limit=limit)
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
