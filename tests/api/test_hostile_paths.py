"""Hostile names, refs, aliases, adapter and token names, and tar member names (MLflow's
CVE history as the list) against every endpoint that takes one, on both backends.

Every request must be refused with a 4xx and a stable code, and nothing outside the
server's own files may be touched: the server runs with a Python audit hook that logs every
file it opens, lists, renames or removes (``sitecustomize`` on its ``PYTHONPATH``), the tree
around its data directory is compared before and after, and so is the S3 bucket.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pytest

from service.storage.blobs import S3BlobStore
from tests._server import ServerProcess
from tests.api.conftest import Deployment, checkpoint_bytes, spec_of_checkpoint, tar_of

REPO = Path(__file__).resolve().parents[2]

# As they go on the wire (already percent-encoded where a raw byte could not be sent).
ENCODED = [
    "..",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%2e%2e",
    "%252e%252e%252fetc%252fpasswd",
    "..%5c..%5cwindows%5cwin.ini",
    "..%255c..%255c",
    "x%23%2f..%2f..%2fetc",
    "x%3b%2f..%2f..",
    "%2f%2fproc%2fself%2froot",
    "%2fetc%2fpasswd",
    "C:%5cWindows%5csystem32",
    "file:%2f%2f%2fetc%2fpasswd",
    "%00",
    "net%00",
    "..%00",
    "%0a..%0d",
    "a" * 97,
    "a" * 5000,
    "mod%C3%A8le",
    "%EF%BC%8E%EF%BC%8E%EF%BC%8F",  # fullwidth "../"
    "%E2%80%AEtxt.exe",  # right-to-left override
    "%ff%fe",  # not UTF-8
    ".",
    "...",
    ".hidden",
    "-rf",
    "~root",
    "%24HOME",
    "%20",
]
# Sent raw: dot segments, fragments and path parameters as a client could send them.
RAW = [
    "../../../etc/passwd",
    "..;/..;/etc",
    "x;jsessionid=..",
    "ghost#/../../etc/passwd",
    "//proc/self/root",
    "./.",
]
PAYLOADS = ENCODED + RAW
STABLE_CODES = {
    "invalid_name",
    "invalid_ref",
    "invalid_request",
    "invalid_adapter",
    "invalid_checkpoint",
    "not_found",
    "method_not_allowed",
}
FIT = json.dumps({"target": spec_of_checkpoint()}).encode()
ADAPTER_RULES = [{"type": "rename", "pattern": "a", "replacement": "b"}]

# Each slot: method, target with {p} for the payload, body.
PATH_SLOTS = [
    ("GET", "/v1/models/{p}/net", b""),
    ("GET", "/v1/models/vision/{p}", b""),
    ("DELETE", "/v1/models/vision/{p}", b""),
    ("POST", "/v1/models/vision/{p}/restore", b""),
    ("GET", "/v1/models/vision/{p}/versions", b""),
    ("POST", "/v1/models/{p}/net/versions", checkpoint_bytes(0)),
    ("POST", "/v1/models/vision/{p}/versions", checkpoint_bytes(0)),
    ("POST", "/v1/models/vision/net/versions?alias={p}", checkpoint_bytes(0)),
    ("GET", "/v1/models/vision/net/versions/{p}", b""),
    ("GET", "/v1/models/vision/net/versions/{p}/blob", b""),
    ("GET", "/v1/models/vision/{p}/versions/1/blob", b""),
    ("POST", "/v1/models/vision/net/versions/{p}/plan", FIT),
    ("POST", "/v1/models/vision/net/versions/{p}/fetch", FIT),
    ("DELETE", "/v1/models/vision/net/versions/{p}", b""),
    ("POST", "/v1/models/vision/net/versions/{p}/restore", b""),
    ("GET", "/v1/models/vision/{p}/aliases", b""),
    ("PUT", "/v1/models/vision/net/aliases/{p}", b'{"version": 1}'),
    ("DELETE", "/v1/models/vision/net/aliases/{p}", b""),
    ("GET", "/v1/adapters/{p}", b""),
    ("DELETE", "/v1/adapters/{p}", b""),
    ("DELETE", "/v1/tokens/{p}", b""),
    ("GET", "/v1/models?namespace={p}", b""),
    ("GET", "/v1/models?tag={p}", b""),
    ("GET", "/v1/models?q=x{p}%00", b""),
]


def json_slots(value: str) -> list[tuple[str, str, bytes]]:
    """Endpoints that take the name in the JSON body."""
    bodies = [
        ("/v1/models", {"namespace": value, "name": "x"}),
        ("/v1/models", {"namespace": "vision", "name": value}),
        ("/v1/models", {"namespace": "vision", "name": "tagged", "tags": [value]}),
        ("/v1/models", {"namespace": "vision", "name": "described", "description": value + "\0"}),
        ("/v1/adapters", {"name": value, "rules": ADAPTER_RULES}),
        ("/v1/adapters", {"name": "x", "scope": {"model": value}, "rules": ADAPTER_RULES}),
        ("/v1/tokens", {"name": value, "scopes": ["read:*"]}),
        ("/v1/tokens", {"name": "x", "scopes": [f"read:{value}/*"]}),
    ]
    return [("POST", path, json.dumps(body).encode()) for path, body in bodies]


BAD_MEMBERS = [
    "../evil.safetensors",
    "/abs/evil.safetensors",
    "a/../../evil.safetensors",
    "..\\evil.safetensors",
    "./../evil.safetensors",
]
BAD_SHARD_REFS = ["../outside.safetensors", "/etc/passwd.safetensors", "a/../../x.safetensors"]


def sharded_uploads() -> Iterator[bytes]:
    """Tars whose member names, or whose index's shard names, leave the archive."""
    shard = checkpoint_bytes(1)
    for name in BAD_MEMBERS:
        index = {"weight_map": {"layer.weight": name, "layer.bias": name}}
        yield tar_of({"m.safetensors.index.json": json.dumps(index).encode(), name: shard})
    for ref in BAD_SHARD_REFS:
        index = {"weight_map": {"layer.weight": ref, "layer.bias": ref}}
        members = {"m.safetensors.index.json": json.dumps(index).encode(), "m.safetensors": shard}
        yield tar_of(members)


