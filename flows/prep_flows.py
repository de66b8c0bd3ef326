"""Prefect flows of data preparation: one per stage (``prep-clean`` … ``prep-tokenize``) and ``prep``.

The flows are thin. For each stage, in pipeline order, they plan from the manifests
(:func:`shardflow.dataprep.stage.plan`, the only source of truth for what is done: Prefect's result
cache plays no part), submit ONE task per shard that needs work to the run's task runner, wait, and
publish the stage's table. A shard task calls :func:`shardflow.dataprep.stage.run_shard`, which
writes the outputs and then the manifest record; so a re-run after a crash, a deleted or corrupted
output, a changed input or a changed config redoes exactly the shards that need it.

A stage whose shards partly fail lets the others finish, publishes its table, and then the flow
fails naming the failed shards (Prefect 3 does not fail a flow because a task failed; we raise).
Later stages do not start: they read every upstream shard. Transient storage errors (connection
resets, timeouts, throttling, generic I/O errors) are retried with exponential backoff; data errors
(bad input, missing files, a stage's own exceptions) are not: a retry would fail the same way.

Task parameters are small and picklable: the stage name, the prep config, the shard spec, the
storage handle and the import path of the stage factory. The worker rebuilds the stage objects from
the config once per process, so compiled regexes and the like never cross process boundaries.
"""
from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stage import PlannedShard, ShardSpec, Stage, plan, retire_orphans
from shardflow.dataprep.stages import (
    DEFAULT_FACTORY,
    STAGE_GROUPS,
    ShardTaskError,
    is_transient,
    load_factory,
    run_named_shard,
    select_stages,
)
from shardflow.flows import artifacts
from shardflow.flows.runners import ShardRunner, prefect_api, shard_pool
from shardflow.storage import Storage
from shardflow.storage.lock import RootLock
from shardflow.storage.manifest import list_records, record_session

if TYPE_CHECKING:
    from shardflow.flows.config import PipelineConfig

# This module is what process-pool and Ray workers import to run a shard task (the task function and
# the flow object in the task's context live here), so it imports nothing heavier than dataprep:
# the pipeline config (which pulls in train/ and torch) is imported inside the functions that need
# it, and the flows take the config as ``Any`` (a PipelineConfig or its ``model_dump()``).


class StageFailed(RuntimeError):
    """Some shards of a stage failed; the message names the stage and the shards."""

    def __init__(self, stage: str, failed: dict[str, str], total: int):
        self.stage, self.failed, self.total = stage, dict(failed), total
        listed = "; ".join(f"{sid}: {msg}" for sid, msg in sorted(failed.items())[:10])
        more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
        super().__init__(f"stage {stage!r}: {len(failed)} of {total} shard(s) failed: {listed}{more}")


def resolve_config(config: Any, config_path: str | None, overrides: list[str] | None) -> PipelineConfig:
    """The run's config: given in-process (a PipelineConfig or its ``model_dump()``), or loaded
    from the deployment's file and overrides; a deployment without a file reads the file named by
    ``$SHARDFLOW_CONFIG`` where the run executes (the worker's environment), else the defaults."""
    from shardflow.flows.config import CONFIG_ENV, PipelineConfig, load_config

    if config is not None:
        if config_path or overrides:
            raise ValueError("pass either a config object or config_path/overrides, not both")
        return config if isinstance(config, PipelineConfig) else PipelineConfig.model_validate(config)
    return load_config(config_path or os.environ.get(CONFIG_ENV) or None, overrides or [])


