"""Which Prefect task runner executes the per-shard tasks.

The runner is chosen per run from the config (``flows.runner``) or the CLI (``--runner``), not fixed
when a flow is decorated: a served deployment runs whatever its config file says. The flows enter
the runner themselves and submit shard tasks to it, so one pool serves every stage of a pipeline run
(a process pool's start-up is paid once, not once per stage).

- ``process`` (default): shards in worker processes — per-shard work is CPU-bound Python (parsing,
  regexes, hashing), so threads would serialize on the GIL. Two flavours (``flows.process_pool``):
  ``prefect``, Prefect's ``ProcessPoolTaskRunner``: the whole task engine runs in each worker,
  which costs ~0.3 s of worker CPU per task (Prefect rebuilds its settings and API client for every
  task) plus a start-up that imports Prefect in every worker; ``executor``: the tasks are
  orchestrated from threads of the flow process and only the shard body goes to a plain
  ``concurrent.futures.ProcessPoolExecutor`` whose workers import nothing but dataprep (~20 ms of
  orchestration per task). Same task runs, states, retries and bytes either way.
- ``thread``: ``ThreadPoolTaskRunner``; enough when stages are I/O bound (remote storage) or for
  quick runs where process start-up would dominate.
- ``sequential``: one thread, shards in plan order; the easiest to debug and to kill at a known point.
- ``ray``: prefect-ray's ``RayTaskRunner``: a cluster at ``ray_address``, or a local one with
  ``workers`` CPUs when no address is given.

Task parameters are small and picklable (the stage name, the prep config, the shard spec, the
storage handle), and shard outputs depend only on them, so every runner writes the same bytes.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

RUNNER_KINDS = ("process", "thread", "sequential", "ray")

try:  # Prefect >= 3.5
    from prefect.task_runners import ProcessPoolTaskRunner
except ImportError:  # pragma: no cover - older Prefect: the executor flavour (threads + process pool)
    ProcessPoolTaskRunner = None  # type: ignore[assignment,misc]


def make_task_runner(kind: str = "process", workers: int = 2, ray_address: str | None = None,
                     ray_init_kwargs: dict[str, Any] | None = None) -> TaskRunner:
    """A fresh (not yet entered) task runner of ``kind`` running up to ``workers`` shards at once."""
    workers = max(1, int(workers))
    if kind == "process":
        if ProcessPoolTaskRunner is None:  # pragma: no cover
            raise RuntimeError("this Prefect has no ProcessPoolTaskRunner (prefect>=3.5); use flows.process_pool=executor")
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise RuntimeError("--runner ray needs prefect-ray and ray: pip install 'shardflow[ray]'") from exc
        init_kwargs = dict(ray_init_kwargs or {})
        if not ray_address or ray_address == "local":
            # A local cluster sized like the other runners; a remote one brings its own resources.
            init_kwargs.setdefault("num_cpus", workers)
            init_kwargs.setdefault("include_dashboard", False)
            ray_address = None
        return RayTaskRunner(address=ray_address, init_kwargs=init_kwargs)
    raise ValueError(f"unknown task runner {kind!r}; choose one of {', '.join(RUNNER_KINDS)}")


@contextlib.contextmanager
def prefect_api() -> Iterator[str | None]:
    """Run the enclosed flows against ``PREFECT_API_URL``, or a local ephemeral API started here.

    Without this, Prefect starts its ephemeral API lazily inside the flow's process only, and the
    settings it hands to process-pool and Ray workers carry no API address: each worker would then
    start a server of its own (seconds per worker, and a different API than the flow's). Starting
    it first and pinning its address into the settings makes every worker talk to the same one.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same singleton Prefect's own ephemeral mode uses
    server.start()
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield server.api_url


# -- the "executor" flavour of the process runner -----------------------------------------------------

_POOLS: dict[str, ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def shard_pool(pool_id: str) -> ProcessPoolExecutor:
    """The process pool a running flow registered under ``pool_id`` (tasks get the id, not the pool)."""
    with _POOLS_LOCK:
        try:
            return _POOLS[pool_id]
        except KeyError:
            raise RuntimeError(f"shard process pool {pool_id} is not running in this process") from None


class ShardRunner:
    """The task runner of one flow run, plus the process pool of the ``executor`` flavour.

    ``submit(task, parameters)`` is the task runner's, with the pool's id added to the parameters
    when there is one.
    """

    def __init__(self, kind: str = "process", workers: int = 2, ray_address: str | None = None,
                 process_pool: str = "prefect", ray_init_kwargs: dict[str, Any] | None = None):
        self.kind, self.workers = kind, max(1, int(workers))
        self.use_executor = kind == "process" and (process_pool == "executor" or ProcessPoolTaskRunner is None)
        self.task_runner = (ThreadPoolTaskRunner(max_workers=self.workers) if self.use_executor
                            else make_task_runner(kind, self.workers, ray_address, ray_init_kwargs))
        self.pool_id: str | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ShardRunner":
        self._stack.__enter__()
        try:
            if self.use_executor:
                # spawn, not fork: the flow process runs threads (API clients, log shipping).
                pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
                self.pool_id = uuid.uuid4().hex
                with _POOLS_LOCK:
                    _POOLS[self.pool_id] = pool
                self._stack.callback(self._close_pool, self.pool_id)
            self._stack.enter_context(self.task_runner)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    @staticmethod
    def _close_pool(pool_id: str) -> None:
        with _POOLS_LOCK:
            pool = _POOLS.pop(pool_id)
        pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, task: Any, parameters: dict[str, Any]):
        if self.pool_id is not None:
            parameters = {**parameters, "pool": self.pool_id}
        return self.task_runner.submit(task, parameters)

    def describe(self) -> str:
        flavour = " (threads + process pool)" if self.use_executor else ""
        return f"{self.kind}{flavour}, {self.workers} worker(s)"
