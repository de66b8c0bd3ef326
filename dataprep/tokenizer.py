"""Train the sentencepiece tokenizer on a deterministic sample of the deduplicated corpus.

Why the sample is chosen by hash and not by position: the tokenizer must not change when shards are
re-cut, re-ordered or reprocessed in another order, so each document's chance of being picked depends
only on (seed, its id). The sample is the documents with the smallest hashes, capped by a document
count and a character budget, kept in a bounded heap while streaming (one pass over the corpus,
memory ~ the budget). Ties on the id hash (repeated ids) are broken by a hash of the text.

Why the model bytes are canonicalised: sentencepiece stores its training arguments inside the model;
with a file input and an output prefix those are temporary paths, and ``num_threads`` is stored as
given. We feed sentences through ``sentence_iterator`` and receive the model through ``model_writer``
(so no path is ever recorded) and drop the stored thread count, so the same sample and config give a
byte-identical ``spm.model`` on any machine. BPE training is thread-count independent (verified in
the tests); unigram's EM result depends on the number of threads, so unigram always trains with one.
"""
from __future__ import annotations

import hashlib
import heapq
import io
from collections.abc import Iterator
from typing import Any

import sentencepiece as spm
import xxhash

from shardflow.storage import Storage, digest_json
from shardflow.storage.jsonl import iter_lines
from shardflow.storage.manifest import read_record
from shardflow.storage.tokenizer_files import META_REF, MODEL_REF, VOCAB_REF, encode_varint, proto_fields, read_varint

from .config import PrepConfig, TokenizerConfig
from .stage import ShardOutput, ShardSpec, upstream_shards

try:  # orjson ships with Prefect; parsing JSON is a visible share of these stages' time
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

FORMAT_VERSION = 1
GLOBAL_SHARD = "_all"
_SAMPLE_DOMAIN = b"shardflow-tokenizer-sample\x00"
"""Domain separation: with equal seeds, the sample must not coincide with the val split's hash order."""


class TokenizerTrainingError(RuntimeError):
    """sentencepiece refused to train; the message says why in terms of our config and sample."""


# -- reading documents ----------------------------------------------------------------------------

def iter_id_text(storage: Storage, ref: str) -> Iterator[tuple[str, str]]:
    """(id, text) of each document of a stage output; a malformed record is an error naming file and line."""
    for lineno, line in iter_lines(storage, ref):
        try:
            doc = _loads(line)
            doc_id, text = doc["id"], doc["text"]
        except Exception as exc:  # noqa: BLE001 - upstream output is ours: a bad line is a bug or corruption
            raise ValueError(f"{storage.uri(ref)}: line {lineno}: not a document record ({type(exc).__name__}: {exc})") from None
        if not isinstance(text, str):
            raise ValueError(f"{storage.uri(ref)}: line {lineno}: 'text' is {type(text).__name__}, not a string")
        yield (doc_id if isinstance(doc_id, str) else str(doc_id)), text


# -- the sample -----------------------------------------------------------------------------------

