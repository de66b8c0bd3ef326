import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from shardflow.storage import Storage
from shardflow.storage.lock import LockHeld, RootLock


def test_second_run_fails_with_clear_message(storage: Storage):
    with RootLock(storage, purpose="pipeline", ttl_s=30):
        with pytest.raises(LockHeld) as ei:
            RootLock(storage, purpose="pipeline", ttl_s=30).acquire()
        assert "locked by a pipeline run" in str(ei.value) and "pid" in str(ei.value)
    # released: can be taken again
    with RootLock(storage, ttl_s=30):
        pass


def test_second_run_waits_until_released(storage: Storage):
    first = RootLock(storage, ttl_s=30).acquire()
    import threading

    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    with RootLock(storage, ttl_s=30, wait_s=20, poll_s=0.1):
        assert time.monotonic() - t0 >= 0.9


def test_expired_lock_is_taken_over(s3_storage: Storage):
    storage = s3_storage
    stale = {"token": "dead", "purpose": "pipeline", "host": "other-host", "pid": 1, "acquired_at": 0, "expires_at": time.time() - 5}
    storage.write_bytes("_lock.json", json.dumps(stale).encode())
    with RootLock(storage, ttl_s=30) as lock:
        assert json.loads(storage.read_bytes("_lock.json"))["token"] == lock.token


def test_live_lock_on_other_host_is_respected(s3_storage: Storage):
    storage = s3_storage
    live = {"token": "alive", "purpose": "train", "host": "other-host", "pid": 1, "acquired_at": time.time(), "expires_at": time.time() + 60}
    storage.write_bytes("_lock.json", json.dumps(live).encode())
    with pytest.raises(LockHeld, match="train run"):
        RootLock(storage, ttl_s=30).acquire()


def _hold(root, started):
    lock = RootLock(Storage(root), ttl_s=300).acquire()
    started.set()
    time.sleep(600)


def test_lock_of_killed_process_is_taken_over(tmp_path):
    root = str(tmp_path / "root")
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    p = ctx.Process(target=_hold, args=(root, started))
    p.start()
    assert started.wait(60)
    with pytest.raises(LockHeld):
        RootLock(Storage(root)).acquire()
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with RootLock(Storage(root)):
        pass


def test_contenders_never_both_win(storage: Storage):
    stale = {"token": "dead", "purpose": "pipeline", "host": "other-host", "pid": 1, "acquired_at": 0, "expires_at": 0}
    storage.write_bytes("_lock.json", json.dumps(stale).encode())
    from concurrent.futures import ThreadPoolExecutor

    def contend(_):
        try:
            RootLock(storage, ttl_s=30).acquire()
            return 1
        except LockHeld:
            return 0

    with ThreadPoolExecutor(6) as ex:
        wins = sum(ex.map(contend, range(6)))
    assert wins == 1


def test_taking_the_lock_sweeps_old_temporaries_of_a_killed_writer(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    storage.write_bytes("stages/clean/000000.jsonl.zst", b"published")
    old = tmp_path / "root" / "stages" / "clean" / ".sftmp-000001.jsonl.zst.deadbeef0000"
    fresh = tmp_path / "root" / "stages" / "clean" / ".sftmp-000002.jsonl.zst.cafe00000000"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - 120, time.time() - 120))
    with RootLock(storage, ttl_s=60):
        pass
    assert not old.exists()  # untouched for longer than the lease: litter of a dead writer
    assert fresh.exists()  # could still belong to a live writer: left alone
    assert storage.read_bytes("stages/clean/000000.jsonl.zst") == b"published"
