"""Append-only packing: token streams that arrived since the last pack go into new tars.

Why: pack is one global shard, so every new input file used to redo it whole — re-read every
token stream and rewrite every tar. On an object store that repack alone cost 42 of the 66 s an
append of 1 % of the files took (bench/reprocess.py), and it rewrites tars a training run may be
reading. An append reads only the new streams, writes tars numbered after the earlier ones and
republishes ``index.json`` with the earlier entries first, unchanged.

What it gives up, deliberately: a from-scratch pack of the union interleaves the new streams by
shard id and fills the last tar of each split, so the tars are not byte-identical to it (the
tokens are the same; docs/architecture.md). Each append leaves at most one short tar per split;
``--force`` on an up-to-date pack, or ``prep.tokenize.pack_incremental: repack``, compacts.

An append is taken only when it is exactly "the same pack plus new streams": the previous pack
record is done under the same pack config and tokenizer, every stream it packed is still there
with the same digest, its outputs still match their fingerprints, and the index it wrote is the
one in place. Anything else repacks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shardflow.storage import Storage
from shardflow.storage.manifest import OutputRef, ShardRecord, check_outputs
from shardflow.storage.shards import INDEX_REF, SPLITS, ShardIndexError, read_index

_NUMBER = re.compile(r"^([a-z]+)-(\d+)\.tar$")


@dataclass
class AppendPlan:
    index: dict[str, Any]
    """The index in place: its entries are kept and come first."""
    new_streams: list[str]
    """Stream refs to pack, in shard-id order (the refs sort by shard id)."""
    kept: dict[str, OutputRef]
    """The previous record's tar outputs, verified by fingerprint, carried over unchanged."""
    counts: dict[str, int]
    """The previous counts: an append adds to them."""

    def next_number(self, split: str) -> int:
        numbers = [int(m.group(2)) for e in self.index["splits"].get(split, {}).get("shards", [])
                   if (m := _NUMBER.match(e["name"])) and m.group(1) == split]
        return max(numbers, default=-1) + 1


def plan_append(storage: Storage, previous: ShardRecord | None, inputs: dict[str, str], config_digest: str,
                model_digest: str, model_ref: str) -> tuple[AppendPlan | None, str]:
    """``(plan, "")`` when only new streams were added since ``previous``, else ``(None, why not)``."""
    if previous is None or previous.status != "done":
        return None, "no earlier pack"
    if previous.config_digest != config_digest:
        return None, "the pack config changed"
    if previous.inputs.get(model_ref) != model_digest or inputs.get(model_ref) != model_digest:
        return None, "the tokenizer changed"
    for ref, digest in previous.inputs.items():
        if ref == model_ref:
            continue
        if ref not in inputs:
            return None, f"stream {ref} is gone"
        if not digest or inputs[ref] != digest:
            return None, f"stream {ref} changed"
    new = sorted(ref for ref in inputs if ref not in previous.inputs)
    if not new:
        return None, "no new stream"
    if any(not inputs[ref] for ref in new):
        return None, "a new stream is not tokenized yet"
    problems, _ = check_outputs(storage, previous)
    if problems:
        return None, f"earlier output changed: {problems[0]}"
    try:
        index = read_index(storage)
    except ShardIndexError as exc:
        return None, str(exc)
    listed = {e["name"] for split in index["splits"].values() for e in split["shards"]}
    tars = {name for name in previous.outputs if name != "index"}
    if listed != tars or index.get("tokenizer_digest") != model_digest or set(index["splits"]) - set(SPLITS):
        return None, f"{storage.uri(INDEX_REF)} is not the one the earlier pack wrote"
    kept = {name: out for name, out in previous.outputs.items() if name != "index"}
    return AppendPlan(index, new, kept, dict(previous.counts)), ""


def merge_counts(before: dict[str, int], added: dict[str, int]) -> dict[str, int]:
    """Counters of the whole pack after an append (every pack counter is a sum over streams or tars)."""
    out = dict(before)
    for key, value in added.items():
        out[key] = out.get(key, 0) + int(value)
    return dict(sorted(out.items()))
