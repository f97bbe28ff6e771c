"""Tensor ops as data (DESIGN sections 5-6).

An op is a plain JSON dict ``{"op": name, **args}``. The planner writes them into plans,
adapters carry them as rules, and the fetch stream applies them tensor by tensor:

    slice               dim, start, stop            rows/columns [start, stop) of ``dim``
    pad                 dim, size, value=0.0        pad the end of ``dim`` up to ``size``
    adapt_in_channels   in_chans, dim=1             timm's ``adapt_input_conv``
    resample_pos_embed  num_prefix_tokens, old_grid, new_grid, mode="bicubic"
    reshape             shape
    transpose           dims (a permutation: torch's ``permute``)
    unflatten           dim, sizes                  split ``dim`` into ``sizes`` (one may be -1)
    flatten             start, end                  merge dims ``start..end`` (inclusive)
    concat              dim                         join several inputs along ``dim``
    stack               dim                         stack several inputs on a new ``dim``
    cast                dtype (a safetensors code)
    fill                value, shape, dtype         a new tensor; the input is ignored

``concat`` and ``stack`` combine the inputs of an entry that derives one tensor from several
(a fused qkv from q, k, v); they come first in a chain and only there (``infer_inputs``,
``apply_inputs``). ``validate_op`` checks user-supplied ops (adapters); ``infer`` /
``infer_chain`` give the shape and dtype an op produces without touching data, which is all
the planner needs.
torch is imported lazily, only by ``apply`` and the dtype helpers, so the planner and the
adapters stay importable (and fast to import) without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from service.core.spec import DTYPE_SIZES, FLOAT_DTYPES
from service.errors import InvalidAdapter

if TYPE_CHECKING:
    import torch

    # safetensors dtype code -> torch dtype (built lazily by the module __getattr__).
    TORCH_DTYPES: dict[str, torch.dtype]

Shape = tuple[int, ...]
Op = dict[str, Any]

# Bounds on user-supplied numbers: beyond them a value is a mistake or an attack.
MAX_DIM = 2**40
MAX_NUMEL = 2**40
MAX_RANK = 64
RESAMPLE_MODES = ("bicubic", "bilinear")

_INT_RANGES: dict[str, tuple[int, int]] = {
    "U8": (0, 2**8 - 1),
    "I8": (-(2**7), 2**7 - 1),
    "U16": (0, 2**16 - 1),
    "I16": (-(2**15), 2**15 - 1),
    "U32": (0, 2**32 - 1),
    "I32": (-(2**31), 2**31 - 1),
    "U64": (0, 2**64 - 1),
    "I64": (-(2**63), 2**63 - 1),
    "BOOL": (0, 1),
}


class OpError(ValueError):
    """An op cannot apply to the shape, dtype or tensor it was given."""


# --------------------------------------------------------------------------- constructors
# The planner builds its ops through these, so every op it writes is already normalised.


def slice_op(dim: int, start: int, stop: int) -> Op:
    return {"op": "slice", "dim": dim, "start": start, "stop": stop}


def pad_op(dim: int, size: int, value: float = 0.0) -> Op:
    return {"op": "pad", "dim": dim, "size": size, "value": float(value)}


def adapt_in_channels_op(in_chans: int, dim: int = 1) -> Op:
    return {"op": "adapt_in_channels", "in_chans": in_chans, "dim": dim}


def resample_pos_embed_op(
    num_prefix_tokens: int, old_grid: Sequence[int], new_grid: Sequence[int], mode: str = "bicubic"
) -> Op:
    return {
        "op": "resample_pos_embed",
        "num_prefix_tokens": num_prefix_tokens,
        "old_grid": list(old_grid),
        "new_grid": list(new_grid),
        "mode": mode,
    }


def cast_op(dtype: str) -> Op:
    return {"op": "cast", "dtype": dtype}


def fill_op(value: float | bool, shape: Sequence[int], dtype: str) -> Op:
    try:
        return {
            "op": "fill",
            "value": _fill_value(value, dtype),
            "shape": list(shape),
            "dtype": dtype,
        }
    except _Bad as exc:
        raise OpError(f"fill: {exc}") from None


def unflatten_op(dim: int, sizes: Sequence[int]) -> Op:
    return {"op": "unflatten", "dim": dim, "sizes": list(sizes)}


def flatten_op(start: int, end: int) -> Op:
    return {"op": "flatten", "start": start, "end": end}


def combine_op(name: str, dim: int) -> Op:
    """``concat`` or ``stack`` along ``dim``: the first op of a several-input chain."""
    if name not in COMBINING_OPS:
        raise OpError(f"{name!r} does not combine inputs; use one of {sorted(COMBINING_OPS)}")
    return {"op": name, "dim": dim}


def describe_op(op: Op) -> str:
    """A short human-readable form, e.g. ``slice(dim=0, start=0, stop=30)``."""
    args = ", ".join(f"{k}={v}" for k, v in op.items() if k != "op")
    return f"{op.get('op')}({args})"


# ----------------------------------------------------------------------------- validation


class _Bad(Exception):
    """Internal: one argument is wrong; validate_op adds the op's name to the message."""


