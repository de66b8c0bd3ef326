"""The shard tasks on a real (local) Ray cluster write the same bytes as the local runners.

One module-scoped cluster (``ray.init`` costs seconds): the flow's RayTaskRunner finds it already
initialized and submits to it, exactly as it would to a remote cluster given ``ray_address``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardflow.flows.prep_flows import run_prep

from .conftest import FACTORY, ran_shards, toy_config
from .test_prep_flows import outputs

ray = pytest.importorskip("ray")
pytest.importorskip("prefect_ray")

pytestmark = pytest.mark.usefixtures("prefect_server")

REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ray_cluster():
    # The toy stages live in tests/, which Ray workers import by name: put the repo on their path.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}})
    yield
    ray.shutdown()


def test_stage_on_ray_matches_local_runner(tmp_path, corpus, ray_cluster):
    local = toy_config(tmp_path / "local", corpus, "flows.runner=sequential")
    on_ray = toy_config(tmp_path / "ray", corpus, "flows.runner=ray")
    assert run_prep(local, stage_factory=FACTORY)["ok"]
    out = run_prep(on_ray, stage_factory=FACTORY)
    assert out["ok"], out
    assert len(ran_shards(out["flow_run_id"], 7)) == 7
    ray_files, local_files = outputs(on_ray.storage.root), outputs(local.storage.root)
    assert len(local_files) == 10 and ray_files == local_files
    # Resumability does not depend on the runner: the manifests written by Ray workers are honoured.
    again = run_prep(on_ray, stage_factory=FACTORY)
    assert again["ok"] and ran_shards(again["flow_run_id"]) == []
