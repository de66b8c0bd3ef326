"""The pipeline config: one YAML file composed of each part's own section.

``flows`` is the only part that sees the whole file; it hands ``storage``, ``prep``, ``train`` and
``eval`` their own sections. Errors name the file and the dotted key (unknown key, wrong type,
missing value), and ``--set section.key=value`` overrides are applied before validation so they get
the same checks.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shardflow.dataprep.config import PrepConfig
from shardflow.dataprep.stages import PIPELINE_GROUPS
from shardflow.storage import Storage, StorageConfig, digest_json
from shardflow.storage.config import OverrideError, apply_override, mask_secrets
from shardflow.train.config import EvalConfig, TrainConfig

from .errors import UserError

RESOLVED_FILE = "pipeline.yaml"
"""The resolved config a dataset root holds (``{digest, config}``, secrets masked): the root describes itself."""

CONFIG_ENV = "SHARDFLOW_CONFIG"
"""A deployment run without ``config_path`` reads the config file this names, on the machine it runs on."""

MASKED_SECRET = "**********"
"""How pydantic dumps a ``SecretStr``; a masked value read back means "not recorded", never the secret."""


def deployment_names() -> list[str]:
    """Every deployment ``shardflow serve`` creates: the keys ``flows.schedules`` may use."""
    return ["pipeline", "prep", *(f"prep-{g}" for g in PIPELINE_GROUPS), "train", "evaluate"]


_CRON_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day of month", 1, 31, {}),
                ("month", 1, 12, {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}),
                ("day of week", 0, 7, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}))


def _plain_cron_error(expr: str) -> str | None:
    """Why ``expr`` is not a plain 5-field cron (numbers, names, ``*``, ranges, steps, lists), or None."""
    fields = expr.split()
    if len(fields) != 5:
        return f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
    for text, (name, lo, hi, names) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            rng, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return f"{name}: bad step {step!r}"
            if rng == "*":
                continue
            bounds = rng.split("-")
            if len(bounds) > 2 or not all(bounds):
                return f"{name}: cannot read {item!r}"
            values = []
            for b in bounds:
                v = names.get(b.lower()) if not b.isdigit() else int(b)
                if v is None or not lo <= v <= hi:
                    return f"{name}: {b!r} is not in {lo}-{hi}"
                values.append(v)
            if len(values) == 2 and values[0] > values[1]:
                return f"{name}: range {rng!r} runs backwards"
    return None


def check_cron(expr: str) -> str:
    """``expr`` if Prefect's server accepts it as a cron schedule, else ValueError saying why.

    Plain 5-field crons (numbers, names, ``*``, ranges, steps, lists) are judged here without
    importing Prefect, so ``config validate``, ``prep`` and a user error stay fast; anything else
    (macros, ``L``, ``#``, a seconds field, wrapping ranges) goes to Prefect's own validator.
    tests/flows/test_cli_errors.py checks that both agree on what the server accepts.
    """
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"invalid cron {expr!r}: empty")
    why = _plain_cron_error(expr)
    if why is None:
        return expr
    exotic = len(expr.split()) == 6 or any(c in expr for c in "LW#?@") or "backwards" in why
    if not exotic:  # a plain cron with a plain mistake: say which field, without importing Prefect
        raise ValueError(f"invalid cron {expr!r}: {why}")
    from prefect._internal.schemas.validators import validate_cron_string  # the authority, for the rest

    try:
        return validate_cron_string(expr)
    except ValueError as exc:
        raise ValueError(f"invalid cron {expr!r}: {exc}") from None


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

    @field_validator("schedules")
    @classmethod
    def _schedules_name_deployments_and_parse(cls, v: dict[str, str]) -> dict[str, str]:
        """A schedule for a deployment that does not exist, or a cron the server refuses, fails here:
        at ``config validate`` and before ``serve`` starts anything, not as a 422 from the API."""
        known = deployment_names()
        unknown = sorted(set(v) - set(known))
        if unknown:
            raise ValueError(f"unknown deployment(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for name, expr in v.items():
            try:
                check_cron(expr)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return v


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


class ConfigError(UserError):
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
        elif kind == "value_error":  # our validators' own words, without pydantic's prefix
            msg = str(err.get("ctx", {}).get("error", err["msg"]))
        else:
            msg = err["msg"]
            if "input" in err and kind not in ("model_type",):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, source: str | None = None) -> PipelineConfig:
    """Read a pipeline YAML (or start from ``base``/defaults), apply overrides, validate.

    ``path`` may also be a root's resolved ``pipeline.yaml`` (see :func:`_from_resolved`).
    """
    source = source or (str(path) if path else "<defaults>")
    data: dict[str, Any] = dict(base or {})
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML: {reason}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(loaded).__name__}")
        if is_resolved(loaded):
            loaded = _from_resolved(loaded, Path(path))
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


def is_resolved(data: dict[str, Any]) -> bool:
    """A root's ``pipeline.yaml`` (``{digest, config}``) rather than a pipeline file of sections."""
    return set(data) == {"digest", "config"} and isinstance(data.get("config"), dict)


def _from_resolved(data: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """The config recorded in a root's ``pipeline.yaml``, usable again.

    Masked secrets are dropped (the standard AWS chain, or ``--set storage.key=…``, supplies them).
    A local root's file lies in the root itself, so the file's folder is the root: the recorded
    path is only where the root was when it was written, and a moved or copied root still works.
    """
    cfg = json.loads(json.dumps(data["config"]))
    st = cfg.get("storage")
    if isinstance(st, dict):
        for k in ("key", "secret"):
            if st.get(k) == MASKED_SECRET:
                st[k] = None
        root = st.get("root")
        if path is not None and path.name == RESOLVED_FILE and isinstance(root, str) and _is_local(root):
            st["root"] = str(path.resolve().parent)
    return cfg


def _is_local(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def load_root_config(root: str, overrides: list[str] | None = None, storage: StorageConfig | None = None) -> PipelineConfig:
    """The config a dataset root recorded (``<root>/pipeline.yaml``), with ``overrides``; ``root`` is a
    path or URI (``s3://bucket/prefix``; credentials from ``storage`` or the AWS chain)."""
    local = _is_local(root)
    root_abs = os.path.abspath(os.path.expanduser(root.removeprefix("file://"))) if local else root.rstrip("/")
    st_cfg = (storage.model_copy(update={"root": root_abs}) if storage is not None else StorageConfig(root=root_abs))
    store = Storage.from_config(st_cfg)
    source = store.uri(RESOLVED_FILE)
    try:
        text = store.read_text(RESOLVED_FILE)
    except FileNotFoundError:
        raise ConfigError(f"{root}: not a shardflow dataset root ({RESOLVED_FILE} is missing); "
                          "run `shardflow prep` on it first, or pass --config FILE") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or not is_resolved(data):
        raise ConfigError(f"{source}: not a resolved pipeline config (expected 'digest' and 'config')")
    base = _from_resolved(data, None)
    base.setdefault("storage", {})["root"] = root_abs
    if storage is not None:  # credentials and endpoint given on the command line win over the record
        for k in ("key", "secret", "endpoint_url", "region"):
            v = getattr(storage, k)
            if v is not None:
                base["storage"][k] = v.get_secret_value() if hasattr(v, "get_secret_value") else v
    return load_config(None, overrides, base=base, source=source)


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
    storage.write_text(RESOLVED_FILE, yaml.safe_dump(body, sort_keys=False, allow_unicode=True))
    return digest
