"""A full spool disk: uploads get 503 storage_unavailable with Retry-After, reads keep
working, nothing half-written stays behind, and uploads work again once space is back.

The spool directory is a real 64 MiB tmpfs mounted for the test (the tests run as root).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from tests._server import ServerProcess, start_server

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

MiB = 1024 * 1024


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "spool"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture
def spool_server(tmp_path: Path, small_spool: Path) -> Iterator[ServerProcess]:
    env = {
        "STATEHUB_DATA_DIR": str(tmp_path / "data"),
        "STATEHUB_SPOOL_DIR": str(small_spool),
        "STATEHUB_SPOOL_MIN_FREE_BYTES": str(8 * MiB),
    }
    server = start_server(env)
    try:
        yield server
    finally:
        server.stop()


def upload(server: ServerProcess, name: str, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/team/{name}/versions", content=body, timeout=60)


def checkpoint(seed: int) -> bytes:
    return st_save({"w": torch.randn(256, 256, generator=torch.Generator().manual_seed(seed))})


def test_full_spool_disk_is_unavailable_then_recovers(
    spool_server: ServerProcess, small_spool: Path
) -> None:
    assert upload(spool_server, "kept", checkpoint(0)).status_code == 201

    filler = small_spool / "filler"
    filler.write_bytes(b"\0" * (60 * MiB))  # leaves ~4 MiB, under the 8 MiB floor
    refused = upload(spool_server, "new", checkpoint(1))
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert refused.headers["retry-after"]
    # What is stored is still served.
    blob = httpx.get(f"{spool_server.url}/v1/models/team/kept/versions/1/blob")
    assert blob.status_code == 200 and blob.content == checkpoint(0)
    assert httpx.get(f"{spool_server.url}/v1/models/team/new").status_code == 404

    filler.unlink()
    assert upload(spool_server, "new", checkpoint(1)).status_code == 201


def test_disk_filling_up_during_an_upload_leaves_nothing(
    spool_server: ServerProcess, small_spool: Path
) -> None:
    def chunked() -> Iterator[bytes]:  # no Content-Length: the size is unknown up front
        for _ in range(80):
            yield b"\1" * MiB

    refused = upload(spool_server, "huge", chunked())
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "storage_unavailable"
    assert list(small_spool.iterdir()) == [], "the partial spool file is removed"
    assert httpx.get(f"{spool_server.url}/v1/models/team/huge").status_code == 404
    assert upload(spool_server, "after", checkpoint(2)).status_code == 201
