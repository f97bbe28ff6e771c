"""Metrics, request ids and structured logs, against real servers.

Metric tests read ``/metrics`` before and after what they do and assert the exact
difference; the servers are shared by the session, but tests run one at a time.
"""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy.engine import make_url

from service import metrics
from service.observability import JsonFormatter, Redactor, TextFormatter, settings_secrets
from service.settings import Settings
from service.storage.blobs import open_blob_store
from statehub import Client, spec_of
from tests._metrics import delta, parse, scrape, value
from tests._server import ServerProcess, pg_url
from tests._services import MotoServer
from tests.conftest import postgres_s3_server

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

MODEL_ROUTE = "/v1/models/{namespace}/{name}"
FETCH_ROUTE = "/v1/models/{namespace}/{name}/versions/{ref}/fetch"
REQUESTS = "statehub_http_requests_total"
LATENCY = "statehub_http_request_duration_seconds"


def random_state_dict(seed: int, n: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(16, 8, generator=generator) for i in range(n)}


# -- request ids --------------------------------------------------------------------------


def test_request_id_is_echoed_when_sent_and_generated_when_not(
    server: ServerProcess, ns: str
) -> None:
    sent = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "deploy-42"})
    assert sent.headers["x-request-id"] == "deploy-42"

    generated = [httpx.get(f"{server.url}/healthz").headers["x-request-id"] for _ in range(2)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in generated)
    assert generated[0] != generated[1]

    too_long = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", too_long.headers["x-request-id"])

    # Errors, mapped centrally or by the router, carry the same id.
    missing = httpx.get(f"{server.url}/v1/models/{ns}/nothing", headers={"X-Request-ID": "e-1"})
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] == "e-1"
    assert missing.headers["x-error-code"] == "not_found"
    unrouted = httpx.get(f"{server.url}/no/such/path", headers={"X-Request-ID": "e-2"})
    assert (unrouted.status_code, unrouted.headers["x-request-id"]) == (404, "e-2")
    invalid = httpx.post(
        f"{server.url}/v1/models/{ns}/x/versions/1/plan",
        json={"target": "nonsense"},
        headers={"X-Request-ID": "e-3"},
    )
    assert (invalid.status_code, invalid.headers["x-request-id"]) == (422, "e-3")


# -- metrics ------------------------------------------------------------------------------


