"""``runs/<run>/metrics.jsonl`` (one JSON line per optimizer step) and the console progress line.

A line (rank 0 writes; every value is already reduced over ranks)::

    step            optimizer step, 1-based, consecutive
    loss            cross-entropy, mean over micro-batches and ranks (what perplexity is made of)
    aux_loss        load-balancing loss, mean over MoE layers (1.0 = balanced); z_loss: router z-loss
    lr              learning rate of this update;  grad_norm: global norm before clipping
    tokens          target tokens trained on so far, all ranks;  tokens_per_s, step_time_s: wall clock
    expert_tokens   [n_moe_layers][n_experts] token-slots routed to each expert in this step (all
                    ranks and micro-batches; a token counts once per chosen expert, i.e. top_k times)
    dropped_tokens  token-slots dropped by capacity dispatch in this step (0 when dropless)
    val_loss        only on steps where validation ran (trainer.eval_every)

Non-finite floats are written as the strings "nan"/"inf" (JSON has no NaN).

Why the log is cut back on resume: a crash loses the steps after the last checkpoint, and the
resumed run does them again; without the cut those steps would appear twice. On (re)start the
file is rewritten atomically to exactly the committed steps, then appended to — and the trainer
makes it durable before every checkpoint is committed, so it never has fewer lines than the
checkpoint it resumes from.

Why a local spool for object stores: S3 has no append. There the log lives in a local file that
is uploaded whole (one atomic PUT) at every flush — every ``log_every`` steps and before each
checkpoint commit — so readers see a complete file, never a partial line.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

from shardflow.storage import Storage


def _finite(x: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the line stays valid JSON (and visibly bad)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class MetricsLog:
    """Append-only per-step log with crash-consistent truncation; a no-op on ranks other than 0."""

    def __init__(self, storage: Storage, ref: str, enabled: bool = True):
        self.storage = storage
        self.ref = ref
        self.enabled = enabled
        self._local = storage.protocol_of(ref) == "file"
        self._f = None
        self._spool_dir: str | None = None
        self.lines = 0
        self.fence: Any = None  # raises once the run lease is lost: a stale trainer never uploads its log

    def _path(self) -> str:
        if self._local:
            return self.storage.resolve(self.ref)[1]
        if self._spool_dir is None:
            self._spool_dir = tempfile.mkdtemp(prefix="shardflow-metrics-")
        return os.path.join(self._spool_dir, "metrics.jsonl")

    def start(self, keep_through_step: int) -> int:
        """Keep the lines of steps ``<= keep_through_step`` (0 = none), publish that atomically, open for append.

        Returns how many lines were kept. A torn last line (a crash mid-write) is dropped.
        """
        if not self.enabled:
            return 0
        kept: list[bytes] = []
        try:
            raw = self.storage.read_bytes(self.ref)
        except FileNotFoundError:
            raw = b""
        for line in raw.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= keep_through_step:
                kept.append(line.rstrip(b"\r\n") + b"\n")
        body = b"".join(kept)
        self.storage.write_bytes(self.ref, body)
        path = self._path()
        if not self._local:
            with open(path, "wb") as f:
                f.write(body)
        self._f = open(path, "ab")  # noqa: SIM115 — held open for the run, closed by close()
        self.lines = len(kept)
        return self.lines

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._f is None:
            raise RuntimeError("MetricsLog.start() must be called before append()")
        line = json.dumps({k: _finite(v) for k, v in record.items()}, separators=(",", ":"), allow_nan=False)
        self._f.write(line.encode("utf-8") + b"\n")
        self._f.flush()  # visible to local readers (and tests watching the run) at once
        self.lines += 1

    def flush(self, durable: bool = False) -> None:
        """Make the log visible (object stores: upload) and, if ``durable``, crash-safe (fsync)."""
        if not self.enabled or self._f is None:
            return
        self._f.flush()
        if self._local:  # appends of a stale trainer land in the file a successor has replaced: harmless
            if durable:
                os.fsync(self._f.fileno())
        else:
            if self.fence is not None:
                self.fence()
            self.storage.put_file(self._path(), self.ref)

    def close(self) -> None:
        if self._f is not None:
            self.flush(durable=True)
            self._f.close()
            self._f = None
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
            self._spool_dir = None


def read_metrics(storage: Storage, ref: str) -> list[dict[str, Any]]:
    """The records of a metrics log, in order ([] when absent): the one reader (reports, eval, demo, tests).

    Unparsable lines are skipped, not fatal: a torn last line (a crash mid-write) or a foreign
    line must not stop a report from coming out of a run.
    """
    try:
        raw = storage.read_bytes(ref)
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


# -- what a step line says ------------------------------------------------------------------------

LOGGER_NAME = "shardflow.train"
log = logging.getLogger(LOGGER_NAME)
"""Rank 0's progress lines. ``python -m shardflow.train`` sends them to stdout; the Prefect train
flow forwards them into its run log (in-process: a handler; under torchrun: the streamed stdout)."""

STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) \|")
"""How a progress line starts; the flow reads the step from it for its progress artifact."""

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "B200": 2250e12}
"""Dense bf16 peak FLOP/s per GPU by product name (vendor datasheets, without sparsity): MFU's denominator."""


