"""Shared fixtures: a real statehub server per backend, clients, unique names."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.storage.blobs import S3BlobStore
from statehub import Client
from tests._server import ServerProcess, create_pg_schema, drop_pg_schema, start_server
from tests._services import S3_TEST_KEYS, MotoServer, s3_settings, start_moto_server

BACKENDS = ("sqlite", "postgres")
# Fixtures that start a statehub server process or a browser: their tests are marked
# ``server`` and stay out of the fast lane (``make test-fast``).
PROCESS_FIXTURES = frozenset({"server", "deployment", "browser"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True)
def client_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test's clients (and CLI runs) keep fetched bodies in a cache of its own."""
    root = tmp_path_factory.mktemp("statehub-cache")
    monkeypatch.setenv("STATEHUB_CACHE", str(root))
    monkeypatch.delenv("STATEHUB_OFFLINE", raising=False)
    return root


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()


def backend_env(
    backend: str, data_dir: str, moto: MotoServer | None
) -> tuple[dict[str, str], str | None]:
    # A small header bound keeps the "header too large" test's upload small.
    env = {"STATEHUB_DATA_DIR": data_dir, "STATEHUB_MAX_HEADER_BYTES": str(4 * 1024 * 1024)}
    if backend == "sqlite":
        return env, None
    assert moto is not None
    schema, url = create_pg_schema()
    bucket = f"statehub-{uuid.uuid4().hex[:12]}"
    S3BlobStore(s3_settings(moto.endpoint, bucket)).ensure_bucket()
    env |= {
        "STATEHUB_DATABASE_URL": url,
        "STATEHUB_S3_ENDPOINT": moto.endpoint,
        "STATEHUB_S3_BUCKET": bucket,
        "STATEHUB_S3_REGION": "us-east-1",
        "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
        "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
        "STATEHUB_S3_MULTIPART_THRESHOLD": str(8 * 1024 * 1024),
        "STATEHUB_S3_MULTIPART_CHUNK": str(8 * 1024 * 1024),
    }
    return env, schema


@contextmanager
def postgres_s3_server(
    moto: MotoServer, data_dir: str, env: dict[str, str], *, log_level: str = "warning"
) -> Iterator[ServerProcess]:
    """A server of a test's own on PostgreSQL + S3 with ``env`` on top; its schema dropped after."""
    base, schema = backend_env("postgres", data_dir, moto)
    server = start_server(base | env, log_level=log_level)
    try:
        yield server
    finally:
        server.stop()
        assert schema is not None
        drop_pg_schema(schema)


@pytest.fixture(scope="session", params=BACKENDS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A running server on one backend; the tests using it run once per backend."""
    backend = request.param
    moto = request.getfixturevalue("moto_server") if backend == "postgres" else None
    data_dir = tmp_path_factory.mktemp(f"data-{backend}")
    env, schema = backend_env(backend, str(data_dir), moto)
    process = start_server(env)
    process.backend = backend  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        process.stop()
        if schema:
            drop_pg_schema(schema)


@pytest.fixture
def hub(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, retries=1) as client:
        yield client


@pytest.fixture
def ns() -> str:
    """A namespace of the test's own, so tests sharing a server never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"
