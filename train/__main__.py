"""``python -m shardflow.train`` and ``torchrun --nproc_per_node N -m shardflow.train``.

Configuration, in either form (``--set`` overrides apply to both, dotted from the top)::

    --config pipeline.yaml      the pipeline file; only its ``train`` and ``storage`` sections are
                                read and validated here (``train`` must not depend on ``flows``)
    --config-json launch.json   {"train": {...}, "storage": {...}} written by a launcher

Why two forms: a person runs the YAML they edit; an orchestrator (the Prefect training flow) has
already resolved and validated its config and hands torchrun exactly that. A launch JSON may hold
storage credentials in clear — write it with :func:`write_launch_config` (a fresh 0600 file in a
private 0700 directory) and delete it afterwards, or better leave credentials out of the config
and pass them the standard way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / profiles),
which torchrun passes on to every rank.

Rank 0 prints the run summary as one JSON line (last line of stdout). Exit status: 0 done,
1 training failed, 2 invalid configuration or data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardflow.storage import StorageConfig

from .config import TrainConfig


class ConfigError(ValueError):
    """Invalid training configuration; the message names the source and each bad dotted key."""


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


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
    for ov in overrides or []:
        head = ov.split("=", 1)[0].strip().split(".", 1)[0]
        if head not in ("train", "storage"):
            raise ConfigError(f"--set {ov!r}: only train.* and storage.* keys can be set here")
        _apply_override(data, ov)
    try:
        train_cfg = TrainConfig.model_validate(data.get("train") or {})
    except ValidationError as exc:
        raise ConfigError(_errors(exc, source, "train")) from None
    try:
        storage_cfg = StorageConfig.model_validate(data.get("storage") or {})
    except ValidationError as exc:
        raise ConfigError(_errors(exc, source, "storage")) from None
    return train_cfg, storage_cfg


def write_launch_config(train: TrainConfig, storage: StorageConfig, directory: str | None = None) -> str:
    """Write ``{"train", "storage"}`` for ``--config-json`` to a new 0600 file; returns its path.

    Secrets are written in clear (the ranks need them): the file is created with ``O_EXCL`` and
    mode 0600 inside a fresh 0700 directory (``directory`` or a new temp dir). The caller deletes
    it when torchrun has exited.
    """
    d = directory or tempfile.mkdtemp(prefix="shardflow-train-")
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    st = storage.model_dump(mode="json")
    for k in ("key", "secret"):
        v = getattr(storage, k)
        st[k] = v.get_secret_value() if v is not None else None
    path = os.path.join(d, "launch.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"train": train.model_dump(mode="json"), "storage": st}, f)
    return path


def torchrun_command(config_json: str, nproc_per_node: int, *, python: str | None = None,
                     master_port: int | None = None, extra: list[str] | None = None) -> list[str]:
    """argv of a single-node torchrun launch of this entry point (``--standalone`` picks a free port)."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    cmd += [f"--master_port={master_port}", "--master_addr=127.0.0.1"] if master_port else ["--standalone"]
    return cmd + ["-m", "shardflow.train", "--config-json", config_json, *(extra or [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardflow.train", description="Train (or resume) a shardflow MoE run.")
    ap.add_argument("--config", help="pipeline YAML (its train and storage sections are used)")
    ap.add_argument("--config-json", help='launch JSON {"train": ..., "storage": ...} (see write_launch_config)')
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. train.trainer.steps=100 or storage.root=s3://bucket/root (repeatable)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) at this step")
    args = ap.parse_args(argv)
    try:
        train_cfg, storage_cfg = load_train_config(args.config, args.overrides, args.config_json)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from .checkpoint import CheckpointError
    from .trainer import TrainingDataError, train

    try:
        summary = train(train_cfg, storage_cfg, max_steps=args.max_steps)
    except (TrainingDataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
