"""Typed configuration of training and evaluation (the ``train`` and ``eval`` sections).

Each component owns its class, torchtitan style: the model (``train.model.ModelConfig``), the data
loader, the optimizer and schedule, the trainer loop and checkpoints, evaluation.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .model import ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Section):
    root: str | None = Field(None, description="Dataset root holding shards/index.json; None = the pipeline's storage root.")
    weight: float = 1.0
    split: Literal["train", "val"] = "train"


class LoaderConfig(_Section):
    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec()])
    seed: int = 0
    batch_size: int = Field(8, description="Sequences per rank per micro-step.")
    num_workers: int = 0
    prefetch_members: int = Field(4, description="Bounded read-ahead, in tar members per worker.")
    verify_digests: bool = False
    cache_dir: str | None = None
    cache_limit_bytes: int = 1 << 30
    pin_memory: bool = True


class OptimConfig(_Section):
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 20
    grad_clip: float = 1.0
    fused: bool | None = Field(None, description="Fused AdamW; None = when available on the device.")


class CheckpointConfig(_Section):
    every_steps: int = 100
    keep_last: int = 3
    enabled: bool = True


class TrainerConfig(_Section):
    steps: int = 200
    grad_accum: int = 1
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = True
    progress: bool = True


class TrainConfig(_Section):
    run: str = "demo"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: LoaderConfig = Field(default_factory=LoaderConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)


class EvalConfig(_Section):
    enabled: bool = True
    checkpoint: str | None = Field(None, description="Checkpoint URI; None = the run's latest.")
    max_val_batches: int = 50
    batch_size: int = 8
    cloze_examples: int = 200
    tasks: list[str] = Field(default_factory=list, description="Multiple-choice task files (JSONL) to run.")
    seed: int = 0
