"""Dedup phase 1, ``dedup_signatures``: per filter shard, one row per document, no text.

Columns: ``idx``, ``id``, ``exact`` (normalized-text key), ``text_hash`` (raw text, survivor
tie-break), ``words`` and, with ``near``, ``band_00`` … (one LSH hash per band) and ``minhash``
(the full signature, ``num_bands × rows_per_band`` uint32 values). The full signature is what
``verify: signature`` estimates a candidate pair's Jaccard from in the cluster phase, so that
verification never re-reads text; it costs 4 bytes per permutation per document. The source
documents' ref and digest go into the file's metadata, so later phases know what the indices
refer to.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import iter_lines, write_parquet_table

from .config import PrepConfig
from .dedup_common import (EXACT_COLUMN, FORMAT_VERSION, META_KEY, MINHASH_COLUMN, NORMALIZATION_VERSION, SIGNATURES,
                           UPSTREAM, band_column, concat, dumps, hasher, sig_params, sig_ref)
from .stage import ShardOutput, ShardSpec, upstream_shards

_SIG_BATCH_BYTES = 4 << 20


class DedupSignaturesStage:
    """Per filter shard: exact key, raw-text hash, word count, band hashes and MinHash signature
    of every document (see the module docstring)."""

    name = SIGNATURES
    per_shard = True  # one shard per filter shard (for status predictions)

    def __init__(self, cfg: PrepConfig):
        self.cfg = cfg
        self.hasher = hasher(cfg.dedup)

    def shards(self, storage: Storage) -> list[ShardSpec]:
        return upstream_shards(storage, UPSTREAM)

    def config_digest(self) -> str:
        d = self.cfg.dedup
        minhash = {"ngram": d.ngram, "num_bands": d.num_bands, "rows_per_band": d.rows_per_band, "seed": d.seed}
        return digest_json({"stage": self.name, "version": FORMAT_VERSION, "normalization": NORMALIZATION_VERSION,
                            "minhash": minhash if d.near else None})

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        ((docs_ref, docs_digest),) = spec.inputs.items()
        counters: Counter = Counter()
        ids: list[str] = []
        parts: list[Any] = []
        texts: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal texts, size
            if texts:
                parts.append(self.hasher.sketch(texts, signature=self.hasher.num_perm > 0))
                texts, size = [], 0

        loads = json.loads
        for lineno, line in iter_lines(storage, docs_ref):
            try:
                doc = loads(line)
                text, doc_id = doc["text"], doc["id"]
                if not isinstance(text, str):
                    raise TypeError(f"text is {type(text).__name__}, not str")
            except (ValueError, KeyError, TypeError) as exc:
                # upstream output is trusted; if it is broken anyway, say where
                raise ValueError(f"{storage.uri(docs_ref)}: line {lineno}: not a document "
                                 f"({type(exc).__name__}: {exc})") from None
            ids.append(doc_id if isinstance(doc_id, str) else str(doc_id))
            texts.append(text)
            size += len(line)
            if size >= _SIG_BATCH_BYTES:
                flush()
        flush()
        n = len(ids)
        bands, perms = self.hasher.num_bands, self.hasher.num_perm
        words = concat([p.words for p in parts], np.int64).astype(np.uint32)
        columns: dict[str, Any] = {
            "idx": pa.array(np.arange(n, dtype=np.uint32)),
            "id": pa.array(ids, type=pa.string()),
            EXACT_COLUMN: pa.array(concat([p.exact for p in parts], np.uint64)),
            "text_hash": pa.array(concat([p.text_hash for p in parts], np.uint64)),
            "words": pa.array(words),
        }
        all_bands = concat([p.bands for p in parts], np.uint64, bands)
        for i in range(bands):
            columns[band_column(i)] = pa.array(np.ascontiguousarray(all_bands[:, i]))
        if perms:
            sig = concat([p.signature for p in parts], np.uint32, perms)
            columns[MINHASH_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(sig.reshape(-1)), perms)
        meta = {"shard": spec.shard_id, "docs_ref": docs_ref, "docs_digest": docs_digest, "docs": n,
                **sig_params(self.cfg.dedup)}
        table = pa.table(columns).replace_schema_metadata({META_KEY: dumps(meta)})
        out = sig_ref(spec.shard_id)
        write_parquet_table(storage, out, table)
        counters["docs_in"] = n
        counters["words"] = int(words.sum())
        counters["docs_short"] = int(((words > 0) & (words < self.hasher.ngram)).sum())
        counters["docs_wordless"] = int((words == 0).sum())
        return ShardOutput(outputs={"signatures": out}, counts=dict(counters))


def read_signatures(column: Any, perms: int) -> np.ndarray:
    """A ``minhash`` column (chunked fixed-size lists) as a (rows, perms) uint32 array."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, perms) if perms else np.zeros((len(arr), 0), dtype=np.uint32)
