"""Derived tensors that move no byte stream as stored ranges, past the transform limit.

A split along dim 0 (a fused qkv cut into q, k, v), a stack of per-expert weights into one
fused tensor and a reshape after them are the stored bytes in another order: the server
sends them from the store as it sends a rename, whatever their size. Only what must be
computed (a transpose, a cast) is bounded by ``STATEHUB_MAX_TRANSFORM_TENSOR_BYTES``, here
1 MiB, and each tensor below is over it. Both backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from statehub import Client, TooLarge
from tests.api.conftest import Deployment

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(deployment: Deployment) -> Any:
    return deployment.start(STATEHUB_MAX_TRANSFORM_TENSOR_BYTES=str(MiB))


@pytest.fixture
def hub(server: Any) -> Any:
    with Client(server.url, retries=1) as client:
        yield client


def test_a_stack_of_experts_and_a_split_stream_past_the_transform_limit(
    hub: Client, ns: str
) -> None:
    gen = torch.Generator().manual_seed(3)
    experts = {
        f"moe.experts.{i}.w1.weight": torch.randn(256, 1024, generator=gen) for i in range(4)
    }
    qkv = torch.randn(3 * 512, 1024, generator=gen)  # 6 MiB, cut into three of 2 MiB
    hub.push(f"{ns}/moe", experts | {"attn.qkv.weight": qkv})
    hub.register_adapter(
        {
            "name": f"{ns}-fuse",
            "scope": {"model": f"{ns}/moe"},
            "rules": [
                {"type": "stack", "target": r"moe\.fused", "repeat": True, "dim": 0,
                 "sources": ["moe.experts.{n}.w1.weight"],
                 "ops": [{"op": "flatten", "start": 0, "end": 1}]},
                {"type": "split", "source": r"attn\.qkv\.weight",
                 "targets": ["attn.q.weight", "attn.k.weight", "attn.v.weight"]},
            ],
        }
    )  # fmt: skip
    target = {"moe.fused": torch.zeros(4 * 256, 1024)} | {
        f"attn.{n}.weight": torch.zeros(512, 1024) for n in "qkv"
    }
    plan = hub.plan(f"{ns}/moe", target=target)
    assert plan.verdict == "adapted", plan.reasons
    assert plan.entry("moe.fused").sources == [f"moe.experts.{i}.w1.weight" for i in range(4)]
    state = hub.fetch(f"{ns}/moe", target=target)
    fused = torch.stack([experts[f"moe.experts.{i}.w1.weight"] for i in range(4)]).flatten(0, 1)
    assert state["moe.fused"].nbytes == 4 * MiB and torch.equal(state["moe.fused"], fused)
    for name, piece in zip("qkv", qkv.chunk(3), strict=True):
        assert torch.equal(state[f"attn.{name}.weight"], piece)


def test_what_must_be_computed_is_bounded_and_says_by_what(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    weight = torch.randn(1024, 512)  # 2 MiB: a transpose must build it
    hub.push(f"{ns}/t", {"proj.weight": weight})
    hub.register_adapter(
        {
            "name": f"{ns}-t",
            "scope": {"model": f"{ns}/t"},
            "rules": [
                {"type": "op", "key": r"proj\.weight", "op": {"op": "transpose", "dims": [1, 0]}}
            ],
        }
    )  # fmt: skip
    target = {"proj.weight": torch.zeros(512, 1024)}
    assert hub.plan(f"{ns}/t", target=target).verdict == "adapted"
    with pytest.raises(TooLarge, match="STATEHUB_MAX_TRANSFORM_TENSOR_BYTES") as info:
        hub.fetch(f"{ns}/t", target=target)
    assert info.value.detail["bytes"] == 2 * MiB and info.value.detail["max_bytes"] == MiB
    # The refusal came before any byte: the version reads back as stored.
    hub.pull(f"{ns}/t", tmp_path / "t.safetensors")
    assert torch.equal(load_file(tmp_path / "t.safetensors")["proj.weight"], weight)
