"""An S3 outage in the middle of a push answers 503 in a bounded time (issue 17 item 10).

PostgreSQL + moto's S3 server reached through a loopback TCP proxy that the test cuts
(connections refused) or freezes (connections accepted, nothing forwarded: a hung
endpoint). The push is authenticated and spooling when the outage starts; the server must
answer ``503 storage_unavailable`` within its connect/read timeouts times its attempts
(``STATEHUB_S3_*`` settings) — before these were bounded it took 62 s — commit nothing, and
serve the same push once S3 is back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from tests._proxy import TcpProxy
from tests._server import ServerProcess, drop_pg_schema, start_server
from tests._services import MotoServer
from tests.api.conftest import checkpoint_bytes
from tests.conftest import backend_env

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

FREEZE_READ_TIMEOUT_S = 1.0
FREEZE_ATTEMPTS = 2


@contextmanager
def s3_behind_proxy(
    moto: MotoServer, data_dir: str, **settings: str
) -> Iterator[tuple[ServerProcess, TcpProxy]]:
    env, schema = backend_env("postgres", data_dir, moto)
    assert schema is not None
    target = urlsplit(moto.endpoint)
    proxy = TcpProxy((target.hostname or "127.0.0.1", target.port or 80))
    env["STATEHUB_S3_ENDPOINT"] = f"http://{proxy.address}"
    server = start_server(env | settings)
    try:
        yield server, proxy
    finally:
        server.stop()
        proxy.delay = 0.0
        proxy.close()
        drop_pg_schema(schema)


@pytest.fixture(scope="module")
def defaults(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, TcpProxy]]:
    """The default S3 timeouts and attempts."""
    with s3_behind_proxy(moto_server, str(tmp_path_factory.mktemp("s3-cut"))) as pair:
        yield pair


@pytest.fixture(scope="module")
def short(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, TcpProxy]]:
    """A read timeout short enough to test a hung endpoint quickly."""
    with s3_behind_proxy(
        moto_server,
        str(tmp_path_factory.mktemp("s3-freeze")),
        STATEHUB_S3_READ_TIMEOUT_S=str(FREEZE_READ_TIMEOUT_S),
        STATEHUB_S3_MAX_ATTEMPTS=str(FREEZE_ATTEMPTS),
    ) as pair:
        yield pair


def push_through_outage(
    url: str, body: bytes, begin: Callable[[], None]
) -> tuple[httpx.Response, float]:
    """POST ``body``: half of it, then ``begin()`` starts the outage, then the rest. Returns
    the answer and the seconds from the outage to the answer."""
    sent_half, go_on = threading.Event(), threading.Event()

    def slow() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        sent_half.set()
        go_on.wait(30)
        yield body[len(body) // 2 :]

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post,
            url,
            content=slow(),
            headers={"Content-Length": str(len(body))},
            timeout=120,
        )
        assert sent_half.wait(30)
        begin()
        started = time.monotonic()
        go_on.set()
        answer = pending.result(150)
    return answer, time.monotonic() - started


def unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storage_unavailable"
    assert int(response.headers["retry-after"]) > 0


def test_s3_cut_mid_push_answers_503_within_seconds(
    defaults: tuple[ServerProcess, TcpProxy],
) -> None:
    server, proxy = defaults
    url = f"{server.url}/v1/models/outage/cut/versions"
    body = checkpoint_bytes(800, rows=512, cols=512)  # 1 MiB
    try:
        answer, elapsed = push_through_outage(url, body, proxy.cut)
    finally:
        proxy.restore()
    unavailable(answer)
    # 3 attempts with standard backoff (at most 1 + 2 s) per S3 call; it was 62 s.
    assert elapsed < 15, elapsed
    assert httpx.get(f"{server.url}/v1/models/outage/cut", timeout=30).status_code == 404
    again = httpx.post(url, content=body, timeout=120)
    assert again.status_code == 201 and again.json()["version"] == 1, again.text


def test_a_hung_s3_endpoint_mid_push_answers_503_within_its_read_timeout(
    short: tuple[ServerProcess, TcpProxy],
) -> None:
    server, proxy = short
    url = f"{server.url}/v1/models/outage/hung/versions"
    body = checkpoint_bytes(801, rows=512, cols=512)

    def freeze() -> None:
        proxy.delay = 3600.0  # accepted, never forwarded

    try:
        answer, elapsed = push_through_outage(url, body, freeze)
    finally:
        proxy.cut()  # drops the frozen connections
        proxy.delay = 0.0
        proxy.restore()
    unavailable(answer)
    # Each S3 call: attempts x read timeout, plus backoff; a few calls before the 503.
    bound = 3 * FREEZE_ATTEMPTS * (FREEZE_READ_TIMEOUT_S + 2)
    assert elapsed < bound, elapsed
    assert httpx.get(f"{server.url}/v1/models/outage/hung", timeout=30).status_code == 404
    again = httpx.post(url, content=body, timeout=120)
    assert again.status_code == 201 and again.json()["version"] == 1, again.text
