"""The registry over HTTP, on both backends: upload, versions, refs, aliases, blobs, errors."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import struct
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests._server import ServerProcess


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv1.weight": torch.randn(8, 3, 3, 3, generator=g),
        "bn1.weight": torch.rand(8, generator=g),
        "bn1.bias": torch.randn(8, generator=g),
        "bn1.running_mean": torch.randn(8, generator=g),
        "bn1.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(4, 8, generator=g).half(),
        "fc.bias": torch.zeros(4, dtype=torch.bfloat16),
    }


def independent_arch_fp(sd: dict[str, torch.Tensor]) -> str:
    lines = sorted(f"{k}\t{','.join(str(d) for d in t.shape)}\n" for k, t in sd.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def independent_shape_fp(sd: dict[str, torch.Tensor]) -> str:
    lines = sorted(f"{','.join(str(d) for d in t.shape)}\n" for t in sd.values())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def upload(server: ServerProcess, ns: str, name: str, body: bytes, **params: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/{name}/versions",
        content=body,
        params=params,
        headers={"Content-Type": "application/octet-stream"},
        timeout=60,
    )


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert response.headers["x-error-code"] == body["error"]["code"]
    assert body["error"]["message"]
    return body["error"]["code"]


def test_upload_round_trip_and_fingerprints(server: ServerProcess, ns: str) -> None:
    sd = sample_state_dict()
    body = st_save(sd, metadata={"note": "hi"})
    response = upload(server, ns, "net", body, metadata=json.dumps({"epoch": 3}))
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["version"] == 1
    assert version["model"] == f"{ns}/net"
    assert version["digest"] == hashlib.sha256(body).hexdigest()
    assert version["size"] == len(body)
    assert version["arch_fp"] == independent_arch_fp(sd)
    assert version["shape_fp"] == independent_shape_fp(sd)
    assert version["param_count"] == sum(t.numel() for t in sd.values())
    assert version["tensor_count"] == len(sd)
    assert version["source_format"] == "safetensors"
    assert version["metadata"] == {"epoch": 3}
    assert version["aliases"] == ["latest"]

    blob = httpx.get(f"{server.url}/v1/models/{ns}/net/versions/1/blob")
    assert blob.status_code == 200
    assert blob.content == body
    assert blob.headers["etag"] == f'"{version["digest"]}"'
    loaded = st_load(blob.content)
    for key, tensor in sd.items():
        assert torch.equal(loaded[key], tensor)

    detail = httpx.get(f"{server.url}/v1/models/{ns}/net/versions/1").json()
    spec = {t["key"]: (t["shape"], t["dtype"]) for t in detail["spec"]["tensors"]}
    assert spec["fc.weight"] == ([4, 8], "F16")
    assert spec["fc.bias"] == ([4], "BF16")
    assert spec["bn1.num_batches_tracked"] == ([], "I64")


def test_blob_range_requests(server: ServerProcess, ns: str) -> None:
    body = st_save(sample_state_dict(1))
    assert upload(server, ns, "net", body).status_code == 201
    url = f"{server.url}/v1/models/{ns}/net/versions/latest/blob"
    part = httpx.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == body[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(body)}"
    tail = httpx.get(url, headers={"Range": "bytes=-16"})
    assert tail.content == body[-16:]
    resumed = httpx.get(url, headers={"Range": "bytes=100-"})
    assert resumed.content == body[100:]
    outside = httpx.get(url, headers={"Range": f"bytes={len(body)}-"})
    assert outside.status_code == 416
    assert error_code(outside) == "range_not_satisfiable"
    stale = httpx.get(url, headers={"Range": "bytes=100-", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == body


def test_versions_refs_and_aliases(server: ServerProcess, ns: str) -> None:
    first, second = st_save(sample_state_dict(1)), st_save(sample_state_dict(2))
    v1 = upload(server, ns, "net", first).json()
    again = upload(server, ns, "net", first)
    assert again.status_code == 200, "identical bytes return the existing version"
    assert again.json()["version"] == 1
    v2 = upload(server, ns, "net", second, alias="staging")
    assert v2.status_code == 201 and v2.json()["version"] == 2
    assert sorted(v2.json()["aliases"]) == ["latest", "staging"]

    base = f"{server.url}/v1/models/{ns}/net"
    assert httpx.get(f"{base}/versions/latest").json()["version"] == 2
    assert httpx.get(f"{base}/versions/1").json()["digest"] == v1["digest"]
    assert httpx.get(f"{base}/versions/sha256:{v1['digest']}").json()["version"] == 1
    assert httpx.get(f"{base}/versions/staging").json()["version"] == 2

    put = httpx.put(f"{base}/aliases/prod", json={"version": 1})
    assert put.status_code == 200 and put.json()["version"] == 1
    assert httpx.get(f"{base}/versions/prod").json()["version"] == 1
    model = httpx.get(base).json()
    assert model["aliases"] == {"latest": 2, "prod": 1, "staging": 2}
    assert [v["version"] for v in model["versions"]] == [1, 2]
    assert model["latest_version"] == 2

    assert error_code(httpx.get(f"{base}/versions/9")) == "not_found"
    assert error_code(httpx.get(f"{base}/versions/nope")) == "not_found"
    assert error_code(httpx.get(f"{base}/versions/sha256:xyz")) == "invalid_ref"
    assert error_code(httpx.put(f"{base}/aliases/prod", json={"version": 7})) == "not_found"
    assert error_code(httpx.put(f"{base}/aliases/latest", json={"version": 1})) == "invalid_request"
    assert error_code(httpx.put(f"{base}/aliases/42", json={"version": 1})) == "invalid_name"
    assert httpx.delete(f"{base}/aliases/prod").status_code == 204
    assert error_code(httpx.get(f"{base}/versions/prod")) == "not_found"


def test_torch_state_dict_upload_is_converted_in_order(server: ServerProcess, ns: str) -> None:
    sd = sample_state_dict(3)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    response = upload(server, ns, "pth", buffer.getvalue())
    assert response.status_code == 201, response.text
    version = response.json()
    assert version["source_format"] == "torch-zip"
    blob = httpx.get(f"{server.url}/v1/models/{ns}/pth/versions/1/blob").content
    assert hashlib.sha256(blob).hexdigest() == version["digest"]
    loaded = st_load(blob)
    assert set(loaded) == set(sd)  # the spec keeps the state_dict order:
    spec = httpx.get(f"{server.url}/v1/models/{ns}/pth/versions/1").json()["spec"]
    assert [t["key"] for t in spec["tensors"]] == list(sd)
    for key, tensor in sd.items():
        assert torch.equal(loaded[key], tensor)


def test_model_crud_and_listing(server: ServerProcess, ns: str) -> None:
    created = httpx.post(
        f"{server.url}/v1/models",
        json={"namespace": ns, "name": "resnet", "description": "A ResNet", "tags": ["vision"]},
    )
    assert created.status_code == 201, created.text
    assert created.json()["latest_version"] is None
    duplicate = httpx.post(f"{server.url}/v1/models", json={"namespace": ns, "name": "resnet"})
    assert error_code(duplicate) == "conflict"
    upload(server, ns, "bert", st_save(sample_state_dict(4)))

    listing = httpx.get(f"{server.url}/v1/models", params={"namespace": ns}).json()
    assert [m["name"] for m in listing["items"]] == ["bert", "resnet"]
    assert listing["total"] == 2
    found = httpx.get(f"{server.url}/v1/models", params={"namespace": ns, "q": "resn"}).json()
    assert [m["name"] for m in found["items"]] == ["resnet"]
    tagged = httpx.get(f"{server.url}/v1/models", params={"namespace": ns, "tag": "vision"})
    assert [m["name"] for m in tagged.json()["items"]] == ["resnet"]
    fp = independent_arch_fp(sample_state_dict(4))
    by_fp = httpx.get(f"{server.url}/v1/models", params={"namespace": ns, "arch_fp": fp}).json()
    assert [m["name"] for m in by_fp["items"]] == ["bert"]

    assert httpx.delete(f"{server.url}/v1/models/{ns}/bert").status_code == 204
    assert error_code(httpx.get(f"{server.url}/v1/models/{ns}/bert")) == "not_found"
    assert error_code(httpx.delete(f"{server.url}/v1/models/{ns}/bert")) == "not_found"


def lying_header(body: bytes) -> bytes:
    """The same file with the first tensor's end offset moved by 4 bytes."""
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + length :]


