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
import math
import os
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
    """Parsed lines of a metrics log (for tests, evaluation and reports)."""
    try:
        raw = storage.read_bytes(ref)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class Progress:
    """Rank 0's console: a tqdm bar when tqdm is installed and wanted, else a line every ``log_every`` steps."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool, use_bar: bool = True):
        self.total, self.log_every, self.enabled = total, max(1, log_every), enabled
        self._bar = None
        self._t0 = time.perf_counter()
        self._start = start
        if enabled and use_bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        desc = (f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} "
                f"{_fmt_count(rec['tokens_per_s'])} tok/s")
        if "val_loss" in rec:
            desc += f" val {rec['val_loss']:.4f}"
        if self._bar is not None:
            if step % self.log_every == 0 or step == self.total or "val_loss" in rec:
                self._bar.set_postfix_str(desc, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if step % self.log_every == 0 or step == self.total or "val_loss" in rec:
            elapsed = time.perf_counter() - self._t0
            rate = (step - self._start) / elapsed if elapsed > 0 else 0.0
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"step {step}/{self.total} | {desc} | eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
