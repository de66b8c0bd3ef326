"""Plan a ``shardflow prep`` run before any Prefect server or flow starts.

Why: starting Prefect (an ephemeral API server, its database, the flow and task engines) costs
seconds, and a scheduled run over a corpus that did not change should cost almost nothing. So the
CLI first checks the request — the stage name, ``--shards``, the inputs — and turns a mistake into
one line naming it (exit code 2), then plans every selected stage from the manifests (metadata
only, see dataprep/stage.py). When every shard of every selected stage is done and no shard is to
be retired, the run is over: it says so and returns. Otherwise the flow starts and plans again
under the root lock (the manifests may have changed in between; the flow's plan is the one acted on).

This module imports neither Prefect nor torch (``python -X importtime`` shows the path).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from shardflow.dataprep.stage import Stage, orphans, plan
from shardflow.dataprep.stages import DEFAULT_FACTORY, load_factory, select_stages
from shardflow.storage.lock import RootLock
from shardflow.storage.manifest import list_records, record_session

from .errors import UserError


class RequestError(UserError):
    """The command asks for something that does not exist (a stage, a shard, an input)."""


@dataclass
class Preplan:
    stages: list[Stage]
    shards: list[str] | None
    work: dict[str, str] = field(default_factory=dict)  # stage -> what the next run does there
    up_to_date: int = 0
    wall_s: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not self.work


def resolve_shards(stages: list[Stage], specs_by_stage: dict[str, list], tokens: list[str] | None) -> list[str] | None:
    """``--shards`` tokens -> shard ids: an id, or an input file (path or name) of the first stage."""
    if not tokens:
        return None
    known = {s.shard_id for specs in specs_by_stage.values() for s in specs}
    first = specs_by_stage.get(stages[0].name, []) if stages else []
    out: list[str] = []
    for token in tokens:
        if token in known:
            out.append(token)
            continue
        matches = [s.shard_id for s in first for ref in s.inputs
                   if ref == token or ref.endswith("/" + token.lstrip("/"))]
        if not matches:
            sample = ", ".join(sorted(known)[:5]) or "none"
            raise RequestError(f"--shards: no shard {token!r} in stage(s) {', '.join(s.name for s in stages)} "
                               f"(shard ids look like {sample}; `shardflow status --json` lists them)")
        out.extend(matches)
    return sorted(dict.fromkeys(out))


def preplan(cfg: Any, stage: str = "all", shards: list[str] | None = None, force: bool = False, verify: bool = False,
            stage_factory: str = DEFAULT_FACTORY) -> Preplan:
    """Check the request and plan the selected stages; raise :class:`RequestError` on a bad one.

    Planning stops at the first stage with work: later stages read what it will produce, so
    their plan now would be a guess (``shardflow status`` shows that guess, with reasons).
    """
    t0 = time.perf_counter()
    try:
        stages = select_stages(load_factory(stage_factory)(cfg.prep), stage)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    storage = cfg.storage_handle()
    specs_by_stage: dict[str, list] = {}
    result = Preplan(stages, None)
    lock = RootLock(storage, purpose="shardflow prep", wait_s=cfg.flows.lock_wait_s, ttl_s=cfg.flows.lock_ttl_s)
    with lock, record_session():  # a plan may refresh fingerprints in records, so it writes like a run
        for i, st in enumerate(stages):
            if (force or result.work) and not shards:
                break
            try:
                specs_by_stage[st.name] = st.shards(storage)
            except FileNotFoundError as exc:  # a missing input (or an unreadable upstream)
                raise RequestError(str(exc)) from None
            if force or shards or result.work:
                continue
            specs = specs_by_stage[st.name]
            records = list_records(storage, st.name, update_index=True)  # we hold the lock
            gone = orphans(specs, records)
            planned = plan(st, storage, deep_verify=verify, specs=specs, records=records)
            todo = [p for p in planned if p.needs_work]
            if todo or gone:
                reasons: dict[str, int] = {}
                for p in todo:
                    reasons[p.reason] = reasons.get(p.reason, 0) + 1
                parts = [f"{n} {r}" for r, n in sorted(reasons.items())] + ([f"{len(gone)} to retire"] if gone else [])
                result.work[st.name] = ", ".join(parts)
            else:
                result.up_to_date += len(planned)
        result.shards = resolve_shards(stages, specs_by_stage, shards)
    if force:
        result.work["*"] = "--force"
    elif result.shards:
        result.work["*"] = f"--shards {','.join(result.shards)}"
    result.wall_s = time.perf_counter() - t0
    return result
