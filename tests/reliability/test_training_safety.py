"""A killed training launch: no orphan keeps training, and no credential is left in any file.

``shardflow train --nproc 2`` (the Prefect train flow, torchrun, two gloo ranks) trains on an S3
root (moto on 127.0.0.1) with a key id and secret planted for this test and given only on the
command line. Once the ranks are training and checkpointing, the ``shardflow`` process is
SIGKILLed — nothing of its own cleanup runs. Within 10 s, torchrun and both ranks must be gone
(parent-death signals, train/launch.py); and no file under the test's folder (which holds the
processes' TMPDIR: the launch file, torchrun's logs, upload spools), no object in the bucket and
no byte of the Prefect server's database may hold either credential.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml

from shardflow.storage import Storage, StorageConfig

from ..train.test_trainer import build_dataset, process_tree, tiny_cfg
from . import report


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait() is missing


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(path)
    return found


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("prefect_server")
def test_sigkilled_train_launcher_leaves_no_rank_and_no_credential(tmp_path, s3_endpoint, s3_bucket):
    import boto3

    from .test_crash import _prefect_env, cli

    key, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3cr3t-{uuid.uuid4().hex}"
    st = StorageConfig(root=f"s3://{s3_bucket}/root", endpoint_url=s3_endpoint, region="us-east-1", key=key, secret=secret)
    build_dataset(Storage.from_config(st))
    train = tiny_cfg("orphans", trainer={"steps": 100_000, "log_every": 1}, checkpoint={"every_steps": 2, "keep_last": 2})
    config = {"storage": {"root": st.root, "endpoint_url": s3_endpoint, "region": "us-east-1"},
              "train": train.model_dump(mode="json"), "eval": {"enabled": False},
              "flows": {"train_launcher": "torchrun"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert key not in path.read_text() and secret not in path.read_text()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(_prefect_env(), TMPDIR=str(tmp))
    proc = cli(["train", "--nproc", "2", "--no-eval", "--config", str(path),
                "--set", f"storage.key={key}", "--set", f"storage.secret={secret}"], env)
    storage = Storage.from_config(st)
    try:
        deadline = time.monotonic() + 240
        while not storage.exists("runs/orphans/checkpoints/latest"):  # ranks train and publish on S3
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "training never published a checkpoint"
            time.sleep(0.25)
        tree = process_tree(proc.pid)
        assert len(tree) >= 4, tree  # shardflow, torchrun, 2 ranks
        proc.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        while any(_alive(p) for p in tree) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        gone_after = time.monotonic() - t0
        survivors = [p for p in tree if _alive(p)]
    finally:
        for p in process_tree(proc.pid) + [p for p in locals().get("tree", []) if _alive(p)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    assert not survivors, f"processes {survivors} outlived the killed launcher by 10 s"
    # Nothing under the test's folder (TMPDIR included) holds a credential; the launch file the
    # killed launcher could not delete is there, with the secrets masked.
    needles = [key.encode(), secret.encode()]
    assert not _files_holding(tmp_path, needles)
    assert list(tmp.rglob("launch.json")), "expected the killed launcher's launch file (with masked secrets)"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    objects = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    leaked = [o["Key"] for o in objects
              if any(n in client.get_object(Bucket=s3_bucket, Key=o["Key"])["Body"].read() for n in needles)]
    assert not leaked, leaked
    db_files = _prefect_database_files()
    assert not [f for d in db_files for f in _files_holding(d, needles)]
    report("training_orphans", ranks_gone_after_s=round(gone_after, 2), processes=len(tree), bucket_objects=len(objects),
           prefect_db_scanned=bool(db_files), credentials_found=0)


def _prefect_database_files() -> list[Path]:
    """The folder of the Prefect test server's SQLite database (flow run parameters, logs, artifacts)."""
    try:
        from prefect.settings import get_current_settings

        url = str(get_current_settings().server.database.connection_url.get_secret_value())
    except Exception:  # noqa: BLE001 - another Prefect layout: nothing to scan here
        return []
    if "sqlite" not in url:
        return []
    db = Path(url.split(":///", 1)[-1])
    return [db.parent] if db.parent.is_dir() else []
