"""Fixtures for the orchestration tests: small JSONL corpora, configs pointing the toy stages at
them, and a reader of the task runs a flow run produced (through the Prefect API)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from shardflow.flows.config import load_config

from .toy_stages import FACTORY

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Streaming data pipelines keep every shard independent, so a failure stays local.",
    "A manifest record is written last, after every output has been published.",
    "Deduplication removes near-identical documents before tokenization.",
    "Short.",
]


def write_corpus(directory: Path, n_files: int = 3, docs_per_file: int = 5, extra: dict[int, list[str]] | None = None) -> list[Path]:
    """``n_files`` JSONL files of real sentences (and one malformed line each)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        lines = [json.dumps({"id": f"d{i}-{j}", "text": f"{TEXTS[j % len(TEXTS)]} (file {i}, doc {j})"}) for j in range(docs_per_file)]
        lines.append('{"id": "broken", "text": ')  # quarantined, never fatal
        lines.extend((extra or {}).get(i, []))
        p = directory / f"part-{i}.jsonl"
        p.write_text("\n".join(lines) + "\n")
        paths.append(p)
    return paths


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_corpus(tmp_path / "in")
    return tmp_path / "in"


def sid(inputs_dir, i: int) -> str:
    """The shard id of ``part-<i>.jsonl`` in ``inputs_dir`` (ids come from the file, not its position)."""
    from shardflow.dataprep.stage import shard_id_for
    from shardflow.storage import Storage

    return shard_id_for(Storage(".").uri(str(Path(inputs_dir) / f"part-{i}.jsonl")))


def toy_config(root, inputs_dir, *overrides: str):
    return load_config(None, [f"storage.root={root}", f"prep.inputs=['{inputs_dir}/*.jsonl']", "prep.workers=2",
                              "flows.runner=thread", "flows.retry_delay_s=0.05", "flows.progress_min_shards=2",
                              *overrides])


def flow_task_runs(flow_run_id: str, expect: int | None = None, timeout: float = 120.0) -> list:
    """Task runs of a flow run, read back from the API.

    Task run states reach the API as events, recorded asynchronously by the server: wait until
    ``expect`` runs are terminal (or, for ``expect=None``/0, a short quiet period), then re-read.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def aread():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)

    def read():
        return asyncio.run(aread())

    deadline = time.monotonic() + timeout
    runs = read()
    while expect and time.monotonic() < deadline and sum(1 for r in runs if r.state and r.state.is_final()) < expect:
        time.sleep(0.2)
        runs = read()
    # Extra runs (more than expected) would show up by now; this pause can only make a check
    # stricter, never fail a correct run (expected runs were waited for above, for up to ``timeout``).
    time.sleep(0.5)
    return read()


def flow_artifacts(flow_run_id: str) -> dict[str, object]:
    """Artifacts of a flow run by key (the latest of each key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    async def aread():
        # Raw filter body: this Prefect's typed client sends nulls for unset filters, which the
        # server rejects (422) or, as an empty task-run filter, turns into a join on task runs.
        async with get_client() as client:
            resp = await client._client.post("/artifacts/filter", json={
                "flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "CREATED_DESC", "limit": 200, "offset": 0})
            return [Artifact.model_validate(a) for a in resp.json()]

    return {a.key: a for a in sorted(asyncio.run(aread()), key=lambda a: a.created) if a.key}


def ran_shards(flow_run_id: str, expect: int | None = None) -> list[str]:
    """Names (``<stage>-<shard>``) of the shard task runs of a flow run, sorted."""
    return sorted(r.name for r in flow_task_runs(flow_run_id, expect) if r.task_key.startswith("shard_task"))


__all__ = ["FACTORY", "write_corpus", "sid", "toy_config", "flow_task_runs", "ran_shards"]
