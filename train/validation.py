"""The validation rows: one reader for the trainer's validation loss and evaluation's perplexity.

Why one reader: the trainer's periodic ``val_loss`` and ``shardflow eval``'s perplexity must score
the same tokens, or two numbers of the same checkpoint disagree for no reason the user can see
(they did: 5.57 vs 5.55, when the trainer read shuffled val batches through the training loader
and evaluation read them in index order). Both now read the first rows of the val split in index
order (shard, member, row); which rows is decided by the row budget alone, never by the batch size
or the number of ranks that share the work.

Why index order rather than the training loader: the loader shuffles and cuts epoch tails to
world-size multiples; a validation figure wants every row once, in a fixed order, so that two
checkpoints are scored on the very same tokens.

How ranks share the rows: global batch ``g`` holds rows ``[g*B*w, (g+1)*B*w)`` of the (capped)
stream and rank ``r`` of ``w`` takes the ``r``-th of ``w`` near-equal contiguous parts of it. Every
rank therefore runs the same number of forward passes (FSDP and expert parallelism need every rank
in every forward); a last global batch with fewer rows than ranks is left out.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from shardflow.storage import Storage
from shardflow.storage.shards import read_member_rows


def val_rows_total(index: dict[str, Any]) -> int:
    return int(sum(m["rows"] for shard in index["splits"].get("val", {}).get("shards", []) for m in shard["members"]))


def read_val_rows(storage: Storage, index: dict[str, Any], start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the val split in index order, ``(stop - start, seq_len + 1)``."""
    seq_len, dtype = index["seq_len"], index["dtype"]
    parts: list[np.ndarray] = []
    row0 = 0
    for shard in index["splits"].get("val", {}).get("shards", []):
        for member in shard["members"]:
            lo, hi = max(start, row0), min(stop, row0 + member["rows"])
            if lo < hi:
                parts.append(read_member_rows(storage, shard, member, lo - row0, hi - row0, seq_len, dtype))
            row0 += member["rows"]
            if row0 >= stop:
                break
        if row0 >= stop:
            break
    if not parts:
        return np.empty((0, seq_len + 1), dtype=np.dtype(dtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def val_batches(storage: Storage, index: dict[str, Any], batch_size: int, max_batches: int,
                rank: int = 0, world_size: int = 1) -> Iterator[np.ndarray]:
    """This rank's part of each of the first ``max_batches`` global val batches (``batch_size`` rows
    per rank), in the shards' dtype. The rows all ranks read together are the first
    ``min(val rows, max_batches * batch_size * world_size)`` rows of the split."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"batch_size must be positive and rank in [0, {world_size}), got {batch_size}, {rank}")
    n = min(val_rows_total(index), max(0, max_batches) * batch_size * world_size)
    step = batch_size * world_size
    for g in range(0, n, step):
        rows = min(step, n - g)
        if rows < world_size:
            return  # some rank would have nothing to score: leave the tail out (see the module docstring)
        yield read_val_rows(storage, index, g + rank * rows // world_size, g + (rank + 1) * rows // world_size)
