"""Malformed and hostile input on both backends (issue 17 items 2, 4, 6, 7): every case is
answered with a 4xx and a stable code, never a 500, nothing is committed, and a body sent
without a valid token is answered without being parsed (the server's RSS says so).

One server per backend with tokens enforced and an info-level log (the client disconnect
is logged at info).
"""

from __future__ import annotations

import io
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import torch

from service.api.bodies import INLINE_PARSE_BYTES
from service.core.jsondata import MAX_METADATA_DEPTH, UNREADABLE, body_value_budget
from service.storage.models import Version
from tests._metrics import delta, scrape
from tests._server import ServerProcess, start_server
from tests.api.conftest import Deployment, checkpoint_bytes, spec_of_checkpoint

MiB = 1024 * 1024
ROOT_TOKEN = "shb_hostile-" + "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6"
TABLES = ("models", "versions", "aliases", "adapters", "tokens", "blob_refs", "stored_tensors")
BASE = "base/net"  # the one model every world has, version 1
PLAN = f"/v1/models/{BASE}/versions/1/plan"
FETCH = f"/v1/models/{BASE}/versions/1/fetch"
UPLOAD_ROUTE = "/v1/models/{namespace}/{name}/versions"
# 10 Mi empty objects in 30 MiB: parsed, ~800 MiB of Python objects.
EMPTY_OBJECTS = b"[" + b"{}," * (10 * MiB) + b"{}]"
# Measured 0 MiB once authentication comes first; parsing the body grew RSS by ~800 MiB.
UNAUTHENTICATED_GROWTH = 16 * MiB
# With a token: the body is read (30 MiB, joined once more) and refused unparsed, ~60 MiB.
AUTHENTICATED_GROWTH = 128 * MiB


@dataclass
class World:
    server: ServerProcess
    deployment: Deployment
    engine: sa.Engine
    root: httpx.Client
    reader: httpx.Client  # read:*
    anonymous: httpx.Client

    def state(self) -> dict[str, int]:
        """Rows per table: what 'nothing was committed' is checked against."""
        with self.engine.connect() as connection:
            return {
                t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one()
                for t in TABLES
            }

    def denials(self) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT actor, object_ref, detail FROM audit_events "
                    "WHERE action = 'access.denied' ORDER BY id"
                )
            ).mappings()
            events = [dict(r) for r in rows]
        for event in events:  # SQLite hands JSON back as text
            if isinstance(event["detail"], str):
                event["detail"] = json.loads(event["detail"])
        return events


@pytest.fixture(scope="module")
def world(deployment: Deployment) -> Iterator[World]:
    server = start_server(
        {**deployment.env, "STATEHUB_BOOTSTRAP_TOKEN": ROOT_TOKEN}, log_level="info"
    )
    deployment.servers.append(server)
    root = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {ROOT_TOKEN}"}, timeout=120
    )
    created = root.post("/v1/tokens", json={"name": "reader", "scopes": ["read:*"]})
    assert created.status_code == 201, created.text
    pushed = root.post(f"/v1/models/{BASE}/versions", content=checkpoint_bytes(0))
    assert pushed.status_code == 201, pushed.text
    reader = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {created.json()['token']}"},
        timeout=120,
    )
    anonymous = httpx.Client(base_url=server.url, timeout=120)
    world = World(server, deployment, deployment.engine(), root, reader, anonymous)
    try:
        yield world
    finally:
        for client in (root, reader, anonymous):
            client.close()
        world.engine.dispose()