BAD_BODIES = {
    "truncated": lambda body: body[: len(body) - 10],
    "trailing bytes": lambda body: body + b"\0" * 8,
    "lying offsets": lying_header,
    "header not json": lambda body: struct.pack("<Q", 16) + b"{not json here!}" + body[24:],
    "tiny": lambda body: b"\x01\x02",
    "empty": lambda body: b"",
    "text file": lambda body: b"hello, this is not a checkpoint at all\n" * 10,
    "no tensors": lambda body: struct.pack("<Q", 8) + b"{}      ",
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_uploads_are_refused_and_leave_nothing(
    server: ServerProcess, ns: str, case: str
) -> None:
    body = BAD_BODIES[case](st_save(sample_state_dict(5)))
    response = upload(server, ns, "bad", body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_checkpoint"
    assert error_code(httpx.get(f"{server.url}/v1/models/{ns}/bad")) == "not_found"
    assert list((server.settings.effective_spool_dir).glob("*")) == []


def test_header_over_the_limit_is_too_large(server: ServerProcess, ns: str) -> None:
    limit = server.settings.max_header_bytes
    header = b"{" + b" " * (limit + 8)
    body = struct.pack("<Q", len(header)) + header
    response = upload(server, ns, "huge", body)
    assert response.status_code == 413
    assert error_code(response) == "too_large"
    assert error_code(httpx.get(f"{server.url}/v1/models/{ns}/huge")) == "not_found"


def test_body_over_the_upload_limit_is_refused_before_reading(
    server: ServerProcess, ns: str
) -> None:
    """A Content-Length beyond the limit is answered at once, without reading the body."""
    claimed = server.settings.max_upload_bytes + 1
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/models/{ns}/big/versions HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {claimed}\r\n\r\n"
            ).encode()
            + b"x" * 1024
        )
        reply = sock.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "too_large" in reply
    assert error_code(httpx.get(f"{server.url}/v1/models/{ns}/big")) == "not_found"


