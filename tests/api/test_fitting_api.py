"""Plan, adapters and search over HTTP: contracts, determinism, and bad input."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from statehub import Client, spec_of
from tests._models import TinyResNet, WithHead, seeded
from tests._server import ServerProcess
from tests.api.test_registry import error_code


def plan_raw(server: ServerProcess, ns: str, name: str, body: object) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/{name}/versions/latest/plan", json=body, timeout=60
    )


@pytest.fixture
def pushed(hub: Client, ns: str) -> str:
    seeded(0)
    hub.push(f"{ns}/resnet", TinyResNet().state_dict())
    return "resnet"


def test_plans_are_deterministic(server: ServerProcess, ns: str, pushed: str) -> None:
    body = {"target": spec_of(TinyResNet(num_classes=3)), "policy": {"head": "slice"}}
    first, second = plan_raw(server, ns, pushed, body), plan_raw(server, ns, pushed, body)
    assert first.status_code == 200, first.text
    assert first.content == second.content
    plan = first.json()
    assert plan["plan"]["verdict"] == "adapted"
    assert plan["version"] == 1 and len(plan["plan_id"]) == 64
    assert [e["target"] for e in plan["plan"]["entries"]] == [
        t["key"] for t in body["target"]["tensors"]
    ]


BAD_SPECS = {
    "negative dim": {"tensors": [{"key": "a", "shape": [-3], "dtype": "F32"}]},
    "absurd dim": {"tensors": [{"key": "a", "shape": [2**50], "dtype": "F32"}]},
    "unknown dtype": {"tensors": [{"key": "a", "shape": [3], "dtype": "float33"}]},
    "duplicate keys": {
        "tensors": [
            {"key": "a", "shape": [3], "dtype": "F32"},
            {"key": "a", "shape": [3], "dtype": "F32"},
        ]
    },
    "rank 20": {"tensors": [{"key": "a", "shape": [1] * 20, "dtype": "F32"}]},
    "bad tie group": {
        "tensors": [{"key": "a", "shape": [3], "dtype": "F32"}],
        "tie_groups": [["a", "ghost"]],
    },
    "not a list": {"tensors": "conv1.weight"},
    "extra field": {"tensors": [], "modules": []},
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_target_specs_get_clear_errors(
    server: ServerProcess, ns: str, pushed: str, case: str
) -> None:
    response = plan_raw(server, ns, pushed, {"target": BAD_SPECS[case]})
    assert response.status_code == 422, response.text
    assert error_code(response) in ("invalid_spec", "invalid_request")


def test_a_million_keys_is_refused_without_parsing(
    server: ServerProcess, ns: str, pushed: str
) -> None:
    tensors = ",".join(f'{{"key":"k{i}","shape":[1],"dtype":"F32"}}' for i in range(10**6))
    body = f'{{"target":{{"tensors":[{tensors}]}}}}'.encode()
    started = time.monotonic()
    response = httpx.post(
        f"{server.url}/v1/models/{ns}/{pushed}/versions/latest/plan",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code == 413
    assert error_code(response) == "too_large"
    assert time.monotonic() - started < 30


def test_bad_policies(server: ServerProcess, ns: str, pushed: str) -> None:
    target = spec_of(TinyResNet())
    for policy in ({"head": "chop"}, {"allow_ops": ["rm_rf"]}, {"strict": "maybe"}, {"bogus": 1}):
        response = plan_raw(server, ns, pushed, {"target": target, "policy": policy})
        assert error_code(response) == "invalid_request", policy
    unknown = plan_raw(server, ns, pushed, {"target": target, "policy": {"adapters": ["nope"]}})
    assert error_code(unknown) == "invalid_request"
    missing = httpx.post(
        f"{server.url}/v1/models/{ns}/{pushed}/versions/7/plan", json={"target": target}
    )
    assert error_code(missing) == "not_found"


BAD_ADAPTERS = {
    "invalid regex": {"type": "rename", "pattern": "(unclosed", "replacement": "x"},
    "unknown rule": {"type": "exec", "code": "import os"},
    "slice out of range": {
        "type": "op",
        "key": "fc",
        "op": {"op": "slice", "dim": -1, "start": 5, "stop": 2},
    },
    "unknown op": {"type": "op", "key": "fc", "op": {"op": "eval", "expr": "1"}},
    "bad cast": {"type": "op", "key": "fc", "op": {"op": "cast", "dtype": "F128"}},
    "bad grid": {
        "type": "op",
        "key": "pos",
        "op": {
            "op": "resample_pos_embed",
            "num_prefix_tokens": 1,
            "old_grid": [0, 4],
            "new_grid": [4, 4],
        },
    },
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused_and_nothing_is_stored(
    server: ServerProcess, ns: str, case: str
) -> None:
    body = {"name": f"{ns}-bad", "scope": {"model": f"{ns}/x"}, "rules": [BAD_ADAPTERS[case]]}
    response = httpx.post(f"{server.url}/v1/adapters", json=body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_adapter"
    assert error_code(httpx.get(f"{server.url}/v1/adapters/{ns}-bad")) == "not_found"


def test_catastrophic_regex_costs_linear_time(hub: Client, server: ServerProcess, ns: str) -> None:
    """`(a+)+$` against a long run of a's: exponential in a backtracking engine."""
    hub.push(f"{ns}/evil", {("a" * 60) + "!": torch.zeros(2), "fc.weight": torch.ones(2)})
    adapter = {
        "name": f"{ns}-redos",
        "scope": {"model": f"{ns}/evil"},
        "rules": [{"type": "rename", "pattern": "(a+)+$", "replacement": "x"}],
    }
    assert httpx.post(f"{server.url}/v1/adapters", json=adapter).status_code == 201
    target = {"tensors": [{"key": "fc.weight", "shape": [2], "dtype": "F32"}]}
    started = time.monotonic()
    response = plan_raw(server, ns, "evil", {"target": target})
    assert response.status_code == 200
    assert time.monotonic() - started < 5
    assert response.json()["plan"]["entries"][0]["source"] == "fc.weight"


