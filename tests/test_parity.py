"""Every table the client and the server must agree on, compared: drift fails here.

The client is a separate, thin package (it never imports ``service``), so each table lives
on both sides: dtype codes and sizes, wrapper prefixes, where snapshots keep their weights,
the fingerprint formula (tests/core/test_formats.py pins it to golden digests on both
sides) and error codes (tests/client/test_client.py, one client class per server code).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service import ingest
from service.core import ops, planner, snapshot, spec
from service.core.recipes import params_from_config
from service.core.snapshot import extract_weights
from service.core.unpickle import DTYPES, StorageRef, TensorRef
from service.errors import InvalidCheckpoint
from statehub import _tensors as client


def test_dtype_codes_and_sizes_agree() -> None:
    assert set(client.DTYPE_CODES.values()) == set(spec.DTYPE_SIZES)
    assert client.TORCH_DTYPES == ops.TORCH_DTYPES
    for code, dtype in client.TORCH_DTYPES.items():
        assert spec.DTYPE_SIZES[code] == torch.empty(0, dtype=dtype).element_size(), code
    # The server's pickle reader names storages by torch name; each maps to the same code.
    readable = {d.name: d.code for d in DTYPES.values() if d.code is not None}
    assert readable == {str(t).removeprefix("torch."): c for t, c in client.DTYPE_CODES.items()}


def test_wrapper_prefixes_agree() -> None:
    server = tuple(f"{wrapper}." for wrapper in planner.WRAPPERS)
    assert client.WRAPPER_PREFIXES == server == ingest.WRAPPER_PREFIXES


def test_snapshot_keys_agree() -> None:
    assert client.STATE_DICT_KEYS == snapshot.STATE_DICT_KEYS
    assert client.EMA_KEYS == snapshot.EMA_KEYS
    assert client.OPTIMIZER_KEYS == snapshot.TRAINING_STATE_KEYS


def _ref(index: int) -> TensorRef:
    return TensorRef(StorageRef(str(index), 8, "cpu", 4), DTYPES["float32"], 0, (2,), (1,))


def _weights(kind: str) -> Any:
    keys = ("fc.weight", "fc.bias")
    if kind == "server":
        return {key: _ref(i) for i, key in enumerate(keys)}
    return {key: torch.zeros(2) for key in keys}


# Snapshot layouts (W stands for a state_dict) and where the weights are, without and with
# ``ema``: both sides must find them there, or both find none.
LAYOUTS = [
    ({"state_dict": "W", "epoch": 3}, "state_dict", None),
    ({"model": {"state_dict": "W"}, "optimizer": {}}, "model.state_dict", None),
    ({"model": {"model_state": "W"}}, "model.model_state", None),
    ({"params": "W", "step": 1}, "params", None),
    ({"model_ema": "W"}, "model_ema", "model_ema"),  # EMA weights only
    ({"model": "W", "model_ema": "W"}, "model", "model_ema"),
    ({"custom_name": "W", "optimizer": "W"}, "custom_name", None),  # one unknown key
    ({"a": "W", "b": "W"}, None, None),  # ambiguous: neither side guesses
    ({"epoch": 1}, None, None),
]


def _build(layout: Any, kind: str) -> Any:
    if layout == "W":
        return _weights(kind)
    if isinstance(layout, dict):
        return {key: _build(value, kind) for key, value in layout.items()}
    return layout


@pytest.mark.parametrize(("layout", "origin", "ema_origin"), LAYOUTS, ids=str)
def test_client_and_server_find_weights_at_the_same_place(
    layout: Any, origin: str | None, ema_origin: str | None
) -> None:
    for ema, expected in ((False, origin), (True, ema_origin)):
        try:
            server_origin = extract_weights(_build(layout, "server"), ema=ema).origin
        except InvalidCheckpoint:
            server_origin = None
        _, client_origin = client.extract_state_dict(_build(layout, "client"), ema=ema)
        assert (server_origin, client_origin) == (expected, expected), f"ema={ema}"


def test_the_client_knows_every_policy_option_the_server_takes() -> None:
    from service.api.schemas import PolicyIn
    from statehub._client import POLICY_KEYS

    assert sorted(POLICY_KEYS) == sorted(PolicyIn.model_fields)


def test_the_client_reads_every_field_of_a_plan_entry() -> None:
    from service.core.plan import Entry
    from statehub._models import PlanEntry

    entry = Entry("t", "s", "transform", "adapter", "r", [], {"e": 1}, "u", ["s", "x"])
    assert PlanEntry.from_json(entry.to_json()).sources == ["s", "x"]
    assert set(entry.to_json()) <= set(PlanEntry.__dataclass_fields__)


class _Config:
    """A transformers config as the client sees one: ``to_dict()``."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        return self.values


MODEL_CONFIGS = [
    {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8},  # Llama 3
    {"hidden_size": 2560, "num_attention_heads": 32, "head_dim": 128},  # head_dim given (Qwen3)
    {"dim": 4096, "n_heads": 32, "n_kv_heads": 8},  # Meta's params.json
    {"hidden_size": 100, "num_attention_heads": 3},  # does not divide: no fact
    {"hidden_size": True, "num_attention_heads": 1, "head_dim": 0},  # not facts
    {"n_embd": 768, "n_head": 12},  # GPT-2's names: not read
]


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_model_facts_read_as_the_server_reads_a_config_json(config: dict[str, Any]) -> None:
    """The client's facts from a target's config are the server's from a version's file."""
    target = SimpleNamespace(config=_Config(config))
    assert client.model_facts(target) == params_from_config(config)
