"""The run lease (train/lease.py): one trainer per run, and a trainer that lost its lease publishes nothing."""
from __future__ import annotations

import os
import time

import pytest

from shardflow.storage import Storage
from shardflow.storage.lock import LockLost, RootLock
from shardflow.train.checkpoint import Checkpointer
from shardflow.train.lease import LEASE_NAME, RunLeaseHeld
from shardflow.train.trainer import train

from .test_trainer import build_dataset, kill_tree, launch, metrics_ref, one_thread, tiny_cfg  # noqa: F401


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Storage:
    storage = Storage(str(tmp_path_factory.mktemp("lease") / "root"))
    build_dataset(storage)
    return storage


@pytest.mark.timeout(300)
def test_a_second_trainer_on_a_live_run_is_refused_clearly(data_root: Storage, tmp_path):
    cfg = tiny_cfg("busy", trainer={"steps": 100_000, "log_every": 1}, checkpoint={"every_steps": 1000})
    first = launch(cfg, data_root, 1, tmp_path)  # python -m shardflow.train: root lock + run lease
    try:
        deadline = time.monotonic() + 180
        while not data_root.exists(metrics_ref("busy")):
            assert first.poll() is None, first.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the first trainer never started"
            time.sleep(0.2)
        # In-process (no root lock: as under a launcher that holds it) the run lease refuses it.
        with pytest.raises(RunLeaseHeld, match=r"training run 'busy' .* is locked by a trainer run \(host .*, pid "
                                               rf"{first.pid}.*Two trainers must never write one run"):
            train(cfg, data_root, max_steps=2)
        # The entry point as a launcher's rank would run it: exit status 3, the same message.
        from shardflow.train.__main__ import main
        from shardflow.train.launch import LAUNCHER_LOCK_ENV, write_launch_config

        path = write_launch_config(cfg, data_root.config, str(tmp_path / "second"))
        os.environ[LAUNCHER_LOCK_ENV] = "1"
        try:
            assert main(["--config-json", path, "--max-steps", "2"]) == 3
        finally:
            del os.environ[LAUNCHER_LOCK_ENV]
        # Standalone, the root lock comes first: refused too, naming the running trainer.
        assert main(["--config-json", path, "--max-steps", "2"]) == 3
        assert first.poll() is None  # the refusals did not disturb the running trainer
    finally:
        kill_tree(first.pid)
        first.wait()
    # Once it is gone (flock dies with it) the run can be resumed.
    summary = train(tiny_cfg("busy", trainer={"steps": 3}), data_root)
    assert summary["step"] == 3


def test_a_trainer_that_lost_its_lease_stops_before_publishing(data_root: Storage, monkeypatch):
    import shardflow.train.trainer as trainer_mod

    cfg = tiny_cfg("usurped", trainer={"steps": 8, "log_every": 1}, checkpoint={"every_steps": 2, "keep_last": 5})
    lease_path = data_root.resolve(f"runs/usurped/{LEASE_NAME}")[1]
    taken: list[RootLock] = []
    real_append = trainer_mod.MetricsLog.append

    def append(self, rec):
        real_append(self, rec)
        if rec["step"] == 3 and not taken:  # after checkpoint 2: another trainer takes the run over
            os.remove(lease_path)
            taken.append(RootLock(data_root, purpose="usurper", ref=f"runs/usurped/{LEASE_NAME}", sweep=False).acquire())

    monkeypatch.setattr(trainer_mod.MetricsLog, "append", append)
    with pytest.raises(LockLost, match="removed or replaced"):
        train(cfg, data_root)
    ck = Checkpointer(data_root, "usurped")
    assert ck.latest_step() == 2 and ck.step_dirs() == [2]  # step 4 was neither written nor published
    taken[0].release()
