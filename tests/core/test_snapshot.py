"""Finding the weights in an unpickled checkpoint, and the rest of it as JSON (pure)."""

from __future__ import annotations

import argparse
import io
import json
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from service.core.safetensors_format import Limits
from service.core.snapshot import (
    dedupe_ties,
    extract_weights,
    module_weights,
    numpy_value,
    render_snapshot,
)
from service.core.torch_format import read_torch_zip
from service.core.unpickle import DTYPES, Placeholder, StorageRef, TensorRef, unpickle
from service.errors import InvalidCheckpoint, UnsafePickle

LIMITS = Limits()


def ref(storage: str = "0", shape: tuple[int, ...] = (2,), offset: int = 0) -> TensorRef:
    strides = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    return TensorRef(
        StorageRef(storage, 1 << 20, "cpu", 4), DTYPES["float32"], offset, shape, strides
    )


def state(*keys: str) -> dict[str, TensorRef]:
    return {key: ref(str(index)) for index, key in enumerate(keys)}


def no_scalars(_: TensorRef) -> None:
    return None


# -- pickled modules --------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("cache", torch.zeros(2), persistent=False)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Block()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        self.alias = self.stem  # the same module under a second name
        self.register_buffer("scale", torch.ones(1))


def test_a_pickled_module_yields_its_state_dict_keys_in_order() -> None:
    net = Net()
    buffer = io.BytesIO()
    torch.save(net, buffer)
    checkpoint = read_torch_zip(buffer.getvalue(), limits=LIMITS)
    weights = module_weights(checkpoint.root)
    assert weights is not None
    assert list(weights.tensors) == list(net.state_dict())
    assert weights.module_class == f"{__name__}.Net"
    tensors = weights.tensors
    assert tensors["alias.conv.weight"].identity == tensors["stem.conv.weight"].identity
    assert "stem.cache" not in tensors


def test_a_module_cycle_is_walked_once() -> None:
    module = Placeholder("m.Loop")
    module.state = {"_parameters": {"w": ref()}, "_buffers": {}, "_modules": {"self": module}}
    weights = module_weights(module)
    assert weights is not None and list(weights.tensors) == ["w"]


# -- where snapshot weights are found ------------------------------------------------------------


def test_a_plain_state_dict_is_its_own_weights() -> None:
    extracted = extract_weights(state("a", "b"), ema=False)
    assert (extracted.origin, extracted.ema, extracted.rest, extracted.dropped) == (
        None,
        False,
        {},
        [],
    )
    with pytest.raises(InvalidCheckpoint, match="EMA"):
        extract_weights(state("a"), ema=True)


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "net", "network"])
def test_snapshot_keys(key: str) -> None:
    snapshot = {key: state("w"), "optimizer": {"state": {}}, "lr_scheduler": {}, "epoch": 3}
    extracted = extract_weights(snapshot, ema=False)
    assert extracted.origin == key
    assert list(extracted.weights.tensors) == ["w"]
    assert extracted.rest == {"epoch": 3}
    assert sorted(extracted.dropped) == ["lr_scheduler", "optimizer"]


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema"])
def test_ema_weights_are_the_uploaders_choice(ema_key: str) -> None:
    snapshot = {"state_dict": state("w"), ema_key: state("w"), "epoch": 1}
    plain = extract_weights(snapshot, ema=False)
    ema = extract_weights(snapshot, ema=True)
    assert (plain.origin, plain.ema, plain.dropped) == ("state_dict", False, [ema_key])
    assert (ema.origin, ema.ema, ema.dropped) == (ema_key, True, ["state_dict"])
    assert ema.weights.tensors["w"] is snapshot[ema_key]["w"]


def test_a_snapshot_with_only_ema_weights_says_so() -> None:
    extracted = extract_weights({"model_ema": state("w")}, ema=False)
    assert (extracted.origin, extracted.ema) == ("model_ema", True)
    with pytest.raises(InvalidCheckpoint, match="EMA weights were asked for"):
        extract_weights({"model": state("w")}, ema=True)


def test_weights_nested_one_level() -> None:
    snapshot = {"model": {"state_dict": state("w"), "arch": "resnet"}, "epoch": 2}
    extracted = extract_weights(snapshot, ema=False)
    assert extracted.origin == "model.state_dict"
    assert extracted.rest == {"model": {"arch": "resnet"}, "epoch": 2}


def test_a_pickled_module_inside_a_snapshot() -> None:
    module = Placeholder("models.yolo.Model")
    module.state = {"_parameters": {}, "_buffers": {"anchors": ref()}, "_modules": {}}
    extracted = extract_weights({"model": module, "ema": None, "epoch": 9}, ema=False)
    assert extracted.origin == "model"
    assert extracted.weights.module_class == "models.yolo.Model"
    assert list(extracted.weights.tensors) == ["anchors"]


def test_a_snapshot_object_is_read_through_its_attributes() -> None:
    snapshot = Placeholder("trainer.Checkpoint")
    snapshot.state = {"model": state("w"), "step": 10}
    extracted = extract_weights(snapshot, ema=False)
    assert (extracted.origin, extracted.snapshot_class) == ("model", "trainer.Checkpoint")
    assert extracted.rest == {"step": 10}


