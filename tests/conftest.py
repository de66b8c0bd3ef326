"""Shared fixtures: a real S3 endpoint (moto over HTTP on 127.0.0.1), storage on local disk and on
S3, and a real Prefect server (prefect_test_harness)."""
from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the moto endpoint only; real ones must never be needed by the suite.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

from shardflow.storage import Storage, StorageConfig  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 for the whole session (as s3fs's own suite does)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test; yields its name."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    yield name


def s3_storage_config(endpoint: str, bucket: str, prefix: str = "root") -> StorageConfig:
    return StorageConfig(root=f"s3://{bucket}/{prefix}", endpoint_url=endpoint, key="testing", secret="testing",
                         region="us-east-1")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    """The same test against a local dataset root and an S3 one."""
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_config(s3_storage_config(endpoint, bucket))


@pytest.fixture
def local_storage(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


@pytest.fixture
def s3_storage(s3_endpoint, s3_bucket) -> Storage:
    return Storage.from_config(s3_storage_config(s3_endpoint, s3_bucket))


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (temporary database, started server) for the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