def test_metrics_are_prometheus_text(server: ServerProcess) -> None:
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    parse(text)  # every sample line is well formed
    for name, kind in [
        (REQUESTS, "counter"),
        (LATENCY, "histogram"),
        ("statehub_http_requests_in_flight", "gauge"),
        ("statehub_push_bytes_total", "counter"),
        ("statehub_fetch_bytes_total", "counter"),
        ("statehub_plan_verdicts_total", "counter"),
        ("statehub_storage_errors_total", "counter"),
        ("statehub_fetches_in_flight", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}\n" in text


def test_request_counts_and_latency_histogram_grow_by_what_was_done(
    server: ServerProcess, ns: str
) -> None:
    before = scrape(server.url)
    for _ in range(3):
        assert httpx.get(f"{server.url}/v1/models/{ns}/missing").status_code == 404
    for _ in range(2):
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/not/a/route/{ns}").status_code == 404
    after = scrape(server.url)

    def requests(method: str, route: str, status: str) -> float:
        return delta(before, after, REQUESTS, method=method, route=route, status=status)

    assert requests("GET", MODEL_ROUTE, "404") == 3
    assert requests("GET", "/healthz", "200") == 2
    assert requests("GET", "<unmatched>", "404") == 1  # raw paths never become labels
    assert requests("GET", "/metrics", "200") == 1  # the first scrape, once it was sent
    assert not any(f"/{ns}" in dict(labels).get("route", "") for _, labels in after)

    labels = {"method": "GET", "route": MODEL_ROUTE, "status": "404"}
    assert delta(before, after, f"{LATENCY}_count", **labels) == 3
    assert 0 < delta(before, after, f"{LATENCY}_sum", **labels) < 60
    bounds = [*(str(b) for b in metrics.LATENCY_BUCKETS), "+Inf"]
    cumulative = [value(after, f"{LATENCY}_bucket", **labels, le=b) for b in bounds]
    assert cumulative == sorted(cumulative), "buckets are cumulative"
    assert cumulative[-1] == value(after, f"{LATENCY}_count", **labels)
    assert value(after, "statehub_http_requests_in_flight") == 1  # the scrape itself


def test_bytes_verdicts_and_fetch_modes_are_counted(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    source = random_state_dict(1)
    path = tmp_path / "ckpt.safetensors"
    save_file(source, path)
    target = spec_of({k: v.half() for k, v in source.items()})  # fp16: an adapted fit

    before = scrape(server.url)
    hub.push(f"{ns}/counted", path)
    plan = hub.plan(f"{ns}/counted", target=target)
    fetched = httpx.post(
        f"{server.url}/v1/models/{ns}/counted/versions/latest/fetch",
        json={"target": target},
        timeout=60,
    )
    after = scrape(server.url)

    assert fetched.status_code == 200, fetched.text
    assert delta(before, after, "statehub_push_bytes_total") == path.stat().st_size
    assert delta(before, after, "statehub_fetch_bytes_total") == len(fetched.content)
    # One plan answered, one made for the fetch.
    assert delta(before, after, "statehub_plan_verdicts_total", verdict=plan.verdict) == 2
    mode = fetched.headers["x-statehub-fetch-mode"]
    assert mode == "transform"
    assert delta(before, after, "statehub_fetches_total", mode=mode) == 1
    assert delta(before, after, "statehub_fetch_tensors_decoded_total") == len(source)
    assert value(after, "statehub_fetches_in_flight") == 0
    fetch_200 = {"method": "POST", "route": FETCH_ROUTE, "status": "200"}
    assert delta(before, after, REQUESTS, **fetch_200) == 1


def test_storage_errors_are_counted(hub: Client, server: ServerProcess, ns: str) -> None:
    version = hub.push(f"{ns}/lost", random_state_dict(2))
    open_blob_store(server.settings).delete(version.digest)  # the store lost the blob

    before = scrape(server.url)
    response = httpx.post(
        f"{server.url}/v1/models/{ns}/lost/versions/1/fetch",
        json={"target": spec_of(random_state_dict(2))},
        timeout=60,
    )
    after = scrape(server.url)

    assert response.status_code == 500
    assert response.headers["x-error-code"] == "storage_error"
    assert delta(before, after, "statehub_storage_errors_total", code="storage_error") == 1
    fetch_500 = {"method": "POST", "route": FETCH_ROUTE, "status": "500"}
    assert delta(before, after, REQUESTS, **fetch_500) == 1


# -- logs ---------------------------------------------------------------------------------

S3_SECRET = f"s3-secret-{uuid.uuid4().hex}"
BEARER = f"shk_{uuid.uuid4().hex}{uuid.uuid4().hex}"
QUERY_TOKEN = f"qtok-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def logged_server(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """PostgreSQL + S3 with a secret of its own, logging at debug level (botocore included)."""
    env = {"STATEHUB_S3_SECRET_ACCESS_KEY": S3_SECRET, "STATEHUB_LOG_FORMAT": "json"}
    data_dir = str(tmp_path_factory.mktemp("logged"))
    with postgres_s3_server(moto_server, data_dir, env, log_level="debug") as server:
        yield server


@pytest.fixture(scope="module")
def log_lines(logged_server: ServerProcess) -> list[dict[str, object]]:
    """Drive the server with credentials in every place a careless log would copy them,
    stop it, and return its whole output as parsed JSON lines."""
    url, ns = logged_server.url, f"t{uuid.uuid4().hex[:10]}"
    with Client(url, retries=1) as hub:  # no token: this server has none configured
        hub.push(f"{ns}/net", random_state_dict(3))
    secret_headers = {"Authorization": f"Bearer {BEARER}", "X-Request-ID": "logs-1"}
    httpx.get(f"{url}/v1/models/{ns}/net", headers=secret_headers)
    httpx.get(f"{url}/v1/models?token={QUERY_TOKEN}&q=x", headers={"X-Request-ID": "logs-2"})
    fetched = httpx.post(
        f"{url}/v1/models/{ns}/net/versions/1/fetch?access_token={QUERY_TOKEN}",
        json={"target": spec_of({k: v.half() for k, v in random_state_dict(3).items()})},
        headers={"X-Request-ID": "logs-3"},
        timeout=60,
    )
    assert fetched.status_code == 200, fetched.text
    logged_server.process.terminate()  # flushes and ends the log; the fixture closes it
    logged_server.process.wait(timeout=30)
    output = logged_server.output(limit=None)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) > 20, output
    parsed = []
    for line in lines:
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        parsed.append(entry)
    return parsed


def test_logs_are_json_lines_with_request_ids(log_lines: list[dict[str, object]]) -> None:
    for entry in log_lines:
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    access = {e["request_id"]: e for e in log_lines if e["logger"] == "statehub.access"}
    assert access["logs-1"]["route"] == MODEL_ROUTE
    assert access["logs-1"]["status"] in (200, 401)  # 401 once tokens are enforced
    fetch = access["logs-3"]
    assert (fetch["method"], fetch["route"], fetch["status"]) == ("POST", FETCH_ROUTE, 200)
    assert isinstance(fetch["duration_ms"], float) and fetch["bytes"] > 0
    assert "?" not in str(access["logs-2"]["path"])  # query strings are never logged
    # The id reaches records written in the thread pool: the route's and the S3 reads'.
    inner = {str(e["logger"]) for e in log_lines if e.get("request_id") == "logs-3"}
    assert "service.fitting" in inner
    assert any(name.startswith("botocore") for name in inner)


def test_no_secret_reaches_the_logs(log_lines: list[dict[str, object]]) -> None:
    text = "\n".join(json.dumps(e) for e in log_lines)
    secrets = [S3_SECRET, BEARER, QUERY_TOKEN]
    password = make_url(pg_url()).password
    if password:
        secrets.append(password)
    for secret in secrets:
        assert secret not in text
    assert "S3BlobStore(" in text  # the start-up line describing the stores was written


def test_redactor_removes_credentials_wherever_they_appear() -> None:
    redact = Redactor(["hunter2-and-more"])
    cases = {
        "Authorization: Bearer abc.def-ghi": "abc.def-ghi",
        "{'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIA/x, Signature=f00d'}": "f00d",
        "headers={'authorization': 'Basic dXNlcjpwYXNz'}": "dXNlcjpwYXNz",
        "token bearer   eyJhbGciOi.eyJzdWIi.c2ln": "eyJhbGciOi",
        "GET /v1/models?q=x&token=t0k3n&limit=3": "t0k3n",
        "https://s3/b/k?X-Amz-Signature=5ign&X-Amz-Credential=AKIA%2F": "5ign",
        '{"secret_access_key": "wJalrXUtnFEMI"}': "wJalrXUtnFEMI",
        "postgresql+psycopg://statehub:pgpass@db:5432/statehub": "pgpass",
        "password=pw123 host=db": "pw123",
        "the configured value hunter2-and-more leaked": "hunter2-and-more",
    }
    for text, secret in cases.items():
        cleaned = redact(text)
        assert secret not in cleaned, cleaned
        assert "[REDACTED]" in cleaned
    assert redact("GET /v1/models/vision/resnet 200 max_tokens=5") == (
        "GET /v1/models/vision/resnet 200 max_tokens=5"
    )


def test_formatters_redact_messages_arguments_extras_and_tracebacks() -> None:
    settings = Settings(
        s3_endpoint="http://minio:9000",
        s3_bucket="b",
        s3_secret_access_key="minio-secret-value",
        database_url="postgresql+psycopg://u:db-password-1@db/statehub",
    )
    secrets = settings_secrets(settings)
    assert {"minio-secret-value", "db-password-1"} <= set(secrets)
    redact = Redactor(secrets)
    logger = logging.getLogger("statehub.test-redaction")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(redact))
    logger.addHandler(handler)
    try:
        logger.warning("key %s", "minio-secret-value", extra={"header": "Bearer abcdef123"})
        try:
            raise RuntimeError("connect failed for postgresql://u:db-password-1@db/statehub")
        except RuntimeError:
            logger.exception("database down")
        handler.setFormatter(TextFormatter(redact))
        logger.warning("text: %s", "minio-secret-value")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    for secret in ("minio-secret-value", "db-password-1", "abcdef123"):
        assert secret not in output
    first = json.loads(output.splitlines()[0])
    assert first["msg"] == "key [REDACTED]" and first["header"] == "Bearer [REDACTED]"
