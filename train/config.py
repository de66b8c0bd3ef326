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
    """One dataset root to train on; several are mixed by weight (``train.data`` explains the schedule).

    Which split is read is the caller's choice (``build_loader(..., split=...)``: train for training,
    val for evaluation), so one list of datasets serves both.
    """

    root: str | None = Field(None, description="Dataset root holding shards/index.json; None = the pipeline's storage root.")
    weight: float = Field(1.0, gt=0, description="Relative share of the global sample stream.")


class LoaderConfig(_Section):
    """The streaming loader (``train.data.build_loader``)."""

    datasets: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec()], min_length=1)
    seed: int = Field(0, ge=0, description="Seeds the sample order (with the epoch); changing it changes every batch.")
    batch_size: int = Field(8, ge=1, description="Sequences per rank per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes; 0 = a reader thread in the trainer's process.")
    shuffle: bool = Field(True, description="Permute members each epoch and rows within a window of members; off = index order.")
    shuffle_window: int = Field(4, ge=1, description="Members whose rows are shuffled together (also the unit of read-ahead).")
    prefetch_members: int = Field(8, ge=1, description="Bounded read-ahead, in tar members per worker.")
    prefetch_batches: int = Field(4, ge=1, description="Assembled batches kept ready per worker.")
    group_batches: int | None = Field(
        None, ge=1, description="Batches assembled and handed over together (amortizes per-batch overhead); None = about 1 Mi tokens.")
    io_threads: int = Field(4, ge=1, description="Concurrent byte-range reads per worker.")
    coalesce_gap_bytes: int | None = Field(
        None, ge=0, description="Merge row reads of a member separated by at most this many bytes; None = 64 KiB locally, 4 MiB on object stores.")
    verify_digests: bool = Field(False, description="Check each shard's sha256 against the index before its first use (reads the whole shard once per process).")
    cache_dir: str | None = Field(None, description="Local cache of members read from remote roots; None = no cache.")
    cache_limit_bytes: int = Field(1 << 30, ge=0, description="Size bound of cache_dir; least recently used members are evicted.")
    pin_memory: bool = Field(True, description="Pin batches when CUDA is available.")


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
    """Evaluation of a checkpoint (``train.evaluate.run_evaluation``); docs/evaluation.md explains each part."""

    enabled: bool = True
    checkpoint: str | None = Field(None, description="Checkpoint URI or ref; None = the run's latest.")
    max_val_batches: int = Field(50, ge=1, description="Bound on validation-shard batches for perplexity and expert statistics.")
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    held_out_docs: int = Field(2000, ge=0, description="Most held-out (val-split) documents read back for per-source perplexity and tasks.")
    max_source_batches: int = Field(10, ge=0, description="Per-source perplexity: batches per source; 0 = skip.")
    cloze_examples: int = Field(200, ge=0, description="Next-word cloze examples built from held-out documents; 0 = skip.")
    cloze_min_context_words: int = Field(16, ge=1)
    mc_examples: int = Field(100, ge=0, description="Examples of the generated held-out continuation task; 0 = skip.")
    mc_choices: int = Field(4, ge=2)
    mc_continuation_words: int = Field(12, ge=1)
    tasks: list[str] = Field(default_factory=list, description="Multiple-choice task files (JSONL) to run.")
    seed: int = 0
    val_fraction: float | None = Field(None, ge=0, le=1, description="Train/val split of documents; None = from the root's pipeline.yaml (prep.tokenize), else the default.")
    split_seed: int | None = Field(None, description="Split hash seed; None = as val_fraction.")
