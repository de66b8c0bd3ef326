"""The model an evaluation or an export scores: a checkpoint's weights, and the tokenizer it needs.

Why the tokenizer check: a model is only meaningful with the tokenizer its shards were made with;
the checkpoint records that tokenizer's digest and anything else is refused, naming both.
"""
from __future__ import annotations

from typing import Any

import torch

from shardflow.storage import Storage

from .checkpoint import load_model_weights
from .config import TrainConfig
from .eval_data import EvaluationError
from .model import MoETransformer


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise EvaluationError("eval.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def load_model(train_cfg: TrainConfig, storage: Storage, checkpoint: str | None, device: torch.device) -> tuple[MoETransformer, dict[str, Any]]:
    """The run's model with a checkpoint's weights, in eval mode; and {ref, uri, step, tokens}.

    A checkpoint URI that does not exist, or whose recorded model config differs from
    ``train_cfg.model``, is a :class:`~shardflow.train.checkpoint.CheckpointError` naming the
    checkpoint (and every differing config field).
    """
    model = MoETransformer(train_cfg.model)
    info = load_model_weights(model, storage, train_cfg, checkpoint)  # CheckpointError names the checkpoint
    meta = info.pop("meta", {})
    info["tokens"] = meta.get("tokens")
    info["tokenizer_digest"] = (meta.get("data") or {}).get("tokenizer_digest")
    return model.to(device).eval(), info


def check_checkpoint_tokenizer(info: dict[str, Any], tokenizer_digest: str, error: type[Exception] = RuntimeError) -> None:
    """A model is only meaningful with the tokenizer it was trained with: refuse any other."""
    trained = info.get("tokenizer_digest")
    if trained and trained != tokenizer_digest:
        raise error(f"{info['uri']} was trained on shards of tokenizer {trained}, but the dataset root's "
                    f"tokenizer is {tokenizer_digest}; evaluate or export it against its own dataset root")
