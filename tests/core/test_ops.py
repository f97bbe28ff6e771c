"""Ops as data: validation, shape inference, and what they do to real tensor values."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.core import ops
from service.core.ops import OpError, apply, apply_chain, infer, infer_chain, validate_op
from service.core.spec import DTYPE_SIZES
from service.errors import InvalidAdapter

RESAMPLE = {"op": "resample_pos_embed", "num_prefix_tokens": 1}

# ------------------------------------------------------------------------------ validation


def test_validate_fills_defaults_and_normalises() -> None:
    assert validate_op({"op": "pad", "dim": 0, "size": 5}) == {
        "op": "pad",
        "dim": 0,
        "size": 5,
        "value": 0.0,
    }
    assert validate_op({"op": "adapt_in_channels", "in_chans": 1}) == {
        "op": "adapt_in_channels",
        "in_chans": 1,
        "dim": 1,
    }
    resample = validate_op(
        {
            "op": "resample_pos_embed",
            "num_prefix_tokens": 1,
            "old_grid": (14, 14),
            "new_grid": [24, 24],
        }
    )
    assert resample == {
        "op": "resample_pos_embed",
        "num_prefix_tokens": 1,
        "old_grid": [14, 14],
        "new_grid": [24, 24],
        "mode": "bicubic",
    }
    assert validate_op({"op": "fill", "value": 0.0, "shape": [], "dtype": "I64"})["value"] == 0
    assert validate_op({"op": "fill", "value": 1, "shape": [2], "dtype": "BOOL"})["value"] is True


def test_validate_returns_a_copy() -> None:
    original = {"op": "reshape", "shape": [2, 3]}
    normalised = validate_op(original)
    normalised["shape"].append(1)
    assert original == {"op": "reshape", "shape": [2, 3]}


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ("slice", "must be an object"),
        ({"dim": 0}, "unknown op"),
        ({"op": "explode"}, "unknown op 'explode'"),
        ({"op": "slice", "dim": 0, "start": 0}, "missing ['stop']"),
        ({"op": "slice", "dim": 0, "start": 0, "stop": 1, "step": 2}, "unexpected ['step']"),
        ({"op": "slice", "dim": -1, "start": 0, "stop": 1}, "dim must be in"),
        ({"op": "slice", "dim": 0, "start": 5, "stop": 1}, "stop (1) must be >= start (5)"),
        ({"op": "slice", "dim": 0, "start": 0, "stop": "3"}, "stop must be an integer"),
        ({"op": "slice", "dim": True, "start": 0, "stop": 3}, "dim must be an integer"),
        ({"op": "slice", "dim": 0, "start": 0.0, "stop": 3}, "start must be an integer"),
        ({"op": "pad", "dim": 0, "size": 3, "value": float("nan")}, "value must be finite"),
        ({"op": "adapt_in_channels", "in_chans": 0}, "in_chans must be in [1,"),
        (
            {
                "op": "resample_pos_embed",
                "num_prefix_tokens": 1,
                "old_grid": [0, 14],
                "new_grid": [2, 2],
            },
            "old_grid[0] must be in [1,",
        ),
        (
            {
                "op": "resample_pos_embed",
                "num_prefix_tokens": 1,
                "old_grid": [14],
                "new_grid": [2, 2],
            },
            "must be [height, width]",
        ),
        (
            {
                "op": "resample_pos_embed",
                "num_prefix_tokens": 0,
                "old_grid": [2, 2],
                "new_grid": [3, 3],
                "mode": "nearest",
            },
            "mode must be one of",
        ),
        ({"op": "reshape", "shape": [2**41]}, "shape[0] must be in"),
        ({"op": "reshape", "shape": [2**30, 2**30]}, "more than"),
        ({"op": "reshape", "shape": [1] * 65}, "at most 64"),
        ({"op": "transpose", "dims": [0, 0]}, "permutation"),
        ({"op": "transpose", "dims": [1, 2]}, "permutation"),
        ({"op": "cast", "dtype": "F128"}, "dtype must be one of"),
        ({"op": "fill", "value": 0.5, "shape": [], "dtype": "I64"}, "not representable in I64"),
        ({"op": "fill", "value": 300, "shape": [], "dtype": "U8"}, "out of range for U8"),
        ({"op": "fill", "value": 2, "shape": [], "dtype": "BOOL"}, "out of range for BOOL"),
    ],
)
def test_validate_rejects(op: object, message: str) -> None:
    with pytest.raises(InvalidAdapter) as info:
        validate_op(op)
    assert message in info.value.message


# ------------------------------------------------------------------------------- inference


def test_infer_shapes_and_dtypes() -> None:
    assert infer({"op": "slice", "dim": 0, "start": 0, "stop": 30}, (1000, 2048), "F32") == (
        (30, 2048),
        "F32",
    )
    assert infer({"op": "pad", "dim": 0, "size": 12, "value": 0.0}, (10, 4), "F16") == (
        (12, 4),
        "F16",
    )
    assert infer(ops.adapt_in_channels_op(4), (64, 3, 7, 7), "BF16") == ((64, 4, 7, 7), "BF16")
    resample = ops.resample_pos_embed_op(1, [14, 14], [24, 24])
    assert infer(resample, (1, 197, 768), "F32") == ((1, 577, 768), "F32")
    assert infer({"op": "reshape", "shape": [6, 4]}, (2, 3, 4), "F32") == ((6, 4), "F32")
    assert infer({"op": "transpose", "dims": [1, 0, 2]}, (2, 3, 4), "F32") == ((3, 2, 4), "F32")
    assert infer(ops.cast_op("F32"), (3,), "F16") == ((3,), "F32")
    assert infer(ops.fill_op(0, [], "I64"), (99,), "F32") == ((), "I64")


def test_infer_chain_composes() -> None:
    chain = [{"op": "transpose", "dims": [1, 0]}, ops.slice_op(0, 0, 2), ops.cast_op("F32")]
    assert infer_chain(chain, (5, 3), "F16") == ((2, 5), "F32")
    assert infer_chain([], (5, 3), "F16") == ((5, 3), "F16")


@pytest.mark.parametrize(
    ("op", "shape", "dtype", "message"),
    [
        (ops.slice_op(0, 0, 1001), (1000, 8), "F32", "beyond dim 0"),
        (ops.slice_op(2, 0, 1), (1000, 8), "F32", "dim 2 out of range"),
        (ops.pad_op(0, 5), (10,), "F32", "smaller than dim 0"),
        (ops.pad_op(0, 12, 0.5), (10,), "I64", "not representable"),
        (ops.adapt_in_channels_op(1), (8, 3, 3, 3), "I64", "floating-point"),
        (ops.resample_pos_embed_op(1, [14, 14], [24, 24]), (1, 196, 768), "F32", "expected [1,"),
        (ops.resample_pos_embed_op(0, [14, 14], [24, 24]), (196, 768), "F32", "expected [1,"),
        ({"op": "reshape", "shape": [5]}, (2, 3), "F32", "cannot reshape"),
        ({"op": "transpose", "dims": [1, 0]}, (2, 3, 4), "F32", "do not match"),
        ({"op": "nope"}, (1,), "F32", "unknown op"),
        ({"op": "slice", "dim": 0}, (1,), "F32", "malformed op"),
    ],
)
def test_infer_refuses(op: dict, shape: tuple[int, ...], dtype: str, message: str) -> None:
    with pytest.raises(OpError, match=message.replace("[", r"\[")):
        infer(op, shape, dtype)


def test_op_error_is_a_value_error() -> None:
    assert issubclass(OpError, ValueError)


# ------------------------------------------------------------------------------- applying


def test_adapt_to_one_channel_is_the_sum() -> None:
    weight = torch.randn(8, 3, 5, 5)
    out = apply(ops.adapt_in_channels_op(1), weight)
    assert out.shape == (8, 1, 5, 5)
    assert torch.equal(out, weight.sum(dim=1, keepdim=True))


def test_adapt_to_four_channels_repeats_and_rescales_exactly() -> None:
    weight = torch.randn(8, 3, 5, 5)
    out = apply(ops.adapt_in_channels_op(4), weight)
    expected = weight.repeat(1, 2, 1, 1)[:, :4] * (3 / 4)
    assert out.shape == (8, 4, 5, 5)
    assert torch.equal(out, expected)
    assert torch.equal(out[:, 3], weight[:, 0] * 0.75)


def test_adapt_computes_in_float32_and_casts_back() -> None:
    weight = torch.randn(4, 3, 3, 3).to(torch.bfloat16)
    out = apply(ops.adapt_in_channels_op(2), weight)
    assert out.dtype == torch.bfloat16
    expected = (weight.float().repeat(1, 1, 1, 1)[:, :2] * (3 / 2)).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_adapt_same_channels_is_identity() -> None:
    weight = torch.randn(4, 3, 3, 3)
    assert torch.equal(apply(ops.adapt_in_channels_op(3), weight), weight)


def test_resample_pos_embed_keeps_prefix_tokens_bitwise() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 32)
    out = apply(ops.resample_pos_embed_op(1, [14, 14], [24, 24]), pos)
    assert out.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(out[:, :1], pos[:, :1])
    assert out.is_contiguous()


def test_resample_pos_embed_matches_interpolate_on_the_grid() -> None:
    pos = torch.randn(1, 2 + 4 * 4, 8, dtype=torch.float16)
    out = apply(ops.resample_pos_embed_op(2, [4, 4], [6, 6]), pos)
    grid = pos[:, 2:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False
    )
    expected = expected.permute(0, 2, 3, 1).reshape(1, 36, 8).to(torch.float16)
    assert out.dtype == torch.float16
    assert torch.equal(out[:, 2:], expected)
    assert torch.equal(out[:, :2], pos[:, :2])


def test_resample_to_the_same_grid_is_identity() -> None:
    pos = torch.randn(1, 5, 4)
    assert torch.equal(apply(ops.resample_pos_embed_op(1, [2, 2], [2, 2]), pos), pos)


def test_slice_copies_the_rows() -> None:
    weight = torch.arange(20.0).reshape(10, 2)
    out = apply(ops.slice_op(0, 2, 5), weight)
    assert torch.equal(out, torch.tensor([[4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]))
    # A copy, not a view pinning the source's storage.
    assert out.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    columns = apply(ops.slice_op(1, 1, 2), weight)
    assert columns.is_contiguous() and torch.equal(columns, weight[:, 1:2])


def test_pad_appends_the_value() -> None:
    weight = torch.ones(2, 3)
    out = apply(ops.pad_op(0, 4, 0.0), weight)
    assert torch.equal(out, torch.tensor([[1.0] * 3, [1.0] * 3, [0.0] * 3, [0.0] * 3]))
    wider = apply(ops.pad_op(1, 5, -1.0), weight)
    assert torch.equal(wider[:, 3:], torch.full((2, 2), -1.0))
    ints = apply(ops.pad_op(0, 3, 7.0), torch.tensor([1, 2], dtype=torch.int64))
    assert ints.dtype == torch.int64 and ints.tolist() == [1, 2, 7]


def test_reshape_and_transpose_are_contiguous() -> None:
    weight = torch.arange(24.0).reshape(2, 3, 4)
    out = apply({"op": "transpose", "dims": [2, 0, 1]}, weight)
    assert out.is_contiguous() and torch.equal(out, weight.permute(2, 0, 1))
    flat = apply({"op": "reshape", "shape": [6, 4]}, weight)
    assert torch.equal(flat, weight.reshape(6, 4))


def test_cast_between_dtypes() -> None:
    half = torch.tensor([1.5, -2.25], dtype=torch.float16)
    out = apply(ops.cast_op("F32"), half)
    assert out.dtype == torch.float32 and out.tolist() == [1.5, -2.25]
    assert apply(ops.cast_op("BF16"), out).dtype == torch.bfloat16
    assert apply(ops.cast_op("F8_E4M3"), out).dtype == torch.float8_e4m3fn


def test_fill_ignores_its_input() -> None:
    out = apply(ops.fill_op(0, [], "I64"), None)
    assert out.dtype == torch.int64 and out.shape == () and out.item() == 0
    ones = apply({"op": "fill", "value": 1.5, "shape": [2, 2], "dtype": "F16"}, torch.zeros(9))
    assert torch.equal(ones, torch.full((2, 2), 1.5, dtype=torch.float16))


def test_apply_chain_applies_in_order() -> None:
    weight = torch.arange(6.0, dtype=torch.float16).reshape(3, 2)
    chain = [{"op": "transpose", "dims": [1, 0]}, ops.slice_op(0, 1, 2), ops.cast_op("F32")]
    out = apply_chain(chain, weight)
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 3.0, 5.0]]
    assert apply_chain([], weight) is weight  # already contiguous: nothing copied


def test_apply_refuses_what_inference_refuses() -> None:
    with pytest.raises(OpError, match="beyond dim 0"):
        apply(ops.slice_op(0, 0, 5), torch.zeros(3))
    with pytest.raises(OpError, match="needs an input"):
        apply(ops.cast_op("F32"), None)
    with pytest.raises(OpError, match="unknown op"):
        apply({"op": "explode"}, torch.zeros(1))


# ------------------------------------------------------------------------------- dtypes


def test_torch_dtypes_cover_every_safetensors_code() -> None:
    assert set(ops.TORCH_DTYPES) == set(DTYPE_SIZES)
    assert ops.TORCH_DTYPES["F8_E4M3"] is torch.float8_e4m3fn
    assert ops.TORCH_DTYPES["F8_E5M2"] is torch.float8_e5m2
    for code, dtype in ops.TORCH_DTYPES.items():
        assert ops.dtype_code(dtype) == code
        assert torch.empty((), dtype=dtype).element_size() == DTYPE_SIZES[code]


def test_dtype_code_refuses_what_safetensors_cannot_hold() -> None:
    with pytest.raises(OpError, match="unsupported dtype"):
        ops.dtype_code(torch.complex64)


def test_fill_every_dtype() -> None:
    for code in DTYPE_SIZES:
        out = apply(ops.fill_op(1, [2], code), None)
        assert ops.dtype_code(out.dtype) == code
        assert math.isclose(float(out.float()[0]), 1.0)


def test_the_planner_side_does_not_import_torch() -> None:
    # Planning works on specs alone; only applying ops needs torch.
    code = (
        "import sys; import service.core.planner, service.core.adapters, service.core.ops; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
