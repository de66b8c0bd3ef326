"""Typed configuration of training and evaluation (the ``train`` and ``eval`` sections).

Each component owns its class, torchtitan style: the model (``train.model_config.ModelConfig``), the data
loader, the optimizer and schedule, the trainer loop and checkpoints, evaluation.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .model_config import ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Section):
    """One dataset root to train on; several are mixed by weight (``train.data_order`` explains the schedule).

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
    prefetch_batches: int = Field(4, ge=1, description="Batches kept ready per DataLoader worker (rounded up to whole groups, at least 2); "
                                  "in-process batches are gathered on demand from the read-ahead windows.")
    group_batches: int | None = Field(
        None, ge=1, description="Batches planned (and, from DataLoader workers, handed over) together; amortizes per-group "
        "overhead. None = about 2 Mi tokens, at most 64 batches.")
    io_threads: int | None = Field(
        None, ge=0, description="Concurrent member reads per worker; 0 = in the loader thread; None = 0 for local roots, 4 for object stores.")
    coalesce_gap_bytes: int | None = Field(
        None, ge=0, description="Merge row reads of a member separated by at most this many bytes; None = 64 KiB locally, 4 MiB on object stores.")
    verify_digests: bool = Field(False, description="Check each shard's sha256 against the index before its first use (reads the whole shard once per process).")
    cache_dir: str | None = Field(None, description="Local cache of members read from remote roots; None = no cache.")
    cache_limit_bytes: int = Field(1 << 30, ge=0, description="Size bound of cache_dir; least recently used members are evicted.")
    pin_memory: bool = Field(True, description="Pin batches when CUDA is available.")
    out_dtype: Literal["int64", "int32", "native"] = Field(
        "int64", description="Dtype of delivered batches: int64 (what the model takes), or int32 / native (the shards' "
        "uint16/uint32) for 4x / 2x less host memory traffic; the trainer widens those to int64 on the device.")


class OptimConfig(_Section):
    """AdamW and its warmup + cosine schedule (``train.optim``)."""

    lr: float = Field(3e-3, gt=0, description="Peak learning rate, reached at the end of warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr, reached at trainer.steps.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled decay of matrices; never norms, biases, embeddings.")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(20, ge=0, description="Linear warmup from lr/warmup_steps to lr.")
    grad_clip: float = Field(1.0, ge=0, description="Max global gradient norm; 0 = no clipping (the norm is still logged).")
    fused: bool | None = Field(None, description="Fused AdamW; None = when available on the device.")


class CheckpointConfig(_Section):
    """DCP checkpoints under ``runs/<run>/checkpoints/`` (``train.checkpoint``)."""

    every_steps: int = Field(100, ge=0, description="Save every N optimizer steps (and always at the last step); 0 = last only.")
    keep_last: int = Field(3, ge=0, description="Committed checkpoints kept; older ones are deleted after a newer is published. 0 = all.")
    enabled: bool = Field(True, description="Off: neither save nor resume.")


class TrainerConfig(_Section):
    """The training loop (``train.trainer``)."""

    steps: int = Field(200, ge=1, description="Optimizer steps of the run; the schedule is planned for this many.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches (of data.batch_size per rank) per optimizer step.")
    parallelism: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: DDP (replicated) or FSDP2 (sharded).")
    expert_parallel: int = Field(1, ge=1, description="Ranks each expert stack is split over (EP groups of consecutive ranks, "
                                 "all-to-all token dispatch); 1 = off. Must divide model.n_experts and the process count.")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    activation_checkpointing: bool = Field(False, description="Recompute block activations in backward (memory for compute).")
    log_every: int = Field(10, ge=1, description="Progress line (at most 5 % of the run apart) and metrics upload cadence, in steps.")
    eval_every: int = Field(0, ge=0, description="Validation loss every N steps on the val split; 0 = never.")
    eval_batches: int = Field(20, ge=1, description="Batches per rank per validation.")
    seed: int = Field(0, ge=0, description="Initial weights and the per-rank random streams.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = Field(
        False, description="Deterministic kernels (use_deterministic_algorithms, cuDNN deterministic, fixed cuBLAS workspace): "
        "bitwise resume on GPU at some speed. Off = cuDNN autotuning and the fastest kernels; on CPU both are bitwise.")
    keep_global_batch: bool = Field(
        True, description="Resuming on another world size: set grad_accum so that batch_size x grad_accum x world size "
        "equals the checkpoint's global batch (refuse where impossible); false = grad_accum as configured.")
    progress: bool = Field(True, description="Rank 0 progress lines (logger shardflow.train); a tqdm bar too on a terminal.")


class MetricsConfig(_Section):
    """What a run records besides ``runs/<run>/metrics.jsonl`` (``train.metrics``)."""

    tensorboard: bool = Field(True, description="TensorBoard event files under runs/<run>/tb/ (rank 0).")


class TrainConfig(_Section):
    """The ``train`` section: run name, model, data, optimizer, loop, checkpoints."""

    run: str = Field("demo", pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name: runs/<run>/ under the dataset root.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: LoaderConfig = Field(default_factory=LoaderConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)

    @model_validator(mode="after")
    def _check_expert_parallel(self) -> TrainConfig:
        ep = self.trainer.expert_parallel
        if self.model.n_experts % ep:
            raise ValueError(f"trainer.expert_parallel={ep} must divide model.n_experts={self.model.n_experts}")
        return self


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
    compare_with: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]+$",
        description="A baseline run under the same dataset root: its latest checkpoint is scored on the same validation "
        "rows and the report gets a 'vs baseline' table (val loss, active and total parameters, tokens seen, difference).")
