"""Export a checkpoint as a self-contained Hugging Face model directory.

The directory holds ``model.safetensors`` + ``config.json`` for ``MixtralForCausalLM`` (written by
:mod:`train.hf_export`), the run's sentencepiece tokenizer as a transformers fast tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``, and the original ``tokenizer.model``),
``generation_config.json`` and ``shardflow_export.json`` (where it came from). Any transformers-based
tool — lm-evaluation-harness included — loads it with ``from_pretrained`` and no custom code.

Why the tokenizer is converted here instead of with ``LlamaTokenizer``: Llama's converter hard-codes
Llama's normalization (no NFKC, no whitespace collapsing). Our models are trained with
``nmt_nfkc`` and sentencepiece's defaults (``remove_extra_whitespaces``, ``add_dummy_prefix``), so
the conversion reads those settings from the model's own ``normalizer_spec`` and reproduces them
(precompiled charsmap, strip + collapse of spaces, the ``▁`` prefix), and keeps byte fallback; the
tests check that both tokenizers give the same ids on real text.

Why files are staged in a local temporary directory and then published one by one through
:class:`Storage` (``config.json`` last): transformers writes to local paths only, the destination
may be an object store, and a reader must never find a ``config.json`` next to missing weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from shardflow.storage import Storage
from shardflow.storage.doc_split import DEFAULT_ADD_BOS, tokenize_settings
from shardflow.storage.layout import export_dir
from shardflow.storage.tokenizer_files import MODEL_REF, load_tokenizer, proto_fields

from .config import TrainConfig
from .hf_export import save_hf
from .model import ModelConfig, MoETransformer
from .model_config import model_config_digest

EXPORT_FORMAT = 1
_PUBLISH_LAST = "config.json"


class ExportError(RuntimeError):
    """The export cannot be made; the message names the checkpoint, tokenizer or directory."""


# -- tokenizer ------------------------------------------------------------------------------------------

def _fields(data: bytes) -> dict[int, list[int | bytes]]:
    """A protobuf message's fields by number (the sentencepiece model's few scalar settings)."""
    out: dict[int, list[int | bytes]] = {}
    try:
        for number, value, _ in proto_fields(data):
            out.setdefault(number, []).append(value)
    except ValueError as exc:
        raise ExportError(f"cannot read the sentencepiece model: {exc}") from None
    return out


def _get(fields: dict[int, list], number: int, default):
    return fields[number][-1] if number in fields else default


def spm_spec(model_bytes: bytes) -> dict[str, Any]:
    """The sentencepiece settings that decide how text is encoded (ModelProto field numbers)."""
    model = _fields(model_bytes)
    trainer = _fields(_get(model, 2, b""))
    norm = _fields(_get(model, 3, b""))
    return {
        "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(_get(trainer, 3, 1), "?"),
        "split_by_whitespace": bool(_get(trainer, 22, 1)),
        "treat_whitespace_as_suffix": bool(_get(trainer, 24, 0)),
        "byte_fallback": bool(_get(trainer, 35, 0)),
        "precompiled_charsmap": bytes(_get(norm, 2, b"")),
        "add_dummy_prefix": bool(_get(norm, 3, 1)),
        "remove_extra_whitespaces": bool(_get(norm, 4, 1)),
        "escape_whitespaces": bool(_get(norm, 5, 1)),
    }


def _bpe_merges(pieces: list[str], mergeable: set[str], rank: dict[str, int]) -> list[tuple[str, str]]:
    """Merges in sentencepiece's order: a pair is merged by the rank (score order) of its result."""
    merges = []
    for piece in pieces:
        if piece not in mergeable:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                merges.append((rank[piece], rank[left], rank[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def spm_to_tokenizers(model_bytes: bytes, add_bos: bool = False):
    """A ``tokenizers.Tokenizer`` that encodes text to the ids the sentencepiece model gives.

    BPE: sentencepiece merges the adjacent pair whose result scores highest; here every pair of
    normal pieces whose concatenation is a normal piece becomes a merge ranked by that piece's
    score. Unigram: the same lattice with the same scores. Control, unknown and unused pieces are
    never produced from text by sentencepiece, so they take no part in merges (BPE) or get a score
    no path would choose (unigram); byte pieces serve byte fallback in both.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE, Unigram

    spec = spm_spec(model_bytes)
    if not spec["split_by_whitespace"] or spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"]:
        raise ExportError("tokenizer options split_by_whitespace=false / treat_whitespace_as_suffix / "
                          "escape_whitespaces=false have no exact transformers equivalent; cannot export the tokenizer")
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    normal = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))]
    unk_id = next((i for i in range(n) if sp.is_unknown(i)), 0)
    if spec["model_type"] == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        rank = {pieces[i]: r for r, i in enumerate(sorted(normal, key=lambda i: (-sp.get_score(i), i)))}
        merges = _bpe_merges(pieces, {pieces[i] for i in normal}, rank)
        model = BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], fuse_unk=True, byte_fallback=spec["byte_fallback"], dropout=None)
    elif spec["model_type"] == "unigram":
        floor = min((sp.get_score(i) for i in normal), default=0.0) - 1e4
        normal_set = set(normal)
        scores = [(pieces[i], sp.get_score(i) if i in normal_set or sp.is_byte(i) else floor) for i in range(n)]
        model = Unigram(scores, unk_id=unk_id, byte_fallback=spec["byte_fallback"])
    else:
        raise ExportError(f"sentencepiece model type {spec['model_type']!r} is not supported for export (bpe, unigram)")
    tok = Tokenizer(model)
    norm = []
    if spec["precompiled_charsmap"]:
        norm.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    prefix = spec["add_dummy_prefix"]
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always" if prefix else "never", split=True)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces are special tokens (skipped when decoding); not matched inside text, see hf_tokenizer.
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in range(n) if sp.is_control(i)])
    bos = sp.bos_id()
    if add_bos:
        if bos < 0:
            raise ExportError("add_bos is set but the tokenizer has no BOS piece")
        tok.post_processor = processors.TemplateProcessing(single=f"{pieces[bos]} $A", pair=f"{pieces[bos]} $A {pieces[bos]} $B",
                                                           special_tokens=[(pieces[bos], bos)])
    return tok


def hf_tokenizer(model_bytes: bytes, meta: Mapping[str, Any], add_bos: bool = False, model_max_length: int | None = None):
    """A ``PreTrainedTokenizerFast`` with the run's special tokens (ids from tokenizer.json meta).

    ``split_special_tokens=True``: sentencepiece never reads ``<s>`` in text as the BOS control
    token, so neither does the export (the ids stay equal on any input).
    """
    import sentencepiece as spm
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    def piece(key: str) -> str | None:
        i = int(meta.get(key, -1))
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    kwargs = {k: v for k, v in (("bos_token", piece("bos_id")), ("eos_token", piece("eos_id")),
                                 ("unk_token", piece("unk_id")), ("pad_token", piece("pad_id"))) if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=spm_to_tokenizers(model_bytes, add_bos), clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length or int(1e30), split_special_tokens=True, **kwargs)
    for key, tid in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
        if key in kwargs and getattr(tok, f"{key}_id") != int(meta[tid]):
            raise ExportError(f"converted tokenizer maps {kwargs[key]!r} to {getattr(tok, f'{key}_id')}, not {meta[tid]}")
    return tok


# -- model ----------------------------------------------------------------------------------------------

def _add_bos(storage: Storage) -> bool:
    """Whether the shards put BOS before each document (prep.tokenize.add_bos of the root's pipeline.yaml)."""
    return bool(tokenize_settings(storage)[0].get("add_bos", DEFAULT_ADD_BOS))


def _publish_dir(storage: Storage, local_dir: str, out_dir: str) -> list[str]:
    names = sorted(os.listdir(local_dir), key=lambda n: (n == _PUBLISH_LAST, n))
    refs = []
    for name in names:
        ref = f"{out_dir.rstrip('/')}/{name}"
        storage.put_file(os.path.join(local_dir, name), ref)
        refs.append(ref)
    return refs


def export_model(
    model_state: Mapping[str, torch.Tensor] | MoETransformer,
    model_cfg: ModelConfig,
    storage: Storage,
    out_dir: str,
    *,
    provenance: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = torch.float32,
    add_bos: bool | None = None,
) -> str:
    """Export weights (a model or its state dict) with the dataset root's tokenizer to ``out_dir``.

    ``out_dir`` is a ref under the root or an absolute path/URI; returns its full URI.
    """
    from transformers import GenerationConfig

    state = model_state.state_dict() if isinstance(model_state, torch.nn.Module) else model_state
    sp, meta, tok_digest = load_tokenizer(storage)
    if meta["vocab_size"] > model_cfg.vocab_size:
        raise ExportError(f"tokenizer at {storage.uri(MODEL_REF)} has {meta['vocab_size']} pieces, "
                          f"more than the model's vocab_size={model_cfg.vocab_size}")
    add_bos = _add_bos(storage) if add_bos is None else add_bos
    model_bytes = sp.serialized_model_proto()
    ids = {k: (int(meta[f"{k}_id"]) if int(meta.get(f"{k}_id", -1)) >= 0 else None) for k in ("bos", "eos", "pad")}
    with tempfile.TemporaryDirectory(prefix="shardflow-export-") as tmp:
        try:
            save_hf(state, model_cfg, tmp, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"], dtype=dtype)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        tok = hf_tokenizer(model_bytes, meta, add_bos, model_cfg.max_seq_len)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(model_bytes)
        GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                         do_sample=False).save_pretrained(tmp)
        with open(os.path.join(tmp, "shardflow_export.json"), "w") as f:
            json.dump({"format": EXPORT_FORMAT, "tokenizer_digest": tok_digest, "add_bos": add_bos,
                       "model_config": model_cfg.model_dump(mode="json"), **(provenance or {})}, f, indent=2, sort_keys=True)
        _publish_dir(storage, tmp, out_dir)
    return storage.uri(out_dir)


def export_checkpoint(train_cfg: TrainConfig, storage: Storage, checkpoint: str | None = None, out_dir: str | None = None) -> str:
    """Export ``checkpoint`` (default: the run's latest) to ``out_dir``; returns the directory's URI.

    ``out_dir``: a URI (``s3://...``) or a local path (relative to the current directory, as a user
    typing ``--out DIR`` expects); None = ``runs/<run>/export/step-<n>`` under the dataset root.
    """
    from .eval_model import check_checkpoint_tokenizer, load_model

    model, info = load_model(train_cfg, storage, checkpoint, torch.device("cpu"))
    check_checkpoint_tokenizer(info, load_tokenizer(storage)[2], ExportError)
    if out_dir is None:
        out_dir = export_dir(train_cfg.run, info.get("step"))
    elif "://" not in out_dir:
        out_dir = os.path.abspath(os.path.expanduser(out_dir))
    provenance = {"run": train_cfg.run, "checkpoint": info, "model_config_digest": model_config_digest(train_cfg.model)}
    return export_model(model, train_cfg.model, storage, out_dir, provenance=provenance)
