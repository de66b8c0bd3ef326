"""Append mode of the cluster phase: new input shards are deduplicated against what was kept.

When the only change since the last ``dedup_clusters`` run is that input shards were *added*
(every earlier shard still has the signature digest recorded in ``dedup/state.json``, and the
config is the same), the cluster phase does not re-cluster the corpus:

- the earlier shards' drop lists are kept as they are (same bytes, so their ``dedup`` shards are
  not redone), and every document they kept stays kept;
- only LSH groups holding a new document are considered, without the documents removed earlier;
  the kept earlier documents in them are fixed centres ranked before all new documents, so a new
  document is removed only in favour of an earlier kept document or a new one it is itself
  verified similar to, and earlier documents are never re-verified against each other;
- drop lists are written for the new shards only.

Work is proportional to what arrived: signatures are computed for the new shards only (their
stage is per shard), verification reads only the documents at the ends of pairs that involve a
new document. What still scales with the corpus is reading key columns — the bucket phase reads
every signature file's band columns (about 8 bytes per band per document, no text) and this
phase reads the bucket files' candidate groups.

Where it differs from a full recompute on the union (``incremental: full``): a new document that
would rank before, or be more similar to a third document than, an earlier survivor cannot take
its place — the earlier survivor stays and the new one is removed in its favour if similar
enough. The set of new documents removed is the same whenever every earlier survivor would also
survive the full recompute.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from shardflow.storage import Storage
from shardflow.storage.jsonl import read_parquet_if_intact
from shardflow.storage.manifest import check_outputs, read_record

from .dedup_common import CLUSTERS, FORMAT_VERSION, GLOBAL_SHARD, STATE_REF, dumps, prefetched
from .dedup_graph import Groups


def previous_state(storage: Storage, config_digest: str, sigs: dict[str, str]) -> dict[str, Any] | None:
    """The last cluster run's state if this run may append to it (see the module docstring),
    else None (a full run). ``sigs``: shard -> signature digest of this run."""
    rec = read_record(storage, CLUSTERS, GLOBAL_SHARD)
    if rec is None or rec.status != "done" or "state" not in rec.outputs or not storage.exists(STATE_REF):
        return None
    state = storage.read_json(STATE_REF)
    if state.get("format") != FORMAT_VERSION or state.get("config") != config_digest:
        return None
    old = state.get("shards") or {}
    if not old or any(sigs.get(s) != dg for s, dg in old.items()) or set(sigs) == set(old):
        return None                  # a shard changed or went away, or nothing was added
    drops = {f"drops.{s}": rec.outputs.get(f"drops.{s}") for s in old}
    if any(out is None for out in drops.values()):
        return None
    # The manifest's own check: one listing of the folder, a re-hash only where a fingerprint
    # changed; a drop list gone or rewritten since means a full run decides afresh.
    problems, refreshed = check_outputs(storage, rec.model_copy(update={"outputs": drops}))
    if problems:
        return None
    drops = {name[len("drops."):]: out for name, out in (refreshed or drops).items()}
    return {"shards": old, "drops": drops, "dropped_total": int(state.get("dropped_total", 0))}


def write_state(storage: Storage, config_digest: str, sigs: dict[str, str], dropped_total: int) -> str:
    storage.write_bytes(STATE_REF, dumps({"format": FORMAT_VERSION, "config": config_digest,
                                          "shards": dict(sorted(sigs.items())), "dropped_total": dropped_total}))
    return STATE_REF


def earlier_drops(storage: Storage, nodes: np.ndarray, shards: list[str], prev: dict[str, Any]) -> np.ndarray:
    """Mask of ``nodes`` (shard ordinal << 32 | idx codes) removed by an earlier run; reads the drop
    lists of only the earlier shards that have candidate nodes."""
    dropped = np.zeros(len(nodes), dtype=bool)
    ordinals = (nodes >> np.uint64(32)).astype(np.int64)
    earlier = [o for o in np.unique(ordinals).tolist() if prev["drops"].get(shards[o]) is not None]
    read = lambda o: read_parquet_if_intact(storage, prev["drops"][shards[o]].ref,  # noqa: E731
                                            prev["drops"][shards[o]].digest, ["idx"])
    for o, table in prefetched(read, earlier):
        out = prev["drops"][shards[o]]
        if table is None:
            raise RuntimeError(f"{storage.uri(out.ref)} changed since the last dedup_clusters run: "
                               f"re-run with prep.dedup.incremental=full")
        idx = table.column("idx").to_numpy().astype(np.uint64)
        dropped |= np.isin(nodes, (np.uint64(o) << np.uint64(32)) | idx)
    return dropped


def restrict_to_new(groups: Groups, is_new: np.ndarray, dropped: np.ndarray) -> tuple[Groups, np.ndarray]:
    """The groups that still have two members once earlier-removed documents are left out and
    that hold a new document; nodes renumbered. Returns them and the new-document mask."""
    gid = np.repeat(np.arange(len(groups.sizes)), groups.sizes)
    ok = ~dropped[groups.members]
    count = np.bincount(gid, weights=ok, minlength=len(groups.sizes))
    has_new = np.bincount(gid, weights=ok & is_new[groups.members], minlength=len(groups.sizes)) > 0
    keep_group = (count >= 2) & has_new
    keep = ok & keep_group[gid]
    members = groups.members[keep]
    sizes = count[keep_group].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(sizes) else np.zeros(0, np.int64)
    used = np.unique(members)
    restricted = Groups(groups.nodes[used], np.searchsorted(used, members).astype(np.int64), starts, sizes,
                        groups.exact[keep_group])
    return restricted, is_new[used]
