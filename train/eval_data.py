"""What evaluation reads besides the model: the data checks, the split settings, the held-out documents.

Why held-out documents are read at all: per-source perplexity and the generated tasks need text,
and the shards hold only packed tokens. The held-out documents are found again in the documents the
tokenize stage read (its manifest inputs, else ``stages/dedup/``) with the stage's own split rule,
:func:`shardflow.storage.doc_split.doc_split`, so they are exactly the documents training never saw.
Everything here reads the on-disk contract through ``shardflow.storage``, never dataprep.
"""
from __future__ import annotations

import random
from typing import Any

from shardflow.storage import Storage
from shardflow.storage.doc_split import (
    DEFAULT_ADD_BOS,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VAL_FRACTION,
    doc_split,
    tokenize_settings,
)
from shardflow.storage.jsonl import iter_lines
from shardflow.storage.layout import DOCS_SUFFIX, stage_dir
from shardflow.storage.manifest import list_records
from shardflow.storage.shards import INDEX_REF
from shardflow.storage.tokenizer_files import MODEL_REF

from .config import EvalConfig, TrainConfig

TOKENIZE_STAGE = "tokenize"
FALLBACK_DOCS_STAGE = "dedup"
"""Where held-out documents are looked for: the inputs the tokenize stage recorded, else the
outputs of the stage it reads by default."""


class EvaluationError(RuntimeError):
    """Evaluation cannot run as configured; the message names the file or setting at fault."""


def check_data(train_cfg: TrainConfig, storage: Storage, index: dict[str, Any], tok_meta: dict, tok_digest: str) -> None:
    """The shards, the tokenizer and the model fit together, and there are validation rows."""
    mcfg = train_cfg.model
    if index["tokenizer_digest"] and index["tokenizer_digest"] != tok_digest:
        raise EvaluationError(f"{storage.uri(INDEX_REF)} was made with tokenizer {index['tokenizer_digest']}, "
                              f"but {storage.uri(MODEL_REF)} is {tok_digest}: re-run the tokenize stage")
    if index["vocab_size"] > mcfg.vocab_size or tok_meta.get("vocab_size", 0) > mcfg.vocab_size:
        raise EvaluationError(f"tokenizer vocabulary ({index['vocab_size']}) exceeds train.model.vocab_size={mcfg.vocab_size}")
    if index["seq_len"] > mcfg.max_seq_len:
        raise EvaluationError(f"shards have seq_len {index['seq_len']} > train.model.max_seq_len {mcfg.max_seq_len}")
    if not index["splits"].get("val", {}).get("samples"):
        raise EvaluationError(f"{storage.uri(INDEX_REF)} has no validation rows (prep.tokenize.val_fraction is 0 "
                              "or the corpus is too small); nothing to evaluate on")


# -- split settings --------------------------------------------------------------------------------------

def split_settings(storage: Storage, eval_cfg: EvalConfig) -> dict[str, Any]:
    """val_fraction / split_seed / add_bos the shards were made with: EvalConfig, else the root's
    pipeline.yaml (``prep.tokenize``), else the tokenize stage's defaults."""
    tok, source = tokenize_settings(storage)
    val_fraction = tok.get("val_fraction", DEFAULT_VAL_FRACTION)
    split_seed = tok.get("split_seed", DEFAULT_SPLIT_SEED)
    return {
        "val_fraction": eval_cfg.val_fraction if eval_cfg.val_fraction is not None else val_fraction,
        "split_seed": eval_cfg.split_seed if eval_cfg.split_seed is not None else split_seed,
        "add_bos": tok.get("add_bos", DEFAULT_ADD_BOS),
        "from": source,
    }


# -- held-out documents -----------------------------------------------------------------------------------

def held_out_refs(storage: Storage) -> list[str]:
    """The document files the tokenize stage read (its manifest), else the dedup stage's outputs."""
    refs = sorted({ref for rec in list_records(storage, TOKENIZE_STAGE).values() if rec.status == "done"
                   for ref in rec.inputs if ref != MODEL_REF})
    if refs:
        return refs
    docs_dir = stage_dir(FALLBACK_DOCS_STAGE)
    return [f"{docs_dir}/{name}" for name in storage.list(docs_dir, suffix=DOCS_SUFFIX)]


def held_out_documents(storage: Storage, settings: dict[str, Any], limit: int, seed: int) -> list[tuple[str, str, str]]:
    """Up to ``limit`` val-split documents as (id, text, source), sorted by id.

    Files are visited in a seeded order and reading stops at ``limit`` val documents, so the cost
    is bounded on a large corpus while still sampling across files (sources often live in
    different files).
    """
    try:
        from orjson import loads
    except ImportError:  # pragma: no cover
        from json import loads
    if limit <= 0:
        return []
    refs = held_out_refs(storage)
    random.Random(seed).shuffle(refs)
    vf, ss = settings["val_fraction"], settings["split_seed"]
    docs: dict[str, tuple[str, str, str]] = {}
    for ref in refs:
        for lineno, raw in iter_lines(storage, ref):
            try:
                d = loads(raw)
                doc_id, text, source = d["id"], d["text"], d.get("source")
            except Exception as exc:  # noqa: BLE001 - stage outputs are ours: a bad line is corruption
                raise EvaluationError(f"{storage.uri(ref)}: line {lineno}: not a document record ({type(exc).__name__}: {exc})") from None
            doc_id = doc_id if isinstance(doc_id, str) else str(doc_id)
            if isinstance(text, str) and text.strip() and doc_split(doc_id, vf, ss) == "val":
                docs.setdefault(doc_id, (doc_id, text, str(source or "unknown")))
                if len(docs) >= limit:
                    break
        if len(docs) >= limit:
            break
    return sorted(docs.values())
