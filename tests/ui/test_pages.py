"""The web UI end to end: a real server on each backend with pushed checkpoints, pages read
as HTML over HTTP, and the same pages used in a real headless Chromium (clicks, forms,
computed colours, no script injected by a hostile tensor key)."""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from statehub import Client, spec_of
from tests._models import TinyResNet
from tests._server import ServerProcess, start_server
from tests.ui.conftest import Tab

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

XSS_KEY = "<script>alert(1)</script>"
XSS_ATTR = '"><img src=x onerror=alert(2)>'
BIG_TENSORS = 10_000
ROOT_TOKEN = "shb_ui-root-" + "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6"


@dataclass(frozen=True)
class Registry:
    url: str
    ns: str

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def reg(server: ServerProcess) -> Registry:
    """Checkpoints of a namespace of this module's own, pushed once per backend."""
    ns = f"ui{uuid.uuid4().hex[:8]}"
    httpx.post(
        f"{server.url}/v1/models",
        json={
            "namespace": ns,
            "name": "resnet",
            "description": f"a tiny ResNet {XSS_KEY}",
            "tags": ["vision", "demo"],
        },
        timeout=30,
    ).raise_for_status()
    with Client(server.url, retries=1) as hub:
        torch.manual_seed(0)
        model = TinyResNet()
        hub.push(f"{ns}/resnet", model, alias="prod", metadata={"top1": 0.71, "note": XSS_ATTR})
        hub.push(f"{ns}/resnet", TinyResNet(num_classes=5))
        wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel
        hub.push(f"{ns}/wrapped", wrapped)
        big = {f"blocks.{i // 10}.p{i % 10}": torch.zeros(1) for i in range(BIG_TENSORS)}
        hub.push(f"{ns}/big", big)
        hub.push(f"{ns}/hostile", {XSS_KEY: torch.zeros(2), XSS_ATTR: torch.ones(3)})
    return Registry(server.url, ns)


def target_spec() -> dict[str, Any]:
    """A 1-channel, 5-class ResNet with one conv reshaped and one new tensor: every kind of
    row the plan table shows (exact, adapted, kept from target, mismatch)."""
    spec = spec_of(TinyResNet(in_chans=1, num_classes=5))
    for t in spec["tensors"]:
        if t["key"] == "layer1.0.conv2.weight":
            t["shape"] = [8, 8, 5, 5]
    spec["tensors"].append({"key": "extra.scale", "shape": [4], "dtype": "F32"})
    return spec


def text(page: str) -> str:
    """The visible text of an HTML page, unescaped, whitespace collapsed."""
    body = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", page, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def row_kinds(page: str) -> dict[str, str]:
    """target key -> kind, from the plan table's rows."""
    rows = re.findall(r'<tr class="row-(\w+)" data-target="([^"]*)"', page)
    return {html.unescape(key): kind for kind, key in rows}


def error_page(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-error-code"] == code
    assert code in text(response.text)
    return text(response.text)


# -- HTML over HTTP, both backends ------------------------------------------------------


def test_models_page_lists_searches_and_filters(reg: Registry) -> None:
    page = reg.get("/ui", params={"namespace": reg.ns})
    assert page.status_code == 200
    shown = text(page.text)
    assert "4 model(s) match" in shown
    row = re.search(r'<tr data-model="[^"]*/resnet">(.*?)</tr>', page.text, re.S)
    assert row is not None
    cells = text(row.group(1))
    assert "vision" in cells and "demo" in cells and "v2" in cells
    params = sum(t.numel() for t in TinyResNet(num_classes=5).state_dict().values())
    assert f"{params / 1000:.1f}K" in cells  # parameters of the latest (5-class) version
    assert "KiB" in cells
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", cells)

    found = text(reg.get("/ui", params={"namespace": reg.ns, "q": "wrap"}).text)
    assert "1 model(s) match" in found and "wrapped" in found and "hostile" not in found
    tagged = text(reg.get("/ui", params={"namespace": reg.ns, "tag": "demo"}).text)
    assert "1 model(s) match" in tagged and "resnet" in tagged


def test_model_page_versions_aliases_and_snippets(reg: Registry) -> None:
    page = reg.get(f"/ui/models/{reg.ns}/resnet")
    assert page.status_code == 200
    shown = text(page.text)
    versions = re.findall(r'<tr data-version="(\d+)">', page.text)
    assert versions == ["2", "1"]  # newest first
    v1 = text(re.search(r'<tr data-version="1">(.*?)</tr>', page.text, re.S).group(1))  # type: ignore[union-attr]
    assert "prod" in v1 and "F32 x" in v1 and "I64 x" in v1 and "safetensors" in v1
    assert f'hub.fetch("{reg.ns}/resnet@prod", target=my_model)' in shown
    assert f"statehub check {reg.ns}/resnet@prod" in shown
    assert f"STATEHUB_URL={reg.url}" in shown
    assert "diff v1" in shown


def test_version_page_summary_report_and_metadata(reg: Registry) -> None:
    page = reg.get(f"/ui/models/{reg.ns}/resnet/versions/prod")
    assert page.status_code == 200
    shown = text(page.text)
    assert f"{reg.ns}/resnet:1" in shown
    assert "Ingestion report" in shown and '"source_format": "safetensors"' in shown
    assert '"top1": 0.71' in shown and XSS_ATTR.replace('"', '\\"') in shown
    groups = re.findall(r'data-prefix="([^"]+)"', page.text)
    assert groups == ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "fc"]
    assert "fc.weight" in shown and "[10, 16]" in shown


