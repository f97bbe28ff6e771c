"""Specs of local objects, and safetensors written and read as streams.

The client never sends a module, only its spec: ``(key, shape, dtype)`` in state_dict order
and the tie groups (keys sharing storage).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Tables the server holds too (service/core/snapshot.py, service/core/planner.py, spec.py):
# tests/test_parity.py fails when the two drift apart.
# Where training snapshots keep the weights, in the order the server looks.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "model_state",
    "weights",
    "params",
)
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema", "ema_model", "model_ema_state")
# Training state beside the weights: never taken for them, dropped on push.
OPTIMIZER_KEYS = frozenset(
    {
        "optimizer",
        "optimizer_state_dict",
        "optimizers",
        "optimizer_states",
        "optim",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "scaler",
        "grad_scaler",
        "amp",
    }
)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def dtype_code(dtype: torch.dtype) -> str:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"statehub cannot store tensors of dtype {dtype}") from None


def state_dict_of(obj: Any) -> dict[str, torch.Tensor]:
    """The state_dict of a module, or a mapping of tensors as it is."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise TypeError(
        f"expected an nn.Module or a dict of tensors, got {type(obj).__name__}; "
        "a training snapshot? pass its path and the server extracts the weights"
    )


def tie_groups(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Keys that are the same view of one storage (a module registered twice, tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in state_dict.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        identity = (
            t.device.type,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        groups.setdefault(identity, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def spec_of_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "tensors": [
            {"key": k, "shape": list(t.shape), "dtype": dtype_code(t.dtype)}
            for k, t in state_dict.items()
        ],
        "tie_groups": tie_groups(state_dict),
    }


def spec_of(target: Any) -> dict[str, Any]:
    """A target spec from a module, a state_dict, a spec dict, or a checkpoint/spec file."""
    if isinstance(target, (str, Path)):
        return spec_of_file(Path(target))
    if isinstance(target, Mapping) and "tensors" in target:
        return {
            "tensors": list(target["tensors"]),
            "tie_groups": list(target.get("tie_groups", [])),
        }
    return spec_of_state_dict(state_dict_of(target))


def spec_of_file(path: Path) -> dict[str, Any]:
    """Reads only what the spec needs: a safetensors header, or a torch file on ``meta``."""
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint or spec file: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return spec_of(data)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        loaded = torch.load(path, map_location="meta", weights_only=True)
        state_dict, _ = extract_state_dict(loaded)
        if state_dict is None:
            raise ValueError(f"{path}: no state_dict found (a plain dict of tensors or a snapshot)")
        return spec_of_state_dict(state_dict)
    try:
        header = read_safetensors_header(path)
    except ValueError as exc:
        raise ValueError(f"{path}: not a safetensors or torch checkpoint: {exc}") from None
    return {
        "tensors": [
            {"key": k, "shape": v["shape"], "dtype": v["dtype"]}
            for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
            if k != "__metadata__"
        ],
        "tie_groups": [],
    }


def is_state_dict(value: Any) -> TypeGuard[Mapping[str, torch.Tensor]]:
    """A non-empty mapping of string keys to tensors."""
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def extract_state_dict(
    loaded: Any, *, ema: bool = False
) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The state_dict in a loaded torch file and where it was, looked for as the server does.

    Returns ``(None, None)`` when there is none; ``origin`` is None for a plain state_dict.
    """
    if is_state_dict(loaded):
        return dict(loaded), None
    if not isinstance(loaded, Mapping):
        return None, None
    order = EMA_KEYS if ema else (*STATE_DICT_KEYS, *EMA_KEYS)
    for key in order:
        if (found := _state_dict_under(loaded, key)) is not None:
            return found
    if ema:
        return None, None
    # Weights under one key statehub does not know (and not training state) are taken too.
    others = [
        found
        for key in loaded
        if key not in OPTIMIZER_KEYS and (found := _state_dict_under(loaded, key)) is not None
    ]
    return others[0] if len(others) == 1 else (None, None)


def _state_dict_under(
    loaded: Mapping[Any, Any], key: Any
) -> tuple[dict[str, torch.Tensor], str] | None:
    """The state_dict at ``loaded[key]``, or one level down under a known key."""
    value = loaded.get(key)
    if is_state_dict(value):
        return dict(value), str(key)
    if isinstance(value, Mapping):
        for sub in (*STATE_DICT_KEYS, *EMA_KEYS):
            if is_state_dict(inner := value.get(sub)):
                return dict(inner), f"{key}.{sub}"
    return None


def wrapper_prefixes(keys: Iterable[str]) -> list[str]:
    """Wrapper prefixes every key shares, outermost first (``module._orig_mod.`` -> both)."""
    keys = list(keys)
    found: list[str] = []
    prefix = ""
    while keys:
        for wrapper in WRAPPER_PREFIXES:
            if all(k.startswith(prefix + wrapper) for k in keys):
                found.append(wrapper)
                prefix += wrapper
                break
        else:
            break
    return found


def _dims(shape: Iterable[int]) -> str:
    return ",".join(str(int(d)) for d in shape)


def arch_fp(spec: Mapping[str, Any]) -> str:
    """sha256 of the sorted lines ``"{key}\\t{d0,d1,...}\\n"`` (DESIGN section 4; no dtype)."""
    lines = sorted(f"{t['key']}\t{_dims(t['shape'])}\n" for t in spec["tensors"])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def shape_fp(spec: Mapping[str, Any]) -> str:
    """sha256 of the sorted shape lines alone (name-free)."""
    lines = sorted(f"{_dims(t['shape'])}\n" for t in spec["tensors"])
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# safetensors' own bound on a header (the Rust reader refuses larger ones).
MAX_SAFETENSORS_HEADER = 100_000_000


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The safetensors header, read only once its claimed length is plausible: a file that
    is not a checkpoint (random bytes, text, an empty file) has a first 8 bytes that claim
    anything up to 2^64, and reading that much would exhaust memory."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"the file has {size} bytes, fewer than a safetensors header needs")
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise ValueError(
                f"its first 8 bytes claim a {length}-byte header, but the file has {size} "
                f"bytes (and headers are at most {MAX_SAFETENSORS_HEADER})"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except UnicodeDecodeError:
        raise ValueError("the header is not UTF-8 JSON") from None
    except RecursionError:
        raise ValueError("the header's JSON is nested too deeply") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ValueError("the header is not a JSON object of tensor entries")
    return header


# -- writing ----------------------------------------------------------------------------


def _contiguous_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = _contiguous_cpu(tensor).reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def safetensors_header(
    items: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, t in items:
        size = t.numel() * t.element_size()
        header[key] = {
            "dtype": dtype_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def dedupe_tied(state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Tensors to write: tied keys once (safetensors refuses shared storage)."""
    skip = {key for group in tie_groups(state_dict) for key in group[1:]}
    return [(k, t) for k, t in state_dict.items() if k not in skip]


def iter_safetensors(items: list[tuple[str, torch.Tensor]], header: bytes) -> Iterator[bytes]:
    """The file as a stream: one tensor's bytes at a time, never the whole file."""
    yield header
    for _, tensor in items:
        data = tensor_bytes(tensor)
        if len(data):
            yield bytes(data)  # one tensor copied at a time: memory O(largest tensor)


# -- reading ----------------------------------------------------------------------------


class StreamReader:
    """Exact reads over an iterator of byte chunks, copying straight into destinations."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = memoryview(b"")
        self.consumed = 0

    def _next(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buffer = memoryview(chunk)
                return True
        return False

    def readinto(self, destination: memoryview) -> None:
        filled = 0
        while filled < len(destination):
            if not self._buffer and not self._next():
                raise EOFError(f"stream ended after {self.consumed} bytes")
            take = min(len(self._buffer), len(destination) - filled)
            destination[filled : filled + take] = self._buffer[:take]
            self._buffer = self._buffer[take:]
            filled += take
            self.consumed += take

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        self.readinto(memoryview(out))
        return bytes(out)


def read_safetensors_stream(
    reader: StreamReader,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors from a safetensors stream, each read directly into its own storage."""
    (length,) = struct.unpack("<Q", reader.read(8))
    header = json.loads(reader.read(length))
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, torch.Tensor] = {}
    for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        tensor = torch.empty(info["shape"], dtype=TORCH_DTYPES[info["dtype"]])
        if tensor.numel():
            reader.readinto(tensor.reshape(-1).view(torch.uint8).numpy().data)
        tensors[key] = tensor
    return tensors, metadata
