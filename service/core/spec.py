"""Architecture specs and their fingerprints (DESIGN section 4).

A spec is the ordered list of ``(key, shape, dtype)`` of a state_dict, in state_dict order,
plus the tie groups: keys that share storage. Dtypes are safetensors codes (``F32``,
``BF16``...). Nothing here touches torch or I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from service.errors import InvalidSpec, TooLarge

# safetensors dtype code -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ArchSpec:
    tensors: tuple[TensorSpec, ...]
    tie_groups: tuple[tuple[str, ...], ...] = ()
    _by_key: dict[str, TensorSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {t.key: t for t in self.tensors})

    @classmethod
    def of(
        cls,
        tensors: Iterable[tuple[str, Sequence[int], str]],
        tie_groups: Iterable[Sequence[str]] = (),
    ) -> ArchSpec:
        return cls(
            tuple(TensorSpec(k, tuple(int(d) for d in s), dt) for k, s, dt in tensors),
            tuple(tuple(g) for g in tie_groups),
        )

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ArchSpec:
        tensors = data.get("tensors", [])
        groups = data.get("tie_groups", [])
        assert isinstance(tensors, list) and isinstance(groups, list)
        return cls.of(((t["key"], t["shape"], t["dtype"]) for t in tensors), groups)

    def to_json(self) -> dict[str, object]:
        return {
            "tensors": [t.to_json() for t in self.tensors],
            "tie_groups": [list(g) for g in self.tie_groups],
        }

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> TensorSpec:
        return self._by_key[key]

    def get(self, key: str) -> TensorSpec | None:
        return self._by_key.get(key)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.tensors]

    @property
    def param_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def arch_fp(self) -> str:
        return arch_fingerprint(self.tensors)

    @property
    def shape_fp(self) -> str:
        return shape_fingerprint(self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return dict(sorted(counts.items()))


def _dims(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


def arch_fingerprint(tensors: Iterable[TensorSpec]) -> str:
    """sha256 of the sorted lines ``"{key}\\t{d0,d1,...}\\n"``; dtype excluded."""
    lines = sorted(f"{t.key}\t{_dims(t.shape)}\n" for t in tensors)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def shape_fingerprint(tensors: Iterable[TensorSpec]) -> str:
    """sha256 of the sorted shape lines alone: equal for checkpoints that differ by names."""
    lines = sorted(f"{_dims(t.shape)}\n" for t in tensors)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_spec(spec: ArchSpec, side: str) -> None:
    """What any spec must satisfy to be planned: non-empty unique keys, known dtypes,
    non-negative dims. Raises InvalidSpec naming the side and the key."""
    counts = Counter(t.key for t in spec.tensors)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise InvalidSpec(
            f"{side} spec names {len(duplicates)} key(s) twice, e.g. {duplicates[0]!r}",
            detail={"side": side, "duplicates": duplicates[:50]},
        )
    for t in spec.tensors:
        if not t.key:
            raise InvalidSpec(f"{side} spec has an empty key", detail={"side": side})
        if t.dtype not in DTYPE_SIZES:
            raise InvalidSpec(
                f"{side} spec: {t.key!r} has unknown dtype {t.dtype!r}; "
                f"use one of {sorted(DTYPE_SIZES)}",
                detail={"side": side, "key": t.key},
            )
        if any(d < 0 for d in t.shape):
            raise InvalidSpec(
                f"{side} spec: {t.key!r} has a negative dimension {list(t.shape)}",
                detail={"side": side, "key": t.key},
            )


def validate_spec(
    spec: ArchSpec, *, max_tensors: int, max_rank: int, max_dim: int, max_key_length: int
) -> ArchSpec:
    """A spec sent by a user: bounded, consistent, with tie groups that name its own keys."""
    if len(spec.tensors) > max_tensors:
        raise TooLarge(
            f"the spec lists {len(spec.tensors)} tensors; the limit is {max_tensors}",
            detail={"tensors": len(spec.tensors), "limit": max_tensors},
        )
    check_spec(spec, "target")
    for t in spec.tensors:
        if len(t.key) > max_key_length:
            raise InvalidSpec(f"tensor key of length {len(t.key)} is too long")
        if len(t.shape) > max_rank or any(d > max_dim for d in t.shape):
            raise InvalidSpec(
                f"tensor {t.key!r}: shape {list(t.shape)} has an absurd dimension "
                f"or more than {max_rank} dimensions",
                detail={"key": t.key, "shape": list(t.shape)},
            )
    for group in spec.tie_groups:
        unknown = [k for k in group if k not in spec]
        if unknown or len(group) < 2:
            raise InvalidSpec(
                f"tie group {list(group)} must name at least two keys of the spec",
                detail={"unknown": unknown},
            )
        if len({spec[k].shape for k in group}) != 1:
            raise InvalidSpec(f"tie group {list(group)} joins tensors of different shapes")
    return spec
