"""What is in a checkpoint file, read locally without executing anything.

safetensors files are read from the header alone. torch files are opened with
``torch.load(weights_only=True)``: zip files memory-mapped on the CPU (nothing is copied into
memory, and tensors that share storage are visible as tie groups), legacy files on the
``meta`` device (shapes and dtypes only). A pickle that needs anything but tensors and plain
containers is refused, never run; the server reads such files with inert placeholders.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from statehub._tensors import (
    EMA_KEYS,
    OPTIMIZER_KEYS,
    arch_fp,
    extract_state_dict,
    is_state_dict,
    read_safetensors_header,
    shape_fp,
    spec_of_state_dict,
    wrapper_prefixes,
)

# What a wrapper prefix means, for people reading the report.
WRAPPER_ORIGINS = {
    "module.": "DataParallel / DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}


@dataclass
class CheckpointReport:
    """A checkpoint file, described the way the server will see it when it is pushed."""

    path: str
    format: str
    size: int
    spec: dict[str, Any]
    state_dict_key: str | None = None
    snapshot_keys: list[str] = field(default_factory=list)
    ema_keys: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_snapshot(self) -> bool:
        return bool(self.snapshot_keys)

    @property
    def wrapper_prefixes(self) -> list[str]:
        return wrapper_prefixes(t["key"] for t in self.spec["tensors"])

    @property
    def tensor_count(self) -> int:
        return len(self.spec["tensors"])

    @property
    def param_count(self) -> int:
        """Elements over every tensor (parameters and buffers), as the server counts them."""
        return sum(math.prod(t["shape"]) for t in self.spec["tensors"])

    @property
    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.spec["tensors"]:
            counts[t["dtype"]] = counts.get(t["dtype"], 0) + 1
        return dict(sorted(counts.items()))

    @property
    def arch_fp(self) -> str:
        return arch_fp(self.spec)

    @property
    def shape_fp(self) -> str:
        return shape_fp(self.spec)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data |= {
            "is_snapshot": self.is_snapshot,
            "wrapper_prefixes": self.wrapper_prefixes,
            "tensor_count": self.tensor_count,
            "param_count": self.param_count,
            "dtypes": self.dtypes,
            "arch_fp": self.arch_fp,
            "shape_fp": self.shape_fp,
        }
        return data


def sniff_format(path: Path) -> str:
    """``safetensors``, ``torch-zip`` or ``torch-legacy``, from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    return "safetensors"


def inspect_checkpoint(path: str | Path, *, ema: bool = False) -> CheckpointReport:
    """Describe a checkpoint file without running any code it contains.

    Args:
        path: a .safetensors, .pth, .pt, .bin or .ckpt file.
        ema: report the EMA weights of a training snapshot (as ``push --ema`` stores them).

    Returns:
        The :class:`CheckpointReport`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable checkpoint, holds no state_dict, or its
            pickle names Python objects (which are never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    kind = sniff_format(path)
    if kind == "safetensors":
        return _inspect_safetensors(path)
    return _inspect_torch(path, kind, ema=ema)


def _inspect_safetensors(path: Path) -> CheckpointReport:
    try:
        header = read_safetensors_header(path)
        metadata = header.pop("__metadata__", None) or {}
        ordered = sorted(header.items(), key=lambda kv: int(kv[1]["data_offsets"][0]))
        tensors = [{"key": k, "shape": v["shape"], "dtype": v["dtype"]} for k, v in ordered]
        for t in tensors:
            shape, dtype = t["shape"], t["dtype"]
            dims_ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
            if not dims_ok or not isinstance(dtype, str):
                raise ValueError(f"tensor {str(t['key'])[:100]!r} has no valid shape and dtype")
    except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
        raise ValueError(f"{path}: not a safetensors or torch checkpoint ({exc})") from None
    spec = {"tensors": tensors, "tie_groups": []}
    return CheckpointReport(str(path), "safetensors", path.stat().st_size, spec, metadata=metadata)


def _load_torch(path: Path, kind: str) -> Any:
    try:
        if kind == "torch-zip":
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        return torch.load(path, weights_only=True, map_location="meta")
    except pickle.UnpicklingError as exc:
        raise ValueError(_unsafe_message(path, kind, exc)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the torch checkpoint: {str(exc)[:300]}") from None


def _unsafe_message(path: Path, kind: str, exc: Exception) -> str:
    names: list[str] = []
    if kind == "torch-zip":
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # best effort: the message below stands without the names
            names = []
    named = f" ({', '.join(names[:10])})" if names else ""
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (
        f"{path}: the pickle names Python objects beyond tensors and containers{named}; "
        f"inspect never runs them ({first}). Push the file: the server reads such "
        "checkpoints with inert placeholders."
    )


def _inspect_torch(path: Path, kind: str, *, ema: bool) -> CheckpointReport:
    loaded = _load_torch(path, kind)
    state_dict, origin = extract_state_dict(loaded, ema=ema)
    if state_dict is None:
        keys = sorted(str(k) for k in loaded) if isinstance(loaded, dict) else []
        found = f"top-level keys {keys[:20]}" if keys else f"a {type(loaded).__name__}"
        raise ValueError(f"{path}: no state_dict found: the file holds {found}")
    report = CheckpointReport(str(path), kind, path.stat().st_size, spec_of_state_dict(state_dict))
    if isinstance(loaded, dict) and not is_state_dict(loaded):
        report.state_dict_key = origin
        report.snapshot_keys = [str(k) for k in loaded]
        report.ema_keys = [str(k) for k in loaded if k in EMA_KEYS]
        report.dropped = sorted(str(k) for k in loaded if k in OPTIMIZER_KEYS or k in EMA_KEYS)
        used = (origin or "").split(".")[0]
        report.extra = {
            str(k): describe(v)
            for k, v in loaded.items()
            if k != used and k not in OPTIMIZER_KEYS and k not in EMA_KEYS
        }
    return report


def describe(value: Any, limit: int = 60) -> str:
    """A short, safe description of a snapshot value (``3``, ``dict (4 keys)``...)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return f"dict ({len(value)} keys)"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