# -- the watched server -------------------------------------------------------------------

HOOK = """
import os, sys
_path = os.environ.get("STATEHUB_TEST_FILE_LOG")
if _path:
    _log = open(_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    _EVENTS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.link",
               "os.mkdir", "os.rmdir", "os.truncate", "os.symlink", "os.chmod", "os.utime",
               "shutil.rmtree", "shutil.copyfile", "shutil.move"}

    def _hook(event, args):
        if event not in _EVENTS:
            return
        for arg in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
            if isinstance(arg, (str, bytes, os.PathLike)):
                _log.write(event + "\\t" + os.fsdecode(arg).replace("\\n", "\\\\n") + "\\n")

    sys.addaudithook(_hook)
"""


@dataclass
class Watched:
    server: ServerProcess
    deployment: Deployment
    log: Path
    cwd: Path

    def touched_since(self, offset: int) -> list[tuple[str, Path]]:
        with open(self.log, encoding="utf-8") as handle:
            handle.seek(offset)
            lines = handle.read().splitlines()
        touched = []
        for line in lines:
            event, _, path = line.partition("\t")
            touched.append((event, Path(os.path.realpath(self.cwd / path))))
        return touched

    def allowed(self, path: Path) -> bool:
        data = Path(self.deployment.env["STATEHUB_DATA_DIR"]).resolve()
        roots = [
            data / "blobs",
            data / "spool",
            REPO / "service",
            REPO / "migrations",
            Path(sys.prefix).resolve(),
            Path(sys.base_prefix).resolve(),
        ]
        if path.parent == data and path.name.startswith("statehub.db"):
            return True
        return any(path == root or root in path.parents for root in roots)


