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
            return RootLock(storage, ttl_s=30).acquire()
        except LockHeld:
            return None

    with ThreadPoolExecutor(6) as ex:
        winners = [lock for lock in ex.map(contend, range(6)) if lock is not None]
    assert len(winners) == 1
    winners[0].release()


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


# -- fencing, conditional release, unsupported stores ----------------------------------------------

def _wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_heartbeat_marks_a_taken_over_lease_lost_and_the_holder_stops(s3_storage: Storage):
    from shardflow.storage.lock import LockLost

    lock = RootLock(s3_storage, purpose="slow", ttl_s=3).acquire()  # heartbeat every second
    # Another run took it over (as after an expiry while this one stalled): its lock is there now.
    usurper = {"token": "usurper", "purpose": "next", "host": "other-host", "pid": 1, "acquired_at": time.time(),
               "expires_at": time.time() + 3600}
    s3_storage.write_bytes("_lock.json", json.dumps(usurper).encode())
    assert _wait_for(lambda: lock.lost), "the heartbeat did not notice the takeover"
    with pytest.raises(LockLost, match="taken over by next run"):
        lock.ensure_held()
    lock.release()  # conditional: the successor's lock stays
    assert json.loads(s3_storage.read_bytes("_lock.json"))["token"] == "usurper"


def test_a_lease_not_renewed_for_its_whole_ttl_counts_as_lost(s3_storage: Storage, monkeypatch):
    from shardflow.storage.lock import LockLost

    lock = RootLock(s3_storage, ttl_s=30).acquire()
    lock.ensure_held()
    lock._renewed -= 28  # the store was unreachable for most of a lease: someone may have taken it
    with pytest.raises(LockLost, match="not renewed"):
        lock.ensure_held()
    lock.release()


def test_release_is_conditional_on_s3(s3_storage: Storage):
    first = RootLock(s3_storage, purpose="first", ttl_s=30).acquire()
    first._stop.set()  # a stalled holder: no more heartbeats
    # Its lease expired and a second run took over by compare-and-swap.
    stale = json.loads(s3_storage.read_bytes("_lock.json"))
    stale["expires_at"] = 0
    s3_storage.write_bytes("_lock.json", json.dumps(stale).encode())
    second = RootLock(s3_storage, purpose="second", ttl_s=30).acquire()
    first.release()  # must not remove or overwrite the second run's lock
    assert json.loads(s3_storage.read_bytes("_lock.json"))["token"] == second.token
    with pytest.raises(LockHeld, match="second run"):
        RootLock(s3_storage, purpose="third", ttl_s=30).acquire()
    second.release()
    assert json.loads(s3_storage.read_bytes("_lock.json"))["released"] is True  # the next run takes it at once
    with RootLock(s3_storage, purpose="fourth", ttl_s=30):
        pass


def test_local_release_leaves_a_successors_lock_alone(tmp_path):
    from shardflow.storage.lock import LockLost

    storage = Storage(str(tmp_path / "root"))
    first = RootLock(storage, purpose="first").acquire()
    os.remove(tmp_path / "root" / "_lock.json")  # someone removed the lock file by hand ...
    second = RootLock(storage, purpose="second").acquire()  # ... and a second run locked a new one
    with pytest.raises(LockLost, match="removed or replaced"):
        first.ensure_held()
    first.release()
    assert json.loads((tmp_path / "root" / "_lock.json").read_bytes())["purpose"] == "second"
    with pytest.raises(LockHeld, match="second run"):
        RootLock(storage, purpose="third").acquire()
    second.ensure_held()
    second.release()


@pytest.mark.parametrize("root", ["memory://shardflow-lock-test/root", "gs://bucket/root", "az://container/root"])
def test_stores_without_conditional_writes_are_refused_by_name(root):
    from shardflow.storage.lock import LockUnsupported

    proto = root.split("://")[0]
    with pytest.raises(LockUnsupported, match=rf"the {proto}:// store has no conditional writes"):
        RootLock(Storage(root)).acquire()
