"""Tokenize documents and pack them into WebDataset shards, in two stages.

Why two stages: the output must not depend on how many processes ran, yet encoding is the expensive
part and has to run in parallel. So ``tokenize`` works per upstream shard — it splits documents into
train/val by a hash of their id, encodes them with sentencepiece's multithreaded batch encoder and
writes each split's token stream (EOS after every document) to ``stages/tokenize/<shard>.<split>.npy``
— and ``pack``, one global shard, concatenates those streams in shard order, cuts rows of
``seq_len + 1`` tokens and writes the tar shards and ``shards/index.json``. Packing is a memory copy,
so doing it in one place costs little, and changing ``seq_len`` or the shard size redoes only it.

Why the split hashes only the document id (with its own domain string and seed): a document stays
in the same split when other documents are added, removed or edited, and evaluation can find the
held-out documents again with :func:`doc_split` (the rule lives in ``shardflow.storage.doc_split``,
the contract layer, which evaluation imports too).

Why encoding runs on a helper thread: sentencepiece releases the GIL while encoding a batch with its
own thread pool, so reading and parsing the next batch overlaps with encoding the current one.
"""
from __future__ import annotations

import io
import logging
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import numpy as np
import xxhash

from shardflow.storage import Storage, digest_json
from shardflow.storage.doc_split import SPLIT_DOMAIN as _SPLIT_DOMAIN
from shardflow.storage.doc_split import val_threshold
from shardflow.storage.layout import stage_dir
from shardflow.storage.manifest import ShardState, StatCache, classify, list_records, read_record, record_ref
from shardflow.storage.shards import (
    INDEX_REF,
    SHARDS_DIR,
    SPLITS,
    ShardWriter,
    make_index,
    shard_ref,
    token_dtype,
    write_index,
)
from shardflow.storage.tokenizer_files import MODEL_REF, load_tokenizer

from .config import PrepConfig, TokenizeConfig
from .pack_append import AppendPlan, merge_counts, plan_append
from .stage import ShardOutput, ShardSpec, upstream_shards
from .tokenizer import GLOBAL_SHARD, iter_id_text, tokenizer_model_digest

FORMAT_VERSION = 1
log = logging.getLogger(__name__)
STAGE_DIR = stage_dir("tokenize")
_MAX_IN_FLIGHT = 2
"""Encode batches queued at once: enough to keep sentencepiece busy, bounded memory."""


def stream_ref(shard_id: str, split: str) -> str:
    return f"{STAGE_DIR}/{shard_id}.{split}.npy"


# -- encoding -----------------------------------------------------------------------------------------

class Encoder:
    """Batch encoding to one flat token array per batch: ``[BOS] doc EOS [BOS] doc EOS ...``."""

    def __init__(self, sp: Any, num_threads: int, add_bos: bool):
        self.sp = sp
        self.num_threads = max(1, num_threads)
        self.add_bos = add_bos
        self.dtype = token_dtype(sp.get_piece_size())
        self.eos_id = sp.eos_id()
        if self.eos_id < 0:
            raise ValueError("the tokenizer model has no EOS id; documents cannot be separated")
        if add_bos and sp.bos_id() < 0:
            raise ValueError("add_bos is set but the tokenizer model has no BOS id")
        self._numpy_out = True

    def encode(self, texts: list[str]) -> np.ndarray:
        kw = dict(add_bos=self.add_bos, add_eos=True, num_threads=self.num_threads)
        if self._numpy_out:
            try:
                arrays = self.sp.encode(texts, out_type="numpy", **kw)
            except (ValueError, TypeError):  # sentencepiece < 0.2.1 has no numpy output
                self._numpy_out = False
            else:
                return np.concatenate(arrays, dtype=self.dtype, casting="unsafe") if arrays else np.empty(0, self.dtype)
        ids = self.sp.encode(texts, out_type=int, **kw)
        return np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=sum(map(len, ids)))


