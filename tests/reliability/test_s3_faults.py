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

import os
import time

import boto3
import pytest

from shardflow.storage import Storage, StorageConfig

from . import check_root_sound, demo_lines, small_config
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_server")]

RETRYING = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"},
                              "connect_timeout": 5, "read_timeout": 20}}


def _client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def upload_corpus(endpoint: str, bucket: str, n_lines: int = 450, n_files: int = 3) -> str:
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


@pytest.fixture
def s3_reference(s3_endpoint, s3_bucket):
    inputs = upload_corpus(s3_endpoint, s3_bucket)
    out = run_prep(s3_config(s3_endpoint, s3_bucket, "ref", inputs))
    assert out["ok"], out
    ref = outputs_of(objects(s3_endpoint, s3_bucket, "ref"))
    assert any(k.startswith("shards/") and k.endswith(".tar") for k in ref)
    return inputs, ref


def pipeline_with_faults(s3_endpoint, s3_bucket, inputs, rate: float, seed: int, prefix: str) -> dict:
    with FaultProxy(s3_endpoint, rate=rate, seed=seed) as proxy:
        t0 = time.perf_counter()
        out = run_prep(s3_config(proxy.url, s3_bucket, prefix, inputs, RETRYING, "flows.retries=3"))
        wall = time.perf_counter() - t0
    return {"out": out, "stats": dict(proxy.stats), "wall_s": round(wall, 1)}


def test_five_percent_faults_complete_with_identical_outputs(s3_endpoint, s3_bucket, s3_reference, tmp_path):
    inputs, ref = s3_reference
    res = pipeline_with_faults(s3_endpoint, s3_bucket, inputs, 0.05, seed=1, prefix="faulty")
    print(f"s3 faults 5%: {res['stats']} in {res['wall_s']}s")
    assert res["out"]["ok"], res
    stats = res["stats"]
    assert stats["faults"] >= 10 and all(stats.get(k, 0) > 0 for k in ("500", "503", "reset", "truncated")), stats
    got = objects(s3_endpoint, s3_bucket, "faulty")
    assert outputs_of(got) == ref
    check_root_sound(mirror_locally(got, tmp_path / "faulty"))


def test_all_requests_failing_is_a_clear_error_and_nothing_half_published(s3_endpoint, s3_bucket, s3_reference, tmp_path):
    inputs, ref = s3_reference
    few_retries = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                                   "connect_timeout": 2, "read_timeout": 5}}
    with FaultProxy(s3_endpoint, rate=0.0, seed=2) as proxy:
        cfg = s3_config(proxy.url, s3_bucket, "dead", inputs, few_retries, "flows.retries=1")
        # Let the run get going (lock, config, the clean stage), then cut the store off for good.
        import threading

        def cut():
            while proxy.stats["requests"] < 120:
                time.sleep(0.01)
            proxy.rate = 1.0

        threading.Thread(target=cut, daemon=True).start()
        out = run_prep(cfg)
        stats = dict(proxy.stats)
    print(f"s3 faults 100%: {stats}, error: {out.get('error', '')[:300]}")
    assert not out["ok"]
    err = out["error"]
    assert s3_bucket in err or "stage" in err, err  # names the object (URI) or the stage and shard
    assert any(w in err for w in ("InternalError", "SlowDown", "reset", "Connection", "Payload", "503", "500",
                                  "ServerDisconnected", "timeout", "Timeout")), err
    got = objects(s3_endpoint, s3_bucket, "dead")
    check_root_sound(mirror_locally(got, tmp_path / "dead"))  # every object that is there verifies
    # Whatever the dead run published is either an exact reference output or not there at all …
    for rel, data in outputs_of(got).items():
        if rel in ref:
            assert data == ref[rel], f"{rel} published with other bytes than a good run's"
    # The dead run could not release its lock (the store was gone): a new run is told who holds it
    # and what to do; once it is removed (or expired, 60 s after the last heartbeat) a fault-free
    # re-run finishes the job with the same bytes.
    cfg = s3_config(s3_endpoint, s3_bucket, "dead", inputs)
    if "_lock.json" in got:
        blocked = run_prep(cfg)
        assert not blocked["ok"] and "LockHeld" in blocked["error"] and "_lock.json" in blocked["error"], blocked
        Storage.from_config(cfg.storage).remove("_lock.json")
    again = run_prep(cfg)
    assert again["ok"], again
    assert outputs_of(objects(s3_endpoint, s3_bucket, "dead")) == ref
