"""Which Prefect task runner executes the per-shard tasks.

The runner is chosen per run from the config (``flows.runner``) or the CLI (``--runner``), not fixed
when a flow is decorated: a served deployment runs whatever its config file says. The flows enter
the runner themselves and submit shard tasks to it, so one pool serves every stage of a pipeline run
(a process pool's start-up is paid once, not once per stage).

- ``process`` (default): Prefect's ``ProcessPoolTaskRunner``. Per-shard work is CPU-bound Python
  (parsing, regexes, hashing), so threads would serialize on the GIL.
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
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

RUNNER_KINDS = ("process", "thread", "sequential", "ray")

try:  # Prefect >= 3.5
    from prefect.task_runners import ProcessPoolTaskRunner
except ImportError:  # pragma: no cover - older Prefect: thread runner + shard work in subprocesses
    ProcessPoolTaskRunner = None  # type: ignore[assignment,misc]


def make_task_runner(kind: str = "process", workers: int = 2, ray_address: str | None = None,
                     ray_init_kwargs: dict[str, Any] | None = None) -> TaskRunner:
    """A fresh (not yet entered) task runner of ``kind`` running up to ``workers`` shards at once."""
    workers = max(1, int(workers))
    if kind == "process":
        if ProcessPoolTaskRunner is None:  # pragma: no cover
            raise RuntimeError("this Prefect has no ProcessPoolTaskRunner (needs prefect>=3.5); use --runner thread or ray")
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


def runner_workers(runner: TaskRunner) -> int | None:
    """How many shards the runner runs at once, where it says (for logs)."""
    for attr in ("_max_workers", "max_workers"):
        value = getattr(runner, attr, None)
        if isinstance(value, int):
            return value
    return None


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