def test_version_page_pages_a_10000_tensor_spec(reg: Registry) -> None:
    first = reg.get(f"/ui/models/{reg.ns}/big/versions/1")
    shown = text(first.text)
    assert "10,000 tensors" in shown and "page 1 of 20" in shown
    assert first.text.count("<tr><td") == 500  # one page of rows, not 10,000
    second = text(reg.get(f"/ui/models/{reg.ns}/big/versions/1", params={"page": 2}).text)
    assert "page 2 of 20" in second and "tensors 501\u20131,000" in second
    assert "blocks.50.p0" in second and "blocks.49.p9" not in second
    found = reg.get(f"/ui/models/{reg.ns}/big/versions/1", params={"q": "blocks.999."})
    assert "10 match" in text(found.text) and found.text.count("<tr><td") == 10


def test_plan_of_a_posted_spec(reg: Registry) -> None:
    response = httpx.post(
        f"{reg.url}/ui/models/{reg.ns}/resnet/versions/1/plan",
        files={"spec_file": ("model.json", json.dumps(target_spec()), "application/json")},
        data={"spec_json": "", "head": "keep"},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:2000]
    kinds = row_kinds(response.text)
    assert kinds["conv1.weight"] == "adapted"
    assert kinds["bn1.weight"] == "exact"
    assert kinds["fc.weight"] == kinds["fc.bias"] == kinds["extra.scale"] == "kept"
    assert kinds["layer1.0.conv2.weight"] == "mismatch"
    shown = text(response.text)
    assert 'data-verdict="partial"' in response.text
    assert "model.json" in shown and "adapt_in_channels" in shown
    assert "3 unused checkpoint key(s)" in shown  # the 10-class head, the reshaped conv


def test_plan_onto_a_stored_version_of_another_model(reg: Registry) -> None:
    page = reg.get(
        f"/ui/models/{reg.ns}/wrapped/versions/1/plan", params={"target": f"{reg.ns}/resnet:1"}
    )
    assert page.status_code == 200
    kinds = row_kinds(page.text)
    assert set(kinds.values()) == {"renamed"}
    assert 'data-verdict="adapted"' in page.text
    assert "module.conv1.weight" in text(page.text)


def test_diff_of_two_versions(reg: Registry) -> None:
    page = reg.get("/ui/diff", params={"a": f"{reg.ns}/resnet:1", "b": f"{reg.ns}/resnet:2"})
    assert page.status_code == 200
    shown = text(page.text)
    assert "Reshaped (2)" in shown and "[10, 16] F32 → [5, 16] F32" in shown
    assert "0 only in A" in shown and "0 only in B" in shown
    assert row_kinds(page.text)["fc.weight"] == "kept"
    assert 'data-verdict="partial"' in page.text


def test_user_mistakes_are_readable_pages_with_stable_codes(reg: Registry) -> None:
    missing = error_page(reg.get(f"/ui/models/{reg.ns}/nope"), 404, "not_found")
    assert f"model {reg.ns}/nope does not exist" in missing
    error_page(reg.get(f"/ui/models/{reg.ns}/resnet/versions/9"), 404, "not_found")
    error_page(reg.get(f"/ui/models/{reg.ns}/resnet/versions/bad%20ref"), 422, "invalid_ref")
    named = error_page(reg.get("/ui/models/x/%3Cscript%3E"), 422, "invalid_name")
    assert "<script>" in named  # shown as text: the raw page holds it escaped
    error_page(reg.get("/ui/no/such/page"), 404, "not_found")
    error_page(reg.get("/ui", params={"page": "two"}), 422, "invalid_request")
    unknown_b = {"a": f"{reg.ns}/resnet:1", "b": "x/y:1"}
    error_page(reg.get("/ui/diff", params=unknown_b), 404, "not_found")
    bad = httpx.post(
        f"{reg.url}/ui/models/{reg.ns}/resnet/versions/1/plan",
        data={"spec_json": '{"tensors": [{"key": "a"}]}'},
        timeout=30,
    )
    shown = error_page(bad, 422, "invalid_spec")
    assert "statehub inspect --spec" in shown and "Plan onto this spec" in shown  # the form


