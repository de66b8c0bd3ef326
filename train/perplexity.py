"""Perplexity: over the validation rows, and per source over re-tokenized held-out documents.

Why per-source perplexity re-tokenizes documents: the shards are packed token rows with no record
of which document (or source) a token came from. The held-out documents (``eval_data``) are
encoded with the run's tokenizer and packed per source exactly as the pack stage packs them.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shardflow.storage import Storage

from .expert_stats import ExpertStats, collecting
from .model import IGNORE_INDEX, MoETransformer
from .validation import val_batches


@torch.no_grad()
def batch_nll(model: MoETransformer, rows: torch.Tensor, stats: ExpertStats | None = None) -> tuple[float, int]:
    """(sum of token NLL in nats, number of target tokens) for rows ``[B, S+1]``; -100 targets ignored."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    out = model(inputs)
    if stats is not None:
        stats.add_output(out.expert_counts, out.dropped_tokens)
    nll = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll), int((targets != IGNORE_INDEX).sum())


def _ppl(nll: float, tokens: int) -> dict[str, Any]:
    loss = nll / tokens if tokens else math.nan
    return {"loss": loss, "ppl": math.exp(loss) if tokens and loss < 700 else math.nan, "tokens": tokens}


def val_perplexity(model, storage: Storage, index, batch_size, max_batches, device, stats: ExpertStats | None = None) -> dict[str, Any]:
    """Token-weighted loss and perplexity over the first ``max_batches`` batches of validation rows
    (:func:`shardflow.train.validation.val_batches`, the rows the trainer's val loss reads)."""
    nll = 0.0
    tokens = batches = rows = 0
    ctx = collecting(stats) if stats is not None else contextlib.nullcontext()
    with ctx:
        for arr in val_batches(storage, index, batch_size, max_batches):
            t = torch.from_numpy(arr.astype(np.int64)).to(device)
            n, k = batch_nll(model, t, stats)
            nll += n
            tokens += k
            batches += 1
            rows += arr.shape[0]
    return {**_ppl(nll, tokens), "batches": batches, "sequences": rows}


def pack_rows(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Rows of ``seq_len + 1`` tokens as the pack stage cuts them; a short tail row is kept (padded
    with -100 targets by the caller) so a small source still counts all its tokens."""
    row = seq_len + 1
    out = [stream[i:i + row] for i in range(0, len(stream) - 1, row)]
    return [r for r in out if len(r) > 1]


def source_perplexity(model, sp, docs: list[tuple[str, str, str]], seq_len: int, doc_prefix: list[int], eos_id: int,
                      batch_size: int, max_batches: int, device) -> dict[str, dict[str, Any]]:
    """Token-weighted perplexity per source over held-out documents packed like the pack stage."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for _, text, source in docs:  # docs are sorted by id: the order is fixed
        by_source[source].append(text)
    out = {}
    for source in sorted(by_source):
        texts = by_source[source]
        ids = sp.encode(texts, out_type=int)
        # A leading EOS puts the first document in the same position as every other: after one.
        stream_parts = [[eos_id]] + [doc_prefix[1:] + x + [eos_id] for x in ids]
        stream = np.fromiter((t for p in stream_parts for t in p), dtype=np.int64)
        rows = pack_rows(stream, seq_len)[: max_batches * batch_size]
        nll, tokens = 0.0, 0
        for b in range(0, len(rows), batch_size):
            chunk = rows[b:b + batch_size]
            width = max(len(r) for r in chunk)
            t = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(chunk):
                t[i, : len(r)] = torch.from_numpy(r)
            inputs = t[:, :-1].clone()
            inputs[inputs == IGNORE_INDEX] = eos_id  # any valid id: padding comes after, never a target
            with torch.no_grad():
                logits = model(inputs.to(device)).logits.float()
            targets = t[:, 1:].to(device)
            nll += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
        out[source] = {**_ppl(nll, tokens), "docs": len(texts)}
    return out
