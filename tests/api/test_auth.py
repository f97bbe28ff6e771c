"""Access control on a server with tokens, on both backends: every token x every /v1
endpoint x two namespaces, each cell asserted (status, code, and what it wrote to the audit
log); lists and search show only what a token may read; a hidden model reads exactly like
a missing one. Plus the modes: open on loopback only, closed by the first token, a
generated bootstrap token logged once."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from fastapi.routing import APIRoute

from service.api.deps import get_principal
from service.app import create_app
from service.settings import Settings
from statehub.cli import main
from tests._server import ServerProcess
from tests._services import free_port
from tests.api.conftest import Deployment, checkpoint_bytes, spec_of_checkpoint

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

ROOT_TOKEN = "shb_root-" + "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6"
NAMESPACES = ("vision", "audio")
READ, WRITE, ADMIN = 1, 2, 3

# The oracle, written out independently of the server's scope logic: the level each token
# holds on a model (0 nothing, 1 read, 2 write, 3 admin).
SCOPES = {
    "reader": ["read:vision/*"],
    "writer": ["write:vision/*"],
    "vadmin": ["admin:vision/*"],
    "onemodel": ["write:vision/net"],
    "everyone": ["read:*"],
}
LEVELS = {
    "root": {"vision": ADMIN, "audio": ADMIN},
    "reader": {"vision": READ},
    "writer": {"vision": WRITE},
    "vadmin": {"vision": ADMIN},
    "everyone": {"vision": READ, "audio": READ},
}
VALID = ("root", *SCOPES)
INVALID = ("anonymous", "garbage", "revoked")


def level(token: str, namespace: str, model: str) -> int:
    if token == "onemodel":
        return WRITE if (namespace, model) == ("vision", "net") else 0
    return LEVELS[token].get(namespace, 0)


def ns_admin(token: str, namespace: str) -> bool:
    """Administers every model of the namespace (may mint tokens for it)."""
    return token != "onemodel" and level(token, namespace, "*") == ADMIN


class World:
    """The server, a client per token, and the audit log read straight from the database."""

    def __init__(self, server: ServerProcess, deployment: Deployment) -> None:
        self.server = server
        self.engine = deployment.engine()
        self.clients: dict[str, httpx.Client] = {}
        self.values: dict[str, str] = {"root": ROOT_TOKEN, "garbage": "shb_" + "x" * 43}
        self.last_event = 0
        self.throwaway = 0  # a token id for the revoke cells

    def client(self, token: str) -> httpx.Client:
        if token not in self.clients:
            headers = {}
            if token != "anonymous":
                headers["Authorization"] = f"Bearer {self.values[token]}"
            self.clients[token] = httpx.Client(
                base_url=self.server.url, headers=headers, timeout=60
            )
        return self.clients[token]

    @property
    def root(self) -> httpx.Client:
        return self.client("root")

    def new_events(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT id, actor, action, object_ref, detail FROM audit_events "
                    "WHERE id > :last ORDER BY id"
                ),
                {"last": self.last_event},
            ).mappings()
            events = [dict(r) for r in rows]
        for event in events:  # JSON arrives as text from SQLite
            if isinstance(event["detail"], str):
                event["detail"] = json.loads(event["detail"])
        if events:
            self.last_event = events[-1]["id"]
        return events

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.engine.dispose()


def ok(response: httpx.Response, status: int = 200) -> httpx.Response:
    assert response.status_code == status, response.text
    return response


def make_token(world: World, name: str, scopes: list[str]) -> dict[str, Any]:
    return ok(world.root.post("/v1/tokens", json={"name": name, "scopes": scopes}), 201).json()


@pytest.fixture(scope="module")
def world(deployment: Deployment) -> Iterator[World]:
    server = deployment.start(STATEHUB_BOOTSTRAP_TOKEN=ROOT_TOKEN)
    world = World(server, deployment)
    for namespace in NAMESPACES:
        for name in ("net", "other"):
            ok(
                world.root.post(
                    f"/v1/models/{namespace}/{name}/versions",
                    content=checkpoint_bytes(0),
                    params={"alias": "prod"},
                ),
                201,
            )
    for name, scopes in SCOPES.items():
        world.values[name] = make_token(world, name, scopes)["token"]
    revoked = make_token(world, "revoked", ["admin:*"])
    world.values["revoked"] = revoked["token"]
    ok(world.root.delete(f"/v1/tokens/{revoked['id']}"))
    world.new_events()
    try:
        yield world
    finally:
        world.close()


# -- the endpoints ------------------------------------------------------------------------

FIT = {"target": spec_of_checkpoint()}
ADAPTER = {"name": "tmp-adapter", "rules": [{"type": "rename", "pattern": "a", "replacement": "b"}]}


@dataclass(frozen=True)
class Endpoint:
    """One route; ``call(client, ns)`` sends a valid request to it for namespace ``ns``.

    ``need``: "read"/"write"/"admin" on ``ns/net`` (or on the new model ``ns/new-*``),
    "any" (any valid token), "root" (``admin:*``), "token-admin" (admin over ``ns/*``),
    "some-admin" (an admin scope anywhere).
    """

    method: str
    route: str
    need: str
    call: Callable[[World, httpx.Client, str], httpx.Response]
    status: int = 200  # on success
    audit: str | None = None  # the audit action a success writes
    before: Callable[[World, str], Any] | None = None  # root prepares the cell
    after: Callable[[World, str], Any] | None = None  # root undoes a success


def _adapter_exists(world: World, _: str) -> None:
    world.root.post("/v1/adapters", json=ADAPTER)


def _throwaway_token(world: World, namespace: str) -> None:
    world.throwaway = make_token(world, "throwaway", [f"read:{namespace}/*"])["id"]


Call = Callable[[World, httpx.Client, str], httpx.Response]
NET = "/v1/models/{ns}/net"


def send(method: str, path: str, **kwargs: Any) -> Call:
    return lambda w, c, ns: c.request(method, path.format(ns=ns, token=w.throwaway), **kwargs)


def create_model(w: World, c: httpx.Client, ns: str) -> httpx.Response:
    return c.post("/v1/models", json={"namespace": ns, "name": f"new-{uuid.uuid4().hex[:8]}"})


def set_tmp_alias(w: World, ns: str) -> None:
    ok(w.root.put(f"/v1/models/{ns}/net/aliases/tmp", json={"version": 1}))


def compose_body(data: bytes) -> dict[str, Any]:
    """The compose request for a safetensors file: its header and each tensor's sha256."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    start = 8 + length
    hashes = {
        key: hashlib.sha256(
            data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]]
        ).hexdigest()
        for key, entry in header.items()
    }
    return {"header": data[8 : 8 + length].decode(), "size": len(data), "tensors": hashes}


def compose_file_body(data: bytes) -> dict[str, Any]:
    """The request composing a folder's file: the same, with the file's own sha256."""
    return compose_body(data) | {"sha256": hashlib.sha256(data).hexdigest()}


def folder_manifest() -> dict[str, Any]:
    """A folder of one file, the bytes of ns/net's version 1 (stored already)."""
    data = checkpoint_bytes(0)
    entry = {"path": "model.safetensors", "size": len(data)}
    return {"files": [entry | {"sha256": hashlib.sha256(data).hexdigest()}]}


def folder_version(world: World, namespace: str) -> None:
    """ns/net gets a version pushed as a folder (the same one each time: idempotent)."""
    response = world.root.post(f"/v1/models/{namespace}/net/versions/files", json=folder_manifest())
    assert response.status_code in (200, 201), response.text


M = "/v1/models/{namespace}/{name}"
V = M + "/versions/{ref}"
TENSOR = hashlib.sha256(b"tensor bytes").hexdigest()
FILE = hashlib.sha256(b"file bytes").hexdigest()
FOLDER_FILE = NET + "/versions/latest/files/model.safetensors"
ENDPOINTS = [
    Endpoint("GET", V + "/files", "read", send("GET", NET + "/versions/1/files")),
    Endpoint(
        "GET", V + "/files/{path:path}", "read", send("GET", FOLDER_FILE), before=folder_version
    ),
    Endpoint(
        "HEAD", V + "/files/{path:path}", "read", send("HEAD", FOLDER_FILE), before=folder_version
    ),
    Endpoint(
        "POST",
        M + "/files/missing",
        "write",
        send("POST", NET + "/files/missing", json={"sha256": [FILE]}),
    ),
    Endpoint(
        "PUT",
        M + "/files/{sha256}",
        "write",
        send("PUT", NET + f"/files/{FILE}", content=b"file bytes"),
    ),
    Endpoint(
        "POST",
        M + "/files/compose",
        "write",
        send("POST", NET + "/files/compose", json=compose_file_body(checkpoint_bytes(0))),
    ),
    Endpoint("POST", M + "/uploads", "write", send("POST", NET + "/uploads", json={"size": 3})),
    Endpoint(
        "POST",
        M + "/uploads/complete",
        "write",
        send(
            "POST",
            NET + "/uploads/complete",
            json={"upload": "x.y", "etags": [], "sha256": "not a digest"},
        ),
        status=422,  # past the scope check: the digest is checked first
    ),
    Endpoint(
        "POST",
        M + "/versions/stored",
        "write",
        send("POST", NET + "/versions/stored", json={"sha256": "0" * 64}),
        status=409,  # files_missing: nothing is stored under that digest
    ),
    Endpoint(
        "POST",
        M + "/versions/files",
        "write",
        send("POST", NET + "/versions/files", json=folder_manifest()),
        audit="version.push_existing",
        before=folder_version,
    ),
    Endpoint("GET", M, "read", send("GET", NET)),
    Endpoint("GET", M + "/versions", "read", send("GET", NET + "/versions")),
    Endpoint("GET", V, "read", send("GET", NET + "/versions/prod")),
    Endpoint("GET", V + "/blob", "read", send("GET", NET + "/versions/1/blob")),
    Endpoint("POST", V + "/plan", "read", send("POST", NET + "/versions/1/plan", json=FIT)),
    Endpoint("POST", V + "/fetch", "read", send("POST", NET + "/versions/1/fetch", json=FIT)),
    Endpoint("GET", M + "/aliases", "read", send("GET", NET + "/aliases")),
    Endpoint("POST", "/v1/models", "write-new", create_model, 201, "model.create"),
    Endpoint(
        "POST",
        M + "/versions",
        "write",
        send("POST", NET + "/versions", content=checkpoint_bytes(0)),
        audit="version.push_existing",
    ),
    Endpoint(
        "POST",
        M + "/tensors/missing",
        "write",
        send("POST", NET + "/tensors/missing", json={"sha256": [TENSOR]}),
    ),
    Endpoint(
        "PUT",
        M + "/tensors/{sha256}",
        "write",
        send("PUT", NET + f"/tensors/{TENSOR}", content=b"tensor bytes"),
    ),
    Endpoint(
        "POST",
        M + "/versions/compose",
        "write",
        send("POST", NET + "/versions/compose", json=compose_body(checkpoint_bytes(0))),
        audit="version.push_existing",
    ),
    Endpoint(
        "PUT",
        M + "/aliases/{alias}",
        "write",
        send("PUT", NET + "/aliases/staging", json={"version": 1}),
        audit="alias.set",
    ),
    Endpoint(
        "DELETE",
        M + "/aliases/{alias}",
        "write",
        send("DELETE", NET + "/aliases/tmp"),
        204,
        "alias.delete",
        before=set_tmp_alias,
    ),
    Endpoint(
        "DELETE",
        M,
        "admin",
        send("DELETE", NET),
        204,
        "model.delete",
        after=lambda w, ns: ok(w.root.post(f"/v1/models/{ns}/net/restore")),
    ),
    Endpoint("POST", M + "/restore", "admin", send("POST", NET + "/restore")),
    Endpoint(
        "DELETE",
        V,
        "admin",
        send("DELETE", NET + "/versions/1"),
        204,
        "version.delete",
        after=lambda w, ns: ok(w.root.post(f"/v1/models/{ns}/net/versions/1/restore")),
    ),
    Endpoint(
        "POST", M + "/versions/{number}/restore", "admin", send("POST", NET + "/versions/1/restore")
    ),
    Endpoint(
        "GET", "/v1/models", "any", lambda w, c, ns: c.get("/v1/models", params={"namespace": ns})
    ),
    Endpoint(
        "POST", "/v1/search/compatible", "any", send("POST", "/v1/search/compatible", json=FIT)
    ),
    Endpoint("GET", "/v1/adapters", "any", send("GET", "/v1/adapters")),
    Endpoint("GET", "/v1/adapters/builtin", "any", send("GET", "/v1/adapters/builtin")),
    Endpoint(
        "GET",
        "/v1/adapters/{name}",
        "any",
        send("GET", "/v1/adapters/tmp-adapter"),
        before=_adapter_exists,
    ),
    Endpoint(
        "POST",
        "/v1/adapters",
        "root",
        send("POST", "/v1/adapters", json=ADAPTER),
        201,
        "adapter.register",
    ),
    Endpoint(
        "DELETE",
        "/v1/adapters/{name}",
        "root",
        send("DELETE", "/v1/adapters/tmp-adapter"),
        204,
        "adapter.delete",
        before=_adapter_exists,
    ),
    Endpoint(
        "POST",
        "/v1/tokens",
        "token-admin",
        lambda w, c, ns: c.post("/v1/tokens", json={"name": "minted", "scopes": [f"read:{ns}/*"]}),
        201,
        "token.create",
    ),
    Endpoint("GET", "/v1/tokens", "some-admin", send("GET", "/v1/tokens")),
    Endpoint(
        "DELETE",
        "/v1/tokens/{token_id}",
        "token-admin",
        send("DELETE", "/v1/tokens/{token}"),
        audit="token.revoke",
        before=_throwaway_token,
    ),
    Endpoint(
        "POST",
        "/v1/admin/gc",
        "root",
        send("POST", "/v1/admin/gc", json={"dry_run": True}),
        audit="gc.run",
    ),
]


def expected_status(endpoint: Endpoint, token: str, namespace: str) -> int:
    """What the cell must answer: success, 401, 404 (cannot read: hidden) or 403."""
    if token in INVALID:
        return 401
    need = endpoint.need
    if need == "any":
        return endpoint.status
    if need == "root":
        return endpoint.status if token == "root" else 403
    if need == "some-admin":
        return endpoint.status if token in ("root", "vadmin") else 403
    if need == "token-admin":
        if token not in ("root", "vadmin"):
            return 403  # no admin scope at all
        if ns_admin(token, namespace):
            return endpoint.status
        # A token it does not administer reads as missing; a scope it does not hold, 403.
        return 404 if endpoint.method == "DELETE" else 403
    wanted = {"read": READ, "write": WRITE, "write-new": WRITE, "admin": ADMIN}[need]
    held = level(token, namespace, "new" if need == "write-new" else "net")
    if held >= wanted:
        return endpoint.status
    return 404 if wanted == READ else 403


CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):  # an included router (FastAPI >= 0.13x)
            yield from api_routes(route.original_router.routes)


def test_every_v1_route_authenticates_and_is_in_the_matrix() -> None:
    v1 = [r for r in api_routes(create_app(Settings()).routes) if r.path.startswith("/v1")]
    routes = {(method, route.path) for route in v1 for method in route.methods}
    assert routes == {(e.method, e.route) for e in ENDPOINTS}
    for route in v1:
        calls = {d.call for d in route.dependant.dependencies}
        assert get_principal in calls, f"{route.path} does not authenticate"


def test_access_matrix(world: World) -> None:
    cells = 0
    for token in (*VALID, *INVALID):
        client = world.client(token)
        for endpoint in ENDPOINTS:
            for namespace in NAMESPACES:
                cell = f"{token} {endpoint.method} {endpoint.route} [{namespace}]"
                if endpoint.before:
                    endpoint.before(world, namespace)
                world.new_events()
                want = expected_status(endpoint, token, namespace)
                response = endpoint.call(world, client, namespace)
                assert response.status_code == want, f"{cell}: {response.text[:300]}"
                events = world.new_events()
                if want in CODES:
                    if endpoint.method != "HEAD":  # a HEAD answer has headers only
                        assert response.json()["error"]["code"] == CODES[want], cell
                    assert response.headers["x-error-code"] == CODES[want], cell
                    assert [e["action"] for e in events] == ["access.denied"], cell
                    assert events[0]["detail"]["status"] == want, cell
                    if want == 401:
                        assert response.headers["www-authenticate"].startswith("Bearer"), cell
                elif endpoint.audit:
                    assert [e["action"] for e in events] == [endpoint.audit], cell
                    name = "bootstrap" if token == "root" else token
                    assert events[0]["actor"].startswith(f"{name} (shb_"), cell
                else:
                    assert events == [], cell
                if want == endpoint.status and endpoint.after:
                    endpoint.after(world, namespace)
                cells += 1
    assert cells == len(VALID + INVALID) * len(ENDPOINTS) * len(NAMESPACES)


def test_lists_and_search_show_only_what_a_token_reads(world: World) -> None:
    for token in VALID:
        client = world.client(token)
        listed = {
            f"{m['namespace']}/{m['name']}"
            for m in ok(client.get("/v1/models", params={"limit": 500})).json()["items"]
        }
        for model in listed:
            namespace, name = model.split("/")
            assert level(token, namespace, name) >= READ, (token, model)
        for namespace in NAMESPACES:
            for name in ("net", "other"):
                readable = level(token, namespace, name) >= READ
                assert (f"{namespace}/{name}" in listed) == readable, (token, namespace, name)
        hits = ok(client.post("/v1/search/compatible", json={**FIT, "limit": 100})).json()
        found = {h["model"] for h in hits}
        expected = {
            f"{ns}/{name}"
            for ns in NAMESPACES
            for name in ("net", "other")
            if level(token, ns, name) >= READ
        }
        assert expected <= found, token
        assert all(level(token, *m.split("/")) >= READ for m in found), (token, found)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/{ns}/{name}",
        "/v1/models/{ns}/{name}/versions",
        "/v1/models/{ns}/{name}/versions/prod",
        "/v1/models/{ns}/{name}/versions/1/blob",
        "/v1/models/{ns}/{name}/aliases",
    ],
)
def test_a_hidden_model_reads_exactly_like_a_missing_one(world: World, path: str) -> None:
    def error(token: str, ns: str, name: str) -> dict[str, Any]:
        response = world.client(token).get(path.format(ns=ns, name=name))
        assert response.status_code == 404, response.text
        return response.json()["error"]

    hidden = error("reader", "audio", "net")  # exists, not readable
    missing = error("root", "audio", "ghost")  # does not exist at all
    assert hidden == {**missing, "message": missing["message"].replace("ghost", "net")} | {
        "detail": {"model": "audio/net"}
    }
    assert error("reader", "audio", "ghost") == missing


def test_a_token_never_mints_a_stronger_one(world: World) -> None:
    vadmin = world.client("vadmin")
    for scopes in (["admin:*"], ["read:audio/*"], ["read:vision/*", "write:audio/x"]):
        response = vadmin.post("/v1/tokens", json={"name": "escalate", "scopes": scopes})
        assert response.status_code == 403, (scopes, response.text)
    minted = ok(
        vadmin.post("/v1/tokens", json={"name": "team-ci", "scopes": ["write:vision/net"]}), 201
    ).json()
    assert minted["token"].startswith("shb_") and minted["prefix"] == minted["token"][:12]
    listed = ok(vadmin.get("/v1/tokens")).json()
    assert "token" not in listed[0]
    assert all(all(s.split(":")[1].startswith("vision/") for s in t["scopes"]) for t in listed)
    assert {"team-ci", "reader", "writer", "vadmin", "onemodel"} <= {t["name"] for t in listed}
    assert {t["name"] for t in ok(world.root.get("/v1/tokens")).json()} >= {"bootstrap", "everyone"}
    team = httpx.Client(
        base_url=world.server.url, headers={"Authorization": f"Bearer {minted['token']}"}
    )
    with team:
        ok(team.put("/v1/models/vision/net/aliases/ci", json={"version": 1}))
        refused = team.put("/v1/models/vision/other/aliases/ci", json={"version": 1})
        assert refused.status_code == 403
        ok(world.root.delete(f"/v1/tokens/{minted['id']}"))
        assert team.get("/v1/models/vision/net").status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": []},
        {"name": "x", "scopes": ["delete:*"]},
        {"name": "x", "scopes": ["read:vision"]},
        {"name": "x", "scopes": ["read:../*"]},
        {"name": "x", "scopes": ["read:vision/a/b"]},
        {"name": "../x", "scopes": ["read:*"]},
        {"name": "x", "scopes": ["read:*"], "expires_at": "2001-01-01T00:00:00Z"},
    ],
)
def test_bad_token_requests_are_refused(world: World, body: dict[str, Any]) -> None:
    response = world.root.post("/v1/tokens", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] in ("invalid_request", "invalid_name")


def test_the_database_holds_hashes_not_tokens(world: World) -> None:
    with world.engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT prefix, token_hash FROM tokens")).all()
    stored = " ".join(f"{p} {h}" for p, h in rows)
    assert len(rows) >= len(world.values) - 1 > 0  # every token but the garbage one is a row
    for value in world.values.values():
        assert value not in stored
    assert all(len(h) == 64 and len(p) == 12 for p, h in rows)


# -- modes --------------------------------------------------------------------------------


def test_an_open_server_refuses_to_listen_beyond_loopback(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHUB_")}
    env["STATEHUB_DATA_DIR"] = str(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "service", "--host", "0.0.0.0", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = process.stdout + process.stderr
    assert process.returncode != 0, output
    assert "refusing to listen on 0.0.0.0: no token is configured" in output


def test_open_on_loopback_until_the_first_token(tmp_path: Any) -> None:
    fresh = Deployment("sqlite", {"STATEHUB_DATA_DIR": str(tmp_path)})
    try:
        server = fresh.start()
        assert "auth: open" in server.output()
        ok(httpx.get(f"{server.url}/v1/models"))
        created = httpx.post(
            f"{server.url}/v1/tokens", json={"name": "first", "scopes": ["admin:*"]}
        )
        assert created.status_code == 201, created.text
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {created.json()['token']}"}
        ok(httpx.delete(f"{server.url}/v1/tokens/{created.json()['id']}", headers=auth))
        # Revoking every token never reopens the server (a restart decides the same way).
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
    finally:
        fresh.stop()


def test_auth_tokens_mode_logs_a_generated_admin_token_once(tmp_path: Any) -> None:
    fresh = Deployment("sqlite", {"STATEHUB_DATA_DIR": str(tmp_path)})
    try:
        first = fresh.start(STATEHUB_AUTH="tokens")
        lines = [line for line in first.output().splitlines() if "shown this once" in line]
        assert len(lines) == 1, first.output()
        found = re.search(r"shb_[A-Za-z0-9_-]{43}", lines[0])
        assert found, lines[0]
        headers = {"Authorization": f"Bearer {found.group()}"}
        assert httpx.get(f"{first.url}/v1/models").status_code == 401
        ok(httpx.get(f"{first.url}/v1/tokens", headers=headers))
        first.stop()
        # In the default mode too, a data set with tokens stays closed and logs none.
        second = fresh.start()
        assert "shown this once" not in second.output()
        assert "auth: open" not in second.output()
        assert httpx.get(f"{second.url}/v1/models").status_code == 401
        ok(httpx.get(f"{second.url}/v1/models", headers=headers))
    finally:
        fresh.stop()


def test_the_cli_manages_tokens_and_runs_gc(world: World) -> None:
    runner = CliRunner()

    def cli(*args: str, token: str = ROOT_TOKEN) -> Result:
        return runner.invoke(main, ["--url", world.server.url, "--token", token, *args])

    created = cli("token", "create", "cli-ci", "--scope", "read:vision/*", "-s", "write:vision/net")
    assert created.exit_code == 0, created.output
    value = created.stdout.strip()
    assert value.startswith("shb_") and "not shown again" in created.stderr
    listed = cli("token", "list")
    assert "cli-ci" in listed.output and value not in listed.output
    token_id = next(
        line.split()[0] for line in listed.output.splitlines() if " cli-ci " in f" {line} "
    )
    assert cli("ls", token=value).exit_code == 0
    assert "forbidden" in cli("gc", token=value).output  # read/write is not admin:*
    dry = cli("gc", "--dry-run")
    assert dry.exit_code == 0 and dry.output.startswith("would delete"), dry.output
    revoked = cli("token", "revoke", token_id)
    assert revoked.exit_code == 0 and "revoked token" in revoked.output
    denied = cli("ls", token=value)
    assert denied.exit_code == 1 and "[unauthorized]" in denied.output
