"""``python -m service``: run the server (what ``statehub serve`` starts).

    python -m service [--host H] [--port P] [--data-dir D] [--log-level L]   serve
    python -m service migrate       apply pending migrations, then exit (a one-shot job)
    python -m service healthcheck   exit 0 if the local server's /healthz answers (images)

Imports are deferred to the command that needs them: ``healthcheck`` is a light process
(the standard library only) that a container runtime can start every few seconds.
"""

from __future__ import annotations

import argparse
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

    from service.app import create_app
    from service.observability import configure_logging
    from service.settings import Settings

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