def test_an_unknown_key_holding_the_only_weights_is_used() -> None:
    extracted = extract_weights({"student": state("w"), "epoch": 1}, ema=False)
    assert extracted.origin == "student"
    with pytest.raises(InvalidCheckpoint, match="several sets of weights"):
        extract_weights({"student": state("w"), "teacher": state("w")}, ema=False)


def test_tensors_only_code_could_reach_are_unsafe() -> None:
    builder = Placeholder("mylib.build_model", (state("w"),))
    with pytest.raises(UnsafePickle) as caught:
        extract_weights({"model": builder, "epoch": 1}, ema=False)
    assert caught.value.detail["globals"] == ["mylib.build_model"]


def test_quantized_or_sparse_tensors_are_named() -> None:
    weights = {"w": ref(), "q": Placeholder("torch._utils._rebuild_qtensor")}
    with pytest.raises(InvalidCheckpoint, match=r"q \(torch\._utils\._rebuild_qtensor\)"):
        extract_weights(weights, ema=False)


def test_no_weights_at_all() -> None:
    with pytest.raises(InvalidCheckpoint, match="no state_dict found"):
        extract_weights({"epoch": 1}, ema=False)
    with pytest.raises(InvalidCheckpoint, match="a list"):
        extract_weights([ref()], ema=False)


def test_tied_views_are_stored_once() -> None:
    shared = ref("0", (4,))
    tensors = {
        "embed": shared,
        "head": shared,
        "copy": ref("0", (4,)),  # same bytes, same view: tied too
        "other": ref("0", (2,), offset=8),
        "empty": ref("0", (0,)),
        "empty2": ref("0", (0,)),
    }
    unique, groups = dedupe_ties(tensors)
    assert [k for k, _ in unique] == ["embed", "other", "empty", "empty2"]
    assert groups == [["embed", "head", "copy"]]


# -- the rest as JSON ----------------------------------------------------------------------------


def unpickled(value: Any) -> Any:
    return unpickle(pickle.dumps(value, protocol=2), limits=LIMITS)


class Config:
    def __init__(self) -> None:
        self.depth = 50
        self.dropout = np.float32(0.25)


def test_numpy_argparse_and_config_objects_render_as_data() -> None:
    rest = unpickled(
        {
            "max_accuracy": np.float64(0.92),
            "step": np.int64(1234),
            "flag": np.bool_(True),
            "curve": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
            "big": np.zeros(10_000),
            "args": argparse.Namespace(lr=0.1, name="run"),
            "config": Config(),
        }
    )
    rendered, omitted = render_snapshot(rest, scalar_of=no_scalars)
    assert omitted == []
    assert rendered["max_accuracy"] == 0.92
    assert rendered["step"] == 1234 and rendered["flag"] is True
    assert rendered["curve"] == [[1.0, 2.0], [3.0, 4.0]]
    assert rendered["big"] == {"__ndarray__": {"dtype": "f8", "shape": [10000]}}
    assert rendered["args"] == {
        "__global__": "argparse.Namespace",
        "state": {"lr": 0.1, "name": "run"},
    }
    assert rendered["config"] == {
        "__global__": f"{__name__}.Config",
        "state": {"depth": 50, "dropout": 0.25},
    }


def test_values_json_stores_refuse_are_made_safe() -> None:
    loop: list[Any] = []
    loop.append(loop)
    rest = {
        "inf": float("inf"),
        "nan": float("nan"),
        "nul": "a\x00b",
        "surrogate": "\ud800x",
        "huge": 2**4000,
        "loop": loop,
        "bytes": b"\x01\x02",
        "set": {"b", "a", "c"},
        "tensor": ref(shape=(2, 3)),
        "scalar": ref(shape=()),
    }
    rendered, _ = render_snapshot(rest, scalar_of=lambda t: 0.5)
    json.dumps(rendered, allow_nan=False).encode("utf-8")
    assert (rendered["inf"], rendered["nan"]) == ("inf", "nan")
    assert rendered["nul"] == "a\ufffdb" and rendered["surrogate"] == "?x"
    assert rendered["huge"] == "<4001-bit integer>"
    assert rendered["loop"] == ["<cycle>"]
    assert rendered["bytes"] == {"__bytes__": "0102"}
    assert rendered["set"] == ["a", "b", "c"]
    assert rendered["tensor"] == {"__tensor__": {"dtype": "float32", "shape": [2, 3]}}
    assert rendered["scalar"] == 0.5


def test_oversized_entries_are_cut_short_or_left_out() -> None:
    rest = {"history": [[float(i)] * 1000 for i in range(1000)]}
    rest |= {f"log{i}": ["x" * 4000] * 10 for i in range(20)}
    rendered, omitted = render_snapshot(rest, scalar_of=no_scalars)
    assert "…" in json.dumps(rendered["history"], ensure_ascii=False)  # the node budget
    assert len(json.dumps(rendered)) <= 256 * 1024
    assert omitted and omitted == [f"log{i}" for i in range(20) if f"log{i}" not in rendered]


def test_numpy_value_ignores_what_it_cannot_decode() -> None:
    odd = Placeholder("numpy._core.multiarray.scalar", (Placeholder("numpy.dtype", ("U5",)), b"x"))
    assert numpy_value(odd) is None
