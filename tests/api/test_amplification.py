"""Amplification on a real server, both backends (issue 17 items 1, 3 and 8).

A small request must not make the server build, send or keep far more than what is stored:
an upload whose pickle inflates (item 1), a target that chooses huge fills (item 3), an
adapter named by a reader that grows keys or matches every key with every rule (item 8).
Each case asserts the status and stable code, that nothing was committed or cached, and a
bound measured on the server process (RSS, bytes, seconds) that the old code crossed.
"""

from __future__ import annotations

import io
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load as st_load

from statehub import Client
from tests._metrics import delta, scrape
from tests._server import ServerProcess

MiB = 1024 * 1024
FIT_CACHE = "statehub_fit_cache_total"


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def state_dict(*, counter: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sd = {
        "conv.weight": torch.randn(16, 3, 3, 3, generator=generator),
        "bn1.weight": torch.ones(16),
        "bn1.bias": torch.zeros(16),
        "bn1.running_mean": torch.zeros(16),
        "bn1.running_var": torch.ones(16),
        "fc.weight": torch.randn(10, 16, generator=generator),
    }
    if counter:
        sd["bn1.num_batches_tracked"] = torch.tensor(3)
    return sd


def spec(sd: dict[str, torch.Tensor], **extra: tuple[list[int], str]) -> dict[str, Any]:
    codes = {torch.float32: "F32", torch.int64: "I64"}
    tensors = [{"key": k, "shape": list(v.shape), "dtype": codes[v.dtype]} for k, v in sd.items()]
    tensors += [{"key": k, "shape": shape, "dtype": dtype} for k, (shape, dtype) in extra.items()]
    return {"tensors": tensors}


def post(server: ServerProcess, ns: str, what: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/m/versions/latest/{what}", json=body, timeout=120
    )


def register(server: ServerProcess, rules: list[dict[str, Any]]) -> str:
    name = f"a{uuid.uuid4().hex[:10]}"
    response = httpx.post(f"{server.url}/v1/adapters", json={"name": name, "rules": rules})
    assert response.status_code == 201, response.text
    return name


def fill_rule(key: str, value: float, shape: list[int], dtype: str) -> dict[str, Any]:
    """An adapter rule that fills target keys matching ``key`` from nothing."""
    op = {"op": "fill", "value": value, "shape": shape, "dtype": dtype}
    return {"type": "op", "key": key, "op": op}


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert response.headers["x-error-code"] == body["code"] == code, body
    assert body["message"]
    return body


# -- item 3: a target chooses fills ----------------------------------------------------------


def test_a_huge_num_batches_tracked_is_not_filled(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # The issue's target: bn1.num_batches_tracked of 2^27 int64 (1 GiB) against a checkpoint
    # saved without it. The planner zero-filled it (RSS +1,034 MiB) and the fit cache kept
    # the 1 GiB body; now the model keeps its own and the body is the checkpoint's bytes.
    sd = state_dict(counter=False)
    hub.push(f"{ns}/m", sd)
    target = spec(sd, **{"bn1.num_batches_tracked": ([2**27], "I64")})
    plan = post(server, ns, "plan", {"target": target})
    assert plan.status_code == 200, plan.text
    entry = plan.json()["plan"]["entries"][-1]
    assert (entry["target"], entry["action"]) == ("bn1.num_batches_tracked", "keep_target")
    assert any("scalar" in w for w in plan.json()["plan"]["warnings"])

    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    fetched = post(server, ns, "fetch", {"target": target})
    growth = server.rss_peak_bytes() - baseline
    assert fetched.status_code == 200, fetched.text
    assert int(fetched.headers["content-length"]) < 256 * 1024  # was 1 GiB + the rest
    tensors = st_load(fetched.content)
    assert "bn1.num_batches_tracked" not in tensors
    assert torch.equal(tensors["conv.weight"], sd["conv.weight"])
    assert growth < 32 * MiB, f"server grew by {growth / MiB:.0f} MiB"


def test_a_scalar_counter_is_still_filled(hub: Client, server: ServerProcess, ns: str) -> None:
    sd = state_dict(counter=False)
    hub.push(f"{ns}/m", sd)
    fetched = post(
        server, ns, "fetch", {"target": spec(sd, **{"bn1.num_batches_tracked": ([], "I64")})}
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.headers["x-statehub-fetch-mode"] == "transform"
    assert torch.equal(st_load(fetched.content)["bn1.num_batches_tracked"], torch.tensor(0))


def test_two_thousand_huge_fills_are_refused_before_anything_is_sent(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # 2,000 target keys, each filled with 1 GiB by an adapter the reader names: the old
    # server announced Content-Length: 2,147,486,410,840. The body is bounded by the stored
    # version's size (8x + 64 MiB): 413 too_large before a byte is built.
    sd = state_dict(counter=True)
    hub.push(f"{ns}/m", sd)
    name = register(server, [fill_rule(r"extra\.\d+", 0, [2**27], "I64")])
    extra = {f"extra.{i}": ([2**27], "I64") for i in range(2000)}
    body = {"target": spec(sd, **extra), "policy": {"adapters": [name]}}
    plan = post(server, ns, "plan", body)
    assert plan.status_code == 200 and plan.json()["plan"]["verdict"] == "adapted", plan.text

    before = scrape(server.url)
    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    started = time.monotonic()
    fetched = post(server, ns, "fetch", body)
    elapsed = time.monotonic() - started
    growth = server.rss_peak_bytes() - baseline
    refused = error(fetched, 413, "too_large")
    assert refused["detail"]["limit"] == "max_fetch_expansion"
    assert refused["detail"]["bytes"] == 2000 * 2**30 + sum(
        t.numel() * t.element_size() for t in sd.values()
    )
    assert refused["detail"]["max_bytes"] < 65 * MiB
    assert "STATEHUB_MAX_FETCH_EXPANSION" in refused["message"]
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert growth < 64 * MiB, f"server grew by {growth / MiB:.0f} MiB"
    after = scrape(server.url)
    assert delta(before, after, FIT_CACHE, event="miss") == 0  # refused before any lookup


def test_a_mostly_filled_body_is_served_but_not_cached(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # A re-initialised head (an adapter fill, 47 MiB) far larger than the rest of the
    # checkpoint: served, with its values, streamed rather than built (the server grows by
    # a chunk, not by the tensor); not kept (its bytes cost no read to make again).
    sd = state_dict(counter=True)
    hub.push(f"{ns}/m", sd)
    name = register(server, [fill_rule(r"head\.weight", 0.5, [3000, 4096], "F32")])
    body = {
        "target": spec(sd, **{"head.weight": ([3000, 4096], "F32")}),
        "policy": {"adapters": [name]},
    }
    before = scrape(server.url)
    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    fetched = post(server, ns, "fetch", body)
    growth = server.rss_peak_bytes() - baseline
    assert fetched.status_code == 200, fetched.text
    assert fetched.headers["x-statehub-fetch-mode"] == "transform"
    tensors = st_load(fetched.content)
    assert torch.equal(tensors["head.weight"], torch.full((3000, 4096), 0.5))
    assert torch.equal(tensors["fc.weight"], sd["fc.weight"])
    after = scrape(server.url)
    assert delta(before, after, FIT_CACHE, event="synthesized") == 1
    assert growth < 24 * MiB, f"server grew by {growth / MiB:.0f} MiB"  # streamed, not built
    again = post(server, ns, "fetch", body)
    assert again.headers["x-statehub-fetch-mode"] == "transform"  # never cached
    assert again.content == fetched.content

    # Control: a body with a scalar fill only is kept, as before.
    small = {"target": spec(sd, **{"bn2.num_batches_tracked": ([], "I64")})}
    before = scrape(server.url)
    assert post(server, ns, "fetch", small).status_code == 200
    deadline = time.monotonic() + 30
    while delta(before, scrape(server.url), FIT_CACHE, event="stored") < 1:
        assert time.monotonic() < deadline, "a body with a scalar fill was not cached"
        time.sleep(0.05)
    assert post(server, ns, "fetch", small).headers["x-statehub-fetch-mode"] == "cached"


# -- item 8: an adapter named by a reader ----------------------------------------------------


def test_the_issues_growing_adapter_is_refused_in_milliseconds(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # 3 rules renaming (.*) to \1 x 100: keys grow 100x per rule; the plan did not finish
    # in 300 s. Every renamed key is held to STATEHUB_MAX_KEY_LENGTH at each step.
    sd = state_dict(counter=True)
    hub.push(f"{ns}/m", sd)
    rule = {"type": "rename", "pattern": "(.*)", "replacement": "\\1" * 100}
    name = register(server, [rule] * 3)
    body = {"target": spec(sd), "policy": {"adapters": [name]}}
    for what in ("plan", "fetch"):
        started = time.monotonic()
        response = post(server, ns, what, body)
        elapsed = time.monotonic() - started
        refused = error(response, 422, "invalid_adapter")
        assert refused["detail"] == {"limit": "max_key_length", "max_key_length": 1024}
        assert name in refused["message"] and "STATEHUB_MAX_KEY_LENGTH" in refused["message"]
        assert elapsed < 2, f"{what}: {elapsed:.1f} s"
    search = httpx.post(
        f"{server.url}/v1/search/compatible",
        json={"target": spec(sd), "policy": {"adapters": [name]}},
        timeout=60,
    )
    assert search.status_code == 200, search.text
    assert all(not hit["ref"].startswith(f"{ns}/") for hit in search.json())


def test_rules_that_match_every_key_are_refused_in_bounded_time(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    # 1,000 identity renames over 2,000 keys: 2M rule evaluations (minutes before; about 12 s
    # once identical keys are not matched again); the budget is 32 per key.
    sd = {f"layers.{i}.weight": torch.full((2,), float(i)) for i in range(2000)}
    hub.push(f"{ns}/m", sd)
    name = register(server, [{"type": "rename", "pattern": "(.*)", "replacement": "\\1"}] * 1000)
    started = time.monotonic()
    response = post(server, ns, "plan", {"target": spec(sd), "policy": {"adapters": [name]}})
    elapsed = time.monotonic() - started
    refused = error(response, 422, "invalid_adapter")
    assert refused["detail"] == {"limit": "adapter_steps_per_key", "max_steps": 10_000 + 32 * 4000}
    assert elapsed < 3, f"{elapsed:.1f} s"
    plain = post(server, ns, "plan", {"target": spec(sd)})
    assert plain.json()["plan"]["verdict"] == "exact"


# -- item 1: an upload whose pickle inflates -------------------------------------------------


def amplifying_zip() -> bytes:
    """The issue's 10 KB upload: a torch zip whose deflated data.pkl is PROTO 2 + 9,900,000
    EMPTY_SETs, then a valid state_dict (the sets stay on the stack; STOP returns the dict)."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source,
        zipfile.ZipFile(out, "w") as target,
    ):
        for info in source.infolist():
            content = source.read(info)
            if not info.filename.endswith("/data.pkl"):
                target.writestr(info, content)
                continue
            assert content[:2] == b"\x80\x02"
            content = b"\x80\x02" + b"\x8f" * 9_900_000 + content[2:]
            target.writestr(info.filename, content, compress_type=zipfile.ZIP_DEFLATED)
    return out.getvalue()


def test_an_upload_that_inflates_in_the_unpickler_is_refused_and_memory_returns(
    server: ServerProcess, ns: str
) -> None:
    upload = amplifying_zip()
    assert len(upload) < 64 * 1024
    reset_peak_rss(server.pid)
    baseline = server.rss_bytes()
    response = httpx.post(
        f"{server.url}/v1/models/{ns}/bomb/versions",
        content=upload,
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    peak = server.rss_peak_bytes() - baseline
    refused = error(response, 413, "too_large")
    assert refused["detail"]["limit"] in {"max_built_bytes", "max_stack"}
    assert httpx.get(f"{server.url}/v1/models/{ns}/bomb").status_code == 404
    # The issue: +2,248 MiB, and still held 20 s later. Peak and after, measured.
    assert peak < 128 * MiB, f"peak grew by {peak / MiB:.0f} MiB"
    after = server.rss_bytes() - baseline
    assert after < 64 * MiB, f"held {after / MiB:.0f} MiB after the refusal"
    # A valid upload still works on the same server.
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    ok = httpx.post(
        f"{server.url}/v1/models/{ns}/fine/versions",
        content=buffer.getvalue(),
        headers={"Content-Type": "application/octet-stream"},
        timeout=120,
    )
    assert ok.status_code == 201, ok.text
