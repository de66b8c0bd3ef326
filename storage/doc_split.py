"""The document train/validation split, and the tokenize settings it was made with.

Why this lives in the contract layer: the tokenize stage (dataprep) assigns each document to a
split, and evaluation (train) must find exactly the held-out documents again to re-tokenize them
per source. Both import the rule from here, so the two can never disagree, and train needs nothing
from dataprep.

Why the split hashes only the document id (with its own domain string and seed): a document stays
in the same split when other documents are added, removed or edited.
"""
from __future__ import annotations

from typing import Any

import xxhash

from .layout import PIPELINE_REF
from .store import Storage

SPLIT_DOMAIN = b"shardflow-split\x00"
"""Domain separation: with equal seeds, the split must not coincide with other id-hash orders."""

DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SPLIT_SEED = 0
DEFAULT_ADD_BOS = False
"""The defaults of ``prep.tokenize.{val_fraction, split_seed, add_bos}`` (dataprep's TokenizeConfig
takes them from here), used when a dataset root has no pipeline.yaml that says otherwise."""


def val_threshold(val_fraction: float) -> int:
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be within [0, 1], got {val_fraction}")
    return min(int(val_fraction * 2.0**64), 2**64)


def doc_split(doc_id: str, val_fraction: float, split_seed: int) -> str:
    """'val' or 'train' for a document id: the rule the tokenize stage applies."""
    h = xxhash.xxh3_64_intdigest(SPLIT_DOMAIN + doc_id.encode("utf-8"), seed=split_seed)
    return "val" if h < val_threshold(val_fraction) else "train"


def tokenize_settings(storage: Storage) -> tuple[dict[str, Any], str]:
    """(``prep.tokenize`` as written in the root's pipeline.yaml, where it came from).

    ``({}, "defaults")`` when the root has no pipeline.yaml (shards made by other tools, or a
    root written before pipeline.yaml existed); callers fall back to the DEFAULT_* values.
    """
    import yaml

    try:
        body = yaml.safe_load(storage.read_text(PIPELINE_REF)) or {}
    except FileNotFoundError:
        return {}, "defaults"
    return ((body.get("config") or body).get("prep") or {}).get("tokenize") or {}, storage.uri(PIPELINE_REF)
