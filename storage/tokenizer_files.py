"""The tokenizer files of a dataset root: where they are, loading them, reading the model's fields.

Why this lives in the contract layer: the tokenizer stage (dataprep) writes ``tokenizer/spm.model``
and ``tokenizer/tokenizer.json``; the tokenize stage, evaluation and the Hugging Face export read
them. A model whose bytes no longer match the digest recorded beside it is refused here, for all
readers alike, so a model can never be used with another tokenizer than the one its shards were
made with.

Why a protobuf reader of our own: the sentencepiece model is a serialized ``ModelProto``; reading
(and, for the tokenizer stage, editing) a few of its fields takes a few lines of wire-format code,
where sentencepiece's own bindings would need the optional protobuf package.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from .store import Storage

TOKENIZER_DIR = "tokenizer"
MODEL_REF = f"{TOKENIZER_DIR}/spm.model"
VOCAB_REF = f"{TOKENIZER_DIR}/spm.vocab"
META_REF = f"{TOKENIZER_DIR}/tokenizer.json"


class TokenizerMissingError(FileNotFoundError):
    """The tokenizer stage has not produced a model yet."""


def load_tokenizer(storage: Storage) -> tuple[Any, dict[str, Any], str]:
    """(sentencepiece processor, tokenizer.json meta, model digest) of the dataset root's tokenizer."""
    import sentencepiece as spm

    try:
        model = storage.read_bytes(MODEL_REF)
        meta = storage.read_json(META_REF)
    except FileNotFoundError:
        raise TokenizerMissingError(f"{storage.uri(MODEL_REF)}: no tokenizer model; run the tokenizer stage first") from None
    digest = "sha256:" + hashlib.sha256(model).hexdigest()
    if meta.get("model_digest") != digest:
        raise ValueError(f"{storage.uri(META_REF)} describes model {meta.get('model_digest')}, but {storage.uri(MODEL_REF)} is {digest}")
    return spm.SentencePieceProcessor(model_proto=model), meta, digest


# -- protobuf wire format ------------------------------------------------------------------------------

def read_varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, next offset) of the base-128 varint at ``data[i:]``."""
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes, bytes]]:
    """(field number, value, raw bytes of the whole field incl. tag) of a serialized protobuf message.

    Values are ints for varints and bytes otherwise; an unknown wire type is a ValueError.
    """
    i = 0
    while i < len(data):
        start = i
        tag, i = read_varint(data, i)
        wire = tag & 7
        if wire == 0:
            value, i = read_varint(data, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = data[i:i + n], i + n
        elif wire == 2:
            n, i = read_varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield tag >> 3, value, data[start:i]
