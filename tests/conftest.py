"""Shared fixtures: a real moto S3 server on 127.0.0.1 (HTTP, the real boto3 client)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from deblur.config import StorageConfig
from deblur.io.storage import Storage
from tests.faultproxy import FaultProxy

# Dummy credentials for moto only; real ones must never reach the tests.
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-never-shown",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's standalone server on a free loopback port; sets the AWS_* environment so every
    boto3 client (this process, Ray workers, CLI subprocesses) talks to it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_ENV)
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture()
def s3_bucket(moto_server: str) -> str:
    """A fresh bucket per test, as ``s3://NAME``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    Storage(StorageConfig(endpoint_url=moto_server)).client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def storage(moto_server: str) -> Storage:
    return Storage(StorageConfig(endpoint_url=moto_server))


@pytest.fixture()
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    host_port = moto_server.removeprefix("http://").split(":")
    proxy = FaultProxy((host_port[0], int(host_port[1]))).start()
    yield proxy
    proxy.stop()