def test_adapter_versions_scopes_and_deletion(hub: Client, server: ServerProcess, ns: str) -> None:
    seeded(1)
    hub.push(f"{ns}/bb", WithHead("backbone").state_dict())
    name = f"{ns}-bb"
    rules = [{"type": "rename", "pattern": r"backbone\.(.*)", "replacement": r"trunk.\1"}]
    first = hub.register_adapter({"name": name, "scope": {"model": f"{ns}/other"}, "rules": rules})
    assert first["version"] == 1
    target = WithHead("trunk")
    unscoped = hub.plan(f"{ns}/bb", target=target)
    assert unscoped.adapters == [], "scoped to another model: not applied"
    assert unscoped.entry("trunk.conv1.weight").stage == "prefix"

    second = hub.register_adapter({"name": name, "scope": {"model": f"{ns}/bb"}, "rules": rules})
    assert second["version"] == 2
    listed = [a for a in hub.adapters() if a["name"] == name]
    assert [a["version"] for a in listed] == [2]
    versions = httpx.get(f"{server.url}/v1/adapters/{name}").json()
    assert [a["version"] for a in versions] == [1, 2]
    applied = hub.plan(f"{ns}/bb", target=target)
    assert applied.adapters == [{"name": name, "version": 2}]
    assert applied.entry("trunk.conv1.weight").stage == "adapter"

    assert httpx.delete(f"{server.url}/v1/adapters/{name}").status_code == 204
    assert error_code(httpx.get(f"{server.url}/v1/adapters/{name}")) == "not_found"
    assert hub.plan(f"{ns}/bb", target=target).adapters == []

    by_name = {"name": f"{ns}-named", "rules": rules}  # no scope: applies only when named
    hub.register_adapter(by_name)
    assert hub.plan(f"{ns}/bb", target=target).adapters == []
    named = hub.plan(f"{ns}/bb", target=target, adapters=[f"{ns}-named"])
    assert named.adapters == [{"name": f"{ns}-named", "version": 1}]
    assert named.entry("trunk.conv1.weight").stage == "adapter"


def test_search_compatible_ranks_by_fit(hub: Client, server: ServerProcess, ns: str) -> None:
    seeded(2)
    exact = TinyResNet(num_classes=7)
    pushed = {
        "exact": hub.push(f"{ns}/exact", exact.state_dict()),
        "wrapped": hub.push(
            f"{ns}/wrapped", {f"module.{k}": v for k, v in exact.state_dict().items()}
        ),
        "other-head": hub.push(f"{ns}/other-head", TinyResNet(num_classes=100).state_dict()),
    }
    hub.push(f"{ns}/unrelated", {"embedding.weight": torch.zeros(4, 4)})
    hits = hub.find_compatible(TinyResNet(num_classes=7), limit=50)
    mine = [h for h in hits if h["model"].startswith(f"{ns}/")]
    assert [h["model"] for h in mine] == [f"{ns}/{name}" for name in pushed]
    assert [h["verdict"] for h in mine] == ["exact", "adapted", "partial"]
    # Each hit names the version it ranks, as a ref the client can fetch.
    for hit, (name, version) in zip(mine, pushed.items(), strict=True):
        assert hit["ref"] == f"{ns}/{name}:1" and hit["version"] == 1
        assert hit["digest"] == version.digest
    assert mine[2]["coverage"]["keys"]["kept"] == 2
