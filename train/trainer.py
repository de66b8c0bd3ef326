"""The training loop: streaming batches → MoE Transformer → AdamW, with exact resume.

``train(cfg, storage)`` runs in a plain process (a world of one: tests, a Prefect task, a
notebook) and under ``torchrun`` (one process per device; DDP by default, FSDP2 as an option).

Exact resume is the design constraint everything else bends to. A run killed at any instant and
restarted produces the loss sequence of an uninterrupted run, bit for bit (same world size and
device), because each step is a pure function of what the checkpoint holds:

* the batch: the loader's position is a count of global samples consumed, restored by seeking
  (``train.data``); the order does not depend on when the process started;
* the weights and AdamW moments: DCP tensors, loaded in place, exact;
* the learning rate: a pure function of the step (``optim.WarmupCosine``);
* randomness (router jitter, anything stochastic): every rank's Python/NumPy/torch generator
  states are restored; evaluation runs between save points under a saved-and-restored RNG so it
  cannot shift the training stream;
* arithmetic: the same micro-batch split and reduction order each time; on GPU also
  ``trainer.deterministic: true`` (deterministic kernels, no autotuning — off by default for
  speed, when a resumed GPU run matches the uninterrupted one only to rounding). CPU kernels are
  deterministic either way.

A resume on another world size keeps the global batch by changing the gradient accumulation
(``train.elastic``), so the samples of each step, and the loss curve, stay those of the original run.

What a crash can lose is the work since the last checkpoint; the metrics log is cut back to the
committed step on restart so those steps are not logged twice (``train.metrics``).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from shardflow.storage import Storage, StorageConfig, digest_json
from shardflow.storage.layout import metrics_ref, tensorboard_dir
from shardflow.storage.shards import ShardIndexError, read_index

from .checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng
from .config import TrainConfig
from .data import dataset_storage, tokens_to
from .distributed import (
    DistEnv,
    autocast_dtype,
    check_same_on_all_ranks,
    init_distributed,
    set_grad_sync,
    teardown,
    wrap_model,
)
from .elastic import BatchPlan, GlobalBatchError, resume_grad_accum
from .expert_parallel import clip_grad_norm
from .metrics import MetricsLog, Progress, TensorBoardLog, flops_per_token
from .model import MoETransformer
from .model_config import model_config_digest
from .moe import MoEBlock
from .optim import WarmupCosine, build_optimizer
from .validation import val_batches


class TrainingDataError(ValueError):
    """The shards cannot feed this model (missing, empty, other tokenizer/vocabulary); names the file."""


def check_data(cfg: TrainConfig, storage: Storage, need_val: bool = False) -> dict[str, Any]:
    """Validate every dataset's ``shards/index.json`` against the model before anything is built.

    Returns the first dataset's index. Errors: no index (the data was never packed), an empty
    split, a vocabulary that differs from ``train.model.vocab_size`` (token ids would index out
    of the embedding, or the model would learn from a different tokenizer than the one exported
    with it), sequences longer than ``max_seq_len``, datasets of different tokenizers.
    """
    first: dict[str, Any] | None = None
    for spec in cfg.data.datasets:
        st = dataset_storage(storage, spec.root)
        try:
            index = read_index(st)
        except ShardIndexError as exc:
            raise TrainingDataError(f"no usable training shards: {exc}") from None
        uri = st.uri("shards/index.json")
        splits = ["train"] + (["val"] if need_val else [])
        for split in splits:
            sp = index["splits"].get(split)
            if not sp or not sp.get("samples"):
                raise TrainingDataError(f"{uri}: split {split!r} has no samples"
                                        + (" (set train.trainer.eval_every=0 to train without validation)" if split == "val" else ""))
        if index["vocab_size"] != cfg.model.vocab_size:
            raise TrainingDataError(
                f"{uri}: shards were tokenized with vocab_size={index['vocab_size']} (tokenizer "
                f"{index['tokenizer_digest']}) but train.model.vocab_size={cfg.model.vocab_size}; "
                f"set train.model.vocab_size={index['vocab_size']} or re-tokenize")
        if index["seq_len"] > cfg.model.max_seq_len:
            raise TrainingDataError(f"{uri}: shards hold sequences of {index['seq_len']} tokens but "
                                    f"train.model.max_seq_len={cfg.model.max_seq_len}")
        if first is not None and index["tokenizer_digest"] != first["tokenizer_digest"]:
            raise TrainingDataError(f"{uri}: tokenizer {index['tokenizer_digest']} differs from the first "
                                    f"dataset's {first['tokenizer_digest']}; mixed datasets must share a tokenizer")
        first = first or index
    if first is None:
        raise TrainingDataError("train.data.datasets is empty")
    return first


def moe_dispatch_path(model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, compiled: bool) -> str:
    """Which expert path the model's MoE layers run (``moe.dropless_path``), or ``dense`` without any."""
    block = next((m for m in model.modules() if isinstance(m, MoEBlock)), None)
    if block is None:
        return "dense"
    path = block.dispatch_path(device, dtype or torch.float32, compiled)
    return path if path == "capacity" else f"dropless {path}"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """A training-stream seed per rank (distinct ranks must not draw the same noise)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device):
    """Kernel selection while training, restoring the caller's settings afterwards.

    ``enabled`` (``trainer.deterministic: true``): ``use_deterministic_algorithms``, cuDNN in
    deterministic mode without autotuning, and a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG``,
    read when cuBLAS first starts in the process, i.e. before the first matmul), so a resumed GPU
    run repeats the uninterrupted one bit for bit. Off (the default): cuDNN autotuning
    (``cudnn.benchmark``) and torch's fastest kernels, some of which accumulate with atomics (e.g.
    ``index_add``/scatter backward), so GPU runs agree only to rounding. On CPU both settings give
    the same kernels; bitwise resume holds either way there.
    """
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench, prev_cudnn_det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if enabled:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        # warn_only: an op without a deterministic kernel warns instead of killing a long run.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = device.type == "cuda"
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_bench, prev_cudnn_det


class _Batches:
    """Endless iteration over a loader, kept off the training RNG stream.

    ``iter(DataLoader)`` draws a base seed from the global torch generator. A resumed run starts
    its iterator at another step than the uninterrupted run did, so that draw would shift every
    random number after it (router jitter, dropout); the generator state is therefore put back
    after every call into the loader. The loader's own order is seeded independently.
    """

    def __init__(self, loader: Any):
        self.loader = loader
        self._it: Iterator | None = None

    def next(self) -> torch.Tensor:
        saved = torch.get_rng_state()
        try:
            for _ in range(2):
                if self._it is None:
                    self._it = iter(self.loader)
                try:
                    return next(self._it)
                except StopIteration:  # a loader that ends at each epoch: start the next one
                    self._it = None
            raise TrainingDataError("the training loader yields no batches (fewer samples than ranks x batch_size?)")
        finally:
            torch.set_rng_state(saved)

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor], *,
                   env: DistEnv, grad_clip: float, autocast: torch.dtype | None) -> dict[str, Any]:
    """One clipped AdamW update from ``len(micro_batches)`` accumulated micro-batches ``(B, L+1)``.

    The loss is the model's total (CE + aux + z), averaged over micro-batches; gradients are
    reduced across ranks once, on the last micro-batch. Returns metrics already reduced over
    ranks (mean CE/aux/z, global grad norm, summed expert counts and drops, tokens of the step on
    all ranks). A non-finite loss or norm raises before the update is applied, identically on
    every rank (the values are global). Shared by the trainer and bench/train_gpu.py.
    """
    device = next(iter(model.parameters())).device
    ga = len(micro_batches)
    model.train()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # ce, aux, z, dropped
    counts = None
    tokens = 0
    for i, batch in enumerate(micro_batches):
        batch = tokens_to(batch, device)  # int64 on the device, whatever the loader's out_dtype
        inputs, targets = batch[:, :-1], batch[:, 1:]
        tokens += targets.numel()
        cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with set_grad_sync(model, i == ga - 1):
            with cast:  # forward only: autocast's casts are recorded in the graph, backward follows them
                out = model(inputs, targets, return_logits=False)
            (out.total_loss / ga).backward()
        stats += torch.stack([out.loss.detach(), out.aux_loss.detach(), out.z_loss.detach(),
                              out.dropped_tokens.detach()]).to(torch.float64)
        c = out.expert_counts.detach()
        counts = c if counts is None else counts + c
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = clip_grad_norm(model, max_norm)  # expert slices counted over their EP group
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        grad_norm = grad_norm.full_tensor()
    stats[:3] /= ga
    env.all_reduce_sum(stats)
    env.all_reduce_sum(counts)
    stats[:3] /= env.world_size
    ce, aux, z, dropped = stats.tolist()
    gn = float(grad_norm)
    if not (math.isfinite(ce) and math.isfinite(gn)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite loss ({ce}) or gradient norm ({gn}); the update was not applied. "
                                 "Lower optim.lr or raise warmup, then resume from the last checkpoint.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": ce, "aux_loss": aux, "z_loss": z, "grad_norm": gn,
            "expert_tokens": counts.tolist(), "dropped_tokens": int(dropped), "tokens_step": tokens * env.world_size}


class Trainer:
    """One training run; build with the config, the dataset root and this process's DistEnv."""

    def __init__(self, cfg: TrainConfig, storage: Storage, env: DistEnv | None = None):
        from .data import build_loader

        self.cfg, self.storage = cfg, storage
        self.env = env or DistEnv()
        # Multi-node: every node reads its own config file; all ranks must train the same thing.
        check_same_on_all_ranks(self.env, digest_json(cfg.model_dump(mode="json")), "train configs (digests)")
        tc = cfg.trainer
        self.device = self.env.device
        self.index = check_data(cfg, storage, need_val=tc.eval_every > 0)
        self.model_config = cfg.model.model_dump(mode="json")

        seed_all(tc.seed)  # identical initial weights on every rank (FSDP2 does not broadcast them)
        model = MoETransformer(cfg.model, activation_checkpointing=tc.activation_checkpointing).to(self.device)
        self.n_params, self.n_active = cfg.model.num_params(), cfg.model.num_active_params()
        self.grad_accum = tc.grad_accum  # the configured one until a resume on another world size changes it
        if tc.compile:
            for block in model.blocks:  # per block: small graphs, shared by all layers
                block.compile()
        self.compute_dtype = autocast_dtype(tc.dtype, self.device)
        fsdp = tc.parallelism == "fsdp" and self.env.distributed
        self.model = wrap_model(model, self.env, tc.parallelism, param_dtype=self.compute_dtype if fsdp else None,
                                expert_parallel=tc.expert_parallel)
        self.dispatch_path = moe_dispatch_path(model, self.device, self.compute_dtype, tc.compile)
        if self.env.is_main:
            print(f"[shardflow.train] MoE experts: {self.dispatch_path} ({self.device.type}, "
                  f"{str(self.compute_dtype or torch.float32).removeprefix('torch.')}"
                  f"{', compiled' if tc.compile else ''})", flush=True)
        # FSDP2 casts through its MixedPrecisionPolicy; everything else autocasts.
        self.autocast = self.compute_dtype if not fsdp else None
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.schedule = WarmupCosine.from_config(cfg.optim, tc.steps)

        self.loader = build_loader(cfg.data, storage, self.env.rank, self.env.world_size, split="train")
        self.checkpointer = Checkpointer(storage, cfg.run, cfg.checkpoint.keep_last, self.env)
        self.metrics = MetricsLog(storage, metrics_ref(cfg.run), enabled=self.env.is_main)
        self.tb = TensorBoardLog(storage, tensorboard_dir(cfg.run), enabled=self.env.is_main and cfg.metrics.tensorboard)

    # -- checkpoint state ------------------------------------------------------------------------------
    def _meta(self, step: int, tokens: int) -> dict[str, Any]:
        return {
            "model_config": self.model_config,
            "model_config_digest": model_config_digest(self.model_config),
            "data": {k: self.index[k] for k in ("tokenizer_digest", "vocab_size", "seq_len", "eos_id")},
            "parallelism": self.cfg.trainer.parallelism,
            "expert_parallel": self.cfg.trainer.expert_parallel,
            "loader": self.loader.state_dict(),
            "scheduler": dict(self.schedule.state_dict(), step=step),
            "tokens": tokens,
            "batch_plan": self.batch_plan().to_json(),
            "train_config": self.cfg.model_dump(mode="json"),
        }

    def batch_plan(self) -> BatchPlan:
        return BatchPlan(self.cfg.data.batch_size, self.grad_accum, self.env.world_size)

    def _resume(self) -> tuple[int, int]:
        """Restore the latest committed checkpoint if there is one; (step, tokens seen)."""
        tc = self.cfg.trainer
        latest = self.checkpointer.latest_step() if self.env.is_main else None
        latest = self.env.broadcast_object(latest)
        if latest is None:
            seed_all(_rank_seed(tc.seed, self.env.rank, 0))
            return 0, 0
        meta, rng = self.checkpointer.load(latest, self.model, self.optimizer, self.model_config)
        where = self.storage.uri(self.checkpointer.step_ref(latest))
        saved_tok = meta.get("data", {}).get("tokenizer_digest")
        if saved_tok != self.index["tokenizer_digest"]:
            raise CheckpointError(f"{where}: trained on shards of tokenizer {saved_tok}, but the shards now come "
                                  f"from tokenizer {self.index['tokenizer_digest']}; start a new run")
        try:
            self.loader.load_state_dict(meta["loader"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{where}: its data position does not fit these shards/loader settings: {exc}; "
                                  f"train a new run on the new shards (--set train.run=NAME)") from None
        try:
            self.grad_accum, note = resume_grad_accum(
                BatchPlan.from_json(meta.get("batch_plan")), self.cfg.data.batch_size, tc.grad_accum,
                self.env.world_size, tc.keep_global_batch)
        except GlobalBatchError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        if note and self.env.is_main:
            print(f"[shardflow.train] {note}", flush=True)
        if rng is not None:
            restore_rng(rng)
        else:  # another world size: per-rank streams cannot be carried over, start fresh ones
            seed_all(_rank_seed(tc.seed, self.env.rank, latest))
        changed = self.schedule.differs_from(meta.get("scheduler", {}))
        if changed and self.env.is_main:
            print(f"[shardflow.train] resuming with a changed schedule: {', '.join(changed)}", flush=True)
        return latest, int(meta.get("tokens", 0))

    def _save(self, step: int, tokens: int) -> str:
        ref = self.checkpointer.save(step, self.model, self.optimizer, self._meta(step, tokens), capture_rng())
        if self.env.is_main:
            self.metrics.flush(durable=True)  # the log covers the step before the pointer names it
            self.tb.flush()
        self.checkpointer.commit(step)
        return ref

    # -- one optimizer step ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self, batches: _Batches) -> dict[str, Any]:
        micro = [batches.next() for _ in range(self.grad_accum)]
        return optimizer_step(self.model, self.optimizer, micro, env=self.env, grad_clip=self.cfg.optim.grad_clip,
                              autocast=self.autocast)

    @torch.no_grad()
    def evaluate(self, n_batches: int) -> float:
        """Mean CE over the first ``n_batches`` global val batches (``batch_size`` rows per rank) of the
        first dataset, in index order: the rows ``shardflow eval``'s perplexity reads
        (:mod:`shardflow.train.validation`), whatever the number of ranks."""
        rng = capture_rng()
        st = dataset_storage(self.storage, self.cfg.data.datasets[0].root)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for rows in val_batches(st, self.index, self.cfg.data.batch_size, n_batches, self.env.rank, self.env.world_size):
                batch = torch.from_numpy(rows.astype(np.int64)).to(self.device)
                with self._autocast():
                    out = self.model(batch[:, :-1], batch[:, 1:], return_logits=False)
                n = batch[:, 1:].numel()
                total += torch.stack([out.loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=self.device)])
        finally:
            self.model.train()
            restore_rng(rng)
        self.env.all_reduce_sum(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self, max_steps: int | None = None) -> dict[str, Any]:
        tc, ck = self.cfg.trainer, self.cfg.checkpoint
        t_start = time.perf_counter()
        start, tokens = self._resume() if ck.enabled else (0, 0)
        if not ck.enabled:
            seed_all(_rank_seed(tc.seed, self.env.rank, 0))
        end = tc.steps if max_steps is None else min(tc.steps, max_steps)
        self.metrics.start(start)
        self.tb.start(start)
        m = self.cfg.model
        progress = Progress(tc.steps, start, tc.log_every, enabled=self.env.is_main and tc.progress, device=self.device,
                            flops_per_token=flops_per_token(self.n_active, m.n_layers, m.dim, int(self.index["seq_len"])),
                            world_size=self.env.world_size)
        batches = _Batches(self.loader)
        last: dict[str, Any] = {}
        ckpt_ref = self.checkpointer.step_ref(start) if start else None
        try:
            for step in range(start + 1, end + 1):
                t0 = time.perf_counter()
                lr = self.schedule.apply(self.optimizer, step)
                st = self.train_step(batches)
                step_tokens = st.pop("tokens_step")
                tokens += step_tokens
                dt = time.perf_counter() - t0
                rec = {"step": step, "loss": st["loss"], "aux_loss": st["aux_loss"], "z_loss": st["z_loss"],
                       "lr": lr, "grad_norm": st["grad_norm"], "tokens": tokens, "tokens_per_s": step_tokens / dt,
                       "step_time_s": dt, "expert_tokens": st["expert_tokens"], "dropped_tokens": st["dropped_tokens"]}
                if tc.eval_every > 0 and step % tc.eval_every == 0:
                    rec["val_loss"] = self.evaluate(tc.eval_batches)
                self.metrics.append(rec)
                self.tb.append(rec)
                progress.update(step, rec)
                last = rec
                save = ck.enabled and (step == end or (ck.every_steps > 0 and step % ck.every_steps == 0))
                if save:
                    ckpt_ref = self._save(step, tokens)
                elif self.env.is_main and step % max(1, tc.log_every) == 0:
                    self.metrics.flush()
                    self.tb.flush()
        finally:
            batches.close()
            progress.close()
            self.metrics.close()
            self.tb.close()
        return {
            "run": self.cfg.run,
            "start_step": start,
            "step": last.get("step", start),
            "steps": tc.steps,
            "loss": last.get("loss"),
            "val_loss": last.get("val_loss"),
            "tokens": tokens,
            "world_size": self.env.world_size,
            "params": self.n_params,
            "active_params": self.n_active,
            "grad_accum": self.grad_accum,
            "dispatch_path": self.dispatch_path,
            "checkpoint": self.storage.uri(ckpt_ref) if ckpt_ref else None,
            "metrics": self.storage.uri(self.metrics.ref),
            "wall_time_s": time.perf_counter() - t_start,
        }


def train(cfg: TrainConfig, storage: Storage | StorageConfig, *, max_steps: int | None = None) -> dict[str, Any]:
    """Train (or resume) run ``cfg.run`` on the shards under ``storage``; returns a summary dict.

    Works in-process (world of one) and under torchrun (joins the process group from the
    environment and leaves it at the end). ``max_steps`` stops early at that step (with a
    checkpoint) without changing the schedule, which is always planned for ``trainer.steps``.
    Summary keys: run, start_step, step, steps, loss, val_loss, tokens, world_size, params,
    active_params, checkpoint (URI of the last committed step dir), metrics (URI), wall_time_s.
    """
    if isinstance(storage, StorageConfig):
        storage = Storage.from_config(storage)
    from .lease import RunLease

    env = init_distributed(cfg.trainer.device)
    try:
        with RunLease(storage, cfg.run, env) as lease, _deterministic(cfg.trainer.deterministic, env.device):
            trainer = Trainer(cfg, storage, env)
            trainer.checkpointer.fence = trainer.metrics.fence = lease.fence  # a lost lease publishes nothing
            return trainer.fit(max_steps=max_steps)
    finally:
        teardown(env)


__all__ = ["Trainer", "TrainingDataError", "check_data", "train"]
