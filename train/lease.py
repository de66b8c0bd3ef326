"""The run lease: one trainer per run folder, and a trainer that lost it publishes nothing.

Two trainers on one run (a restarted run while the orphaned ranks of a killed launch still train,
or two launches by mistake) would overwrite each other's checkpoints and metrics. The lease is the
root lock's machinery (``storage.lock.RootLock``) on ``runs/<run>/_lease.json``: a kernel flock on
a local disk, a heartbeat-refreshed object with conditional PUTs on S3. Rank 0 takes it for the
whole run; every rank learns whether it got it (so a refusal ends all ranks with the same clear
error rather than a hang), and the checkpointer calls :meth:`RunLease.fence` before it writes a
step and before it publishes ``latest``.
"""
from __future__ import annotations

from shardflow.storage import Storage
from shardflow.storage.layout import run_ref
from shardflow.storage.lock import LockHeld, RootLock

from .distributed import DistEnv

LEASE_NAME = "_lease.json"
LEASE_TTL_S = 60.0


class RunLeaseHeld(LockHeld):
    """Another trainer holds this run's lease."""


class RunLease:
    """Held by rank 0 of a training run; other ranks carry an empty one (nothing to fence)."""

    def __init__(self, storage: Storage, run: str, env: DistEnv, ttl_s: float = LEASE_TTL_S):
        self.env = env
        self.lock = RootLock(storage, purpose="trainer", ttl_s=ttl_s, ref=f"{run_ref(run)}/{LEASE_NAME}",
                             what=f"training run {run!r} ({storage.uri(run_ref(run))})", sweep=False) if env.is_main else None

    def acquire(self) -> "RunLease":
        """Take the lease on rank 0; every rank raises :class:`RunLeaseHeld` if that failed."""
        error = None
        if self.lock is not None:
            try:
                self.lock.acquire()
            except LockHeld as exc:
                error = f"{exc}. Two trainers must never write one run: stop the other one or train under another train.run"
        error = self.env.broadcast_object(error)
        if error:
            raise RunLeaseHeld(error)
        return self

    def fence(self) -> None:
        """Raise ``LockLost`` (rank 0) if the lease is no longer certainly ours: call before publishing."""
        if self.lock is not None:
            self.lock.ensure_held()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never mask the error that ended the run
            if exc_type is None:
                raise