def test_hostile_names_are_escaped_and_script_is_refused(reg: Registry) -> None:
    page = reg.get(f"/ui/models/{reg.ns}/hostile/versions/1", params={"q": "<"})
    assert XSS_KEY not in page.text and "<img src=x" not in page.text
    assert html.escape(XSS_KEY) in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    model = reg.get(f"/ui/models/{reg.ns}/resnet")
    assert XSS_KEY not in model.text and html.escape(XSS_KEY) in model.text


def test_login_keeps_the_token_in_a_strict_httponly_cookie(reg: Registry) -> None:
    # Origin as a browser sends it with a form POST (a login without one is refused).
    with httpx.Client(base_url=reg.url, headers={"Origin": reg.url}, timeout=30) as browser:
        kept = browser.post("/ui/login", data={"token": "shb_pasted-token-123", "action": "keep"})
        assert kept.status_code == 303
        cookie = kept.headers["set-cookie"]
        assert "statehub_token=shb_pasted-token-123" in cookie
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/ui"):
            assert attribute.lower() in cookie.lower()
        assert "shb_past…" in text(browser.get("/ui/login").text)  # sent back as the bearer
        forgot = browser.post("/ui/login", data={"action": "forget"})
        assert 'statehub_token=""' in forgot.headers["set-cookie"]
    cross = httpx.post(
        f"{reg.url}/ui/login",
        data={"token": "shb_x"},
        headers={"Origin": "https://evil.example"},
        timeout=30,
    )
    error_page(cross, 403, "forbidden")