def log_cadence(total: int, log_every: int, max_gap_fraction: float = 0.05) -> int:
    """Steps between progress lines: ``log_every``, but never more than 5 % of the run."""
    return max(1, min(int(log_every), int(total * max_gap_fraction) or 1))


def flops_per_token(n_active_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per active parameter (forward + backward) plus attention's
    12·layers·dim·seq (PaLM's MFU accounting, appendix B)."""
    return 6.0 * n_active_params + 12.0 * n_layers * dim * seq_len


def peak_flops(device: Any) -> float | None:
    """Peak bf16 FLOP/s of one accelerator of ``device``'s kind; None where unknown (CPUs)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    try:
        import torch

        name = torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001
        return None
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name.upper().replace("NVIDIA ", ""):
            return PEAK_FLOPS[key]
    return None


def memory_bytes(device: Any) -> int | None:
    """Peak memory of this process: allocated CUDA memory on a GPU, else the peak resident set size."""
    try:
        if getattr(device, "type", str(device)) == "cuda":
            import torch

            return int(torch.cuda.max_memory_allocated(device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except Exception:  # noqa: BLE001
        return None


def expert_imbalance(expert_tokens: Any) -> float | None:
    """Worst layer's max/mean token-slots per expert in a step (1.0 = perfectly balanced)."""
    worst = None
    for layer in expert_tokens or []:
        if not layer:
            continue
        mean = sum(layer) / len(layer)
        if mean > 0:
            r = max(layer) / mean
            worst = r if worst is None else max(worst, r)
    return worst


def step_line(step: int, total: int, rec: dict[str, Any], eta_s: float | None = None, mfu: float | None = None,
              mem: int | None = None) -> str:
    """``step 40/300 | loss 5.1234 | lr 3.00e-03 | gnorm 0.812 | 41.2k tok/s | mfu 38.1% | mem 1.2G | imb 1.31 | eta 20s``."""
    parts = [f"step {step}/{total}", f"loss {rec['loss']:.4f}"]
    if "val_loss" in rec:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"{_fmt_count(rec['tokens_per_s'])} tok/s"]
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if mem is not None:
        parts.append(f"mem {_fmt_count(mem)}B")
    imb = expert_imbalance(rec.get("expert_tokens"))
    if imb is not None:
        parts.append(f"imb {imb:.2f}")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"eta {eta_s:.0f}s")
    return " | ".join(parts)


