"""Dependencies failing under a running server (PostgreSQL + S3 protocol): each reached
through a TCP proxy on loopback that the test cuts and restores. The server answers
``503 storage_unavailable`` with ``Retry-After``, keeps serving what does not need the
missing dependency, reports it in ``/readyz``, and recovers by itself."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import make_url

from tests._proxy import TcpProxy
from tests._server import ServerProcess, drop_pg_schema, start_server
from tests._services import MotoServer
from tests.api.conftest import checkpoint_bytes, spec_of_checkpoint
from tests.conftest import backend_env

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server


@dataclass
class Faulty:
    server: ServerProcess
    database: TcpProxy
    s3: TcpProxy

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.server.url}{path}", timeout=60, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def faulty(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    env, schema = backend_env("postgres", str(tmp_path_factory.mktemp("faults")), moto_server)
    assert schema is not None
    url = make_url(env["STATEHUB_DATABASE_URL"])
    database = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    moto = urlsplit(moto_server.endpoint)
    s3 = TcpProxy((moto.hostname or "127.0.0.1", moto.port or 80))
    env["STATEHUB_DATABASE_URL"] = url.set(host="127.0.0.1", port=database.port).render_as_string(
        hide_password=False
    )
    env["STATEHUB_S3_ENDPOINT"] = f"http://{s3.address}"
    server = start_server(env)
    try:
        yield Faulty(server, database, s3)
    finally:
        server.stop()
        database.close()
        s3.close()
        drop_pg_schema(schema)


def unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert response.headers["x-error-code"] == "storage_unavailable"
    assert int(response.headers["retry-after"]) > 0


def ready_again(faulty: Faulty, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while faulty.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, faulty.get("/readyz").text
        time.sleep(0.2)


def test_s3_down_then_back(faulty: Faulty) -> None:
    body = checkpoint_bytes(600)
    url = faulty.server.url
    assert httpx.post(f"{url}/v1/models/f/s3/versions", content=body).status_code == 201
    faulty.s3.cut()
    try:
        unavailable(faulty.get("/v1/models/f/s3/versions/1/blob"))
        unavailable(httpx.post(f"{url}/v1/models/f/s3/versions", content=checkpoint_bytes(601)))
        # What needs only the database still works.
        assert faulty.get("/v1/models/f/s3").status_code == 200
        plan = httpx.post(
            f"{url}/v1/models/f/s3/versions/1/plan", json={"target": spec_of_checkpoint()}
        )
        assert plan.status_code == 200, plan.text
        ready = faulty.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["blobs"] != "ok"
    finally:
        faulty.s3.restore()
    ready_again(faulty)
    assert faulty.get("/v1/models/f/s3/versions/1/blob").content == body
    assert httpx.post(f"{url}/v1/models/f/s3/versions", content=checkpoint_bytes(601)).is_success


def test_postgres_down_then_back(faulty: Faulty) -> None:
    url = faulty.server.url
    assert httpx.post(f"{url}/v1/models/f/pg/versions", content=checkpoint_bytes(610)).is_success
    faulty.database.cut()
    try:
        unavailable(faulty.get("/v1/models/f/pg"))
        unavailable(httpx.post(f"{url}/v1/models/f/pg/versions", content=checkpoint_bytes(611)))
        ready = faulty.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] != "ok"
        assert ready.json()["checks"]["blobs"] == "ok"
        assert faulty.get("/healthz").status_code == 200  # the process itself is fine
    finally:
        faulty.database.restore()
    ready_again(faulty)
    assert faulty.get("/v1/models/f/pg").json()["latest_version"] == 1
    second = httpx.post(f"{url}/v1/models/f/pg/versions", content=checkpoint_bytes(611))
    assert second.status_code == 201 and second.json()["version"] == 2


def test_a_slow_s3_endpoint_still_serves_whole_blobs(faulty: Faulty) -> None:
    body = checkpoint_bytes(620, rows=256, cols=1024)  # 1 MiB
    url = faulty.server.url
    assert httpx.post(f"{url}/v1/models/f/slow/versions", content=body).is_success
    faulty.s3.delay = 0.01
    try:
        started = time.monotonic()
        blob = faulty.get("/v1/models/f/slow/versions/1/blob")
        assert time.monotonic() - started > 0.05
    finally:
        faulty.s3.delay = 0.0
    assert blob.status_code == 200
    assert hashlib.sha256(blob.content).hexdigest() == hashlib.sha256(body).hexdigest()


def test_postgres_lost_mid_upload_then_the_retry_succeeds(faulty: Faulty) -> None:
    body = checkpoint_bytes(630, rows=256, cols=256)
    url = f"{faulty.server.url}/v1/models/f/mid/versions"
    sent_half = threading.Event()
    go_on = threading.Event()

    def slow() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        sent_half.set()
        go_on.wait(30)
        yield body[len(body) // 2 :]

    headers = {"Content-Length": str(len(body))}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, url, content=slow(), headers=headers, timeout=60)
        assert sent_half.wait(30)
        faulty.database.cut()  # the request is authenticated and spooling: the commit fails
        go_on.set()
        try:
            unavailable(pending.result(60))
        finally:
            faulty.database.restore()
    ready_again(faulty)
    assert faulty.get("/v1/models/f/mid").status_code == 404  # nothing half-committed
    retried = httpx.post(url, content=body, timeout=60)
    assert retried.status_code == 201 and retried.json()["version"] == 1