def refused(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the stable error: status, code in header and body, valid JSON."""
    assert response.status_code == status, response.text
    assert response.headers["x-error-code"] == code, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


def json_post(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_growth(server: ServerProcess, send: Callable[[], httpx.Response]) -> tuple[int, Any]:
    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    response = send()
    return server.rss_peak_bytes() - baseline, response


# -- item 2: authentication before the body; parse work bounded ---------------------------


@pytest.mark.parametrize("who", ["no token", "unknown token"])
def test_a_json_body_without_a_valid_token_is_refused_before_it_is_parsed(
    world: World, who: str
) -> None:
    headers = {"Content-Type": "application/json"}
    if who == "unknown token":
        headers["Authorization"] = "Bearer shb_" + "x" * 43
    before = world.state()

    growth, response = peak_growth(
        world.server,
        lambda: world.anonymous.post(PLAN, content=EMPTY_OBJECTS, headers=headers),
    )

    refused(response, 401, "unauthorized")
    assert growth < UNAUTHENTICATED_GROWTH, f"RSS grew by {growth / MiB:.0f} MiB"
    assert world.state() == before
    assert world.anonymous.get("/healthz").status_code == 200  # the connection still serves


def test_a_chunked_body_without_a_token_is_refused_unread(world: World) -> None:
    def chunks() -> Iterator[bytes]:
        yield from (EMPTY_OBJECTS[i : i + MiB] for i in range(0, len(EMPTY_OBJECTS), MiB))

    growth, response = peak_growth(
        world.server,
        lambda: world.anonymous.post(
            PLAN, content=chunks(), headers={"Content-Type": "application/json"}
        ),
    )
    refused(response, 401, "unauthorized")
    assert growth < UNAUTHENTICATED_GROWTH, f"RSS grew by {growth / MiB:.0f} MiB"


def test_a_token_holder_cannot_make_the_server_parse_millions_of_values(world: World) -> None:
    settings = world.server.settings
    budget = body_value_budget(max_tensors=settings.max_tensors, max_rank=settings.max_rank)
    assert len(EMPTY_OBJECTS) < settings.max_spec_bytes  # under the byte limit: the value
    # budget is what refuses it

    growth, response = peak_growth(
        world.server, lambda: json_post(world.reader, PLAN, EMPTY_OBJECTS)
    )

    error = refused(response, 413, "too_large")
    assert error["detail"]["limit"] == budget
    assert error["detail"]["values"] > budget
    assert growth < AUTHENTICATED_GROWTH, f"RSS grew by {growth / MiB:.0f} MiB"


def test_a_chunked_json_body_over_the_byte_limit_is_413_not_400(world: World) -> None:
    limit = world.server.settings.max_spec_bytes

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // MiB + 2):
            yield b" " * MiB

    response = world.reader.post(
        PLAN, content=chunks(), headers={"Content-Type": "application/json"}
    )
    refused(response, 413, "too_large")


def test_a_spec_under_the_budget_still_plans(world: World) -> None:
    response = world.reader.post(PLAN, json={"target": spec_of_checkpoint()})
    assert response.status_code == 200, response.text
    assert response.json()["plan"]["verdict"] == "exact"


def test_a_large_spec_is_parsed_off_the_event_loop_and_plans(world: World) -> None:
    """Over INLINE_PARSE_BYTES the body is parsed in a worker thread: same answer."""
    tensors = spec_of_checkpoint()["tensors"] + [
        {"key": f"extra.layers.{i}.weight", "shape": [64, 64], "dtype": "F32"} for i in range(6_000)
    ]
    body = json.dumps({"target": {"tensors": tensors}}).encode()
    assert len(body) > INLINE_PARSE_BYTES
    response = json_post(world.reader, PLAN, body)
    assert response.status_code == 200, response.text
    assert response.json()["plan"]["verdict"] != "incompatible"


# -- item 4: metadata checked before anything is stored ------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_METADATA = {
    "nested 260 levels": '{"a": ' + nested(260) + "}",
    "nested 2,000 levels": '{"a": ' + nested(2000) + "}",
    f"nested {MAX_METADATA_DEPTH + 1} levels": '{"a": ' + nested(MAX_METADATA_DEPTH) + "}",
    "5,000-digit integer": '{"a": ' + "9" * 5000 + "}",
    "integer 2**63": '{"a": ' + str(2**63) + "}",
    "NaN": '{"loss": NaN}',
    "Infinity": '{"loss": -Infinity}',
    "NUL in a value": '{"a": "x\\u0000"}',
    "NUL in a key": '{"a\\u0000": 1}',
    "lone surrogate": '{"a": "\\ud800"}',
    "not an object": "[1, 2]",
    "not JSON": "{'a': 1}",
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_refused_and_nothing_is_stored(world: World, case: str) -> None:
    before = world.state()
    response = world.root.post(
        "/v1/models/meta/refused/versions",
        content=checkpoint_bytes(7),
        params={"metadata": BAD_METADATA[case]},
    )
    refused(response, 422, "invalid_request")
    assert world.state() == before
    refused(world.root.get("/v1/models/meta/refused"), 404, "not_found")


def test_metadata_at_the_limits_is_kept_as_sent(world: World) -> None:
    metadata = {
        "deep": json.loads(nested(MAX_METADATA_DEPTH - 1)),
        "int": 2**63 - 1,
        "neg": -(2**63),
        "text": "é ✓ 𝄞",
    }
    response = world.root.post(
        "/v1/models/meta/kept/versions",
        content=checkpoint_bytes(8),
        params={"metadata": json.dumps(metadata)},
    )
    assert response.status_code == 201, response.text
    assert world.root.get("/v1/models/meta/kept/versions/1").json()["metadata"] == metadata


def test_stored_bad_metadata_cannot_break_reads(world: World) -> None:
    """Metadata stored before these checks (written straight to the database here) is
    served as a note, and every read of the model keeps working."""
    pushed = world.root.post("/v1/models/meta/legacy/versions", content=checkpoint_bytes(9))
    assert pushed.status_code == 201, pushed.text
    deep = {"a": json.loads(nested(260))}
    with world.engine.begin() as connection:
        connection.execute(
            sa.update(Version)
            .where(Version.digest == pushed.json()["digest"])
            .values(user_metadata=deep)
        )

    for path in ("/v1/models/meta/legacy/versions/1", "/v1/models/meta/legacy/versions"):
        response = world.root.get(path)
        assert response.status_code == 200, response.text
        body = response.json()
        version = body if isinstance(body, dict) else body[0]
        assert set(version["metadata"]) == {UNREADABLE}
        assert "deeper than" in version["metadata"][UNREADABLE]
    model = world.root.get("/v1/models/meta/legacy")
    assert model.status_code == 200, model.text
    assert set(model.json()["versions"][0]["metadata"]) == {UNREADABLE}


# -- item 6: NUL bytes never reach the database; audit failures change nothing -----------


@pytest.mark.parametrize(
    ("client", "method", "path", "status", "code"),
    [
        ("root", "GET", "/v1/adapters/%00", 422, "invalid_name"),
        ("root", "DELETE", "/v1/adapters/a%00", 422, "invalid_name"),
        ("reader", "DELETE", "/v1/adapters/a%00", 403, "forbidden"),
        ("anonymous", "DELETE", "/v1/adapters/a%00", 401, "unauthorized"),
        ("anonymous", "GET", "/v1/adapters/%00", 401, "unauthorized"),
        ("root", "GET", "/v1/models/%00/net", 422, "invalid_name"),
        ("root", "GET", f"/v1/models/{BASE}/versions/a%00", 422, "invalid_ref"),
        ("root", "GET", "/v1/models?q=%00", 422, "invalid_request"),
        ("root", "GET", "/v1/models?namespace=%00", 422, "invalid_name"),
        ("root", "GET", "/v1/models?tag=a%00", 422, "invalid_name"),
        ("root", "PUT", f"/v1/models/{BASE}/aliases/a%00", 422, "invalid_name"),
    ],
)
def test_nul_in_a_path_or_query_is_a_4xx(
    world: World, client: str, method: str, path: str, status: int, code: str
) -> None:
    before_state, before_metrics = world.state(), scrape(world.server.url)
    denials = len(world.denials())
    sender: httpx.Client = getattr(world, client)
    body = {"json": {"version": 1}} if method == "PUT" else {}
    refused(sender.request(method, path, **body), status, code)
    assert world.state() == before_state
    after = scrape(world.server.url)
    assert delta(before_metrics, after, "statehub_audit_write_failures_total") == 0
    if status in (401, 403):  # the denial is audited, the NUL recorded as U+FFFD
        event = world.denials()[denials]
        assert "\x00" not in event["object_ref"] + event["detail"]["path"]
        assert "\ufffd" in event["detail"]["path"]


NUL = "a\x00b"
NUL_BODIES = {
    "model description": ("/v1/models", {"namespace": "nul", "name": "m", "description": NUL}),
    "model name": ("/v1/models", {"namespace": "nul", "name": NUL}),
    "model tag": ("/v1/models", {"namespace": "nul", "name": "m", "tags": [NUL]}),
    "adapter description": (
        "/v1/adapters",
        {
            "name": "nul-adapter",
            "description": NUL,
            "rules": [{"type": "rename", "pattern": "a", "replacement": "b"}],
        },
    ),
    "adapter rule": (
        "/v1/adapters",
        {"name": "nul-adapter", "rules": [{"type": "rename", "pattern": NUL, "replacement": "b"}]},
    ),
    "token name": ("/v1/tokens", {"name": NUL, "scopes": ["read:*"]}),
    "token scope": ("/v1/tokens", {"name": "t", "scopes": [f"read:{NUL}/*"]}),
    "plan key": (PLAN, {"target": {"tensors": [{"key": NUL, "shape": [4], "dtype": "F32"}]}}),
    "search policy": (
        "/v1/search/compatible",
        {"target": spec_of_checkpoint(), "policy": {"adapters": [NUL]}},
    ),
}


@pytest.mark.parametrize("case", list(NUL_BODIES))
def test_nul_in_a_body_string_is_refused_before_the_database(world: World, case: str) -> None:
    path, body = NUL_BODIES[case]
    before = world.state()
    error = refused(world.root.post(path, json=body), 422, "invalid_request")
    assert "NUL" in error["message"]
    assert world.state() == before


TRIGGERS = {
    "sqlite": [
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
        "WHEN NEW.object_ref LIKE '%audit-fails%' "
        "BEGIN SELECT RAISE(ABORT, 'audit refused by the test'); END"
    ],
    "postgres": [
        "CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN "
        "IF NEW.object_ref LIKE '%audit-fails%' THEN "
        "RAISE EXCEPTION 'audit refused by the test'; END IF; RETURN NEW; END $$ "
        "LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    ],
}
DROP_TRIGGERS = {
    "sqlite": ["DROP TRIGGER refuse_audit"],
    "postgres": ["DROP TRIGGER refuse_audit ON audit_events", "DROP FUNCTION refuse_audit()"],
}


def test_a_failed_audit_write_does_not_change_the_answer(world: World) -> None:
    """The database itself refuses the denial's audit row (a trigger): the caller still
    gets its 401 / 403, the failure is logged and counted."""
    backend = world.deployment.backend
    with world.engine.begin() as connection:
        for statement in TRIGGERS[backend]:
            connection.execute(sa.text(statement))
    try:
        before = scrape(world.server.url)
        refused(world.anonymous.delete("/v1/adapters/audit-fails"), 401, "unauthorized")
        refused(world.reader.delete("/v1/adapters/audit-fails"), 403, "forbidden")
        after = scrape(world.server.url)
    finally:
        with world.engine.begin() as connection:
            for statement in DROP_TRIGGERS[backend]:
                connection.execute(sa.text(statement))
    assert delta(before, after, "statehub_audit_write_failures_total") == 2
    assert "cannot audit a denied request" in world.server.output(limit=None)
    for status in ("500", "503"):
        assert (
            delta(
                before,
                after,
                "statehub_http_requests_total",
                method="DELETE",
                route="/v1/adapters/{name}",
                status=status,
            )
            == 0
        )


# -- item 7: malformed input is a 422 ------------------------------------------------------


def safetensors_with_header(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


BAD_HEADERS = {
    "nested 100,000 deep": b'{"__metadata__": ' + nested(100_000).encode() + b"}",
    "5,000-digit integer": (
        b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    ),
    "5,000-digit offset": (
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}"
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_a_malformed_safetensors_header_is_invalid_checkpoint(world: World, case: str) -> None:
    before = world.state()
    body = safetensors_with_header(BAD_HEADERS[case]) + b"\x00" * 4
    response = world.root.post("/v1/models/st/bad/versions", content=body)
    refused(response, 422, "invalid_checkpoint")
    assert world.state() == before


class ForgedArray:
    """Pickles as a numpy array of 3,000 dimensions (numpy itself cannot make one)."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = (1, (1,) * 3000, np.dtype("float32"), False, b"\x00" * 4)
        return (np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), state)