class Progress:
    """Rank 0's progress: a line through :data:`log` every :func:`log_cadence` steps (and at every
    validation and the last step); a tqdm bar as well, only when stderr is a terminal.

    ``flops_per_token`` and ``device`` give MFU (where the accelerator's peak is known) and memory.
    """

    def __init__(self, total: int, start: int, log_every: int, enabled: bool, use_bar: bool = True,
                 flops_per_token: float | None = None, device: Any = None, world_size: int = 1):
        self.total, self.enabled = total, enabled
        self.every = log_cadence(total, log_every)
        self.device, self.world_size = device, max(1, world_size)
        peak = peak_flops(device) if device is not None else None
        self._flops_per_token = flops_per_token if peak else None
        self._peak = peak
        self._bar = None
        self._t0 = time.perf_counter()
        self._start = start
        if enabled and use_bar and _is_tty(sys.stderr):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def due(self, step: int, rec: dict[str, Any]) -> bool:
        return step % self.every == 0 or step == self.total or "val_loss" in rec

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if not self.due(step, rec):
            return
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else None
        mfu = None
        if self._flops_per_token and self._peak:
            mfu = rec["tokens_per_s"] * self._flops_per_token / (self._peak * self.world_size)
        line = step_line(step, self.total, rec, eta, mfu, memory_bytes(self.device) if self.device is not None else None)
        if self._bar is not None:
            self._bar.set_postfix_str(line.split(" | ", 1)[1], refresh=False)
        log.info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def log_to_stdout() -> None:
    """Send :data:`log`'s lines to stdout, one flushed line each (``python -m shardflow.train``, torchrun ranks)."""
    if not any(getattr(h, "_shardflow_stdout", False) for h in log.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(message)s"))
        h._shardflow_stdout = True  # type: ignore[attr-defined]
        log.addHandler(h)
    log.setLevel(logging.INFO)


# -- TensorBoard ----------------------------------------------------------------------------------

TB_SCALARS = ("loss", "val_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "dropped_tokens")


class TensorBoardLog:
    """Every step's scalars as TensorBoard event files under ``runs/<run>/tb/`` (rank 0; ``train.metrics.tensorboard``).

    Written with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package), so ``tensorboard
    --logdir <root>/runs`` reads them. A resumed run opens a new event file with ``purge_step`` at
    the first step it redoes: TensorBoard then discards the older file's steps from there on, as
    the metrics log is cut back. On object stores the files are written locally and uploaded whole
    at every flush (S3 has no append), like the metrics log.
    """

    def __init__(self, storage: Storage, ref: str, enabled: bool = True):
        self.storage, self.ref, self.enabled = storage, ref, enabled
        self._local = storage.protocol_of(ref) == "file"
        self._w = None
        self._dir: str | None = None

    def start(self, start_step: int) -> None:
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard not installed: the metrics log still has everything
            log.warning("train.metrics.tensorboard: no TensorBoard event files (%s); pip install tensorboard", exc)
            self.enabled = False
            return
        if self._local:
            self._dir = self.storage.resolve(self.ref)[1]
            os.makedirs(self._dir, exist_ok=True)
        else:
            self._dir = tempfile.mkdtemp(prefix="shardflow-tb-")
        self._w = SummaryWriter(log_dir=self._dir, purge_step=start_step + 1 if start_step else None,
                                flush_secs=3600, max_queue=1000)

    def append(self, rec: dict[str, Any]) -> None:
        if self._w is None:
            return
        step = int(rec["step"])
        for key in TB_SCALARS:
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                self._w.add_scalar(tag, float(v), step)
        imb = expert_imbalance(rec.get("expert_tokens"))
        if imb is not None:
            self._w.add_scalar("train/expert_imbalance", imb, step)

    def flush(self) -> None:
        if self._w is None:
            return
        self._w.flush()
        if not self._local and self._dir is not None:
            for name in sorted(os.listdir(self._dir)):
                self.storage.put_file(os.path.join(self._dir, name), f"{self.ref}/{name}")

    def close(self) -> None:
        if self._w is None:
            return
        self.flush()
        self._w.close()
        self._w = None
        if not self._local and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
