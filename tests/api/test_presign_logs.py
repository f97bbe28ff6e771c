"""A presigned URL's signature never reaches the log, even at debug level (issue 17 item 5).

A real server on PostgreSQL + S3 (moto over HTTP) with presigned fetches on, logging at
debug level with botocore's loggers enabled: the test takes the exact ``X-Amz-Signature``
the server handed out (a blob download and an exact fetch), uses the URL, and looks for the
signature, and the signer's records, in everything the server wrote.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from statehub import Client
from tests._server import ServerProcess
from tests._services import MotoServer
from tests.conftest import postgres_s3_server

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def presigning(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"STATEHUB_PRESIGN_FETCH": "true", "STATEHUB_LOG_FORMAT": "json"}
    data_dir = str(tmp_path_factory.mktemp("presign-logs"))
    with postgres_s3_server(moto_server, data_dir, env, log_level="debug") as server:
        yield server


def signature_of(location: str) -> str:
    query = parse_qs(urlsplit(location).query)
    (signature,) = query["X-Amz-Signature"]
    assert len(signature) == 64  # SigV4: 32 bytes, hex
    return signature


def test_presigned_signatures_are_not_logged_at_debug(presigning: ServerProcess) -> None:
    ns = f"t{uuid.uuid4().hex[:10]}"
    state = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}
    body = st_save(state)
    with Client(presigning.url, retries=1) as hub:
        hub.push(f"{ns}/net", state)
    base = f"{presigning.url}/v1/models/{ns}/net/versions/1"
    blob = httpx.get(f"{base}/blob", timeout=60)
    assert blob.status_code == 303, blob.text
    target = {"tensors": [{"key": "w", "shape": [64, 64], "dtype": "F32"}]}
    fetch = httpx.post(f"{base}/fetch", json={"target": target}, timeout=60)
    assert fetch.status_code == 303, fetch.text
    signatures = {signature_of(r.headers["location"]) for r in (blob, fetch)}
    for response in (blob, fetch):  # the URLs work: these are live credentials
        fetched = httpx.get(response.headers["location"], timeout=60)
        assert fetched.status_code == 200 and fetched.content == body

    output = presigning.output(limit=None)
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    loggers = {str(e["logger"]) for e in entries}
    # Debug logging really was on, botocore's included: the absence below means something.
    assert any(e["level"] == "debug" and e["logger"].startswith("botocore") for e in entries)
    assert "botocore.auth" not in loggers, "the signer's records must be dropped"
    for signature in signatures:
        assert signature not in output
    assert "Signature:" not in output and "StringToSign" not in output