def test_a_snapshot_holding_a_3000_dimension_array_is_invalid_checkpoint(world: World) -> None:
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": ForgedArray()}, buffer)
    before = world.state()
    response = world.root.post("/v1/models/snap/forged/versions", content=buffer.getvalue())
    error = refused(response, 422, "invalid_checkpoint")
    assert error["detail"] == {"dimensions": 3000, "limit": 64}
    assert world.state() == before


SURROGATE = b'"\\ud800"'
SPEC_WITH_KEY = b'{"target": {"tensors": [{"key": KEY, "shape": [4], "dtype": "F32"}]}}'
SURROGATE_BODIES = {
    "plan": (PLAN, SPEC_WITH_KEY.replace(b"KEY", SURROGATE)),
    "fetch": (FETCH, SPEC_WITH_KEY.replace(b"KEY", SURROGATE)),
    "search": ("/v1/search/compatible", SPEC_WITH_KEY.replace(b"KEY", SURROGATE)),
    "token": ("/v1/tokens", b'{"name": ' + SURROGATE + b', "scopes": ["read:*"]}'),
    "model name": ("/v1/models", b'{"namespace": "sur", "name": ' + SURROGATE + b"}"),
    "model description": (
        "/v1/models",
        b'{"namespace": "sur", "name": "m", "description": "x' + SURROGATE[1:] + b"}",
    ),
    "raw UTF-8 surrogate": ("/v1/models", b'{"namespace": "sur", "name": "\xed\xa0\x80"}'),
}


