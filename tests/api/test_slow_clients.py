"""Slow and half-open clients are cut within a bound (issue 17 item 10).

A real server process (``python -m service``: uvicorn with the server's own protocol) with
short timeouts, reached over raw sockets so that a test controls every byte and its timing:
a half-sent head, a silent connection, an oversized head, a body trickling at 1 KiB/s and a
body that stops. Each is answered 408 / 431 with ``Connection: close`` and the socket is
closed within the configured bound plus a margin; nothing is committed; a normal client is
served meanwhile.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing

import httpx
import pytest

from tests._server import ServerProcess, start_server
from tests.api.conftest import checkpoint_bytes

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
MIN_RATE = 8 * 1024  # bytes/s
KEEP_ALIVE_S = 1
MARGIN_S = 2.5  # loaded CI machines; a missing timeout holds the connection far longer


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        {
            "STATEHUB_DATA_DIR": str(tmp_path_factory.mktemp("slow-clients")),
            "STATEHUB_REQUEST_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "STATEHUB_REQUEST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "STATEHUB_REQUEST_BODY_MIN_RATE": str(MIN_RATE),
            "STATEHUB_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
        }
    )
    try:
        yield server
    finally:
        server.stop()


def connect(server: ServerProcess) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(30)  # far beyond every bound: a hang fails the timing assertion
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return bytes(received)


def head(path: str, *, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: statehub", *([extra] if extra else [])]
    if length is not None:
        lines += ["Content-Type: application/octet-stream", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def assert_closed_answer(answer: bytes, status: int) -> None:
    assert status_of(answer) == status, answer[:300]
    assert b"connection: close" in answer.lower()


def test_a_half_sent_head_is_answered_408_and_closed(timed: ServerProcess) -> None:
    sockets = [connect(timed) for _ in range(50)]
    started = time.monotonic()
    for sock in sockets:
        sock.sendall(b"POST /v1/models/slow/head/versions HTTP/1.1\r\nHost: statehub\r\nX-A")
    # While 50 half-open requests wait, a normal client is served.
    assert httpx.get(f"{timed.url}/healthz", timeout=10).status_code == 200
    answers = []
    for sock in sockets:
        with closing(sock):
            answers.append(read_until_closed(sock))
    elapsed = time.monotonic() - started
    for answer in answers:
        assert_closed_answer(answer, 408)
    assert HEADER_TIMEOUT_S * 0.8 <= elapsed < HEADER_TIMEOUT_S + MARGIN_S, elapsed


def test_a_silent_connection_is_closed(timed: ServerProcess) -> None:
    with closing(connect(timed)) as sock:
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert_closed_answer(answer, 408)
    assert elapsed < HEADER_TIMEOUT_S + MARGIN_S, elapsed


def test_an_oversized_head_is_431(timed: ServerProcess) -> None:
    with closing(connect(timed)) as sock:
        sock.sendall(head("/healthz", extra="X-Big: " + "a" * (100 * 1024)))
        answer = read_until_closed(sock)
    assert_closed_answer(answer, 431)
    # Many headers, each small, count together.
    many = "\r\n".join(f"X-H{i}: {'b' * 60}" for i in range(2000))
    with closing(connect(timed)) as sock:
        sock.sendall(head("/healthz", extra=many))
        answer = read_until_closed(sock)
    assert_closed_answer(answer, 431)


def trickle(sock: socket.socket, data: bytes, *, per_second: int, stop: threading.Event) -> None:
    """Send ``data`` at ``per_second`` bytes/s in 1/4 s steps until closed or told to stop."""
    step = max(1, per_second // 4)
    try:
        for offset in range(0, len(data), step):
            if stop.is_set():
                return
            sock.sendall(data[offset : offset + step])
            time.sleep(0.25)
    except OSError:
        pass  # the server closed the connection: what the test waits for


def upload_slowly(server: ServerProcess, path: str, body: bytes, *, per_second: int) -> float:
    """Seconds until the server answers 408 and closes, ``body`` sent at ``per_second``."""
    stop = threading.Event()
    with closing(connect(server)) as sock:
        sock.sendall(head(path, length=len(body)))
        started = time.monotonic()
        sender = threading.Thread(
            target=trickle, args=(sock, body), kwargs={"per_second": per_second, "stop": stop}
        )
        sender.start()
        try:
            answer = read_until_closed(sock)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            sender.join(10)
    assert_closed_answer(answer, 408)
    assert b"bytes/s" in answer  # the reason, for whoever reads the response
    return elapsed


def test_a_body_at_1_kib_per_second_is_cut(timed: ServerProcess) -> None:
    body = checkpoint_bytes(700, rows=256, cols=256)  # 257 KiB: 4+ minutes at 1 KiB/s
    elapsed = upload_slowly(timed, "/v1/models/slow/trickle/versions", body, per_second=1024)
    # Deadline: the timeout, plus 1/8 s per second earned at 1 KiB/s against 8 KiB/s.
    bound = BODY_TIMEOUT_S * 8 / 7
    assert bound * 0.8 <= elapsed < bound + MARGIN_S, elapsed
    assert httpx.get(f"{timed.url}/v1/models/slow/trickle", timeout=10).status_code == 404


def test_a_body_that_stops_is_cut(timed: ServerProcess) -> None:
    body = checkpoint_bytes(701, rows=256, cols=256)
    with closing(connect(timed)) as sock:
        sock.sendall(head("/v1/models/slow/stops/versions", length=len(body)))
        sock.sendall(body[: len(body) // 2])  # fast, then nothing
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert_closed_answer(answer, 408)
    assert elapsed < BODY_TIMEOUT_S + MARGIN_S, elapsed
    assert httpx.get(f"{timed.url}/v1/models/slow/stops", timeout=10).status_code == 404
    # The cut is the client's doing: logged as a warning, not an application error.
    log = timed.output(limit=None)
    assert "request body timed out" in log
    assert "Exception in ASGI application" not in log and "Traceback" not in log


def test_fast_clients_and_idle_keep_alive(timed: ServerProcess) -> None:
    body = checkpoint_bytes(702, rows=1024, cols=2048)  # 8 MiB, far above the body window
    pushed = httpx.post(f"{timed.url}/v1/models/slow/fast/versions", content=body, timeout=60)
    assert pushed.status_code == 201, pushed.text
    # A kept-alive connection that goes idle is closed after the keep-alive timeout.
    with closing(connect(timed)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: statehub\r\n\r\n")
        started = time.monotonic()
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert status_of(answer) == 200
    assert KEEP_ALIVE_S * 0.8 <= elapsed < KEEP_ALIVE_S + MARGIN_S, elapsed
