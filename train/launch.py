"""Launching ``python -m shardflow.train`` under torchrun: the one argv builder, the launch file, and
how credentials and parent death reach the ranks.

Why credentials travel in the environment: the launch file outlives a SIGKILLed launcher (nothing
runs its cleanup), so it must never hold one. :func:`write_launch_config` writes the resolved config
with secrets masked; :func:`credentials_env` puts ``storage.key``/``secret``/``options`` in clear into
one variable, :data:`CREDENTIALS_ENV`, that torchrun passes on to every rank, and
:func:`storage_with_credentials` (called by the entry point) takes it out of the environment again.
``/proc/<pid>/environ`` is readable only by the same user and vanishes with the process.

Why ranks watch their parent: torchrun does not die with whoever started it, and its ranks do not
die with torchrun when it is SIGKILLed. A launcher starts torchrun with :func:`die_with_parent` as
its ``preexec_fn`` (the kernel sends it SIGTERM when the launcher dies; torchrun then stops its
ranks), and each rank calls :func:`exit_with_parent` first thing: a parent-death signal (SIGKILL),
plus a thread polling ``os.getppid()`` where ``prctl`` is unavailable or the parent already left.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from shardflow.storage import StorageConfig

from .config import TrainConfig

CREDENTIALS_ENV = "SHARDFLOW_STORAGE_CREDENTIALS"
"""JSON ``{"key", "secret", "options"}`` of the storage section, in clear, for the ranks only."""

LAUNCHER_LOCK_ENV = "SHARDFLOW_ROOT_LOCK_HELD"
"""Set by a launcher that holds the dataset root's lock, so that rank 0 does not try to take it."""

_PR_SET_PDEATHSIG = 1


def write_launch_config(train: TrainConfig, storage: StorageConfig, directory: str | None = None) -> str:
    """Write ``{"train", "storage"}`` for ``--config-json`` to a new 0600 file; returns its path.

    Secrets are masked in the file (``storage.key``/``secret`` and secret-like ``options``):
    hand them to the ranks with :func:`credentials_env`. The caller deletes the file's directory
    (``directory`` or a fresh 0700 temp dir) when torchrun has exited.
    """
    d = directory or tempfile.mkdtemp(prefix="shardflow-train-")
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    path = os.path.join(d, "launch.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"train": train.model_dump(mode="json"), "storage": storage.model_dump(mode="json")}, f)
    return path


def credentials_env(storage: StorageConfig) -> dict[str, str]:
    """The environment entry that carries ``storage``'s credentials to the ranks (empty if it has none)."""
    fields = storage.secret_fields()
    if fields["key"] is None and fields["secret"] is None and not storage.secrets():
        return {}
    return {CREDENTIALS_ENV: json.dumps(fields)}


def storage_with_credentials(storage_data: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``storage_data`` (a storage section) with the credentials a launcher put in the environment.

    Removes the variable from ``environ`` (default ``os.environ``) so that processes this rank
    starts do not inherit it; the values live on in the returned config only.
    """
    environ = os.environ if environ is None else environ
    raw = environ.pop(CREDENTIALS_ENV, None)
    if not raw:
        return storage_data
    try:
        creds = json.loads(raw)
    except ValueError:
        raise ValueError(f"${CREDENTIALS_ENV} is not valid JSON") from None
    out = dict(storage_data)
    for k in ("key", "secret"):
        if creds.get(k) is not None:
            out[k] = creds[k]
    if creds.get("options"):
        out["options"] = creds["options"]
    return out


def torchrun_command(config_json: str, nproc_per_node: int, *, python: str | None = None,
                     master_port: int | None = None, torchrun_args: Sequence[str] | None = (),
                     extra: Sequence[str] | None = ()) -> list[str]:
    """argv of a torchrun launch of ``python -m shardflow.train --config-json config_json``.

    Single node by default: ``--standalone`` (a free port picked by torchrun), or a fixed
    ``master_port`` on 127.0.0.1. ``torchrun_args`` are further torchrun options placed before the
    entry point; any rendezvous option among them (``--nnodes``, ``--rdzv-*``, ``--master-*``)
    replaces the single-node default. ``extra`` are arguments of ``shardflow.train`` itself.
    """
    torchrun_args, extra = list(torchrun_args or ()), list(extra or ())
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    rendezvous = any(a.lstrip("-").replace("_", "-").split("=")[0] in ("nnodes", "node-rank", "rdzv-endpoint",
                                                                       "rdzv-id", "rdzv-backend", "master-addr",
                                                                       "master-port", "standalone")
                     for a in torchrun_args)
    if master_port:
        cmd += [f"--master_port={master_port}", "--master_addr=127.0.0.1"]
    elif not rendezvous:
        cmd += ["--standalone"]
    return cmd + [*torchrun_args, "-m", "shardflow.train", "--config-json", config_json, *extra]


def rendezvous_args(nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                    rdzv_id: str | None = None) -> list[str]:
    """torchrun options joining node ``node_rank`` of ``nnodes`` through the c10d rendezvous; [] for one node.

    Every node runs the same launch with its own ``node_rank``; ``rdzv_endpoint`` (``HOST:PORT``,
    the same on every node) is where the c10d store runs: on the node whose address it names,
    started by that node's torchrun, so no separate service is needed. ``rdzv_id`` names the job
    (equal on all nodes, different for concurrent jobs sharing an endpoint). Ranks are numbered
    node by node, ``nproc_per_node`` consecutive ranks per node, so EP groups of up to
    ``nproc_per_node`` ranks stay inside a node.
    """
    if nnodes < 1:
        raise ValueError(f"--nnodes must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank must be in [0, {nnodes}), got {node_rank}")
    if nnodes == 1:
        return []
    host, sep, port = (rdzv_endpoint or "").rpartition(":")
    if not (rdzv_endpoint and sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node), got {rdzv_endpoint!r}")
    if rdzv_id is not None and not rdzv_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"--rdzv-id must be letters, digits, '-', '_' or '.', got {rdzv_id!r}")
    return [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id or 'shardflow'}"]


def _prctl():
    """libc's ``prctl``, resolved here (never between fork and exec, where ``dlopen`` may deadlock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _prctl_pdeathsig(sig: int) -> bool:
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def die_with_parent(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when its parent dies.

    (Linux counts the *thread* that started the child as its parent: start it from a thread that
    waits for it, as ``launch_torchrun`` does.) If the parent is already gone by the time the child
    runs, the child exits at once. ``prctl`` is looked up before the fork.
    """
    parent = os.getpid()
    prctl = _prctl()

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Make this process die when its parent does (a rank whose torchrun is gone is an orphan).

    Only under torchrun (``TORCHELASTIC_RUN_ID`` or ``LOCAL_RANK`` set): a plain
    ``python -m shardflow.train`` run from a shell must survive the shell going away.
    """
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LOCAL_RANK")):
        return
    parent = os.getppid()
    _prctl_pdeathsig(signal.SIGKILL)

    def watch() -> None:
        while True:
            threading.Event().wait(poll_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="shardflow-parent-watch", daemon=True).start()


__all__ = ["CREDENTIALS_ENV", "LAUNCHER_LOCK_ENV", "credentials_env", "rendezvous_args", "die_with_parent", "exit_with_parent",
           "storage_with_credentials", "torchrun_command", "write_launch_config"]
