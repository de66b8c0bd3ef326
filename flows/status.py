"""``shardflow status`` and ``shardflow verify``: what the next run will do, and whether the bytes agree.

Both read only; neither needs Prefect. ``status`` plans every stage the way a run would
(:func:`shardflow.dataprep.stage.plan`, metadata only: fingerprints, re-hashing only what changed)
and then carries the consequences downstream, because a run redoes the dependants of whatever it
redoes: a shard whose upstream shard will be redone is ``stale`` with reason ``upstream changed``,
a shard whose upstream shard does not exist yet is ``pending`` (``missing``), and every shard of a
global stage (tokenizer, pack, dedup buckets/clusters) is stale as soon as anything upstream will
change. Each shard needing work has one reason: input changed, config changed, upstream changed,
missing, failed, corrupt (or selected, for ``--shards``/``--force``). ``verify`` re-hashes every
output recorded in a done manifest and every tar shard listed in ``shards/index.json``, and returns
the problems it found.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from shardflow.dataprep.stage import PlannedShard, Reason, ShardSpec, Stage, orphans, plan
from shardflow.dataprep.stages import DEFAULT_FACTORY, load_factory
from shardflow.flows import artifacts
from shardflow.storage import Storage
from shardflow.storage.manifest import ShardState, StatCache, list_records, record_session, verify_outputs

STATE_COLUMNS = ("done", "pending", "stale", "failed", "corrupt")
_STATE_NAME = {ShardState.DONE: "done", ShardState.MISSING: "pending", ShardState.STALE: "stale",
               ShardState.FAILED: "failed", ShardState.CORRUPT: "corrupt"}
ALL = None
"""Upstream "everything may change" (a global stage upstream will be redone)."""


def is_per_shard(stage: Stage, ids: set[str], known: set[str]) -> bool:
    """Whether a stage has one shard per upstream shard (same ids) rather than global shards.

    A stage may say so (``per_shard = True/False``); otherwise its ids are compared with the
    per-shard ids seen upstream.
    """
    declared = getattr(stage, "per_shard", None)
    if declared is not None:
        return bool(declared)
    return bool(ids & known)


def stage_status(stage: Stage, storage: Storage, deep: bool = False, upstream: set[str] | None = frozenset(),
                 known: set[str] = frozenset(), new_only: bool = False) -> tuple[dict[str, Any], set[str] | None, set[str], bool]:
    """One stage's row, the set of its shard ids the next run will redo (ALL = None for a global
    stage that will run), the shard ids of this stage if it is per-shard (else ``known``) and
    whether every shard to redo is a new one.

    ``upstream``: shard ids the previous stage will redo (ALL: every shard may change);
    ``known``: ids of the nearest per-shard stage upstream (to predict shards not listed yet);
    ``new_only``: the upstream shards to redo are all new ones, so a global stage that appends
    (``appends``: incremental dedup) leaves the earlier shards after it as they are.
    """
    row: dict[str, Any] = {"stage": stage.name, "shards": 0, **{c: 0 for c in STATE_COLUMNS}, "orphaned": 0,
                           "docs_in": 0, "docs_out": 0, "tokens": 0, "failed_shards": [], "reasons": {},
                           "work": [], "error": None}
    try:
        specs: list[ShardSpec] = stage.shards(storage)
    except Exception as exc:  # noqa: BLE001 - e.g. an input glob matching nothing: report, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"
        specs = []
    records = list_records(storage, stage.name)
    try:
        planned: list[PlannedShard] = plan(stage, storage, deep_verify=deep, refresh=False, specs=specs, records=records)
    except Exception as exc:  # noqa: BLE001
        row["error"] = row["error"] or f"{type(exc).__name__}: {exc}"
        planned = []
    ids = {p.spec.shard_id for p in planned}
    per_shard = is_per_shard(stage, ids | set(records), known) if (ids or records) else bool(getattr(stage, "per_shard", False))
    upstream_all = upstream is ALL
    upstream_ids = set() if upstream_all else set(upstream)
    frozen = bool(getattr(stage, "frozen", False))  # stays done while upstream changes (tokenizer)
    rows: list[tuple[str, str, str, str]] = []  # (shard, state, reason, detail)
    for p in planned:
        state, reason, detail = _STATE_NAME[p.state], p.reason, p.detail
        if p.state is ShardState.DONE and not frozen and (upstream_all or (per_shard and p.spec.shard_id in upstream_ids)
                                                          or (not per_shard and upstream_ids)):
            state, reason = "stale", Reason.UPSTREAM
        rows.append((p.spec.shard_id, state, reason, detail))
        rec = p.record
        if rec is not None and rec.status == "done":
            docs_in, docs_out = artifacts.docs_of(rec.counts)
            row["docs_in"] += docs_in
            row["docs_out"] += docs_out
            row["tokens"] += artifacts.tokens_of(rec.counts)
    # Shards the next run will create once upstream has produced them.
    if per_shard:
        future = (known if upstream_all else upstream_ids) - ids
        rows.extend((sid, "pending", Reason.MISSING, "upstream not done yet") for sid in sorted(future))
    elif not planned and (upstream_all or upstream_ids):
        rows.append(("(all)", "pending", Reason.MISSING, "upstream not done yet"))
    row["shards"] = len(rows)
    for sid, state, reason, detail in rows:
        row[state] += 1
        if state == "failed":
            row["failed_shards"].append(sid)
        if state != "done":
            row["reasons"][reason] = row["reasons"].get(reason, 0) + 1
            row["work"].append({"shard": sid, "state": state, "reason": reason, **({"detail": detail} if detail else {})})
    row["orphaned"] = len(orphans(specs, records))
    redo = {sid for sid, state, _, _ in rows if state != "done"}
    if not per_shard:
        # A global stage that reruns may change everything after it, unless it only appends for
        # new shards; one that stays done passes the per-shard changes before it on (tokenize
        # depends on dedup's shards and on the tokenizer).
        if redo and not (getattr(stage, "appends", False) and new_only and upstream is not ALL):
            return row, ALL, known, False
        return row, upstream, known, new_only
    new = {sid for sid, state, reason, _ in rows if state != "done" and reason == Reason.MISSING}
    return row, redo, ids | {sid for sid, *_ in rows}, redo == new


def collect_status(cfg, stage_factory: str = DEFAULT_FACTORY, deep: bool = False) -> dict[str, Any]:
    storage = cfg.storage_handle()
    stages = load_factory(stage_factory)(cfg.prep)
    rows = []
    upstream: set[str] | None = set()
    known: set[str] = set()
    new_only = False
    with record_session():  # read-only: each record is read once however many stages list it
        for stage in stages:
            row, upstream, known, new_only = stage_status(stage, storage, deep, upstream, known, new_only)
            rows.append(row)
    out: dict[str, Any] = {"root": storage.root, "stages": rows,
                           "next_run": {r["stage"]: r["reasons"] for r in rows if r["reasons"] or r["orphaned"]}}
    if storage.exists("shards/index.json"):
        try:
            index = storage.read_json("shards/index.json")
            out["shards"] = {split: {"shards": len(sp.get("shards", [])), "samples": sp.get("samples", 0),
                                     "tokens": sp.get("tokens", 0)} for split, sp in sorted(index.get("splits", {}).items())}
        except Exception as exc:  # noqa: BLE001
            out["shards"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _next_run(r: dict[str, Any]) -> str:
    parts = [f"{n} {reason}" for reason, n in sorted(r["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))]
    if r["orphaned"]:
        parts.append(f"{r['orphaned']} retired (input gone)")
    return "; ".join(parts) if parts else "nothing"


def format_status(status: dict[str, Any]) -> str:
    cols = ("stage", "shards", *STATE_COLUMNS, "docs_in", "docs_out", "tokens")
    rows = [[str(r[c]) for c in cols] + [_next_run(r)] for r in status["stages"]]
    cols = (*cols, "next run")
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def line(values):
        return "  ".join(v.ljust(w) if i in (0, len(cols) - 1) else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    lines = [f"dataset root: {status['root']}", line(cols)]
    lines.extend(line(r) for r in rows)
    for r in status["stages"]:
        if r["error"]:
            lines.append(f"{r['stage']}: cannot list shards: {r['error']}")
        if r["failed_shards"]:
            lines.append(f"{r['stage']}: failed shards {', '.join(r['failed_shards'][:20])} (see stages/{r['stage']}/_manifest/)")
        if r["orphaned"]:
            lines.append(f"{r['stage']}: {r['orphaned']} manifest record(s) for shards no longer in the plan (retired by the next run)")
    for split, info in sorted((status.get("shards") or {}).items()):
        if isinstance(info, dict):
            lines.append(f"shards/{split}: {info['shards']} tar shard(s), {info['samples']} samples, {info['tokens']} tokens")
        else:
            lines.append(f"shards/index.json: {info}")
    todo = [r for r in status["stages"] if r["reasons"] or r["orphaned"]]
    lines.append("next run: nothing to do" if not todo else
                 "next run: " + ", ".join(f"{r['stage']} ({_next_run(r)})" for r in todo))
    return "\n".join(lines)


def status_markdown(status: dict[str, Any]) -> str:
    """The status table as markdown (the ``status`` artifact of a prep run)."""
    cols = ("stage", "shards", *STATE_COLUMNS, "next run")
    out = [f"**Dataset root** `{status['root']}`", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in status["stages"]:
        out.append("| " + " | ".join([*(str(r[c]) for c in cols[:-1]), _next_run(r)]) + " |")
    return "\n".join(out) + "\n"


def print_status(cfg, as_json: bool = False, stage_factory: str = DEFAULT_FACTORY) -> dict[str, Any]:
    """Print the per-stage table (or JSON) and return it."""
    status = collect_status(cfg, stage_factory)
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return status


def verify(cfg, stage_factory: str = DEFAULT_FACTORY, out=None) -> list[str]:
    """Re-hash every recorded output and every indexed tar shard; print and return the problems."""
    out = out or sys.stdout
    storage = cfg.storage_handle()
    problems: list[str] = []
    checked = 0
    for stage in load_factory(stage_factory)(cfg.prep):
        stats = StatCache(storage)  # one listing per output folder of the stage
        for shard_id, rec in sorted(list_records(storage, stage.name).items()):
            where = f"stage {stage.name} shard {shard_id}"
            if rec.status != "done":
                problems.append(f"{where}: last run failed: {(rec.error or '').splitlines()[0] if rec.error else 'no error recorded'}")
                continue
            checked += len(rec.outputs)
            problems.extend(f"{where}: {p}" for p in verify_outputs(storage, rec, deep=True, stats=stats))
    problems.extend(_verify_index(storage))
    for p in problems:
        print(f"PROBLEM {p}", file=out)
    n_tar = _count_indexed(storage)
    print(f"verify: {checked} stage output(s) and {n_tar} tar shard(s) checked under {storage.root}: "
          f"{len(problems) or 'no'} problem(s)", file=out)
    return problems


def _count_indexed(storage: Storage) -> int:
    try:
        index = storage.read_json("shards/index.json")
    except (FileNotFoundError, ValueError):
        return 0
    return sum(len(sp.get("shards", [])) for sp in index.get("splits", {}).values())


def _verify_index(storage: Storage) -> list[str]:
    if not storage.exists("shards/index.json"):
        return []
    from shardflow.storage.shards import ShardIndexError, read_index, verify_shard

    try:
        index = read_index(storage)
    except ShardIndexError as exc:
        return [f"shards/index.json: {exc}"]
    problems = []
    listed = set()
    for split, sp in sorted(index["splits"].items()):
        for entry in sp["shards"]:
            listed.add(entry["name"])
            problems.extend(f"shards/{split}: {p}" for p in verify_shard(storage, entry, deep=True))
    for name in storage.list("shards", suffix=".tar"):
        if name not in listed:
            problems.append(f"shards/{name}: tar shard not listed in shards/index.json")
    return problems
