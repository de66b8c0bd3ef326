"""``shardflow status`` and ``shardflow verify``: what the manifests say, and whether the bytes agree.

Both read only; neither needs Prefect. ``status`` classifies every shard of every stage the way a
run would plan it (done / pending / stale / failed / corrupt) but checks outputs by size only, so it
stays cheap on large roots; ``verify`` re-hashes every output recorded in a done manifest and every
tar shard listed in ``shards/index.json``, and returns the problems it found.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from shardflow.dataprep.stage import ShardSpec, Stage
from shardflow.dataprep.stages import DEFAULT_FACTORY, load_factory
from shardflow.flows import artifacts
from shardflow.storage import Storage
from shardflow.storage.manifest import ShardState, classify, list_records, verify_outputs

STATE_COLUMNS = ("done", "pending", "stale", "failed", "corrupt")
_STATE_NAME = {ShardState.DONE: "done", ShardState.MISSING: "pending", ShardState.STALE: "stale",
               ShardState.FAILED: "failed", ShardState.CORRUPT: "corrupt"}


def stage_status(stage: Stage, storage: Storage, deep: bool = False) -> dict[str, Any]:
    """One stage's shard states and totals from its manifest records."""
    row: dict[str, Any] = {"stage": stage.name, "shards": 0, **{c: 0 for c in STATE_COLUMNS},
                           "orphaned": 0, "docs_in": 0, "docs_out": 0, "tokens": 0, "failed_shards": [], "error": None}
    try:
        specs: list[ShardSpec] = stage.shards(storage)
    except Exception as exc:  # noqa: BLE001 - e.g. an input glob matching nothing: report, keep going
        row["error"] = f"{type(exc).__name__}: {exc}"
        specs = []
    records = list_records(storage, stage.name)
    config_digest = stage.config_digest()
    row["shards"] = len(specs)
    for spec in specs:
        rec = records.get(spec.shard_id)
        state = _STATE_NAME[classify(storage, rec, spec.input_digest, config_digest, deep=deep)]
        row[state] += 1
        if state == "failed":
            row["failed_shards"].append(spec.shard_id)
        if rec is not None and rec.status == "done":
            docs_in, docs_out = artifacts.docs_of(rec.counts)
            row["docs_in"] += docs_in
            row["docs_out"] += docs_out
            row["tokens"] += artifacts.tokens_of(rec.counts)
    row["orphaned"] = len(set(records) - {s.shard_id for s in specs})
    return row


def collect_status(cfg, stage_factory: str = DEFAULT_FACTORY, deep: bool = False) -> dict[str, Any]:
    storage = cfg.storage_handle()
    stages = load_factory(stage_factory)(cfg.prep)
    rows = [stage_status(s, storage, deep=deep) for s in stages]
    out: dict[str, Any] = {"root": storage.root, "stages": rows}
    if storage.exists("shards/index.json"):
        try:
            index = storage.read_json("shards/index.json")
            out["shards"] = {split: {"shards": len(sp.get("shards", [])), "samples": sp.get("samples", 0),
                                     "tokens": sp.get("tokens", 0)} for split, sp in sorted(index.get("splits", {}).items())}
        except Exception as exc:  # noqa: BLE001
            out["shards"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def format_status(status: dict[str, Any]) -> str:
    cols = ("stage", "shards", *STATE_COLUMNS, "docs_in", "docs_out", "tokens")
    rows = [[str(r[c]) for c in cols] for r in status["stages"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = [f"dataset root: {status['root']}",
             "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    for r in status["stages"]:
        if r["error"]:
            lines.append(f"{r['stage']}: cannot list shards: {r['error']}")
        if r["failed_shards"]:
            lines.append(f"{r['stage']}: failed shards {', '.join(r['failed_shards'][:20])} (see stages/{r['stage']}/_manifest/)")
        if r["orphaned"]:
            lines.append(f"{r['stage']}: {r['orphaned']} manifest record(s) for shards no longer in the plan")
    for split, info in sorted((status.get("shards") or {}).items()):
        if isinstance(info, dict):
            lines.append(f"shards/{split}: {info['shards']} tar shard(s), {info['samples']} samples, {info['tokens']} tokens")
        else:
            lines.append(f"shards/index.json: {info}")
    return "\n".join(lines)


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
        for shard_id, rec in sorted(list_records(storage, stage.name).items()):
            where = f"stage {stage.name} shard {shard_id}"
            if rec.status != "done":
                problems.append(f"{where}: last run failed: {(rec.error or '').splitlines()[0] if rec.error else 'no error recorded'}")
                continue
            checked += len(rec.outputs)
            problems.extend(f"{where}: {p}" for p in verify_outputs(storage, rec, deep=True))
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