def _int(value: Any, name: str, *, low: int = 0, high: int = MAX_DIM) -> int:
    # bool is an int in Python; a JSON `true` is never a meaningful dimension.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise _Bad(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise _Bad(f"{name} must be finite, got {value!r}")
    return float(value)


def _shape(value: Any, name: str, *, min_dim: int = 0) -> list[int]:
    if not isinstance(value, list | tuple):
        raise _Bad(f"{name} must be a list of integers, got {value!r}")
    if len(value) > MAX_RANK:
        raise _Bad(f"{name} has {len(value)} dims, at most {MAX_RANK} allowed")
    dims = [_int(d, f"{name}[{i}]", low=min_dim) for i, d in enumerate(value)]
    if math.prod(dims) > MAX_NUMEL:
        raise _Bad(f"{name} {dims} has more than {MAX_NUMEL} elements")
    return dims


def _grid(value: Any, name: str) -> list[int]:
    dims = _shape(value, name, min_dim=1)
    if len(dims) != 2:
        raise _Bad(f"{name} must be [height, width], got {value!r}")
    return dims


def _dtype(value: Any, name: str = "dtype") -> str:
    if value not in DTYPE_SIZES:
        raise _Bad(f"{name} must be one of {sorted(DTYPE_SIZES)}, got {value!r}")
    return str(value)


def _fill_value(value: Any, dtype: str) -> float | int | bool:
    """The fill/pad value as the dtype can hold it: bool, an in-range int, or a float."""
    if dtype in FLOAT_DTYPES:
        return _number(value, "value")
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise _Bad(f"value must be a number, got {value!r}")
    if not float(value).is_integer():
        raise _Bad(f"value {value!r} is not representable in {dtype}")
    low, high = _INT_RANGES[dtype]
    if not low <= int(value) <= high:
        raise _Bad(f"value {value!r} is out of range for {dtype}")
    return bool(value) if dtype == "BOOL" else int(value)


def _validate_slice(args: dict[str, Any]) -> Op:
    dim = _int(args["dim"], "dim", high=MAX_RANK - 1)
    start = _int(args["start"], "start")
    stop = _int(args["stop"], "stop")
    if stop < start:
        raise _Bad(f"stop ({stop}) must be >= start ({start})")
    return slice_op(dim, start, stop)


def _validate_pad(args: dict[str, Any]) -> Op:
    return pad_op(
        _int(args["dim"], "dim", high=MAX_RANK - 1),
        _int(args["size"], "size"),
        _number(args.get("value", 0.0), "value"),
    )


def _validate_adapt(args: dict[str, Any]) -> Op:
    return adapt_in_channels_op(
        _int(args["in_chans"], "in_chans", low=1),
        _int(args.get("dim", 1), "dim", high=MAX_RANK - 1),
    )


def _validate_resample(args: dict[str, Any]) -> Op:
    mode = args.get("mode", "bicubic")
    if mode not in RESAMPLE_MODES:
        raise _Bad(f"mode must be one of {list(RESAMPLE_MODES)}, got {mode!r}")
    return resample_pos_embed_op(
        _int(args["num_prefix_tokens"], "num_prefix_tokens"),
        _grid(args["old_grid"], "old_grid"),
        _grid(args["new_grid"], "new_grid"),
        mode,
    )


def _validate_reshape(args: dict[str, Any]) -> Op:
    return {"op": "reshape", "shape": _shape(args["shape"], "shape")}


def _validate_transpose(args: dict[str, Any]) -> Op:
    dims = _shape(args["dims"], "dims")
    if sorted(dims) != list(range(len(dims))):
        raise _Bad(f"dims must be a permutation of 0..{len(dims) - 1}, got {dims}")
    return {"op": "transpose", "dims": dims}


