"""``python -m shardflow.train`` and ``torchrun --nproc_per_node N -m shardflow.train``.

Configuration, in either form (``--set`` overrides apply to both, dotted from the top)::

    --config pipeline.yaml      the pipeline file; only its ``train`` and ``storage`` sections are
                                read and validated here (``train`` must not depend on ``flows``)
    --config-json launch.json   {"train": {...}, "storage": {...}} written by a launcher

Why two forms: a person runs the YAML they edit; an orchestrator (the Prefect training flow) has
already resolved and validated its config and hands torchrun exactly that. A launch JSON never holds
credentials (:func:`write_launch_config` masks them): a launcher passes ``storage.key``/``secret``/
``options`` in the ``SHARDFLOW_STORAGE_CREDENTIALS`` environment variable (:func:`credentials_env`),
or the standard way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles); torchrun passes
the environment on to every rank (see ``train/launch.py``).

Safety: under torchrun each rank dies with its parent (no orphans keep training after the launcher
is killed); rank 0 takes the dataset root's lock unless its launcher holds it
(``SHARDFLOW_ROOT_LOCK_HELD``), and the run's lease (``runs/<run>/_lease.json``, train/lease.py).

Rank 0 of each node prints the run summary as one JSON line (last line of stdout). Exit status: 0 done,
1 training failed, 2 invalid configuration or data, 3 the root or the run is held by another run
(or this run lost its lease).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardflow.storage import StorageConfig
from shardflow.storage.config import MASK, OverrideError, apply_override

from .config import TrainConfig
from .launch import (  # noqa: F401 - re-exported: the launch API of this entry point
    CREDENTIALS_ENV,
    LAUNCHER_LOCK_ENV,
    credentials_env,
    exit_with_parent,
    storage_with_credentials,
    torchrun_command,
    write_launch_config,
)


class ConfigError(ValueError):
    """Invalid training configuration; the message names the source and each bad dotted key."""


def _errors(exc: ValidationError, source: str, section: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join([section, *(str(p) for p in err["loc"])])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None,
                      json_path: str | os.PathLike[str] | None = None) -> tuple[TrainConfig, StorageConfig]:
    """The ``train`` and ``storage`` sections of a pipeline YAML or a launch JSON, overridden, validated.

    Other sections of the YAML are ignored (the pipeline CLI validates them). A relative
    ``storage.root`` in a YAML file is relative to the file, as in the pipeline CLI.
    """
    if path and json_path:
        raise ConfigError("give --config or --config-json, not both")
    source = str(path or json_path or "<defaults>")
    data: dict[str, Any] = {}
    if path or json_path:
        p = Path(path or json_path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        try:
            loaded = json.loads(text) if json_path else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{source}: not valid {'JSON' if json_path else 'YAML'}: {exc}") from None
        loaded = loaded or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        data = {k: loaded[k] for k in ("train", "storage") if k in loaded}
        root = (data.get("storage") or {}).get("root") if isinstance(data.get("storage"), dict) else None
        if path and isinstance(root, str) and "://" not in root and not os.path.isabs(root):
            data["storage"]["root"] = str((p.resolve().parent / root).resolve())
    try:
        if CREDENTIALS_ENV in os.environ or isinstance(data.get("storage"), dict):
            data["storage"] = storage_with_credentials(data.get("storage") or {})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    masked = [k for k in ("key", "secret") if (data.get("storage") or {}).get(k) == MASK]
    if masked:
        raise ConfigError(f"{source}: storage.{'/'.join(masked)} masked ({MASK}) and ${CREDENTIALS_ENV} does not carry "
                          f"them: start the ranks through `shardflow train`, or pass the credentials in the environment")
    for ov in overrides or []:
        head = ov.split("=", 1)[0].strip().split(".", 1)[0]
        if head not in ("train", "storage"):
            raise ConfigError(f"--set {ov!r}: only train.* and storage.* keys can be set here")
        try:
            apply_override(data, ov)
        except OverrideError as exc:
            raise ConfigError(f"--set {ov!r}: {exc}") from None
    try:
        train_cfg = TrainConfig.model_validate(data.get("train") or {})
    except ValidationError as exc:
        raise ConfigError(_errors(exc, source, "train")) from None
    try:
        storage_cfg = StorageConfig.model_validate(data.get("storage") or {})
    except ValidationError as exc:
        raise ConfigError(_errors(exc, source, "storage")) from None
    return train_cfg, storage_cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardflow.train", description="Train (or resume) a shardflow MoE run.")
    ap.add_argument("--config", help="pipeline YAML (its train and storage sections are used)")
    ap.add_argument("--config-json", help='launch JSON {"train": ..., "storage": ...} (see write_launch_config)')
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. train.trainer.steps=100 or storage.root=s3://bucket/root (repeatable)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) at this step")
    args = ap.parse_args(argv)
    exit_with_parent()  # under torchrun: never outlive the launcher (an orphan would keep publishing)
    try:
        train_cfg, storage_cfg = load_train_config(args.config, args.overrides, args.config_json)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from shardflow.storage import Storage
    from shardflow.storage.lock import LockHeld, LockUnsupported, RootLock

    from .checkpoint import CheckpointError
    from .metrics import log_to_stdout
    from .trainer import TrainingDataError, train

    storage = Storage.from_config(storage_cfg)
    take_root = int(os.environ.get("RANK", "0")) == 0 and not os.environ.get(LAUNCHER_LOCK_ENV)
    log_to_stdout()  # rank 0's progress lines; the Prefect train flow streams them into its log
    try:
        with RootLock(storage, purpose=f"shardflow train {train_cfg.run}") if take_root else contextlib.nullcontext():
            summary = train(train_cfg, storage, max_steps=args.max_steps)
    except (TrainingDataError, CheckpointError, LockUnsupported) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LockHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # rank 0 of each node: every node's launcher gets it
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
