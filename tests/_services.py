"""Real services for the tests: an S3-protocol server (moto's server mode) over HTTP.

``start_moto_server()`` runs ``python -m moto.server -H 127.0.0.1 -p <free port>`` as a
subprocess and waits until it answers HTTP;
Nothing is mocked: the S3 store talks to it through boto3 exactly as to MinIO or AWS.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import IO, Any

from service.settings import MiB, Settings

# moto accepts any credentials; explicit ones keep boto3 away from ~/.aws and the env chain.
S3_TEST_KEYS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    """A moto server subprocess on loopback; ``endpoint`` is its ``http://127.0.0.1:<port>``."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def kill(self) -> None:
        """Stop it abruptly (SIGKILL): connections drop mid-response."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1) as response:
            return response.status == 200
    except urllib.error.HTTPError:
        return True  # it answered HTTP
    except OSError:
        return False


def start_moto_server(*, startup_timeout: float = 30.0) -> MotoServer:
    """Start ``python -m moto.server`` on a free loopback port and wait until it answers."""
    last_output = ""
    for _ in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = tempfile.TemporaryFile()  # noqa: SIM115 - owned (and closed) by MotoServer
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        server = MotoServer(endpoint=endpoint, process=process, log=log)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(endpoint):
                return server
            time.sleep(0.1)
        last_output = server.output()
        server.stop()
    raise RuntimeError(f"moto server did not start:\n{last_output}")


def s3_settings(endpoint: str, bucket: str, **overrides: Any) -> Settings:
    """Settings for an S3 store on ``endpoint``; multipart from 5 MiB (S3's minimum part)."""
    values: dict[str, Any] = {
        "s3_endpoint": endpoint,
        "s3_bucket": bucket,
        "s3_region": "us-east-1",
        "s3_multipart_threshold": 5 * MiB,
        "s3_multipart_chunk": 5 * MiB,
        **S3_TEST_KEYS,
    }
    values.update(overrides)
    return Settings(**values)
