"""Fixtures of the cluster tests: a real S3 API (moto's server mode) on a loopback port."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1, running for the session; yields the environment that points s3fs (and boto) at it."""
    server_mod = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    server.stop()


@pytest.fixture
def s3(s3_server: dict[str, str], monkeypatch):
    """A fresh bucket on the moto server, the environment set for this process; yields an s3fs filesystem and the bucket URL."""
    import s3fs

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"mmcurate-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(s3_server: dict[str, str]) -> dict[str, str]:
    """The environment of a subprocess that talks to the moto server."""
    return {**os.environ, **s3_server}
