"""Object-storage faults: the whole prep pipeline on S3 through a proxy that fails requests.

Inputs and dataset root both live on the moto S3 endpoint; the pipeline reaches it only through
:class:`FaultProxy`. With 5 % of requests failing (500, 503 SlowDown, connection reset, truncated
body) the run must complete with outputs byte-identical to a fault-free run. With every request
failing from some point on, it must fail with a clear error and leave nothing half-published: the
root, copied down and checked, holds no object under a final name that does not verify and no done
manifest record for a shard that did not finish; a fault-free re-run then completes it.

Which layer handles what (see docs/reliability.md): botocore's retry handler retries 500/503 and
connection errors (``config_kwargs.retries``); s3fs's wrapper retries what botocore raises past it;
a short body is caught by aiohttp's Content-Length check (ClientPayloadError) and retried by s3fs on
reads; the flows' per-shard task retries redo a shard whose storage error got through every layer.
"""
from __future__ import annotations

import json
import os
import time

import boto3
import pytest

from shardflow.storage import Storage, StorageConfig

from . import check_root_sound, demo_lines, report, small_config
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_server")]

RETRYING = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"},
                              "connect_timeout": 5, "read_timeout": 20}}


def _client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def upload_corpus(endpoint: str, bucket: str, n_lines: int = 240, n_files: int = 3) -> str:
    lines = demo_lines()[:n_lines]
    client = _client(endpoint)
    for i in range(n_files):
        client.put_object(Bucket=bucket, Key=f"in/part-{i}.jsonl", Body=b"".join(lines[i::n_files]))
    return f"s3://{bucket}/in/*.jsonl"


