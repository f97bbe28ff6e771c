"""Stateless replicas: the deployment claims of DESIGN section 10, on this machine.

- Two server processes on one PostgreSQL schema and one S3 bucket (moto over HTTP) behave
  as one registry: what is pushed or aliased through one is seen through the other.
- A replica told to stop (SIGTERM) refuses new connections, lets in-flight fetches finish
  within STATEHUB_SHUTDOWN_GRACE_SECONDS, cuts what is still running after that, and exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch

from service.app import create_app
from service.settings import Settings
from statehub import Client
from tests._metrics import scrape, value
from tests._models import TinyResNet, seeded
from tests._server import ServerProcess, drop_pg_schema, migrate, start_server
from tests._services import MotoServer, free_port
from tests.conftest import backend_env

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def replicas(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Migrations run once (the compose service / Kubernetes Job), then two replicas start
    with STATEHUB_MIGRATE_ON_START=false; each has its own spool directory."""
    env, schema = backend_env("postgres", str(tmp_path_factory.mktemp("replicas")), moto_server)
    assert schema is not None
    env["STATEHUB_MIGRATE_ON_START"] = "false"
    try:
        migrate(env)
        envs = [{**env, "STATEHUB_DATA_DIR": str(tmp_path_factory.mktemp(f"r{i}"))} for i in (1, 2)]
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(start_server, e) for e in envs]
            servers = [f.result() for f in futures]
        try:
            yield servers[0], servers[1]
        finally:
            for server in servers:
                server.stop()
    finally:
        drop_pg_schema(schema)


@pytest.fixture
def hubs(replicas: tuple[ServerProcess, ServerProcess]) -> Iterator[tuple[Client, Client]]:
    with Client(replicas[0].url, retries=1) as a, Client(replicas[1].url, retries=1) as b:
        yield a, b


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_a_push_through_one_replica_is_fetched_through_the_other(
    hubs: tuple[Client, Client], ns: str
) -> None:
    a, b = hubs
    seeded(1)
    trained = TinyResNet(num_classes=10)
    pushed = a.push(f"{ns}/resnet", trained)

    assert [v.version for v in b.versions(f"{ns}/resnet")] == [1]
    assert b.version(f"{ns}/resnet:1").digest == pushed.digest
    fitted = b.fetch(f"{ns}/resnet", target=TinyResNet(num_classes=10))
    assert_same_tensors(fitted, trained.state_dict())

    again = b.push(f"{ns}/resnet", trained)  # identical bytes through the other replica
    assert (again.created, again.version) == (False, 1)


def test_aliases_set_through_one_replica_are_seen_by_the_other(
    hubs: tuple[Client, Client], ns: str
) -> None:
    a, b = hubs
    weights = []
    for seed in (1, 2):
        seeded(seed)
        model = TinyResNet()
        weights.append(model.state_dict())
        a.push(f"{ns}/net", model)

    b.set_alias(f"{ns}/net", "prod", 1)
    assert a.version(f"{ns}/net@prod").version == 1
    assert_same_tensors(a.fetch(f"{ns}/net@prod", target=TinyResNet()), weights[0])

    a.set_alias(f"{ns}/net", "prod", 2)
    assert b.version(f"{ns}/net@prod").version == 2
    assert b.version(f"{ns}/net@latest").version == 2


# -- graceful shutdown --------------------------------------------------------------------

TENSORS, ROWS, COLS = 12, 1024, 1024  # 48 MiB of fp32: far more than the socket buffers
GRACE_S = 5


def _read_slowly(response: httpx.Response, *, seconds: float) -> bytes:
    """The whole body, spread over about ``seconds``."""
    total = int(response.headers["content-length"])
    chunks, chunk_size = [], 256 * 1024
    pause = seconds / (total / chunk_size)
    for chunk in response.iter_bytes(chunk_size):
        chunks.append(chunk)
        time.sleep(pause)
    return b"".join(chunks)


def _eventually(condition: Callable[[], bool], *, within: float = 3) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _refused(url: str) -> bool:
    """No new request is served: the connection is refused, or (in the moment the listening
    socket closes) accepted and closed without a response."""
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return True
    return False


def test_sigterm_lets_in_flight_fetches_finish_and_cuts_them_after_the_grace(
    tmp_path: Path, ns: str
) -> None:
    env = {"STATEHUB_DATA_DIR": str(tmp_path), "STATEHUB_SHUTDOWN_GRACE_SECONDS": str(GRACE_S)}
    server = start_server(env, log_level="info")
    with ExitStack() as stack:
        stack.callback(server.stop)
        generator = torch.Generator().manual_seed(0)
        source = {f"w{i}": torch.randn(ROWS, COLS, generator=generator) for i in range(TENSORS)}
        with Client(server.url, retries=1) as hub:
            version = hub.push(f"{ns}/big", source)
        target = {"tensors": [{"key": k, "shape": [ROWS, COLS], "dtype": "F32"} for k in source]}
        http = stack.enter_context(httpx.Client(base_url=server.url, timeout=60))
        url = f"/v1/models/{ns}/big/versions/1/fetch"
        # Two fetches in flight: one read to the end, one whose reader stalls.
        steady = stack.enter_context(http.stream("POST", url, json={"target": target}))
        stalled_client = stack.enter_context(httpx.Client(base_url=server.url, timeout=60))
        stalled = stack.enter_context(stalled_client.stream("POST", url, json={"target": target}))
        assert steady.status_code == stalled.status_code == 200
        stalled_chunks = stalled.iter_bytes(64 * 1024)
        next(stalled_chunks)
        assert _eventually(lambda: value(scrape(server.url), "statehub_fetches_in_flight") == 2)

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert _eventually(lambda: _refused(server.url)), "new connections still accepted"
        body = _read_slowly(steady, seconds=2)  # goes on well after the signal

        assert len(body) == int(steady.headers["content-length"]) == version.size
        assert hashlib.sha256(body).hexdigest() == version.digest  # exact: the stored bytes
        server.process.wait(timeout=GRACE_S + 20)
        exited_after = time.monotonic() - signalled
        assert GRACE_S - 1 < exited_after < GRACE_S + 15  # the stalled fetch held it, bounded
        assert server.process.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):  # the stalled fetch was cut, not completed
            b"".join(stalled_chunks)
        output = server.output(limit=None)
        assert "timeout graceful shutdown exceeded" in output
        assert "Application shutdown complete" in output


def test_a_draining_app_fails_readiness_and_refuses_new_requests(tmp_path: Path) -> None:
    """What a request on a kept-alive connection meets between SIGTERM and its close."""
    app = create_app(Settings(data_dir=tmp_path))

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://replica") as client,
        ):
            assert (await client.get("/readyz")).status_code == 200
            app.state.drain.begin()
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "shutting_down")
            assert (await client.get("/healthz")).status_code == 200  # alive: keep it
            refused = await client.get("/v1/models/a/b", headers={"X-Request-ID": "d"})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["connection"] == "close"
            assert refused.headers["x-request-id"] == "d"
            assert "retry-after" in refused.headers

    # A loop of its own, in a thread of its own: whatever else ran in this process.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result(timeout=60)


def test_the_image_healthcheck_command(server: ServerProcess) -> None:
    """``python -m service healthcheck`` (the Dockerfile's HEALTHCHECK) asks the local port."""
    port = server.url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "service", "healthcheck", "--path", "/readyz"]
    env = {**os.environ, "STATEHUB_PORT": port}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    env["STATEHUB_PORT"] = str(free_port())  # nothing listens there
    failed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1 and "unhealthy" in failed.stderr