def config_param(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as a flow parameter: plain data (secrets stay ``SecretStr``, masked in the API),
    so that workers unpickling a task's context need not import the config classes."""
    return cfg.model_dump()


# -- retry policy ---------------------------------------------------------------------------------

def retry_if_transient(task_obj, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a shard only on transient storage errors."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, ShardTaskError):
        return exc.transient
    return isinstance(exc, BaseException) and is_transient(exc)


def backoff(retries: int, delay_s: float) -> list[float]:
    """Exponential backoff: delay, 2×delay, 4×delay … (one entry per retry)."""
    return [round(delay_s * 2 ** i, 3) for i in range(max(retries, 0))] or [0.0]


# -- the shard task -------------------------------------------------------------------------------

@task(name="shard", cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage}-{spec.shard_id}")
def shard_task(stage: str, spec: ShardSpec, prep: PrepConfig, storage: Storage, factory: str = DEFAULT_FACTORY,
               pool: str | None = None) -> dict[str, Any]:
    """Process one shard (outputs, then its manifest record); returns the record's counters.

    ``pool``: run the shard body in that process pool of this process (the ``executor`` flavour of
    the process runner: the task itself is orchestrated from a thread), else right here.
    """
    if pool is None:
        return run_named_shard(factory, prep, stage, spec, storage)
    return shard_pool(pool).submit(run_named_shard, factory, prep, stage, spec, storage).result()


# -- one stage ------------------------------------------------------------------------------------

def _error_of(future) -> str:
    state = future.state
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = future.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001
            exc = e
    if isinstance(exc, ShardTaskError):
        return exc.message
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}"
    return state.message or state.name


def run_stage_tasks(stage: Stage, storage: Storage, cfg: PipelineConfig, runner, only: set[str] | None, force: bool,
                    factory: str, flow_label: str, verify: bool = False) -> dict[str, Any]:
    """Retire shards whose input is gone, plan one stage, run its pending shards as tasks on
    ``runner``, publish its table."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    with record_session():  # planning only: shard tasks write records from other threads/processes
        specs = stage.shards(storage)
        records = list_records(storage, stage.name)
        retired = retire_orphans(stage, storage, specs, records)
        if retired:
            logger.info("stage %s: retired %d shard(s) whose input is gone: %s", stage.name, len(retired),
                        ", ".join(retired[:10]) + (" ..." if len(retired) > 10 else ""))
            records = {k: v for k, v in records.items() if k not in retired}
        ids = {s.shard_id for s in specs}
        wanted = (only & ids) if only else None
        planned: list[PlannedShard] = plan(stage, storage, only=wanted or None,
                                           force=force if (not only or wanted) else False, deep_verify=verify,
                                           specs=specs, records=records)
    pending = [p for p in planned if p.needs_work]
    for p in pending[:20]:
        logger.info("stage %s shard %s: %s%s", stage.name, p.spec.shard_id, p.reason, f" ({p.detail})" if p.detail else "")
    states = {p.spec.shard_id: p.state.value for p in planned}
    by_state: dict[str, int] = {}
    for p in planned:
        by_state[p.state.value] = by_state.get(p.state.value, 0) + 1
    logger.info("stage %s: %d shard(s) %s; running %d", stage.name, len(specs),
                ", ".join(f"{n} {s}" for s, n in sorted(by_state.items())) or "-", len(pending))

    failed: dict[str, str] = {}
    ran: list[str] = []
    if pending:
        shard = shard_task.with_options(
            retries=cfg.flows.retries, retry_delay_seconds=backoff(cfg.flows.retries, cfg.flows.retry_delay_s),
            retry_condition_fn=retry_if_transient)
        progress = None
        if len(pending) >= cfg.flows.progress_min_shards:
            progress = artifacts.Progress(artifacts.artifact_key(cfg.name, flow_label, stage.name, "progress"), len(pending),
                                          f"{stage.name}: shards done of {len(pending)}")
        futures = {}
        for p in pending:
            fut = runner.submit(shard, {"stage": stage.name, "spec": p.spec, "prep": cfg.prep, "storage": storage,
                                        "factory": factory})
            futures[fut] = p.spec.shard_id
        for fut in as_completed(list(futures)):
            sid = futures[fut]
            fut.wait()  # sets the final state from the runner's own future (no API round trip)
            if fut.state.is_completed():
                ran.append(sid)
                states[sid] = "ran"
            else:
                failed[sid] = _error_of(fut)
                states[sid] = "failed"
                logger.error("stage %s shard %s failed: %s", stage.name, sid, failed[sid])
            if progress is not None:
                progress.advance()

    records = list_records(storage, stage.name, update_index=True)  # the lock holder keeps the index current
    rows = [artifacts.shard_row(sid, states.get(sid, "not selected"), records.get(sid)) for sid in sorted(ids)]
    table = artifacts.stage_table(rows)
    summary = artifacts.stage_summary(stage.name, table, ran=len(ran), skipped=len(planned) - len(pending),
                                      failed=sorted(failed), wall_s=time.perf_counter() - t0)
    summary["retired"] = retired
    summary["errors"] = dict(sorted(failed.items()))
    artifacts.publish_table(artifacts.artifact_key(cfg.name, flow_label, stage.name), table,
                            f"Stage {stage.name}: {len(ran)} shard(s) run, {summary['skipped']} up to date, {len(failed)} failed")
    if stage.name == "dedup_clusters":
        artifacts.publish_dedup_report(storage, flow_label, cfg.name)
    logger.info("stage %s: ran %d, up to date %d, failed %d, docs %d -> %d, tokens %d (%.1fs)", stage.name, len(ran),
                summary["skipped"], len(failed), summary["docs_in"], summary["docs_out"], summary["tokens"], summary["wall_s"])
    return summary


# -- the flows ------------------------------------------------------------------------------------

def _prep(selection: str | list[str], config: Any, config_path: str | None, overrides: list[str] | None,
          shards: list[str] | None, force: bool, runner: str | None, ray_address: str | None, stage_factory: str,
          flow_label: str, verify: bool = False) -> dict[str, Any]:
    cfg = resolve_config(config, config_path, overrides)
    logger = get_run_logger()
    storage = cfg.storage_handle()
    stages = select_stages(load_factory(stage_factory)(cfg.prep), selection)
    only = {str(s) for s in shards} if shards else None
    kind = runner or cfg.flows.runner
    summaries: list[dict[str, Any]] = []
    error: StageFailed | None = None
    t0 = time.perf_counter()
    from shardflow.flows.config import write_resolved

    with RootLock(storage, purpose=f"shardflow {flow_label}", wait_s=cfg.flows.lock_wait_s, ttl_s=cfg.flows.lock_ttl_s) as lock:
        write_resolved(cfg, storage)
        if only and stages:
            known = {s.shard_id for s in stages[0].shards(storage)}
            unknown = sorted(only - known)
            if unknown:
                raise ValueError(f"stage {stages[0].name!r} has no shard(s) {unknown}; known: {sorted(known)[:20]}")
        shard_runner = ShardRunner(kind, cfg.prep.workers, ray_address or cfg.flows.ray_address, cfg.flows.process_pool)
        logger.info("%s: stages %s on %s, runner %s", flow_label, [s.name for s in stages], storage.root,
                    shard_runner.describe())
        with shard_runner as task_runner:
            for stage in stages:
                lock.ensure_held()  # a run whose lease was lost or taken over starts no further stage
                summary = run_stage_tasks(stage, storage, cfg, task_runner, only, force, stage_factory, flow_label, verify)
                summaries.append(summary)
                if summary["failed"]:
                    error = StageFailed(stage.name, summary["errors"], summary["ran"] + len(summary["failed"]))
                    break
    artifacts.publish_markdown(artifacts.artifact_key(cfg.name, flow_label, "summary"),
                               artifacts.summary_markdown(f"shardflow {flow_label}: {storage.root}", summaries,
                                                          str(error) if error else None),
                               f"Data preparation summary ({flow_label})")
    _publish_status(cfg, stage_factory, flow_label, logger)
    if error is not None:
        raise error
    return {"ok": True, "stages": summaries, "wall_s": round(time.perf_counter() - t0, 2)}


def _publish_status(cfg: PipelineConfig, stage_factory: str, flow_label: str, logger) -> None:
    """The ``status`` table after the run (what a next run would do, and why) as an artifact."""
    from shardflow.flows.status import collect_status, status_markdown

    try:
        status = collect_status(cfg, stage_factory)
    except Exception as exc:  # noqa: BLE001 - a status view never fails a run
        logger.warning("cannot build the status artifact: %s: %s", type(exc).__name__, exc)
        return
    artifacts.publish_markdown(artifacts.artifact_key(cfg.name, flow_label, "status"), status_markdown(status), "Status after this run: what the next run would do")


@flow(name="prep", log_prints=True)
def prep_flow(config: Any = None, config_path: str | None = None, overrides: list[str] | None = None,
              stages: list[str] | None = None, shards: list[str] | None = None, force: bool = False,
              runner: str | None = None, ray_address: str | None = None,
              stage_factory: str = DEFAULT_FACTORY, verify: bool = False) -> dict[str, Any]:
    """Every data-preparation stage in order (or the ``stages`` named), shard-resumable.

    ``verify``: re-hash every input and output while planning instead of trusting fingerprints."""
    return _prep(stages or "all", config, config_path, overrides, shards, force, runner, ray_address, stage_factory, "prep",
                 verify)


def _stage_flow(group: str):
    def stage_flow(config: Any = None, config_path: str | None = None,
                   overrides: list[str] | None = None, shards: list[str] | None = None, force: bool = False,
                   runner: str | None = None, ray_address: str | None = None,
                   stage_factory: str = DEFAULT_FACTORY, verify: bool = False) -> dict[str, Any]:
        return _prep(group, config, config_path, overrides, shards, force, runner, ray_address, stage_factory,
                     f"prep-{group}", verify)

    stage_flow.__name__ = stage_flow.__qualname__ = f"prep_{group}_flow"
    stage_flow.__doc__ = f"The {group!r} stage ({', '.join(STAGE_GROUPS[group])}), shard-resumable."
    return flow(name=f"prep-{group}", log_prints=True)(stage_flow)


STAGE_FLOWS = {group: _stage_flow(group) for group in STAGE_GROUPS}
prep_clean_flow = STAGE_FLOWS["clean"]
prep_filter_flow = STAGE_FLOWS["filter"]
prep_dedup_flow = STAGE_FLOWS["dedup"]
prep_tokenizer_flow = STAGE_FLOWS["tokenizer"]
prep_tokenize_flow = STAGE_FLOWS["tokenize"]


def flow_outcome(state) -> dict[str, Any]:
    """A finished flow's state as ``{"ok", "flow_run_id", ...result | "error"}``."""
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    if state.is_completed():
        result = state.result()
        out = dict(result) if isinstance(result, dict) else {"result": result}
        out.setdefault("ok", True)
        out["flow_run_id"] = flow_run_id
        return out
    exc = state.result(raise_on_failure=False)
    msg = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else (state.message or state.name)
    return {"ok": False, "error": msg, "flow_run_id": flow_run_id, "state": state.name}


def run_prep(cfg: PipelineConfig, stage: str = "all", shards: list[str] | None = None, force: bool = False,
             runner: str | None = None, ray_address: str | None = None,
             stage_factory: str = DEFAULT_FACTORY, verify: bool = False) -> dict[str, Any]:
    """``shardflow prep <stage>``: run the stage's flow (or ``prep`` for ``all`` / a single stage name)."""
    params = dict(config=config_param(cfg), shards=shards, force=force, runner=runner, ray_address=ray_address,
                  stage_factory=stage_factory, verify=verify)
    with prefect_api():
        if stage in STAGE_FLOWS:
            state = STAGE_FLOWS[stage](**params, return_state=True)
        else:
            state = prep_flow(**params, stages=None if stage == "all" else [stage], return_state=True)
    out = flow_outcome(state)
    print_outcome(out)
    return out


def print_outcome(out: dict[str, Any]) -> None:
    for s in out.get("stages", []):
        print(f"{s['stage']:<18} ran {s['ran']:>5}  up-to-date {s['skipped']:>5}  failed {len(s['failed']):>3}  "
              f"docs {s['docs_in']:>9} -> {s['docs_out']:>9}  tokens {s['tokens']:>11}  {s['wall_s']:.1f}s")
    if not out.get("ok", True):
        print(f"error: {out.get('error')}", file=sys.stderr)