def _validate_unflatten(args: dict[str, Any]) -> Op:
    dim = _int(args["dim"], "dim", high=MAX_RANK - 1)
    sizes = args["sizes"]
    if not isinstance(sizes, list | tuple) or not 1 <= len(sizes) <= MAX_RANK:
        raise _Bad(f"sizes must be a list of 1 to {MAX_RANK} integers, got {sizes!r}")
    checked = [
        -1 if s == -1 and not isinstance(s, bool) else _int(s, f"sizes[{i}]", low=1)
        for i, s in enumerate(sizes)
    ]
    if checked.count(-1) > 1:
        raise _Bad(f"sizes may infer one dimension (-1), got {checked}")
    return unflatten_op(dim, checked)


def _validate_flatten(args: dict[str, Any]) -> Op:
    start = _int(args["start"], "start", high=MAX_RANK - 1)
    end = _int(args["end"], "end", high=MAX_RANK - 1)
    if end < start:
        raise _Bad(f"end ({end}) must be >= start ({start})")
    return flatten_op(start, end)


def _validate_combine(name: str) -> Callable[[dict[str, Any]], Op]:
    return lambda args: combine_op(name, _int(args["dim"], "dim", high=MAX_RANK - 1))


def _validate_cast(args: dict[str, Any]) -> Op:
    return cast_op(_dtype(args["dtype"]))


def _validate_fill(args: dict[str, Any]) -> Op:
    dtype = _dtype(args["dtype"])
    value = _fill_value(args["value"], dtype)
    return {"op": "fill", "value": value, "shape": _shape(args["shape"], "shape"), "dtype": dtype}


# op name -> (required args, optional args, validator)
_SCHEMAS: dict[str, tuple[frozenset[str], frozenset[str], Callable[[dict[str, Any]], Op]]] = {
    "slice": (frozenset({"dim", "start", "stop"}), frozenset(), _validate_slice),
    "pad": (frozenset({"dim", "size"}), frozenset({"value"}), _validate_pad),
    "adapt_in_channels": (frozenset({"in_chans"}), frozenset({"dim"}), _validate_adapt),
    "resample_pos_embed": (
        frozenset({"num_prefix_tokens", "old_grid", "new_grid"}),
        frozenset({"mode"}),
        _validate_resample,
    ),
    "reshape": (frozenset({"shape"}), frozenset(), _validate_reshape),
    "transpose": (frozenset({"dims"}), frozenset(), _validate_transpose),
    "unflatten": (frozenset({"dim", "sizes"}), frozenset(), _validate_unflatten),
    "flatten": (frozenset({"start", "end"}), frozenset(), _validate_flatten),
    "concat": (frozenset({"dim"}), frozenset(), _validate_combine("concat")),
    "stack": (frozenset({"dim"}), frozenset(), _validate_combine("stack")),
    "cast": (frozenset({"dtype"}), frozenset(), _validate_cast),
    "fill": (frozenset({"value", "shape", "dtype"}), frozenset(), _validate_fill),
}
OP_NAMES = tuple(_SCHEMAS)
# Ops that take several inputs; the rest take one (or none: fill).
COMBINING_OPS = frozenset({"concat", "stack"})


