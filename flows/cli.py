"""The ``shardflow`` command line.

Every subcommand takes ``--config FILE`` (one YAML file per pipeline) and ``--set key=value``
overrides; without ``--config`` the embedded defaults are used. The commands that work on an
existing dataset root (``prep``, ``status``, ``verify``, ``train``, ``eval``, ``export-hf``) also take
``--root DIR``: the config the root recorded in ``DIR/pipeline.yaml``, which ``--config
DIR/pipeline.yaml`` reads the same way. Runs go through Prefect (an ephemeral API unless
``PREFECT_API_URL`` points at a server), except ``config``/``status``/``verify`` which only read.

Errors a person made (a bad value, a missing file, a checkpoint that does not exist) are one line
``error: …`` and exit status 2, found before any Prefect server starts (flows/errors.py); a run that
fails exits 1; output cut by a closed pipe (``shardflow status | head``) ends quietly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from .errors import UserError, report_user_error, user_error_from

EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a tool that stopped because its reader went away."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line ``error: …`` (exit 2) like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _add_config_args(p: argparse.ArgumentParser, root: bool = False) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="pipeline YAML file, or a root's pipeline.yaml (default: embedded defaults)")
    if root:
        p.add_argument("--root", metavar="DIR", help="an existing dataset root (path or URI): use the config it recorded "
                                                     "in DIR/pipeline.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set prep.workers=4 (repeatable)")


def _load(args: argparse.Namespace):
    from .config import load_config, load_root_config

    root = getattr(args, "root", None)
    if root:
        if args.config:
            raise UserError("give either --root DIR or --config FILE, not both")
        return load_root_config(root, args.overrides)
    return load_config(args.config, args.overrides)


def _load_existing_root(args: argparse.Namespace):
    """The config of a command that reads an existing root; with neither --config nor --root the
    default root must exist (else the answer would be about an empty, unrelated root)."""
    cfg = _load(args)
    if not args.config and not getattr(args, "root", None):
        from .config import RESOLVED_FILE, load_root_config

        storage = cfg.storage_handle()
        if not storage.exists(RESOLVED_FILE):
            raise UserError(f"{storage.root}: no dataset root here (no {RESOLVED_FILE}); pass --root DIR or --config FILE")
        cfg = load_root_config(cfg.storage.root, args.overrides)
    return cfg


def _check_checkpoint(cfg, checkpoint: str | None) -> None:
    """Fail before any server starts when the checkpoint (or the run's latest) does not exist."""
    from shardflow.train.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    storage = cfg.storage_handle()
    try:
        read_meta(storage, resolve_checkpoint(storage, checkpoint, cfg.train.run))
    except CheckpointError as exc:
        if checkpoint is None:
            raise UserError(f"run {cfg.train.run!r} on {storage.root} has no checkpoint yet: {exc}") from None
        raise user_error_from(exc) from None


def _parse_shards(value: str | None) -> list[str] | None:
    """``--shards a,b``: shard ids (``shardflow status --json`` lists them) or input file names."""
    if value is None:
        return None
    out = [part.strip() for part in value.split(",") if part.strip()]
    if not out:
        from .preplan import RequestError

        raise RequestError(f"--shards {value!r} names no shard")
    return out


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.action == "show":
        print(yaml.safe_dump(cfg.resolved(), sort_keys=False, allow_unicode=True), end="")
        print(f"# digest: {cfg.digest()}")
    else:
        print(f"ok: {args.config or '<defaults>'} is valid (digest {cfg.digest()})")
    return 0


def cmd_prep(args: argparse.Namespace) -> int:
    """Check the request and plan before Prefect starts (flows/preplan.py); run the flow only if
    there is something to do."""
    from shardflow.storage.lock import LockHeld

    from .preplan import preplan

    cfg = _load(args)
    try:
        pre = preplan(cfg, args.stage, _parse_shards(args.shards), force=args.force, verify=args.verify)
    except LockHeld as exc:  # another run holds the root: not a usage error, but one line all the same
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if pre.nothing_to_do:
        print(f"nothing to do: {pre.up_to_date} shard(s) of {len(pre.stages)} stage(s) up to date "
              f"(planned in {pre.wall_s:.2f}s from the manifests; --force redoes them)")
        return 0
    print("to do: " + "; ".join(f"{k}: {v}" for k, v in pre.work.items()), flush=True)
    from .prep_flows import run_prep

    result = run_prep(cfg, stage=args.stage, shards=pre.shards, force=args.force,
                      runner=args.runner, ray_address=args.address, verify=args.verify)
    return 0 if result.get("ok", True) else 1


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load_existing_root(args)  # config errors first, before the heavier imports
    from .status import print_status

    print_status(cfg, as_json=args.json)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_existing_root(args)  # a user error is reported before Prefect is even imported
    from .train_flows import run_train

    result = run_train(cfg, nproc=args.nproc, evaluate=not args.no_eval, nnodes=args.nnodes, node_rank=args.node_rank,
                       rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id)
    return 0 if result.get("ok", True) else 1


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _load_existing_root(args)
    if cfg.eval.enabled:
        _check_checkpoint(cfg, args.checkpoint or cfg.eval.checkpoint)
    from .train_flows import run_eval

    result = run_eval(cfg, checkpoint=args.checkpoint)
    return 0 if result.get("ok", True) else 1


def cmd_export_hf(args: argparse.Namespace) -> int:
    from shardflow.train.export import export_checkpoint

    from shardflow.storage.lock import RootLock

    cfg = _load_existing_root(args)
    _check_checkpoint(cfg, args.checkpoint)
    storage = cfg.storage_handle()
    # The lock keeps training and pruning off the checkpoint while it is read (and the export's
    # provenance true); like every entry point that touches a root, it takes it.
    with RootLock(storage, purpose=f"shardflow export-hf {cfg.train.run}", wait_s=cfg.flows.lock_wait_s,
                  ttl_s=cfg.flows.lock_ttl_s):
        out = export_checkpoint(cfg.train, storage, checkpoint=args.checkpoint, out_dir=args.out)
    print(f"exported to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)  # a bad cron or key is reported before Prefect is even imported
    from .deploy import serve

    serve(cfg, config_path=args.config, overrides=args.overrides)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _load_existing_root(args)
    from .status import verify

    problems = verify(cfg)
    return 0 if not problems else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(workdir=args.workdir, overrides=args.overrides, config=args.config)
    return 0 if result.get("ok", True) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardflow", description="Streaming data-plus-training pipeline for LLM pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled corpus (local storage, ephemeral Prefect)")
    p.add_argument("--workdir", default="./shardflow-demo", help="where the dataset root and runs go (default ./shardflow-demo)")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", help="show or validate a pipeline config")
    p.add_argument("action", choices=["show", "validate"])
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prep", help="run a data-preparation stage (or 'all') as a Prefect flow")
    p.add_argument("stage", help="clean | filter | dedup | tokenizer | tokenize | all")
    p.add_argument("--shards", help="comma-separated shard ids (or input file names) to redo, e.g. part-3-1a2b3c4d5e,part-7.jsonl")
    p.add_argument("--force", action="store_true", help="redo every selected shard even if up to date")
    p.add_argument("--verify", action="store_true", help="re-hash every input and output while planning (default: "
                   "trust unchanged size + mtime/ETag)")
    p.add_argument("--runner", choices=["process", "thread", "ray", "sequential"], help="task runner (default from config)")
    p.add_argument("--address", help="Ray cluster address for --runner ray (default: start a local cluster)")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("status", help="per-stage table of done / pending / stale / failed shards")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("verify", help="re-hash stage outputs and shards against manifests and index")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("train", help="train the MoE model from the shards (launches torchrun when --nproc > 1)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun --nproc_per_node)")
    p.add_argument("--no-eval", action="store_true", help="do not run evaluation after training")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node run (each runs this command with its --node-rank)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this node's index; node 0 runs the Prefect flow (lock, artifacts, evaluation), the others only join")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="torchrun c10d rendezvous store, the same on every node (default $SHARDFLOW_RDZV_ENDPOINT)")
    p.add_argument("--rdzv-id", help="job id shared by the nodes (default $SHARDFLOW_RDZV_ID, else the run name)")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint (default: the run's latest)")
    p.add_argument("--checkpoint", help="checkpoint URI (default: latest of the configured run)")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-hf", help="export a checkpoint to Hugging Face MixtralForCausalLM format")
    p.add_argument("--checkpoint", help="checkpoint URI (default: latest of the configured run)")
    p.add_argument("--out", required=True, help="output directory")
    _add_config_args(p, root=True)
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("serve", help="serve all deployments (pipeline, stages, train, eval) with their schedules")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def _quiet_broken_pipe() -> int:
    """The reader went away (``| head``): nothing more to say; keep the interpreter's final flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from shardflow.storage.lock import LockHeld, LockUnsupported

    from .preplan import RequestError  # prep's planning errors (flows/preplan.py): user errors too

    try:
        args = build_parser().parse_args(argv)
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at exit
        return rc
    except (UserError, RequestError) as exc:
        return report_user_error(exc)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (LockHeld, LockUnsupported) as exc:  # commands that lock outside a flow (export-hf): not a user error
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