@pytest.mark.parametrize("case", list(SURROGATE_BODIES))
def test_a_lone_surrogate_is_a_422_rendered_on_a_connection_that_stays_open(
    world: World, case: str
) -> None:
    path, body = SURROGATE_BODIES[case]
    before = world.state()
    with httpx.Client(base_url=world.server.url, headers=world.root.headers, timeout=60) as client:
        response = json_post(client, path, body)
        refused(response, 422, "invalid_request")
        assert response.headers.get("connection") != "close"
        again = client.post(PLAN, json={"target": spec_of_checkpoint()})  # same connection
        assert again.status_code == 200, again.text
    assert world.state() == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", f"/v1/models/{BASE}/aliases/prod", {"version": 2**63}),
        ("POST", "/v1/admin/gc", {"dry_run": True, "grace_s": 2**63}),
        ("GET", f"/v1/models?offset={2**63}", None),
        ("POST", PLAN, {"target": {"tensors": [{"key": "w", "shape": [2**64], "dtype": "F32"}]}}),
    ],
)
def test_integers_past_64_bits_are_a_422(
    world: World, method: str, path: str, body: dict[str, Any] | None
) -> None:
    before = world.state()
    response = world.root.request(method, path, json=body)
    assert response.status_code == 422, response.text
    assert response.headers["x-error-code"] in ("invalid_request", "invalid_spec")
    assert world.state() == before


def test_a_client_that_drops_an_upload_mid_body_is_a_disconnect_not_a_500(world: World) -> None:
    url = urlsplit(world.server.url)
    before_metrics, before_state = scrape(world.server.url), world.state()
    log_start = len(world.server.output(limit=None))
    head = (
        "POST /v1/models/drop/cut/versions HTTP/1.1\r\n"
        f"Host: {url.netloc}\r\n"
        f"Authorization: Bearer {ROOT_TOKEN}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {64 * MiB}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head.encode() + b"\x00" * MiB)

    def answered(status: str) -> float:
        samples = scrape(world.server.url)
        return delta(
            before_metrics,
            samples,
            "statehub_http_requests_total",
            method="POST",
            route=UPLOAD_ROUTE,
            status=status,
        )

    deadline = time.monotonic() + 30
    while answered("499") == 0:  # the request is recorded once the server has given up
        assert time.monotonic() < deadline, world.server.output()
        time.sleep(0.1)
    assert (answered("499"), answered("500"), answered("503")) == (1, 0, 0)
    log = world.server.output(limit=None)[log_start:]
    assert "client disconnected before its request body was complete" in log, log
    assert "Traceback" not in log and "unhandled error" not in log, log
    assert world.state() == before_state
