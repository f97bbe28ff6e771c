"""``python -m service``: run the server (what ``statehub serve`` starts).

    python -m service [--host H] [--port P] [--data-dir D] [--log-level L]   serve
    python -m service migrate       apply pending migrations, then exit (a one-shot job)
    python -m service healthcheck   exit 0 if the local server's /healthz answers (images)

Imports are deferred to the command that needs them: ``healthcheck`` is a light process
(the standard library only) that a container runtime can start every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

log = logging.getLogger("statehub")

STARTUP_FAILURE = 3  # uvicorn's exit status when the server could not start


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate"]:
        migrate(argv[1:])
    elif argv[:1] == ["healthcheck"]:
        sys.exit(healthcheck(argv[1:]))
    else:
        serve(argv[1:] if argv[:1] == ["serve"] else argv)


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="statehub serve", description="Run the server.")
    parser.add_argument("--host", help="listen address (default 127.0.0.1, STATEHUB_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, STATEHUB_PORT)")
    parser.add_argument("--data-dir", type=Path, help="embedded data (STATEHUB_DATA_DIR)")
    parser.add_argument("--log-level", help="log level (default info, STATEHUB_LOG_LEVEL)")
    args = parser.parse_args(argv)

    import uvicorn

    from service.allocator import bound_allocator
    from service.app import create_app
    from service.observability import configure_logging
    from service.settings import Settings

    bound_allocator()  # before any worker thread makes an arena of its own
    settings = Settings(**{k: v for k, v in vars(args).items() if v is not None})
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our handler (JSON, redacted) formats uvicorn's records too
        log_level=settings.log_level,
        access_log=False,  # the request middleware writes the access log, with request ids
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        http=timed_http_protocol(settings),
    )
    server = draining_server(config, on_exit=app.state.drain.begin)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def draining_server(config: Any, *, on_exit: Callable[[], None]) -> Any:
    """uvicorn's server, which also calls ``on_exit`` (the app starts draining) on SIGTERM
    or SIGINT. uvicorn then stops listening, lets in-flight responses finish for at most
    ``timeout_graceful_shutdown`` seconds, cancels what is left, and runs the lifespan's
    shutdown."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            on_exit()  # no logging here: this runs inside a signal handler
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def timed_http_protocol(settings: Any) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (httptools) with deadlines for slow and half-open clients.

    uvicorn itself times out only idle keep-alive connections: a connection that never
    completes its request line and headers, or trickles its body, would be held forever.

    - Head: from the connection (or a request's first byte) the request line and headers
      must arrive within ``request_header_timeout_s`` and hold at most
      ``request_head_max_bytes``: else 408 / 431 and the connection is closed.
    - Body: a deadline ``request_body_timeout_s`` ahead, which every byte received extends
      by 1/``request_body_min_rate`` s, never beyond that timeout from now: a body pausing
      longer, or averaging less than the rate, is answered 408 (or cut, if the response
      has started) and the application reads a disconnect. While the server itself is not
      reading (flow control, an unanswered ``Expect: 100-continue``) the client is not
      timed.
    """
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    header_timeout = settings.request_header_timeout_s
    head_max = settings.request_head_max_bytes
    body_timeout = settings.request_body_timeout_s
    body_rate = float(settings.request_body_min_rate)
    tick = min(1.0, body_timeout / 4)

    class HeadTooLarge(Exception):
        pass

    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _body_deadline = 0.0
        _refusal: tuple[int, str] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout, self._head_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, delay: float, callback: Callable[[], None]) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        # -- the head
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            if self._timer is None:  # a later request on a kept-alive connection
                self._arm(header_timeout, self._head_timed_out)

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > head_max:
                self._refusal = (431, f"request line and headers exceed {head_max} bytes")
                raise HeadTooLarge  # httptools stops parsing; uvicorn answers send_400

        def send_400_response(self, msg: str) -> None:
            if self._refusal is None:
                return super().send_400_response(msg)
            self._refuse(*self._refusal)

        def _head_timed_out(self) -> None:
            self._timer = None
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined request waits while the previous one is answered.
                self._arm(header_timeout, self._head_timed_out)
                return
            self._refuse(408, f"the request's headers did not arrive within {header_timeout} s")

        def _refuse(self, status: int, message: str) -> None:
            if self.transport.is_closing():
                return
            body = message.encode()
            self.transport.write(
                b"".join(
                    [
                        STATUS_LINE[status],
                        b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: %d\r\n" % len(body),
                        b"connection: close\r\n\r\n",
                        body,
                    ]
                )
            )
            self.transport.close()

        # -- the body
        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()
            self._body_deadline = self.loop.time() + body_timeout
            self._arm(tick, self._body_tick)

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            now = self.loop.time()
            self._body_deadline = min(
                self._body_deadline + len(body) / body_rate, now + body_timeout
            )

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def _body_tick(self) -> None:
            self._timer = None
            now = self.loop.time()
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                self._body_deadline = now + body_timeout  # we are not reading: not its fault
            if now < self._body_deadline:
                self._arm(tick, self._body_tick)
                return
            message = (
                f"the request body arrived slower than {int(body_rate)} bytes/s or paused "
                f"longer than {body_timeout} s"
            )
            if cycle is not None and not cycle.response_started:
                self._refuse(408, message)
            else:
                self.transport.close()
            if cycle is not None:  # the application's receive() answers http.disconnect
                cycle.disconnected = True
                cycle.message_event.set()
            log.warning("request body timed out: %s", message)

    return TimedHttpToolsProtocol


def migrate(argv: list[str]) -> None:
    """Apply pending alembic migrations to the configured database (idempotent)."""
    argparse.ArgumentParser(prog="statehub migrate", description=migrate.__doc__).parse_args(argv)
    from service.observability import configure_logging
    from service.settings import Settings
    from service.storage import db

    settings = Settings()
    configure_logging(settings)
    db.upgrade(settings.effective_database_url)
    log.info("database schema is at head")


def healthcheck(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="statehub healthcheck")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    port = int(os.environ.get("STATEHUB_PORT", "8000"))  # Settings.port, without pydantic
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{args.path}", timeout=args.timeout):
            return 0
    except OSError as exc:  # URLError, HTTPError, timeouts
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
