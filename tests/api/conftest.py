"""Dedicated servers for tests that configure, kill or restart them (auth, integrity,
atomicity): one data set per module and backend, any number of processes over it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save as st_save

from service.settings import Settings
from service.storage.blobs import BlobStore, open_blob_store
from tests._server import ServerProcess, drop_pg_schema, start_server
from tests.conftest import BACKENDS, backend_env


@dataclass
class Deployment:
    """One backend's data (directory, or PostgreSQL schema + bucket) and its servers."""

    backend: str
    env: dict[str, str]
    servers: list[ServerProcess] = field(default_factory=list)

    def start(self, **extra: str) -> ServerProcess:
        """A server process over this data; ``extra`` env vars on top (a restart after
        a kill is just another start)."""
        server = start_server({**self.env, **extra})
        self.servers.append(server)
        return server

    @property
    def settings(self) -> Settings:
        keys = {k.removeprefix("STATEHUB_").lower(): v for k, v in self.env.items()}
        return Settings(**keys)

    def store(self) -> BlobStore:
        return open_blob_store(self.settings)

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.settings.effective_database_url)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    backend = request.param
    moto = request.getfixturevalue("moto_server") if backend == "postgres" else None
    data_dir = tmp_path_factory.mktemp(f"dedicated-{backend}")
    env, schema = backend_env(backend, str(data_dir), moto)
    deployment = Deployment(backend, env)
    try:
        yield deployment
    finally:
        deployment.stop()
        if schema:
            drop_pg_schema(schema)


def checkpoint_bytes(seed: int = 0, *, rows: int = 4, cols: int = 8) -> bytes:
    """A small safetensors file; ``seed`` makes distinct content."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "layer.weight": torch.randn(rows, cols, generator=generator),
        "layer.bias": torch.randn(rows, generator=generator),
    }
    return st_save(tensors)


def spec_of_checkpoint(rows: int = 4, cols: int = 8) -> dict[str, Any]:
    return {
        "tensors": [
            {"key": "layer.weight", "shape": [rows, cols], "dtype": "F32"},
            {"key": "layer.bias", "shape": [rows], "dtype": "F32"},
        ]
    }


def tar_of(members: dict[str, bytes]) -> bytes:
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
