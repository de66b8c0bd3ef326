"""The full pipeline flow: data preparation → training → evaluation, each as a subflow.

Subflows keep each part's runs, logs and artifacts separate in the UI and let a part be re-run on
its own (``shardflow prep``, ``train``, ``eval``) with the same code. Every part is resumable on its
own terms, so re-running the pipeline after a failure redoes only what is missing: shards from
their manifests, training from its latest checkpoint. Evaluation runs here as a downstream subflow
once training has completed; the served deployments also trigger it from the train deployment's
completion event (flows/deploy.py).
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from shardflow.dataprep.stages import DEFAULT_FACTORY
from shardflow.flows.config import PipelineConfig
from shardflow.flows.prep_flows import config_param, flow_outcome, prep_flow, print_outcome, resolve_config
from shardflow.flows.runners import prefect_api
from shardflow.flows.train_flows import eval_flow, train_flow


@flow(name="pipeline", log_prints=True)
def pipeline_flow(config: PipelineConfig | None = None, config_path: str | None = None,
                  overrides: list[str] | None = None, nproc: int = 1, train: bool = True, evaluate: bool = True,
                  runner: str | None = None, ray_address: str | None = None,
                  stage_factory: str = DEFAULT_FACTORY) -> dict[str, Any]:
    """Prepare the data (every stage), train on it, evaluate the result."""
    cfg = resolve_config(config, config_path, overrides)
    logger = get_run_logger()
    out: dict[str, Any] = {"ok": True}
    out["prep"] = prep_flow(config=config_param(cfg), runner=runner, ray_address=ray_address, stage_factory=stage_factory)
    if train:
        out["train"] = train_flow(config=cfg, nproc=nproc, evaluate=False)["train"]
    if evaluate:
        logger.info("training done; evaluating run %r", cfg.train.run)
        out["eval"] = eval_flow(config=cfg)
    return out


def run_pipeline(cfg: PipelineConfig, nproc: int = 1, train: bool = True, evaluate: bool = True,
                 runner: str | None = None, ray_address: str | None = None,
                 stage_factory: str = DEFAULT_FACTORY) -> dict[str, Any]:
    """Run :func:`pipeline_flow` (ephemeral API unless PREFECT_API_URL is set); ``{"ok": …}``."""
    with prefect_api():
        state = pipeline_flow(config=cfg, nproc=nproc, train=train, evaluate=evaluate, runner=runner,
                              ray_address=ray_address, stage_factory=stage_factory, return_state=True)
    out = flow_outcome(state)
    if out.get("ok"):
        print_outcome(out.get("prep") or {})
    else:
        print_outcome(out)
    return out
