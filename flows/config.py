"""The pipeline config: one YAML file composed of each part's own section.

``flows`` is the only part that sees the whole file; it hands ``storage``, ``prep``, ``train`` and
``eval`` their own sections. Errors name the file and the dotted key (unknown key, wrong type,
missing value), and ``--set section.key=value`` overrides are applied before validation so they get
the same checks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardflow.dataprep.config import PrepConfig
from shardflow.storage import Storage, StorageConfig, digest_json
from shardflow.storage.config import OverrideError, apply_override, mask_secrets
from shardflow.train.config import EvalConfig, TrainConfig


class FlowsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    runner: Literal["process", "thread", "ray", "sequential"] = "process"
    process_pool: Literal["prefect", "executor"] = Field(
        "executor", description="runner=process: 'prefect' = Prefect's ProcessPoolTaskRunner (task engine in each worker); "
                               "'executor' = tasks on threads, shard bodies in a plain process pool (much less per-task overhead).")
    ray_address: str | None = None
    retries: int = 2
    retry_delay_s: float = 2.0
    schedules: dict[str, str] = Field(default_factory=lambda: {"pipeline": "0 3 * * *"},
                                      description="Deployment name -> cron for `shardflow serve`.")
    work_pool: str | None = None
    gpu_work_pool: str | None = "gpu-pool"
    lock_wait_s: float = Field(0.0, ge=0, description="How long a run waits for another run's lock on the dataset root before failing.")
    lock_ttl_s: float = Field(60.0, gt=0, description="Lease of the root lock on object stores: a lock not refreshed for this long "
                                                       "is taken over (a local lock dies with its process).")
    progress_min_shards: int = Field(4, ge=1, description="Stages with at least this many shards to run get a progress artifact.")
    train_launcher: Literal["auto", "inprocess", "torchrun"] = Field(
        "auto", description="How the train flow runs the trainer: auto = in this process for one process, torchrun for more.")
    torchrun_args: list[str] = Field(default_factory=list, description="Extra torchrun arguments (e.g. --nnodes=2 --rdzv-endpoint=host:29400 for multi-node); empty = --standalone.")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "shardflow"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    prep: PrepConfig = Field(default_factory=PrepConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    flows: FlowsConfig = Field(default_factory=FlowsConfig)

    def storage_handle(self) -> Storage:
        return Storage.from_config(self.storage)

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, as written to ``pipeline.yaml`` and digested: secrets appear masked,
        never in clear (``storage.key``/``secret``, and any value under a key/secret/token/password-like
        key in any section, ``storage.options`` included)."""
        return mask_secrets(self.model_dump(mode="json"))

    def digest(self) -> str:
        return digest_json(self.resolved())


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key"
        elif kind == "missing":
            msg = "required value is missing"
        else:
            msg = err["msg"]
            if "input" in err and kind not in ("model_type",):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (or start from ``base``/defaults), apply overrides, validate."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = dict(base or {})
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        # Relative local paths in the file are relative to the file, not to the caller's cwd.
        _anchor_paths(loaded, Path(path).resolve().parent)
        data = _deep_merge(data, loaded)
    for ov in overrides or []:
        try:
            apply_override(data, ov)
        except OverrideError as exc:
            raise ConfigError(f"{source} (--set {ov}): {exc}") from None
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (a file sets only what it changes)."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _anchor(p: str, base: Path) -> str:
    if "://" in p or os.path.isabs(p):
        return p
    return str((base / p).resolve()) if not any(c in p for c in "*?[") else str(base / p)


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    st = data.get("storage")
    if isinstance(st, dict) and isinstance(st.get("root"), str):
        st["root"] = _anchor(st["root"], base)
    prep = data.get("prep")
    if isinstance(prep, dict) and isinstance(prep.get("inputs"), list):
        prep["inputs"] = [_anchor(p, base) if isinstance(p, str) else p for p in prep["inputs"]]


def write_resolved(cfg: PipelineConfig, storage: Storage | None = None) -> str:
    """Write ``pipeline.yaml`` (resolved config + digest) to the dataset root; return the digest."""
    storage = storage or cfg.storage_handle()
    digest = cfg.digest()
    body = {"digest": digest, "config": cfg.resolved()}
    storage.write_text("pipeline.yaml", yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return digest
