"""Real server processes for the integration tests, on each backend.

Backends: ``sqlite`` (SQLite file + local blob directory, the embedded default) and
``postgres`` (PostgreSQL at STATEHUB_TEST_DATABASE_URL in a fresh schema + moto's S3 server
over HTTP through boto3). The server runs as ``python -m service`` on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil
import sqlalchemy as sa

from service.settings import Settings
from tests._services import free_port

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    return os.environ.get("STATEHUB_TEST_DATABASE_URL", DEFAULT_PG_URL)


def create_pg_schema() -> tuple[str, str]:
    """A fresh schema in the test database; returns (schema, url that selects it)."""
    schema = f"sh_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(pg_url())
    with engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    separator = "&" if "?" in pg_url() else "?"
    return schema, f"{pg_url()}{separator}options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    engine = sa.create_engine(pg_url())
    with engine.begin() as connection:
        connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@dataclass
class ServerProcess:
    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    @property
    def settings(self) -> Settings:
        """The server's settings, as the tests' own process would read them."""
        keys = {
            k.removeprefix("STATEHUB_").lower(): v
            for k, v in self.env.items()
            if k.startswith("STATEHUB_")
        }
        return Settings(**keys)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_peak_bytes(self) -> int:
        """Peak resident memory of the server process (VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return psutil.Process(self.pid).memory_info().rss

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def output(self, *, limit: int | None = 6000) -> str:
        self.log.flush()
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return text[-limit:] if limit else text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def migrate(env: dict[str, str]) -> None:
    """``python -m service migrate`` with ``env``: the one-shot migration step."""
    subprocess.run(
        [sys.executable, "-m", "service", "migrate"],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=120,
    )


def start_server(
    env: dict[str, str], *, timeout: float = 60.0, log_level: str = "warning"
) -> ServerProcess:
    port = free_port()
    full_env = {**os.environ, **env, "STATEHUB_PORT": str(port), "STATEHUB_HOST": "127.0.0.1"}
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by ServerProcess
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--log-level", log_level],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=full_env,
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", full_env, process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    output = server.output()
    server.stop()
    raise RuntimeError(f"statehub server did not become ready:\n{output}")