INVALID_NAMES = [
    "%2E%2E",
    "a..b",
    ".hidden",
    "x" * 500,
    "bad%01name",
    "sp%20ace",
    "-dash",
    "a%2F..%2Fb",
]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused(server: ServerProcess, ns: str, name: str) -> None:
    body = st_save(sample_state_dict(6))
    for response in (
        httpx.post(f"{server.url}/v1/models/{ns}/{name}/versions", content=body),
        httpx.get(f"{server.url}/v1/models/{ns}/{name}"),
        httpx.post(
            f"{server.url}/v1/models", json={"namespace": ns, "name": name.replace("%01", "\x01")}
        ),
    ):
        assert response.status_code in (404, 422), (name, response.status_code, response.text)
        assert error_code(response) in ("invalid_name", "not_found", "invalid_request")
    listing = httpx.get(f"{server.url}/v1/models", params={"namespace": ns}).json()
    assert listing["total"] == 0


def test_unknown_route_and_method_errors_are_json(server: ServerProcess) -> None:
    assert error_code(httpx.get(f"{server.url}/v1/nothing-here")) == "not_found"
    assert httpx.get(f"{server.url}/v1/nothing-here").headers["x-request-id"]
    assert error_code(httpx.patch(f"{server.url}/v1/models")) == "method_not_allowed"
    bad_json = httpx.post(
        f"{server.url}/v1/models", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert error_code(bad_json) == "invalid_request"


def test_health_and_readiness(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready == {"status": "ready", "checks": {"database": "ok", "blobs": "ok"}}