def sample_key(doc_id: str, text: str, seed: int) -> tuple[int, int]:
    return (xxhash.xxh3_64_intdigest(_SAMPLE_DOMAIN + doc_id.encode("utf-8"), seed=seed),
            xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"), seed=seed))


class HashSampler:
    """The documents with the smallest keys such that at most ``max_docs`` are taken and the
    characters before the last one are under ``max_chars`` — a function of the set of documents
    offered, not of their order."""

    def __init__(self, max_docs: int, max_chars: int):
        if max_docs <= 0 or max_chars <= 0:
            raise ValueError("sample_docs and sample_max_chars must be positive")
        self.max_docs, self.max_chars = max_docs, max_chars
        self._heap: list[tuple[int, int, str]] = []  # (-key1, -key2, text): a max-heap on the key
        self.chars = 0
        self.offered = 0

    def _full(self) -> bool:
        return len(self._heap) >= self.max_docs or self.chars >= self.max_chars

    def offer(self, key: tuple[int, int], text: str) -> None:
        self.offered += 1
        item = (-key[0], -key[1], text)
        heap = self._heap
        if heap and self._full() and item <= heap[0]:
            return  # larger key than everything kept, and nothing more fits
        heapq.heappush(heap, item)
        self.chars += len(text)
        while len(heap) > self.max_docs or (len(heap) > 1 and self.chars - len(heap[0][2]) >= self.max_chars):
            self.chars -= len(heapq.heappop(heap)[2])

    def texts(self) -> list[str]:
        """The sample in key order; the last document is cut so the total is within the budget."""
        ordered = [t for _, _, t in sorted(self._heap, reverse=True)]
        budget = self.max_chars
        out = []
        for t in ordered:
            if len(t) >= budget:
                out.append(t[:budget])
                break
            out.append(t)
            budget -= len(t)
        return out


def _split_long(line: str, max_bytes: int) -> Iterator[str]:
    """Cut a line into pieces of at most ``max_bytes`` UTF-8 bytes, at spaces where possible."""
    data = line.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        yield line
        return
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            cut = data.rfind(b" ", start + 1, end)
            if cut > start:
                end = cut
            else:
                while end > start and (data[end] & 0xC0) == 0x80:  # never split a UTF-8 sequence
                    end -= 1
        piece = data[start:end].decode("utf-8", "replace").strip()
        if piece:
            yield piece
        start = end


def sample_sentences(texts: list[str], max_sentence_bytes: int) -> list[str]:
    """One sentencepiece 'sentence' per non-empty line of each sampled document."""
    out = []
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                out.extend(_split_long(line, max_sentence_bytes))
    return out


# -- training ---------------------------------------------------------------------------------------

_MODEL_TRAINER_SPEC = 2  # ModelProto.trainer_spec
_TRAINER_NUM_THREADS = 16  # TrainerSpec.num_threads


def canonical_model(model: bytes) -> bytes:
    """The model with the thread count removed from its stored trainer spec (see module docstring).

    Edits the wire format directly (sentencepiece's protobuf bindings need the optional protobuf
    package); sentencepiece serialises fields in field order, so the rest is kept byte for byte.
    """
    out = bytearray()
    for field, _, raw in proto_fields(model):
        if field != _MODEL_TRAINER_SPEC:
            out += raw
            continue
        tag_end = read_varint(raw, 0)[1]
        _, body_start = read_varint(raw, tag_end)
        body = b"".join(r for f, _, r in proto_fields(raw[body_start:]) if f != _TRAINER_NUM_THREADS)
        out += raw[:tag_end] + encode_varint(len(body)) + body
    return bytes(out)


def training_args(cfg: TokenizerConfig) -> dict[str, Any]:
    """sentencepiece trainer arguments: the config plus the options that make training deterministic."""
    return dict(
        model_type=cfg.model_type, vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id, unk_id=cfg.unk_id,
        normalization_rule_name=cfg.normalization_rule_name, split_digits=cfg.split_digits,
        max_sentence_length=cfg.max_sentence_length,
        num_threads=cfg.num_threads if cfg.model_type == "bpe" else 1,
        input_sentence_size=0, shuffle_input_sentence=False, train_extremely_large_corpus=False,
        hard_vocab_limit=True, minloglevel=2,
    )


def train_model(sentences: list[str], cfg: TokenizerConfig) -> bytes:
    """Train on the given sentences (in this order); returns the canonical serialized model."""
    if not sentences:
        raise TokenizerTrainingError("the tokenizer sample is empty: no documents with text in the upstream shards")
    spm.set_random_generator_seed(cfg.seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=writer, **training_args(cfg))
    except RuntimeError as exc:
        msg = str(exc)
        hint = ""
        if "Vocabulary size too high" in msg or "vocab_size" in msg.lower():
            hint = (f" — the sample ({len(sentences)} lines, {sum(map(len, sentences))} chars) is too small for "
                    f"prep.tokenizer.vocab_size={cfg.vocab_size}: lower vocab_size or raise sample_docs / sample_max_chars")
        raise TokenizerTrainingError(f"sentencepiece training failed: {msg}{hint}") from None
    return canonical_model(writer.getvalue())


def vocab_text(model: bytes) -> str:
    """The ``.vocab`` listing sentencepiece writes next to a model: piece<TAB>score per id."""
    sp = spm.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):.6g}\n" for i in range(sp.get_piece_size()))


