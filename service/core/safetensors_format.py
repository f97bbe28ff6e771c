"""The safetensors container: strict header validation and header construction.

Layout: 8 bytes little-endian u64 ``N``, then ``N`` bytes of JSON, then the raw tensor data.
The JSON maps each key to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the data start) and may hold ``"__metadata__": {str: str}``.
The order of tensors in a file is the order of their data offsets; statehub writes files in
state_dict order, so that order is the spec order.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.core.spec import DTYPE_SIZES, ArchSpec, TensorSpec
from service.errors import InvalidCheckpoint, TooLarge

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024 * 1024
    max_tensors: int = 200_000
    max_rank: int = 8
    max_dim: int = 2**40
    max_key_length: int = 1024


@dataclass(frozen=True)
class StoredTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # relative to data_start
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int
    tensors: tuple[StoredTensor, ...]
    metadata: dict[str, str]

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def total_size(self) -> int:
        return self.data_start + self.data_size

    def spec(self, tie_groups: Sequence[Sequence[str]] = ()) -> ArchSpec:
        return ArchSpec(
            tuple(TensorSpec(t.key, t.shape, t.dtype) for t in self.tensors),
            tuple(tuple(g) for g in tie_groups),
        )

    def by_key(self) -> dict[str, StoredTensor]:
        return {t.key: t for t in self.tensors}


def read_header_length(prefix: bytes, *, file_size: int, limits: Limits) -> int:
    """Length of the JSON header, from the first 8 bytes, bounded and checked against size."""
    if len(prefix) < 8 or file_size < 8:
        raise InvalidCheckpoint("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if 8 + length > file_size:
        raise InvalidCheckpoint(
            f"not a safetensors file, or a truncated one: its header would be {length} bytes "
            f"but the file has {file_size}"
        )
    if length > limits.max_header_bytes:
        raise TooLarge(
            f"safetensors header of {length} bytes exceeds the limit of "
            f"{limits.max_header_bytes} bytes",
            detail={"header_bytes": length, "limit": limits.max_header_bytes},
        )
    return length


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidCheckpoint(f"safetensors header names key {key!r} twice")
        seen[key] = value
    return seen


def parse_header(raw: bytes, *, file_size: int, limits: Limits) -> SafetensorsHeader:
    """Validate a header strictly: known dtypes, byte sizes that agree with shapes, offsets
    that tile the data region exactly (sorted, contiguous, no gap, no overlap, to the end)."""
    if not raw.lstrip(b" ").startswith(b"{"):
        raise InvalidCheckpoint("not a safetensors file: the header is not a JSON object")
    try:
        data = json.loads(raw, object_pairs_hook=_reject_duplicates)
    except InvalidCheckpoint:  # a duplicate key
        raise
    except RecursionError as exc:  # a header nested thousands deep
        raise InvalidCheckpoint("safetensors header is nested too deeply to be one") from exc
    except ValueError as exc:  # bad JSON or UTF-8, or an integer of thousands of digits
        raise InvalidCheckpoint(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidCheckpoint("safetensors header is not a JSON object")
    metadata = _parse_metadata(data.pop(METADATA_KEY, None))
    if len(data) > limits.max_tensors:
        raise TooLarge(
            f"{len(data)} tensors exceed the limit of {limits.max_tensors}",
            detail={"tensors": len(data), "limit": limits.max_tensors},
        )
    tensors = sorted(
        (_parse_entry(key, value, limits) for key, value in data.items()),
        key=lambda t: (t.begin, t.end),
    )
    data_start = 8 + len(raw)
    _check_tiling(tensors, data_size=file_size - data_start)
    return SafetensorsHeader(data_start, tuple(tensors), metadata)


def _parse_metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidCheckpoint("safetensors __metadata__ must map strings to strings")
    return value


def _parse_entry(key: str, value: Any, limits: Limits) -> StoredTensor:
    if not key or len(key) > limits.max_key_length:
        raise InvalidCheckpoint(f"tensor key of length {len(key)} is empty or too long")
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise InvalidCheckpoint(
            f"tensor {key!r}: expected exactly dtype, shape and data_offsets",
            detail={"key": key},
        )
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise InvalidCheckpoint(f"tensor {key!r}: unknown dtype {dtype!r}", detail={"key": key})
    if not _is_int_list(shape) or len(shape) > limits.max_rank:
        raise InvalidCheckpoint(
            f"tensor {key!r}: shape must be a list of at most {limits.max_rank} integers",
            detail={"key": key},
        )
    if any(d < 0 or d > limits.max_dim for d in shape):
        raise InvalidCheckpoint(f"tensor {key!r}: dimension out of range in {shape}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise InvalidCheckpoint(f"tensor {key!r}: data_offsets must be [begin, end]")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise InvalidCheckpoint(
            f"tensor {key!r}: {dtype} {shape} needs {expected} bytes, "
            f"data_offsets span {offsets[1] - offsets[0]}",
            detail={"key": key},
        )
    return StoredTensor(key, dtype, tuple(shape), offsets[0], offsets[1])


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _check_tiling(tensors: list[StoredTensor], *, data_size: int) -> None:
    position = 0
    for t in tensors:
        if t.begin != position:
            what = "overlaps the previous one" if t.begin < position else "leaves a gap"
            raise InvalidCheckpoint(
                f"tensor {t.key!r} at offset {t.begin} {what} (expected {position})",
                detail={"key": t.key},
            )
        position = t.end
    if position != data_size:
        raise InvalidCheckpoint(
            f"safetensors data region is {data_size} bytes but the tensors cover {position}"
            + (" (truncated file)" if data_size < position else " (trailing bytes)"),
            detail={"data_bytes": data_size, "covered_bytes": position},
        )


def build_header(tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and JSON header for ``tensors`` laid out back to back in order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the safetensors library
    does, so the data region stays aligned.
    """
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = metadata
    offset = 0
    for t in tensors:
        header[t.key] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