def validate_op(op: Any) -> Op:
    """A normalised copy of a user-supplied op (defaults filled in), or InvalidAdapter."""
    if not isinstance(op, dict):
        raise InvalidAdapter(f"an op must be an object, got {type(op).__name__}")
    name = op.get("op")
    if not isinstance(name, str) or name not in _SCHEMAS:
        raise InvalidAdapter(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    required, optional, validator = _SCHEMAS[name]
    args = {k: v for k, v in op.items() if k != "op"}
    missing = sorted(required - args.keys())
    extra = sorted(args.keys() - required - optional)
    if missing or extra:
        problems = [f"missing {missing}"] if missing else []
        problems += [f"unexpected {extra}"] if extra else []
        raise InvalidAdapter(f"op {name!r}: {'; '.join(problems)} arguments")
    try:
        return validator(args)
    except _Bad as exc:
        raise InvalidAdapter(f"op {name!r}: {exc}") from None


# ------------------------------------------------------------------------------ inference


def _check_dim(op: Op, shape: Shape) -> int:
    dim = int(op["dim"])
    if dim >= len(shape):
        raise OpError(f"{op['op']}: dim {dim} out of range for shape {list(shape)}")
    return dim


def _require_float(op: Op, dtype: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise OpError(f"{op['op']}: needs a floating-point tensor, got {dtype}")


def _infer_slice(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    dim = _check_dim(op, shape)
    if op["stop"] > shape[dim]:
        raise OpError(f"slice: stop {op['stop']} beyond dim {dim} of shape {list(shape)}")
    return _with_dim(shape, dim, op["stop"] - op["start"]), dtype


def _infer_pad(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    dim = _check_dim(op, shape)
    if op["size"] < shape[dim]:
        raise OpError(f"pad: size {op['size']} smaller than dim {dim} of shape {list(shape)}")
    try:
        _fill_value(op.get("value", 0.0), dtype)
    except _Bad as exc:
        raise OpError(f"pad: {exc}") from None
    return _with_dim(shape, dim, op["size"]), dtype


def _infer_adapt(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    dim = _check_dim(op, shape)
    _require_float(op, dtype)
    if shape[dim] < 1:
        raise OpError(f"adapt_in_channels: dim {dim} of shape {list(shape)} is empty")
    return _with_dim(shape, dim, op["in_chans"]), dtype


def _infer_resample(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    _require_float(op, dtype)
    prefix = op["num_prefix_tokens"]
    (old_h, old_w), (new_h, new_w) = op["old_grid"], op["new_grid"]
    if len(shape) != 3 or shape[0] != 1 or shape[1] != prefix + old_h * old_w:
        raise OpError(
            f"resample_pos_embed: expected [1, {prefix}+{old_h}*{old_w}, D], got {list(shape)}"
        )
    return (1, prefix + new_h * new_w, shape[2]), dtype


def _infer_reshape(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    new = tuple(op["shape"])
    if math.prod(new) != math.prod(shape):
        raise OpError(f"reshape: cannot reshape {list(shape)} into {list(new)}")
    return new, dtype


def _infer_transpose(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    dims = op["dims"]
    if len(dims) != len(shape):
        raise OpError(f"transpose: dims {dims} do not match shape {list(shape)}")
    return tuple(shape[d] for d in dims), dtype


def _infer_unflatten(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    dim = _check_dim(op, shape)
    sizes = list(op["sizes"])
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known == 0 or shape[dim] % known:
            raise OpError(
                f"unflatten: dim {dim} of shape {list(shape)} ({shape[dim]}) is not divisible "
                f"by {known} (sizes {sizes})"
            )
        sizes[sizes.index(-1)] = shape[dim] // known
    elif known != shape[dim]:
        raise OpError(
            f"unflatten: sizes {sizes} hold {known} elements, dim {dim} of shape "
            f"{list(shape)} holds {shape[dim]}"
        )
    return (*shape[:dim], *sizes, *shape[dim + 1 :]), dtype


def _infer_flatten(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    start, end = op["start"], op["end"]
    if end >= len(shape):
        raise OpError(f"flatten: dims {start}..{end} out of range for shape {list(shape)}")
    return (*shape[:start], math.prod(shape[start : end + 1]), *shape[end + 1 :]), dtype


def _infer_cast(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    return shape, op["dtype"]


def _infer_fill(op: Op, shape: Shape, dtype: str) -> tuple[Shape, str]:
    return tuple(op["shape"]), op["dtype"]


def _with_dim(shape: Shape, dim: int, size: int) -> Shape:
    return (*shape[:dim], size, *shape[dim + 1 :])


_INFER: dict[str, Callable[[Op, Shape, str], tuple[Shape, str]]] = {
    "slice": _infer_slice,
    "pad": _infer_pad,
    "adapt_in_channels": _infer_adapt,
    "resample_pos_embed": _infer_resample,
    "reshape": _infer_reshape,
    "transpose": _infer_transpose,
    "unflatten": _infer_unflatten,
    "flatten": _infer_flatten,
    "cast": _infer_cast,
    "fill": _infer_fill,
}


def infer(op: Op, shape: Sequence[int], dtype: str) -> tuple[Shape, str]:
    """Shape and dtype that a normalised op produces from ``shape``/``dtype``, or OpError."""
    fn = _INFER.get(op.get("op"))  # type: ignore[arg-type]
    if fn is None:
        raise OpError(f"unknown op {op.get('op')!r}")
    try:
        return fn(op, tuple(shape), dtype)
    except (KeyError, TypeError) as exc:
        raise OpError(f"malformed op {op!r}: {exc}") from None


def infer_chain(ops: Sequence[Op], shape: Sequence[int], dtype: str) -> tuple[Shape, str]:
    current, current_dtype = tuple(shape), dtype
    for op in ops:
        current, current_dtype = infer(op, current, current_dtype)
    return current, current_dtype


def infer_combine(op: Op, inputs: Sequence[tuple[Sequence[int], str]]) -> tuple[Shape, str]:
    """Shape and dtype of ``concat`` / ``stack`` over ``inputs`` (shape, dtype) pairs:
    every input of one dtype and rank, equal in every dim but ``dim`` (concat) or in all
    (stack). OpError says which input disagrees."""
    name, dim = op.get("op"), int(op["dim"])
    if name not in COMBINING_OPS:
        raise OpError(f"{name!r} does not combine inputs")
    if len(inputs) < 2:
        raise OpError(f"{name}: needs at least two inputs, got {len(inputs)}")
    first_shape, first_dtype = tuple(inputs[0][0]), inputs[0][1]
    rank = len(first_shape) + (1 if name == "stack" else 0)
    if dim >= rank:
        raise OpError(f"{name}: dim {dim} out of range for inputs of shape {list(first_shape)}")
    for i, (shape, dtype) in enumerate(inputs[1:], start=1):
        if dtype != first_dtype:
            raise OpError(f"{name}: input {i} is {dtype}, input 0 is {first_dtype}")
        other = tuple(shape)
        same = (
            other == first_shape
            if name == "stack"
            else len(other) == len(first_shape)
            and all(
                a == b for d, (a, b) in enumerate(zip(other, first_shape, strict=True)) if d != dim
            )
        )
        if not same:
            raise OpError(
                f"{name}: input {i} has shape {list(other)}, which does not "
                f"{'equal' if name == 'stack' else 'line up with'} input 0's "
                f"{list(first_shape)} along dim {dim}"
            )
    if name == "stack":
        return (*first_shape[:dim], len(inputs), *first_shape[dim:]), first_dtype
    total = sum(tuple(shape)[dim] for shape, _ in inputs)
    return _with_dim(first_shape, dim, total), first_dtype


def infer_inputs(
    ops: Sequence[Op], inputs: Sequence[tuple[Sequence[int], str]]
) -> tuple[Shape, str]:
    """Shape and dtype of a chain over its inputs: several inputs need a combining first op."""
    if ops and ops[0].get("op") in COMBINING_OPS:
        shape, dtype = infer_combine(ops[0], inputs)
        return infer_chain(ops[1:], shape, dtype)
    if len(inputs) != 1:
        raise OpError(f"{len(inputs)} inputs need concat or stack first")
    return infer_chain(ops, *inputs[0])


# ------------------------------------------------------------------------------- applying


def _torch() -> Any:
    import torch

    return torch


@functools.cache
def _torch_dtypes() -> dict[str, Any]:
    torch = _torch()
    return {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "I64": torch.int64,
        "U64": torch.uint64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


@functools.cache
def _dtype_codes() -> dict[Any, str]:
    return {v: k for k, v in _torch_dtypes().items()}


def __getattr__(name: str) -> Any:
    # PEP 562: TORCH_DTYPES is built on first access so importing this module needs no torch.
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (OpError for dtypes safetensors cannot hold)."""
    try:
        return _dtype_codes()[dtype]
    except KeyError:
        raise OpError(f"unsupported dtype {dtype}") from None


def _apply_slice(op: Op, t: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: a small slice must not pin the whole source tensor's storage.
    narrowed = t.narrow(op["dim"], op["start"], op["stop"] - op["start"])
    return narrowed.clone(memory_format=_torch().contiguous_format)


def _apply_pad(op: Op, t: torch.Tensor) -> torch.Tensor:
    dim = op["dim"]
    shape = list(t.shape)
    shape[dim] = op["size"]
    out = t.new_full(shape, _fill_value(op.get("value", 0.0), dtype_code(t.dtype)))
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _apply_adapt(op: Op, t: torch.Tensor) -> torch.Tensor:
    # timm.models._manipulate.adapt_input_conv, generalised to any source channel count.
    dim, in_chans, src_chans = op["dim"], op["in_chans"], t.shape[op["dim"]]
    if in_chans == src_chans:
        return t.contiguous()
    weight = t.float()
    if in_chans == 1:
        weight = weight.sum(dim=dim, keepdim=True)
    else:
        repeats = [1] * t.ndim
        repeats[dim] = math.ceil(in_chans / src_chans)
        weight = weight.repeat(*repeats).narrow(dim, 0, in_chans)
        weight = weight * (src_chans / float(in_chans))
    return weight.to(t.dtype).contiguous()


def _apply_resample(op: Op, t: torch.Tensor) -> torch.Tensor:
    # timm.layers.resample_abs_pos_embed: prefix tokens untouched, the grid interpolated.
    torch = _torch()
    prefix, (old_h, old_w), new_grid = op["num_prefix_tokens"], op["old_grid"], op["new_grid"]
    if list(new_grid) == [old_h, old_w]:
        return t.contiguous()
    dim = t.shape[-1]
    prefix_tokens, grid = t[:, :prefix], t[:, prefix:]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(
        grid,
        size=tuple(new_grid),
        mode=op.get("mode", "bicubic"),
        antialias=True,
        align_corners=False,
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(t.dtype)
    return torch.cat([prefix_tokens, grid], dim=1).contiguous()


def _apply_reshape(op: Op, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(op["shape"]).contiguous()


def _apply_transpose(op: Op, t: torch.Tensor) -> torch.Tensor:
    return t.permute(*op["dims"]).contiguous()


def _apply_unflatten(op: Op, t: torch.Tensor) -> torch.Tensor:
    shape, _ = _infer_unflatten(op, tuple(t.shape), "")
    return t.reshape(shape).contiguous()


def _apply_flatten(op: Op, t: torch.Tensor) -> torch.Tensor:
    return t.flatten(op["start"], op["end"]).contiguous()


def _apply_cast(op: Op, t: torch.Tensor) -> torch.Tensor:
    return t.to(_torch_dtypes()[op["dtype"]]).contiguous()


def _apply_fill(op: Op, t: torch.Tensor | None) -> torch.Tensor:
    dtype = op["dtype"]
    return _torch().full(op["shape"], _fill_value(op["value"], dtype), dtype=_torch_dtypes()[dtype])


_APPLY: dict[str, Callable[[Op, Any], Any]] = {
    "slice": _apply_slice,
    "pad": _apply_pad,
    "adapt_in_channels": _apply_adapt,
    "resample_pos_embed": _apply_resample,
    "reshape": _apply_reshape,
    "transpose": _apply_transpose,
    "unflatten": _apply_unflatten,
    "flatten": _apply_flatten,
    "cast": _apply_cast,
    "fill": _apply_fill,
}


def apply(op: Op, tensor: torch.Tensor | None) -> torch.Tensor:
    """Apply one normalised op; the result is contiguous. OpError if it cannot apply."""
    name = op.get("op")
    if name == "fill":
        return _apply_fill(op, tensor)
    if name in COMBINING_OPS:
        raise OpError(f"{name}: combines several inputs; it must be a chain's first op")
    if name not in _APPLY:
        raise OpError(f"unknown op {name!r}")
    if tensor is None:
        raise OpError(f"{name}: needs an input tensor")
    # Inference first: a clean OpError instead of whatever torch would raise mid-op.
    expected_shape, _ = infer(op, tuple(tensor.shape), dtype_code(tensor.dtype))
    out = _APPLY[name](op, tensor)
    if tuple(out.shape) != expected_shape:  # an internal bug, never a user's mistake
        raise AssertionError(f"{name} produced {list(out.shape)}, expected {expected_shape}")
    return out


def apply_chain(ops: Sequence[Op], tensor: torch.Tensor | None) -> torch.Tensor:
    """Apply ops in order. An empty chain returns the tensor itself, made contiguous."""
    if not ops:
        if tensor is None:
            raise OpError("an empty op chain needs an input tensor")
        return tensor.contiguous()
    result = tensor
    for op in ops:
        result = apply(op, result)
    assert result is not None
    return result


def apply_inputs(ops: Sequence[Op], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply a chain to its inputs: several inputs are first combined by ``ops[0]``."""
    if ops and ops[0].get("op") in COMBINING_OPS:
        expected = infer_combine(ops[0], [(tuple(t.shape), dtype_code(t.dtype)) for t in inputs])
        join = _torch().cat if ops[0]["op"] == "concat" else _torch().stack
        combined = join(list(inputs), dim=ops[0]["dim"])
        if tuple(combined.shape) != expected[0]:  # an internal bug, never a user's mistake
            raise AssertionError(f"{ops[0]['op']} produced {list(combined.shape)}")
        return apply_chain(ops[1:], combined)
    if len(inputs) != 1:
        raise OpError(f"{len(inputs)} inputs need concat or stack first")
    return apply_chain(ops, inputs[0])