def tokenize_docs(
    docs: Iterable[tuple[str, str]],
    encoder: Encoder,
    val_fraction: float,
    split_seed: int,
    batch_chars: int = 4_000_000,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Split documents by id hash and encode each split's documents, in input order.

    Returns one token stream per split and counters ``docs.<split>``, ``tokens.<split>``,
    ``chars.<split>``. The result does not depend on ``batch_chars`` or the thread count.
    """
    threshold = val_threshold(val_fraction)
    h = xxhash.xxh3_64_intdigest
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    ndocs = dict.fromkeys(SPLITS, 0)
    pending_chars = dict.fromkeys(SPLITS, 0)
    parts: dict[str, list[Future]] = {s: [] for s in SPLITS}
    counts = {f"{k}.{s}": 0 for k in ("docs", "tokens", "chars") for s in SPLITS}
    inflight: deque[Future] = deque()

    with ThreadPoolExecutor(1, thread_name_prefix="spm-encode") as pool:
        def submit(split: str) -> None:
            while len(inflight) >= _MAX_IN_FLIGHT:
                inflight.popleft().result()
            fut = pool.submit(encoder.encode, texts[split])
            inflight.append(fut)
            parts[split].append(fut)
            texts[split] = []
            pending_chars[split] = 0

        for doc_id, text in docs:
            split = "val" if h(_SPLIT_DOMAIN + doc_id.encode("utf-8"), seed=split_seed) < threshold else "train"
            texts[split].append(text)
            n = len(text)
            chars[split] += n
            ndocs[split] += 1
            pending_chars[split] += n
            if pending_chars[split] >= batch_chars:
                submit(split)
        for split in SPLITS:
            if texts[split]:
                submit(split)
        streams = {}
        for split in SPLITS:
            arrays = [f.result() for f in parts[split]]
            streams[split] = np.concatenate(arrays) if arrays else np.empty(0, encoder.dtype)
            counts[f"tokens.{split}"] = int(streams[split].size)
            counts[f"chars.{split}"] = chars[split]
            counts[f"docs.{split}"] = ndocs[split]
    return streams, counts


def write_stream(storage: Storage, ref: str, tokens: np.ndarray) -> None:
    with storage.atomic_write(ref) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(tokens), version=(1, 0), allow_pickle=False)


def read_stream(storage: Storage, ref: str, dtype: np.dtype) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(storage.read_bytes(ref)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{storage.uri(ref)}: not a readable token stream ({exc}); re-run the tokenize stage") from None
    if arr.ndim != 1 or arr.dtype != dtype:
        raise ValueError(f"{storage.uri(ref)}: expected a 1-D {dtype} token stream, found {arr.dtype} {arr.shape}"
                         " (was the tokenizer changed without re-running the tokenize stage?)")
    return arr


# -- stage 1: per-shard tokenization -----------------------------------------------------------------

class TokenizeStage:
    """One shard per upstream shard: docs -> ``stages/tokenize/<shard>.{train,val}.npy``."""

    name = "tokenize"
    per_shard = True  # one shard per upstream shard (for status predictions)

    def __init__(self, cfg: PrepConfig, upstream: str = "dedup"):
        self.prep = cfg
        self.cfg: TokenizeConfig = cfg.tokenize
        self.upstream = upstream

    def config_digest(self) -> str:
        c = self.cfg
        return digest_json({"version": FORMAT_VERSION, "val_fraction": c.val_fraction, "split_seed": c.split_seed, "add_bos": c.add_bos})

    def shards(self, storage: Storage) -> list[ShardSpec]:
        # The tokenizer model is an input of every shard: a retrained tokenizer makes all of them stale.
        model = tokenizer_model_digest(storage)
        return [ShardSpec(s.shard_id, {**s.inputs, MODEL_REF: model}) for s in upstream_shards(storage, self.upstream)]

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        sp, _meta, model_digest = load_tokenizer(storage)
        if spec.inputs.get(MODEL_REF) != model_digest:
            raise RuntimeError(f"the tokenizer model changed since this shard was planned ({spec.inputs.get(MODEL_REF) or 'none'} -> "
                               f"{model_digest}); plan the tokenize stage again")
        docs_refs = [r for r in spec.inputs if r != MODEL_REF]
        if len(docs_refs) != 1:
            raise ValueError(f"tokenize shard {spec.shard_id} expects one documents input, got {docs_refs}")
        encoder = Encoder(sp, self.cfg.num_threads, self.cfg.add_bos)
        streams, counts = tokenize_docs(iter_id_text(storage, docs_refs[0]), encoder, self.cfg.val_fraction,
                                        self.cfg.split_seed, self.cfg.encode_batch_chars)
        outputs = {}
        for split in SPLITS:
            ref = stream_ref(spec.shard_id, split)
            write_stream(storage, ref, streams[split])
            outputs[split] = ref
        counts["docs_in"] = counts["docs.train"] + counts["docs.val"]
        return ShardOutput(outputs=outputs, counts=counts)


# -- stage 2: global pack into tar shards -------------------------------------------------------------

def pack_split(
    storage: Storage,
    split: str,
    refs: list[str],
    cfg: TokenizeConfig,
    dtype: np.dtype,
    eos_id: int,
    start_index: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Concatenate the streams in order, cut rows of seq_len + 1, write the split's shards
    (numbered from ``start_index``: an append continues after the earlier tars).

    The tail that does not fill a last row is dropped (and counted): a padded row would teach the
    model padding, and the loss of < seq_len tokens per split is negligible.
    """
    row_len = cfg.seq_len + 1
    carry = np.empty(0, dtype)
    docs = stream_tokens = 0
    with ShardWriter(storage, split, cfg.seq_len, dtype, cfg.rows_per_member, cfg.samples_per_shard, start_index,
                     doc_boundaries_eos=eos_id if cfg.write_doc_boundaries else None) as writer:
        for ref in refs:
            stream = read_stream(storage, ref, dtype)
            docs += int(np.count_nonzero(stream == eos_id))
            stream_tokens += stream.size
            buf = np.concatenate([carry, stream]) if carry.size else stream
            n = buf.size // row_len
            if n:
                writer.write(buf[: n * row_len].reshape(n, row_len))
            carry = buf[n * row_len:].copy()
        entries = writer.close()
    rows = sum(e["samples"] for e in entries)
    counts = {f"docs.{split}": docs, f"rows.{split}": rows, f"tokens.{split}": rows * row_len,
              f"stream_tokens.{split}": stream_tokens, f"dropped_tail_tokens.{split}": int(carry.size),
              f"shards.{split}": len(entries)}
    return entries, counts


class PackStage:
    """One global shard ("_all"): every tokenize stream -> ``shards/*.tar`` + ``shards/index.json``."""

    name = "pack"
    per_shard = False

    def __init__(self, cfg: PrepConfig, upstream: str = "dedup"):
        self.prep = cfg
        self.cfg: TokenizeConfig = cfg.tokenize
        self.tokenize = TokenizeStage(cfg, upstream)

    def config_digest(self) -> str:
        c = self.cfg
        return digest_json({"version": FORMAT_VERSION, "seq_len": c.seq_len, "rows_per_member": c.rows_per_member,
                            "samples_per_shard": c.samples_per_shard, "write_doc_boundaries": c.write_doc_boundaries})

    def shards(self, storage: Storage) -> list[ShardSpec]:
        expected = self.tokenize.shards(storage)
        if not expected:
            return []
        records = list_records(storage, self.tokenize.name)
        inputs = {MODEL_REF: tokenizer_model_digest(storage)}
        for spec in expected:
            rec = records.get(spec.shard_id)
            for split in SPLITS:
                out = rec.outputs.get(split) if rec is not None and rec.status == "done" else None
                # A shard not tokenized yet still appears (digest ''), so finishing it changes this input.
                inputs[out.ref if out else stream_ref(spec.shard_id, split)] = out.digest if out else ""
        return [ShardSpec(GLOBAL_SHARD, inputs)]

    def _check_upstream(self, storage: Storage) -> None:
        records = list_records(storage, self.tokenize.name)
        config_digest = self.tokenize.config_digest()
        stats = StatCache(storage)  # one listing of the streams' folder, not one per shard
        behind = [s.shard_id for s in self.tokenize.shards(storage)
                  if classify(storage, records.get(s.shard_id), s.input_digest, config_digest, deep=False,
                              stats=stats) is not ShardState.DONE]
        if behind:
            raise RuntimeError(f"tokenize shards not done or out of date: {behind[:20]}{' ...' if len(behind) > 20 else ''}; "
                               "run the tokenize stage first")

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        self._check_upstream(storage)
        _sp, meta, model_digest = load_tokenizer(storage)
        if spec.inputs.get(MODEL_REF) != model_digest:
            raise RuntimeError("the tokenizer model changed since the pack stage was planned; plan it again")
        dtype = token_dtype(meta["vocab_size"])
        if self.cfg.pack_incremental == "append":
            previous = read_record(storage, self.name, spec.shard_id)
            appending, why_not = plan_append(storage, previous, spec.inputs, self.config_digest(), model_digest, MODEL_REF)
            if appending is not None:
                return self._append(storage, appending, meta, dtype, model_digest)
            log.info("pack: repacking every stream (%s)", why_not)
        # Shards are rewritten in place: retire the old record and index first, so a crash midway
        # leaves "pack not done" rather than an index describing tars that are being replaced.
        storage.remove(record_ref(self.name, spec.shard_id))
        storage.remove(INDEX_REF)
        counts: dict[str, int] = {}
        entries = {}
        for split in SPLITS:
            refs = sorted(r for r in spec.inputs if r.startswith(f"{STAGE_DIR}/") and r.endswith(f".{split}.npy"))
            entries[split], c = pack_split(storage, split, refs, self.cfg, dtype, meta["eos_id"])
            counts.update(c)
        index = make_index(self.cfg.seq_len, dtype, meta["vocab_size"], model_digest, meta["eos_id"], entries)
        write_index(storage, index)
        names = {e["name"] for split in SPLITS for e in entries[split]}
        for name in storage.list(SHARDS_DIR, suffix=".tar"):
            if name not in names and name.split("-", 1)[0] in SPLITS:
                storage.remove(shard_ref(name))  # left over from a run with more shards
        outputs = {"index": INDEX_REF, **{name: shard_ref(name) for name in sorted(names)}}
        return ShardOutput(outputs=outputs, counts=counts)

    def _append(self, storage: Storage, plan: AppendPlan, meta: dict, dtype: np.dtype, model_digest: str) -> ShardOutput:
        """New streams into new tars; the index gains their entries after the earlier ones.

        The earlier record and index stay in place until the new index is published: a crash
        before that leaves the earlier pack intact (plus unlisted tars that the next run
        overwrites); a crash after it, before the record, leaves an index its record does not
        describe, which the next plan finds and repacks.
        """
        entries = {split: list(plan.index["splits"].get(split, {}).get("shards", [])) for split in SPLITS}
        counts = dict(plan.counts)
        new_names: list[str] = []
        for split in SPLITS:
            refs = [r for r in plan.new_streams if r.startswith(f"{STAGE_DIR}/") and r.endswith(f".{split}.npy")]
            if not refs:
                continue
            added, c = pack_split(storage, split, refs, self.cfg, dtype, meta["eos_id"], plan.next_number(split))
            entries[split].extend(added)
            new_names.extend(e["name"] for e in added)
            counts = merge_counts(counts, c)
        index = make_index(self.cfg.seq_len, dtype, meta["vocab_size"], model_digest, meta["eos_id"], entries)
        write_index(storage, index)
        log.info("pack: appended %d stream(s) as %d new tar(s); %d earlier tar(s) untouched",
                 len(plan.new_streams), len(new_names), len(plan.kept))
        outputs = {"index": INDEX_REF, **{name: shard_ref(name) for name in new_names}}
        return ShardOutput(outputs=outputs, counts=counts, kept=plan.kept)


def tokenize_stages(cfg: PrepConfig, upstream: str = "dedup") -> list[Any]:
    """The two stages, in the order they must run."""
    return [TokenizeStage(cfg, upstream), PackStage(cfg, upstream)]