def s3_config(endpoint: str, bucket: str, prefix: str, inputs: str, options: dict | None = None, *overrides: str):
    cfg = small_config(f"s3://{bucket}/{prefix}", inputs, "flows.runner=thread", *overrides)
    storage = StorageConfig(root=f"s3://{bucket}/{prefix}", endpoint_url=endpoint, key="testing", secret="testing",
                            region="us-east-1", options=options or {})
    return cfg.model_copy(update={"storage": storage})


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under a root, keyed relative to it (read fault-free, straight from the store)."""
    client = _client(endpoint)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) + 1:]
            out[rel] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def outputs_of(objs: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in objs.items() if "/_manifest/" not in k and k not in ("pipeline.yaml", "_lock.json")}


def mirror_locally(objs: dict[str, bytes], directory) -> str:
    for rel, data in objs.items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return str(directory)


def run_prep(cfg):
    from shardflow.flows.prep_flows import run_prep as _run

    return _run(cfg)


@pytest.fixture(scope="module")
def shared_bucket(s3_endpoint):
    """One bucket for the module: the fault-free reference is built once and shared."""
    import uuid

    name = f"rel-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_reference(s3_endpoint, shared_bucket, prefect_server):
    inputs = upload_corpus(s3_endpoint, shared_bucket)
    out = run_prep(s3_config(s3_endpoint, shared_bucket, "ref", inputs))
    assert out["ok"], out
    ref = outputs_of(objects(s3_endpoint, shared_bucket, "ref"))
    assert any(k.startswith("shards/") and k.endswith(".tar") for k in ref)
    return inputs, ref


def pipeline_with_faults(s3_endpoint, s3_bucket, inputs, rate: float, seed: int, prefix: str) -> dict:
    with FaultProxy(s3_endpoint, rate=rate, seed=seed) as proxy:
        t0 = time.perf_counter()
        out = run_prep(s3_config(proxy.url, s3_bucket, prefix, inputs, RETRYING, "flows.retries=3"))
        wall = time.perf_counter() - t0
    return {"out": out, "stats": dict(proxy.stats), "wall_s": round(wall, 1)}


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_five_percent_faults_complete_with_identical_outputs(s3_endpoint, shared_bucket, s3_reference, tmp_path, seed):
    s3_bucket = shared_bucket
    inputs, ref = s3_reference
    res = pipeline_with_faults(s3_endpoint, s3_bucket, inputs, 0.05, seed=seed, prefix=f"faulty-{seed}")
    assert res["out"]["ok"], res
    stats = res["stats"]
    assert stats["faults"] >= 10 and all(stats.get(k, 0) > 0 for k in ("500", "503", "reset", "truncated")), stats
    got = objects(s3_endpoint, s3_bucket, f"faulty-{seed}")
    assert outputs_of(got) == ref
    check_root_sound(mirror_locally(got, tmp_path / "faulty"))
    report("s3_faults", rate=0.05, seed=seed, ok=True, identical=True, wall_s=res["wall_s"], **stats)


def test_all_requests_failing_is_a_clear_error_and_nothing_half_published(s3_endpoint, shared_bucket, s3_reference, tmp_path):
    s3_bucket = shared_bucket
    inputs, ref = s3_reference
    few_retries = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                                   "connect_timeout": 2, "read_timeout": 5}}
    with FaultProxy(s3_endpoint, rate=0.0, seed=2) as proxy:
        # A long lease: the dead run's lock must still be live when the re-run looks, however long the
        # retries against the dead store take on a loaded machine (a 60 s lease could expire first).
        cfg = s3_config(proxy.url, s3_bucket, "dead", inputs, few_retries, "flows.retries=1", "flows.lock_ttl_s=900")
        # Let the run get going (lock, config, the clean stage), then cut the store off for good.
        import threading

        def cut():
            while proxy.stats["requests"] < 80:
                time.sleep(0.01)
            proxy.rate = 1.0

        threading.Thread(target=cut, daemon=True).start()
        out = run_prep(cfg)
        stats = dict(proxy.stats)
    assert not out["ok"]
    err = out["error"]
    assert s3_bucket in err or "stage" in err, err  # names the object (URI) or the stage and shard
    assert any(w in err for w in ("InternalError", "internal error", "SlowDown", "reduce your request rate", "reset",
                                  "Connection", "Payload", "503", "500", "ServerDisconnected", "timeout", "Timeout")), err
    got = objects(s3_endpoint, s3_bucket, "dead")
    check_root_sound(mirror_locally(got, tmp_path / "dead"))  # every object that is there verifies
    # Whatever the dead run published is either an exact reference output or not there at all …
    for rel, data in outputs_of(got).items():
        if rel in ref:
            assert data == ref[rel], f"{rel} published with other bytes than a good run's"
    # The dead run could not release its lock (the store was gone): a new run is told who holds it
    # and what to do; once it is removed (or expired, a lease after the last heartbeat) a fault-free
    # re-run finishes the job with the same bytes.
    cfg = s3_config(s3_endpoint, s3_bucket, "dead", inputs)
    # (A fault may still land a request on the store: the release's compare-and-swap can get through, and
    # leaves a released marker, which the next run takes at once.)
    lock = json.loads(got["_lock.json"]) if "_lock.json" in got else {"released": True}
    if not lock.get("released"):
        blocked = run_prep(cfg)
        assert not blocked["ok"] and "LockHeld" in blocked["error"] and "_lock.json" in blocked["error"], blocked
        Storage.from_config(cfg.storage).remove("_lock.json")
    again = run_prep(cfg)
    assert again["ok"], again
    assert outputs_of(objects(s3_endpoint, s3_bucket, "dead")) == ref
    report("s3_faults", rate=1.0, after_requests=80, ok=False, error=err[:200], nothing_half_published=True,
           rerun_identical=True, **stats)


# -- the root lock on S3 ------------------------------------------------------------------------------

def _plant_lock(endpoint, bucket, prefix, **fields):
    import socket

    body = {"token": "someone-else", "purpose": "shardflow prep", "host": socket.gethostname(), "pid": 1,
            "acquired_at": time.time() - 100, "expires_at": time.time() + 3600, **fields}
    _client(endpoint).put_object(Bucket=bucket, Key=f"{prefix}/_lock.json", Body=json.dumps(body).encode())


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_s3_locks_are_taken_over_and_live_ones_refused(s3_endpoint, s3_bucket):
    from shardflow.storage.lock import LockHeld, RootLock

    storage = Storage.from_config(StorageConfig(root=f"s3://{s3_bucket}/root", endpoint_url=s3_endpoint, key="testing",
                                                secret="testing", region="us-east-1"))
    # A live run elsewhere (another host, lease not expired): refused, naming it.
    _plant_lock(s3_endpoint, s3_bucket, "root", host="other-host", pid=4242)
    with pytest.raises(LockHeld, match=r"shardflow prep run \(host other-host, pid 4242"):
        RootLock(storage, purpose="second").acquire()
    # Its lease ran out (the run was killed and stopped refreshing): taken over.
    _plant_lock(s3_endpoint, s3_bucket, "root", host="other-host", pid=4242, expires_at=time.time() - 1)
    with RootLock(storage, purpose="after-expiry"):
        assert b"after-expiry" in storage.read_bytes("_lock.json")
    # A run on this host whose process is gone: taken over at once.
    _plant_lock(s3_endpoint, s3_bucket, "root", pid=_dead_pid())
    with RootLock(storage, purpose="after-death"):
        assert b"after-death" in storage.read_bytes("_lock.json")
    # Released by compare-and-swap into an expired marker (never an unconditional delete).
    assert json.loads(storage.read_bytes("_lock.json"))["released"] is True


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_two_concurrent_cli_runs_on_one_s3_root(s3_endpoint, shared_bucket, s3_reference, tmp_path):
    """As the local test in test_crash.py, on S3: the second run is refused while the first holds
    the lock (conditional PUT), the first completes, and a third run waiting for the lock succeeds."""
    import signal
    import yaml

    from .test_crash import _prefect_env, cli

    inputs, ref = s3_reference
    cfg = s3_config(s3_endpoint, shared_bucket, "pair", inputs)
    data = cfg.model_dump(mode="json")
    data["storage"]["key"], data["storage"]["secret"] = "testing", "testing"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    env = _prefect_env()
    args = ["prep", "all", "--runner", "thread", "--config", str(path)]
    # A lease longer than anything below can take: while SIGSTOPped the first run cannot renew it, and
    # with the default 60 s a slow machine could let it expire, be taken over and (fencing) fail the run.
    first = cli([*args, "--set", "flows.lock_ttl_s=900"], env)
    client = _client(s3_endpoint)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                body = client.get_object(Bucket=shared_bucket, Key="pair/_lock.json")["Body"].read()
                if f'"pid": {first.pid}'.encode() in body:
                    first.send_signal(signal.SIGSTOP)
                    break
            except client.exceptions.NoSuchKey:
                pass
            assert first.poll() is None, first.communicate()[1].decode()[-3000:]
            time.sleep(0.01)
        second = cli(args, env)
        out, err = second.communicate(timeout=300)
        waiter = cli([*args, "--set", "flows.lock_wait_s=300"], env)
        time.sleep(5)
    finally:
        first.send_signal(signal.SIGCONT)
    text = out.decode() + err.decode()
    assert second.returncode == 1 and "is locked by a shardflow prep run" in text and f"pid {first.pid}" in text, text[-3000:]
    assert first.wait(timeout=300) == 0
    wout, werr = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, werr.decode()[-3000:]
    assert outputs_of(objects(s3_endpoint, shared_bucket, "pair")) == ref
