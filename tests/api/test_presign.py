"""Presigned redirects (``STATEHUB_PRESIGN_FETCH``): whole stored blobs come from the store.

The server runs on SQLite with moto's S3 server behind a recording loopback proxy: the
presigned URLs name the proxy, so the test sees every request the client sends the store
(and checks that none carries the client's bearer token).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from service.storage.blobs import S3BlobStore
from statehub import Client, IntegrityError
from statehub._client import _ResumableBody
from tests._metrics import delta, scrape
from tests._proxy import TcpProxy, _close
from tests._server import ServerProcess, start_server
from tests._services import S3_TEST_KEYS, MotoServer, s3_settings

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

TOKEN = "shb_" + "presign-test-token-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PRESIGNED_GET = re.compile(rb"GET (\S*X-Amz-Signature=\S*) HTTP/1\.1\r\n(.*?)\r\n\r\n", re.S)


class RecordingProxy(TcpProxy):
    """A ``TcpProxy`` that keeps every byte sent upstream, one buffer per connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.sent: list[bytearray] = []
        self._record_lock = threading.Lock()
        super().__init__(target)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            upstream = sink.getpeername() == self.target
        except OSError:
            upstream = False
        if not upstream:
            super()._pipe(source, sink)
            return
        record = bytearray()
        with self._record_lock:
            self.sent.append(record)
        try:
            while data := source.recv(65536):
                record += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)

    def presigned_requests(self) -> list[tuple[bytes, bytes]]:
        """(target, header block) of every GET of a presigned URL sent so far."""
        with self._record_lock:
            sent = b"\n".join(bytes(r) for r in self.sent)
        return [(m.group(1), m.group(2)) for m in PRESIGNED_GET.finditer(sent)]

    def everything_sent(self) -> bytes:
        with self._record_lock:
            return b"".join(bytes(r) for r in self.sent)


