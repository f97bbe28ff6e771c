"""The web UI under hostile input (issue 17 items 6 and 10), on real server processes.

- NUL characters in the models page's filters (and the other pages' text parameters) are a
  422 ``invalid_request`` page on both backends, never a 500 from PostgreSQL.
- ``POST /ui/login`` needs an Origin of this site: a missing Origin, ``null`` and another
  site's are refused with 403 ``forbidden`` and no cookie.
- The snippets on a model page show the configured ``STATEHUB_PUBLIC_URL``, never the
  request's Host header.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import torch
from pydantic import ValidationError

from service.settings import Settings
from statehub import Client
from tests._server import ServerProcess, start_server

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

PUBLIC_URL = "https://statehub.example.org"


def expect_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["x-error-code"] == code
    assert "text/html" in response.headers["content-type"]


@pytest.fixture(scope="module")
def pushed(server: ServerProcess) -> tuple[ServerProcess, str]:
    ns = f"uh{uuid.uuid4().hex[:8]}"
    with Client(server.url, retries=1) as hub:
        hub.push(f"{ns}/net", {"w": torch.zeros(2)})
    return server, ns


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/ui", {"q": "\x00"}),
        ("/ui", {"namespace": "\x00"}),
        ("/ui", {"tag": "a\x00b"}),
        ("/ui", {"q": "net\x00", "namespace": "x"}),
    ],
)
def test_nul_in_model_filters_is_422(
    pushed: tuple[ServerProcess, str], path: str, params: dict[str, str]
) -> None:
    server, _ = pushed
    expect_error(httpx.get(server.url + path, params=params, timeout=30), 422, "invalid_request")
    # The server is fine afterwards (a PostgreSQL error would also have broken nothing
    # here, but a 500 above would already have failed).
    assert httpx.get(f"{server.url}/ui", timeout=30).status_code == 200


def test_nul_elsewhere_in_the_ui_is_a_4xx(pushed: tuple[ServerProcess, str]) -> None:
    server, ns = pushed
    version = f"/ui/models/{ns}/net/versions/1"
    for path, params in [
        (version, {"q": "\x00"}),
        (f"{version}/plan", {"target": "\x00"}),
        (f"{version}/plan", {"target": f"{ns}/net\x00:1"}),
        ("/ui/diff", {"a": f"{ns}/net:1", "b": "x\x00/y:1"}),
        (f"/ui/models/{ns}/net%00", {}),
    ]:
        answer = httpx.get(server.url + path, params=params, timeout=30)
        assert 400 <= answer.status_code < 500 or answer.status_code == 200, (path, answer.text)
        assert answer.status_code != 500


def test_nul_in_api_list_filters_finds_nothing_or_is_refused(
    pushed: tuple[ServerProcess, str],
) -> None:
    """The repository query the UI and the API share returns nothing for a NUL filter."""
    server, _ = pushed
    for params in ({"q": "\x00"}, {"namespace": "\x00"}, {"tag": "\x00"}):
        answer = httpx.get(f"{server.url}/v1/models", params=params, timeout=30)
        assert answer.status_code in (200, 400, 422), answer.text
        if answer.status_code == 200:
            assert answer.json()["items"] == [] and answer.json()["total"] == 0


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    server = start_server(
        {
            "STATEHUB_DATA_DIR": str(tmp_path_factory.mktemp("ui-public")),
            "STATEHUB_PUBLIC_URL": PUBLIC_URL + "/",
        }
    )
    ns = f"uh{uuid.uuid4().hex[:8]}"
    try:
        with Client(server.url, retries=1) as hub:
            hub.push(f"{ns}/net", {"w": torch.zeros(2)})
        yield server, ns
    finally:
        server.stop()


def test_snippets_show_the_public_url_not_the_host_header(
    public: tuple[ServerProcess, str],
) -> None:
    server, ns = public
    page = httpx.get(
        f"{server.url}/ui/models/{ns}/net", headers={"Host": "evil.example:666"}, timeout=30
    )
    assert page.status_code == 200, page.text
    assert "evil.example" not in page.text
    assert f"STATEHUB_URL={PUBLIC_URL}" in page.text


def test_snippets_default_to_the_listen_address(pushed: tuple[ServerProcess, str]) -> None:
    server, ns = pushed
    page = httpx.get(
        f"{server.url}/ui/models/{ns}/net", headers={"Host": "evil.example:666"}, timeout=30
    )
    assert page.status_code == 200
    assert "evil.example" not in page.text
    assert f"STATEHUB_URL={server.url}" in page.text  # http://127.0.0.1:<port>


def login(server: ServerProcess, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/ui/login",
        data={"token": "shb_some-pasted-token-1", "action": "keep"},
        headers=headers,
        timeout=30,
    )


def test_login_needs_an_origin_of_this_site(public: tuple[ServerProcess, str]) -> None:
    server, _ = public
    for headers in (
        {},  # no Origin at all
        {"Origin": "null"},
        {"Origin": "https://evil.example"},
        {"Origin": "file://"},
        {"Origin": server.url.replace("127.0.0.1", "localhost")},  # another origin
        {"Origin": PUBLIC_URL + ":444"},
    ):
        refused = login(server, headers)
        expect_error(refused, 403, "forbidden")
        assert "set-cookie" not in refused.headers, headers
    for origin in (server.url, PUBLIC_URL):  # the origin addressed, or the public one
        kept = login(server, {"Origin": origin})
        assert kept.status_code == 303, (origin, kept.text)
        assert "statehub_token=shb_some-pasted-token-1" in kept.headers["set-cookie"]
        assert "secure" in kept.headers["set-cookie"].lower()  # the public URL is https


def test_the_public_url_setting_is_an_http_url() -> None:
    assert Settings(public_url="https://hub.example/prefix/").public_url == (
        "https://hub.example/prefix"
    )
    assert Settings(host="0.0.0.0", port=9000).effective_public_url == "http://localhost:9000"
    assert Settings(host="::1", port=9000).effective_public_url == "http://[::1]:9000"
    for bad in ("javascript:alert(1)", "hub.example", "https://hub.example/?q=1", "ftp://h/"):
        with pytest.raises(ValidationError, match="STATEHUB_PUBLIC_URL"):
            Settings(public_url=bad)