# -- tokens enforced (one backend: the plumbing, not the storage) -----------------------


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A server that requires tokens, with one model and a reader of its namespace."""
    data = tmp_path_factory.mktemp("ui-closed")
    server = start_server({"STATEHUB_DATA_DIR": str(data), "STATEHUB_BOOTSTRAP_TOKEN": ROOT_TOKEN})
    try:
        with Client(server.url, token=ROOT_TOKEN, retries=1) as hub:
            hub.push("team/net", {"w": torch.zeros(2)})
            hub.push("other/net", {"w": torch.zeros(2)})
        yield Registry(server.url, "team")
    finally:
        server.stop()


def test_pages_are_read_with_the_cookie_token(closed: Registry) -> None:
    error_page(closed.get("/ui/models/team/net"), 401, "unauthorized")
    reader = httpx.post(
        f"{closed.url}/v1/tokens",
        json={"name": "ui-reader", "scopes": ["read:team/*"]},
        headers={"Authorization": f"Bearer {ROOT_TOKEN}"},
        timeout=30,
    ).json()["token"]
    with httpx.Client(base_url=closed.url, headers={"Origin": closed.url}, timeout=30) as browser:
        browser.post("/ui/login", data={"token": reader, "action": "keep"})
        assert browser.get("/ui/models/team/net").status_code == 200
        listed = text(browser.get("/ui").text)
        assert "team" in listed and "other" not in listed  # what it cannot read is left out
        error_page(browser.get("/ui/models/other/net"), 404, "not_found")  # reads hide
        assert "read as ui-reader" in text(browser.get("/ui/login").text)
        browser.post("/ui/login", data={"token": "shb_revoked-or-made-up", "action": "keep"})
        error_page(browser.get("/ui/models/team/net"), 401, "unauthorized")
        assert "unknown token" in text(browser.get("/ui/login").text)  # still reachable


# -- in a real browser ------------------------------------------------------------------


def test_browse_from_the_list_to_a_version(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui?namespace={reg.ns}")
    assert page.locator("table.models tbody tr").count() == 4
    tab.screenshot("models")
    page.get_by_role("link", name="resnet", exact=True).click()
    assert page.locator("h1").inner_text() == f"{reg.ns}/resnet"
    assert page.locator("tr[data-version] .alias", has_text="prod").count() == 1
    tab.screenshot("model")
    page.get_by_role("link", name="v1", exact=True).click()
    assert page.locator("h1").inner_text().startswith(f"{reg.ns}/resnet:1")
    tab.screenshot("version")


def test_groups_open_on_click_and_page_two_of_10000(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui/models/{reg.ns}/big/versions/1")
    group = page.locator('details.group[data-prefix="blocks.0"]')
    row = group.locator("td.key", has_text="blocks.0.p3")
    assert group.get_attribute("open") is None and not row.is_visible()
    group.locator("summary").click()
    assert group.get_attribute("open") is not None and row.is_visible()
    page.get_by_role("button", name="expand all").click()
    assert page.locator("details.group:not([open])").count() == 0
    page.locator("a[rel=next]").first.click()
    assert "page 2 of 20" in page.locator(".pager .where").first.inner_text()
    first = page.locator("details.group").first
    assert first.get_attribute("data-prefix") == "blocks.50"
    first.locator("summary").click()
    assert first.locator("tr").nth(1).locator("td").first.inner_text() == "501"
    tab.screenshot("version-page-2")


def test_plan_of_a_pasted_spec_in_the_browser(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui/models/{reg.ns}/resnet/versions/1/plan")
    form = page.locator("#spec-form")
    form.locator("textarea[name=spec_json]").fill(json.dumps(target_spec()))
    form.get_by_role("button", name="Plan onto this spec").click()
    assert page.locator(".verdict").inner_text().lower() == "partial"
    adapted = page.locator('tr[data-target="conv1.weight"]')
    assert adapted.get_attribute("class") == "row-adapted"
    assert "adapt_in_channels" in adapted.inner_text()
    colours = {
        key: page.locator(f'tr[data-target="{key}"]').evaluate(
            "el => getComputedStyle(el).backgroundColor"
        )
        for key in ("bn1.weight", "conv1.weight", "fc.weight", "layer1.0.conv2.weight")
    }
    assert colours == {
        "bn1.weight": "rgb(227, 244, 231)",  # exact
        "conv1.weight": "rgb(255, 243, 214)",  # adapted
        "fc.weight": "rgb(238, 239, 241)",  # kept from target
        "layer1.0.conv2.weight": "rgb(253, 228, 225)",  # mismatch
    }
    kept = page.locator('tr[data-target="fc.weight"]')
    assert "kept from target" in kept.inner_text()
    mismatch = page.locator('tr[data-target="layer1.0.conv2.weight"]')
    assert "layer1.0.conv2.weight" in mismatch.locator("td.source").inner_text()
    coverage = page.locator(".coverage").first.inner_text()
    assert "of parameters loaded" in coverage and "exact" in coverage
    assert page.locator(".unused summary").inner_text() == "3 unused checkpoint key(s)"
    assert "spec_json" not in page.url  # posted, not put in the address
    tab.screenshot("plan")


def test_plan_onto_a_stored_version_in_the_browser(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui/models/{reg.ns}/wrapped/versions/1/plan")
    form = page.locator("#stored-form")
    form.locator("input[name=target]").fill(f"{reg.ns}/resnet:1")
    form.get_by_role("button", name="Plan onto this version").click()
    assert page.locator(".verdict").inner_text().lower() == "adapted"
    row = page.locator('tr[data-target="layer2.0.downsample.0.weight"]')
    assert row.get_attribute("class") == "row-renamed"
    assert row.locator("td.source").inner_text() == "module.layer2.0.downsample.0.weight"
    tab.screenshot("plan-stored")


def test_hostile_keys_render_as_text_in_the_browser(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui/models/{reg.ns}/hostile/versions/1")
    assert page.locator("details.group[open]").count() == 1  # a lone group starts open
    keys = page.locator("td.key").all_inner_texts()
    assert sorted(keys) == sorted([XSS_KEY, XSS_ATTR])
    assert page.locator("img").count() == 0
    hostile = {"tensors": [{"key": XSS_KEY, "shape": [2], "dtype": "F32"}], "tie_groups": []}
    page.goto(f"{reg.url}/ui/models/{reg.ns}/hostile/versions/1/plan")
    page.locator("textarea[name=spec_json]").fill(json.dumps(hostile))
    page.get_by_role("button", name="Plan onto this spec").click()
    assert page.locator(f'tr[data-target="{XSS_KEY}"] td.key').first.inner_text() == XSS_KEY
    tab.screenshot("hostile")  # the tab fixture fails the test if any dialog opened


def test_login_form_in_the_browser(reg: Registry, tab: Tab) -> None:
    page = tab.page
    page.goto(f"{reg.url}/ui/login")
    page.locator("input[name=token]").fill("shb_browser-token-42")
    page.get_by_role("button", name="Keep this token").click()
    assert "shb_brow…" in page.locator(".status").inner_text()
    cookie = next(c for c in page.context.cookies() if c["name"] == "statehub_token")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert page.evaluate("document.cookie") == ""  # scripts cannot read it
    page.get_by_role("button", name="Forget the token").click()
    assert "No token" in page.locator(".status").inner_text()