@pytest.fixture(scope="module")
def proxy(moto_server: MotoServer) -> Iterator[RecordingProxy]:
    host, port = moto_server.endpoint.removeprefix("http://").split(":")
    proxy = RecordingProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def s3_server(
    proxy: RecordingProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    endpoint = f"http://{proxy.address}"
    bucket = f"presign-{uuid.uuid4().hex[:12]}"
    S3BlobStore(s3_settings(endpoint, bucket)).ensure_bucket()
    server = start_server(
        {
            "STATEHUB_DATA_DIR": str(tmp_path_factory.mktemp("presign")),
            "STATEHUB_S3_ENDPOINT": endpoint,
            "STATEHUB_S3_BUCKET": bucket,
            "STATEHUB_S3_REGION": "us-east-1",
            "STATEHUB_S3_ACCESS_KEY_ID": S3_TEST_KEYS["s3_access_key_id"],
            "STATEHUB_S3_SECRET_ACCESS_KEY": S3_TEST_KEYS["s3_secret_access_key"],
            "STATEHUB_PRESIGN_FETCH": "true",
            "STATEHUB_BOOTSTRAP_TOKEN": TOKEN,
        }
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub(s3_server: ServerProcess) -> Iterator[Client]:
    with Client(s3_server.url, token=TOKEN, retries=1) as client:
        yield client


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(32, 16, generator=generator) for i in range(3)}


def spec(sd: dict[str, torch.Tensor], dtype: str = "F32") -> dict[str, Any]:
    return {"tensors": [{"key": k, "shape": list(v.shape), "dtype": dtype} for k, v in sd.items()]}


def push(hub: Client, ref: str, sd: dict[str, torch.Tensor], where: Path) -> tuple[str, bytes]:
    body = st_save(sd)
    path = where / "ckpt.safetensors"
    path.write_bytes(body)
    version = hub.push(ref, path)
    path.unlink()
    return version.digest, body


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def base(server: ServerProcess, ns: str, name: str) -> str:
    return f"{server.url}/v1/models/{ns}/{name}/versions/latest"


def test_an_exact_fetch_is_redirected_to_the_store(
    s3_server: ServerProcess, proxy: RecordingProxy, hub: Client, ns: str, tmp_path: Path
) -> None:
    source = state_dict(1)
    digest, body = push(hub, f"{ns}/m", source, tmp_path)
    before = scrape(s3_server.url)

    response = httpx.post(
        f"{base(s3_server, ns, 'm')}/fetch", json={"target": spec(source)}, headers=AUTH
    )
    assert response.status_code == 303
    location = response.headers["location"]
    assert location.startswith(f"http://{proxy.address}/") and "X-Amz-Signature=" in location
    assert response.headers["x-statehub-fetch-mode"] == "passthrough"
    assert response.headers["x-statehub-verdict"] == "exact"
    assert response.headers["x-statehub-digest"] == digest
    assert response.headers["x-statehub-body-digest"] == digest
    assert response.headers["x-statehub-plan-id"]
    assert response.headers["etag"].strip('"')
    assert "no-store" in response.headers["cache-control"]
    assert httpx.get(location).content == body  # the URL alone is the credential

    assert_equal(hub.fetch(f"{ns}/m", target=spec(source)), source)
    after = scrape(s3_server.url)
    assert delta(before, after, "statehub_fetches_total", mode="redirect") == 2
    assert delta(before, after, "statehub_presigned_redirects_total", route="fetch") == 2


def test_a_blob_download_is_redirected_and_ranges_are_served_here(
    s3_server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    digest, body = push(hub, f"{ns}/m", state_dict(2), tmp_path)
    url = f"{base(s3_server, ns, 'm')}/blob"
    before = scrape(s3_server.url)
    whole = httpx.get(url, headers=AUTH)
    assert whole.status_code == 303 and whole.headers["x-statehub-digest"] == digest
    ranged = httpx.get(url, headers=AUTH | {"Range": "bytes=10-99"})
    assert ranged.status_code == 206 and ranged.content == body[10:100]

    out = hub.pull(f"{ns}/m", tmp_path / "out" / "m.safetensors")
    assert out.read_bytes() == body
    after = scrape(s3_server.url)
    assert delta(before, after, "statehub_presigned_redirects_total", route="blob") == 2


def test_the_store_never_sees_the_bearer_token(
    s3_server: ServerProcess, proxy: RecordingProxy, hub: Client, ns: str, tmp_path: Path
) -> None:
    source = state_dict(3)
    push(hub, f"{ns}/m", source, tmp_path)
    already = len(proxy.presigned_requests())
    hub.fetch(f"{ns}/m", target=spec(source))
    hub.pull(f"{ns}/m", tmp_path / "m.safetensors")
    deadline = time.monotonic() + 5
    while len(proxy.presigned_requests()) < already + 2:  # the proxy records asynchronously
        assert time.monotonic() < deadline, "the client did not GET the presigned URLs"
        time.sleep(0.05)
    for _, head in proxy.presigned_requests():
        assert b"authorization:" not in head.lower()
    assert TOKEN.encode() not in proxy.everything_sent()


def test_a_presigned_request_is_built_without_the_clients_headers() -> None:
    with Client("http://127.0.0.1:9", token=TOKEN) as client:
        stream = _ResumableBody(client, "POST", "/v1/models/a/b/versions/1/fetch", {})
        stream._location = "http://store.example/bucket/key?X-Amz-Signature=abc"
        stream._store_etag = '"s3-etag"'
        request = stream._store_request(1000)
    assert "authorization" not in request.headers
    assert request.url.host == "store.example"
    assert request.headers["range"] == "bytes=1000-"
    assert request.headers["if-range"] == '"s3-etag"'


def test_a_corrupted_object_in_the_bucket_is_an_integrity_error(
    s3_server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    source = state_dict(4)
    digest, body = push(hub, f"{ns}/m", source, tmp_path)
    store = S3BlobStore(s3_server.settings)
    corrupted = bytearray(body)
    corrupted[-3] ^= 0x01
    store._client.put_object(
        Bucket=store.bucket,
        Key=f"{store.prefix}blobs/sha256/{digest[:2]}/{digest}",
        Body=bytes(corrupted),
    )
    with pytest.raises(IntegrityError):
        hub.fetch(f"{ns}/m", target=spec(source))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        hub.pull(f"{ns}/m", out / "m.safetensors")
    assert list(out.iterdir()) == []


def test_transform_fetches_stream_and_their_cached_bodies_redirect(
    s3_server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    source = state_dict(5)
    push(hub, f"{ns}/m", source, tmp_path)
    target = spec(source, "F16")
    url = f"{base(s3_server, ns, 'm')}/fetch"
    before = scrape(s3_server.url)
    first = httpx.post(url, json={"target": target}, headers=AUTH)
    assert first.status_code == 200 and first.headers["x-statehub-fetch-mode"] == "transform"
    deadline = time.monotonic() + 30
    while delta(before, scrape(s3_server.url), "statehub_fit_cache_total", event="stored") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    cached = httpx.post(url, json={"target": target}, headers=AUTH)
    assert cached.status_code == 303
    assert cached.headers["x-statehub-fetch-mode"] == "cached"
    assert cached.headers["x-statehub-body-digest"] == hashlib.sha256(first.content).hexdigest()
    assert httpx.get(cached.headers["location"]).content == first.content
    ranged = httpx.post(url, json={"target": target}, headers=AUTH | {"Range": "bytes=5-"})
    assert ranged.status_code == 206 and ranged.content == first.content[5:]
    assert_equal(hub.fetch(f"{ns}/m", target=target), {k: v.half() for k, v in source.items()})


def test_a_local_store_never_redirects(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, ns: str
) -> None:
    server = start_server(
        {
            "STATEHUB_DATA_DIR": str(tmp_path_factory.mktemp("presign-local")),
            "STATEHUB_PRESIGN_FETCH": "true",
        }
    )
    try:
        with Client(server.url, retries=1) as client:
            source = state_dict(6)
            _, body = push(client, f"{ns}/m", source, tmp_path)
            blob = httpx.get(f"{base(server, ns, 'm')}/blob")
            assert blob.status_code == 200 and blob.content == body
            exact = httpx.post(f"{base(server, ns, 'm')}/fetch", json={"target": spec(source)})
            assert exact.status_code == 200 and exact.content == body
            assert_equal(client.fetch(f"{ns}/m", target=spec(source)), source)
    finally:
        server.stop()
