"""The ``statehub`` command line."""

from __future__ import annotations

import os
import sys

import click


@click.group()
@click.version_option(package_name="statehub")
def main() -> None:
    """statehub: a registry that fits stored PyTorch checkpoints to your model."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--host", help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Embedded data directory.")
def serve(host: str | None, port: int | None, data_dir: str | None) -> None:
    """Run the server (needs the [server] extra). Settings also come from STATEHUB_* vars."""
    args = [sys.executable, "-m", "service"]
    for flag, value in (("--host", host), ("--port", port), ("--data-dir", data_dir)):
        if value is not None:
            args += [flag, str(value)]
    # The server runs as its own program: the client package never imports it.
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()
