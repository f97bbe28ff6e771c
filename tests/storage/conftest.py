"""Fixtures for the blob stores: each store on tmp_path and on moto's S3 server."""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from service.storage.blobs import LocalBlobStore, S3BlobStore
from tests._services import MotoServer, s3_settings, start_moto_server


@pytest.fixture
def start_moto() -> Iterator[Callable[[], MotoServer]]:
    """Start dedicated moto servers (for tests that kill them); all stopped at teardown."""
    servers: list[MotoServer] = []

    def start() -> MotoServer:
        servers.append(start_moto_server())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def make_s3_settings() -> Callable[..., Settings]:
    """``make_s3_settings(endpoint, bucket, **overrides)`` -> Settings for an S3 store."""
    return s3_settings


@pytest.fixture(scope="module")
def s3_bucket(moto_server: MotoServer) -> str:
    """A uniquely named bucket for the test module, created through the store."""
    bucket = f"statehub-test-{uuid.uuid4().hex[:12]}"
    S3BlobStore(s3_settings(moto_server.endpoint, bucket)).ensure_bucket()
    return bucket


@pytest.fixture
def s3_store_settings(moto_server: MotoServer, s3_bucket: str) -> Settings:
    """Settings for the module's bucket under a per-test prefix, so tests never share keys."""
    return s3_settings(moto_server.endpoint, s3_bucket, s3_prefix=f"t-{uuid.uuid4().hex[:8]}/")


@pytest.fixture
def s3_store(s3_store_settings: Settings) -> S3BlobStore:
    return S3BlobStore(s3_store_settings)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "data")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Any:
    """Each blob store in turn: ``LocalBlobStore`` on tmp_path, ``S3BlobStore`` on moto."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture
def closed_port_endpoint() -> str:
    """An HTTP endpoint on loopback where nothing listens (connections are refused)."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