# -- the stage --------------------------------------------------------------------------------------

class TokenizerStage:
    """One global shard ("_all"): sample every upstream shard's documents, train, publish."""

    name = "tokenizer"
    per_shard = False

    def __init__(self, cfg: PrepConfig, upstream: str = "dedup"):
        self.cfg = cfg.tokenizer
        self.upstream = upstream

    def config_digest(self) -> str:
        # num_threads is left out: it does not change the model (BPE) or is not used (unigram);
        # retrain_on_new_data decides when to plan a retraining, not what a training produces.
        return digest_json({"version": FORMAT_VERSION,
                            "tokenizer": self.cfg.model_dump(mode="json", exclude={"num_threads", "retrain_on_new_data"})})

    @property
    def frozen(self) -> bool:
        """Whether new or changed documents leave a trained tokenizer as it is (``status`` asks)."""
        return not self.cfg.retrain_on_new_data

    def shards(self, storage: Storage) -> list[ShardSpec]:
        """One global shard over every upstream shard's documents.

        Unless ``retrain_on_new_data``, a tokenizer trained with this config is pinned to the
        documents it was trained on: new inputs do not retrain it (which would change every token
        id and re-tokenize the whole corpus for a 1 % append); ``--force`` or a config change does.
        """
        inputs: dict[str, str] = {}
        for spec in upstream_shards(storage, self.upstream):
            inputs.update(spec.inputs)
        if not inputs:
            return []
        pinned = ""
        if self.frozen:
            rec = read_record(storage, self.name, GLOBAL_SHARD)
            if rec is not None and rec.status == "done" and rec.config_digest == self.config_digest():
                pinned = rec.input_digest
        return [ShardSpec(GLOBAL_SHARD, inputs, pinned_digest=pinned)]

    def process(self, storage: Storage, spec: ShardSpec) -> ShardOutput:
        cfg = self.cfg
        sampler = HashSampler(cfg.sample_docs, cfg.sample_max_chars)
        docs_in = 0
        for ref in sorted(spec.inputs):
            for doc_id, text in iter_id_text(storage, ref):
                docs_in += 1
                if text:
                    sampler.offer(sample_key(doc_id, text, cfg.seed), text)
        texts = sampler.texts()
        sentences = sample_sentences(texts, cfg.max_sentence_length)
        h = hashlib.sha256()
        for s in sentences:
            h.update(s.encode("utf-8", "surrogatepass"))
            h.update(b"\n")
        model = train_model(sentences, cfg)
        model_digest = "sha256:" + hashlib.sha256(model).hexdigest()
        sp = spm.SentencePieceProcessor(model_proto=model)
        meta = {
            "version": FORMAT_VERSION, "model_type": cfg.model_type, "vocab_size": sp.get_piece_size(),
            "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(), "unk_id": sp.unk_id(),
            "byte_fallback": cfg.byte_fallback, "character_coverage": cfg.character_coverage,
            "normalization_rule_name": cfg.normalization_rule_name, "split_digits": cfg.split_digits,
            "sample_digest": "sha256:" + h.hexdigest(), "sample_docs": len(texts),
            "sample_chars": sum(map(len, texts)), "sample_lines": len(sentences), "sample_seed": cfg.seed,
            "model_digest": model_digest, "sentencepiece_version": spm.__version__,
        }
        storage.write_bytes(MODEL_REF, model)
        storage.write_text(VOCAB_REF, vocab_text(model))
        storage.write_json(META_REF, meta)  # last: its model_digest ties it to the model above
        counts = {"docs_in": docs_in, "sample_docs": len(texts), "sample_chars": meta["sample_chars"],
                  "sample_lines": len(sentences), "vocab_size": meta["vocab_size"]}
        return ShardOutput(outputs={"model": MODEL_REF, "vocab": VOCAB_REF, "meta": META_REF}, counts=counts)


def tokenizer_model_digest(storage: Storage) -> str:
    """Digest of the published model from the tokenizer's manifest ('' if it is not done)."""
    rec = read_record(storage, TokenizerStage.name, GLOBAL_SHARD)
    if rec is None or rec.status != "done" or "model" not in rec.outputs:
        return ""
    return rec.outputs["model"].digest