@pytest.fixture(scope="module")
def watched(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Watched:
    hook_dir = tmp_path_factory.mktemp("file-audit")
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    log = hook_dir / "files.log"
    python_path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    server = deployment.start(PYTHONPATH=python_path, STATEHUB_TEST_FILE_LOG=str(log))
    body = checkpoint_bytes(0)
    status, _, text = request(server, "POST", "/v1/models/vision/net/versions?alias=prod", body)
    assert status == 201, text
    return Watched(server, deployment, log, Path.cwd())


def request(
    server: ServerProcess, method: str, target: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (no client normalisation)."""
    url = urlsplit(server.url)
    assert url.hostname and url.port
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        sock.sendall(head.encode("ascii") + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, data


def refused(watched: Watched, method: str, target: str, body: bytes) -> str:
    """Send; assert a 4xx with a stable code in body and header; return the code."""
    status, headers, data = request(watched.server, method, target, body)
    where = f"{method} {target[:120]}"
    assert 400 <= status < 500, f"{where}: {status} {data[:300]!r}"
    code = json.loads(data)["error"]["code"]
    assert code in STABLE_CODES, f"{where}: {code}"
    assert headers["x-error-code"] == code, where
    return code


def snapshot(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every path under ``root``; files with their size and modification time (a directory
    changes its own mtime when a temp file comes and goes: its entries are what count)."""
    state = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if path in skip or any(s in path.parents for s in skip):
                continue
            stat = path.lstat()
            state[str(path)] = (0, 0) if name in dirs else (stat.st_size, stat.st_mtime_ns)
    return state


def bucket_keys(deployment: Deployment) -> dict[str, str]:
    store = deployment.store()
    assert isinstance(store, S3BlobStore)
    pages = store._client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", ())}


def targets() -> Iterator[tuple[str, str, bytes]]:
    for method, template, body in PATH_SLOTS:
        for payload in PAYLOADS:
            if "?" in template and payload in RAW:
                payload = quote(payload, safe="")  # a raw query would change the request
            yield method, template.replace("{p}", payload), body
    for payload in PAYLOADS:  # decoded once, as the JSON body carries them
        yield from json_slots(unquote(payload, errors="surrogateescape"))
    for tar in sharded_uploads():
        yield "POST", "/v1/models/vision/sharded/versions", tar


def test_hostile_names_are_refused_and_touch_nothing_outside(watched: Watched) -> None:
    data_dir = Path(watched.deployment.env["STATEHUB_DATA_DIR"]).resolve()
    all_targets = list(targets())
    for method, target, body in all_targets[:: len(PAYLOADS)]:  # warm up: lazy imports
        request(watched.server, method, target, body)
    around = data_dir.parent
    skip = {data_dir / n for n in ("statehub.db", "statehub.db-wal", "statehub.db-shm")}
    skip.add(watched.log.parent)
    before = snapshot(around, skip)
    keys = bucket_keys(watched.deployment) if watched.deployment.backend == "postgres" else {}
    offset = watched.log.stat().st_size

    codes: dict[str, int] = {}
    for method, target, body in all_targets:
        code = refused(watched, method, target, body)
        codes[code] = codes.get(code, 0) + 1

    outside = sorted(
        {f"{e} {p}" for e, p in watched.touched_since(offset) if not watched.allowed(p)}
    )
    assert outside == [], outside
    assert snapshot(around, skip) == before
    if watched.deployment.backend == "postgres":
        assert bucket_keys(watched.deployment) == keys
        assert all(k.startswith("blobs/sha256/") for k in keys)
    assert codes.get("invalid_name", 0) > 200 and codes.get("invalid_ref", 0) > 50, codes
    assert codes.get("invalid_checkpoint") == len(BAD_MEMBERS) + len(BAD_SHARD_REFS), codes


def test_the_audit_hook_sees_what_the_server_opens(watched: Watched) -> None:
    """The proof above is only as good as the hook: a real blob read must show up."""
    offset = watched.log.stat().st_size
    status, _, _ = request(watched.server, "GET", "/v1/models/vision/net/versions/1/blob")
    assert status == 200
    touched = [p for e, p in watched.touched_since(offset) if e == "open"]
    if watched.deployment.backend == "sqlite":
        assert any(p.parent.parent.name == "sha256" for p in touched), touched
    probe = Path(watched.deployment.env["STATEHUB_DATA_DIR"]).parent / f"probe-{uuid.uuid4()}"
    assert not watched.allowed(probe.resolve())


def test_a_valid_request_still_works(watched: Watched) -> None:
    status, _, data = request(watched.server, "GET", "/v1/models/vision/net/versions/prod")
    assert status == 200, data
    assert json.loads(data)["version"] == 1
