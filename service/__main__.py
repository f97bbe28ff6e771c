"""``python -m service``: run the server (what ``statehub serve`` starts)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="statehub serve", description=__doc__)
    parser.add_argument("--host", help="listen address (default 127.0.0.1, STATEHUB_HOST)")
    parser.add_argument("--port", type=int, help="port (default 8000, STATEHUB_PORT)")
    parser.add_argument("--data-dir", type=Path, help="embedded data (STATEHUB_DATA_DIR)")
    parser.add_argument("--log-level", default=os.environ.get("STATEHUB_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "log_level"}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
