"""A flipped byte in the store is never served as weights, on both backends.

Small blobs (up to ``verify_buffer_bytes``, 16 MiB) are checked before the response
starts: a clean ``500 storage_error``. Larger ones are checked while they stream, the last
byte held back: on a mismatch the connection is cut short of ``Content-Length``, so the
body can never be taken for complete. The client checks the digest of what it receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from statehub import Client, IntegrityError, StorageError
from tests._server import ServerProcess

MiB = 1024 * 1024


def unique_checkpoint(seed: int, *, mib: float) -> bytes:
    rows = max(int(mib * MiB / (4 * 256)), 1)
    generator = torch.Generator().manual_seed(seed)
    return st_save({"layer.weight": torch.randn(rows, 256, generator=generator)})


def flip_stored_byte(server: ServerProcess, digest: str, offset: int) -> None:
    """Corrupt the stored blob in place: the local file, or the S3 object (a plain PUT)."""
    settings = server.settings
    key = f"blobs/sha256/{digest[:2]}/{digest}"
    if not settings.uses_s3:
        path = settings.data_dir / key
        with open(path, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0x01]))
        return
    from service.storage.blobs import S3BlobStore

    store = S3BlobStore(settings)
    body = bytearray(store.read_range(digest, 0, store.size(digest)))
    body[offset] ^= 0x01
    store._client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=bytes(body))


def push(hub: Client, ns: str, name: str, body: bytes, where: Path) -> str:
    path = where / f"{name}.safetensors"
    path.write_bytes(body)
    version = hub.push(f"{ns}/{name}", path)
    path.unlink()
    assert version.digest == hashlib.sha256(body).hexdigest()
    return version.digest


def cut_short(send: Callable[[], httpx.Response]) -> None:
    """The response starts (200/206, a length) and then breaks before that length."""
    with send() as response:
        assert response.status_code in (200, 206)
        total = int(response.headers["content-length"])
        received = 0
        with pytest.raises(httpx.TransportError):
            for chunk in response.iter_raw():
                received += len(chunk)
        assert received < total


def test_a_small_corrupted_blob_is_a_storage_error_before_any_byte(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    body = unique_checkpoint(1, mib=0.05)
    digest = push(hub, ns, "small", body, tmp_path)
    exact = {"target": {"tensors": hub.version(f"{ns}/small").spec["tensors"]}}  # type: ignore[index]
    flip_stored_byte(server, digest, len(body) - 10)
    base = f"{server.url}/v1/models/{ns}/small/versions/1"

    for response in (
        httpx.get(f"{base}/blob"),
        httpx.get(f"{base}/blob", headers={"Range": "bytes=0-99"}),
        httpx.post(f"{base}/fetch", json=exact),
    ):
        assert response.status_code == 500, response.text
        assert response.json()["error"]["code"] == "storage_error"
        assert "corrupted" in response.json()["error"]["message"]
        assert response.json()["error"]["detail"]["digest"] == digest
    assert httpx.post(f"{base}/plan", json=exact).status_code == 200  # no weights read

    with pytest.raises(StorageError):
        hub.pull(f"{ns}/small:1", tmp_path / "out.safetensors")
    with pytest.raises(StorageError):
        hub.fetch(f"{ns}/small:1", target=exact["target"])
    assert list(tmp_path.iterdir()) == []


def test_a_large_corrupted_blob_is_cut_short_mid_stream(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    body = unique_checkpoint(2, mib=20)  # above verify_buffer_bytes: checked while streaming
    digest = push(hub, ns, "large", body, tmp_path)
    exact = {"target": {"tensors": hub.version(f"{ns}/large").spec["tensors"]}}  # type: ignore[index]
    base = f"{server.url}/v1/models/{ns}/large/versions/1"

    # Intact: every byte arrives, the held-back one included, whole and ranged.
    assert hashlib.sha256(httpx.get(f"{base}/blob", timeout=60).content).hexdigest() == digest
    ranged = httpx.get(f"{base}/blob", headers={"Range": "bytes=1000-2000999"}, timeout=60)
    assert ranged.status_code == 206 and ranged.content == body[1000:2001000]

    flip_stored_byte(server, digest, len(body) // 2)
    cut_short(lambda: httpx.stream("GET", f"{base}/blob", timeout=60))
    cut_short(lambda: httpx.stream("GET", f"{base}/blob", headers={"Range": "bytes=5-"}))
    cut_short(lambda: httpx.stream("POST", f"{base}/fetch", json=exact, timeout=60))

    # A client that says it verifies gets every byte without a second pass on the server
    # and must find the mismatch itself: the statehub client does, and returns nothing.
    verifies = {"X-Statehub-Client-Verifies": "sha256"}
    whole = httpx.get(f"{base}/blob", headers=verifies, timeout=60)
    assert whole.status_code == 200 and len(whole.content) == len(body)
    assert hashlib.sha256(whole.content).hexdigest() != whole.headers["x-statehub-body-digest"]
    target = tmp_path / "out.safetensors"
    with pytest.raises(IntegrityError):
        hub.pull(f"{ns}/large:1", target)
    with pytest.raises(IntegrityError):
        hub.fetch(f"{ns}/large:1", target=exact["target"])
    assert list(tmp_path.iterdir()) == []


# -- the client's own check, against hand-built responses -----------------------------------


def _lying_client(body: bytes, headers: dict[str, str]) -> Client:
    """A client whose server sends ``body`` with ``headers`` for every request."""

    def handler(request: httpx.Request) -> httpx.Response:
        length = {"Content-Length": str(len(body))}
        return httpx.Response(200, stream=httpx.ByteStream(body), headers={**headers, **length})

    client = Client("http://statehub.invalid", retries=1)
    client._http = httpx.Client(
        base_url=client.url, transport=httpx.MockTransport(handler), headers=client._http.headers
    )
    return client


def test_the_client_checks_the_digest_of_a_pull(tmp_path: Path) -> None:
    body = unique_checkpoint(3, mib=0.01)
    wrong = hashlib.sha256(b"something else").hexdigest()
    for headers in ({"ETag": f'"{wrong}"'}, {"X-Statehub-Digest": wrong}, {}):
        with _lying_client(body, headers) as client, pytest.raises(IntegrityError):
            client.pull("ns/m:1", tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
    right = {"X-Statehub-Digest": hashlib.sha256(body).hexdigest()}
    with _lying_client(body, right) as client:
        assert client.pull("ns/m:1", tmp_path / "out.safetensors").read_bytes() == body


def test_the_client_checks_the_digest_of_a_passthrough_fetch() -> None:
    body = unique_checkpoint(4, mib=0.01)
    # A target with values: the client fetches at once (a spec target is planned first).
    spec = {"layer.weight": torch.zeros(10, 256)}
    headers = {"X-Statehub-Fetch-Mode": "passthrough"}
    wrong = {**headers, "X-Statehub-Digest": "0" * 64}
    with _lying_client(body, wrong) as client, pytest.raises(IntegrityError):
        client.fetch("ns/m:1", target=spec)
    right = {**headers, "X-Statehub-Digest": hashlib.sha256(body).hexdigest()}
    with _lying_client(body, right) as client:
        assert client.fetch("ns/m:1", target=spec)["layer.weight"].shape == (10, 256)
