"""Reading an uploaded checkpoint into the stored form: a validated safetensors file.

safetensors uploads are validated and stored byte for byte. torch files (zip or legacy) are
read with ``torch.load(weights_only=True)`` on the CPU: nothing in them is executed. The
state_dict is taken from a training snapshot when there is one, and written as safetensors in
state_dict order (the order the planner relies on); tensors that share one storage are
written once and recorded as a tie group.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.core.ops import dtype_code
from service.core.safetensors_format import (
    Limits,
    SafetensorsHeader,
    build_header,
    parse_header,
    read_header_length,
)
from service.core.spec import TensorSpec
from service.errors import InvalidCheckpoint, TooLarge, UnsafePickle
from service.storage.spool import Spooled

# Where training snapshots keep the weights, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "lr_scheduler", "scheduler")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Ingested:
    path: Path
    digest: str
    size: int
    header: SafetensorsHeader
    source_format: str
    tie_groups: list[list[str]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    # JSON-able, non-tensor parts of a training snapshot (epoch, metrics, config).
    snapshot: dict[str, Any] = field(default_factory=dict)


def sniff_format(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    return "safetensors"


def ingest(spooled: Spooled, *, limits: Limits, work_dir: Path, ema: bool = False) -> Ingested:
    source_format = sniff_format(spooled.path)
    if source_format == "safetensors":
        header = read_safetensors_header(spooled.path, size=spooled.size, limits=limits)
        ingested = Ingested(spooled.path, spooled.digest, spooled.size, header, source_format)
    else:
        ingested = _ingest_torch(spooled, source_format, limits=limits, work_dir=work_dir, ema=ema)
    if not ingested.header.tensors:
        ingested.path.unlink(missing_ok=True)
        raise InvalidCheckpoint("the checkpoint holds no tensors")
    ingested.report.setdefault("source_format", source_format)
    ingested.report["wrapper_prefixes"] = wrapper_prefixes(t.key for t in ingested.header.tensors)
    ingested.report["dtypes"] = ingested.header.spec().dtypes
    return ingested


def read_safetensors_header(path: Path, *, size: int, limits: Limits) -> SafetensorsHeader:
    with open(path, "rb") as handle:
        length = read_header_length(handle.read(8), file_size=size, limits=limits)
        raw = handle.read(length)
    return parse_header(raw, file_size=size, limits=limits)


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


def _load_torch(path: Path, source_format: str) -> Any:
    try:
        return torch.load(
            path, weights_only=True, mmap=source_format == "torch-zip", map_location="cpu"
        )
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "Weights only load failed" in message or "Unsupported global" in message:
            raise UnsafePickle(
                "the checkpoint's pickle names Python objects that are not plain tensors or "
                "containers; statehub never executes them",
                detail={"reason": message.splitlines()[0][:500]},
            ) from exc
        raise InvalidCheckpoint(f"corrupt pickle in checkpoint: {message[:300]}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise InvalidCheckpoint(f"cannot read the torch checkpoint: {str(exc)[:300]}") from exc


def _ingest_torch(
    spooled: Spooled, source_format: str, *, limits: Limits, work_dir: Path, ema: bool
) -> Ingested:
    loaded = _load_torch(spooled.path, source_format)
    state_dict, origin, snapshot, dropped = extract_state_dict(loaded, ema=ema)
    if len(state_dict) > limits.max_tensors:
        raise TooLarge(f"{len(state_dict)} tensors exceed the limit of {limits.max_tensors}")
    tensors, tie_groups = _dedupe_shared(state_dict)
    path = work_dir / f"{uuid.uuid4().hex}.converted.incomplete"
    try:
        digest, size = write_safetensors(path, tensors)
        header = read_safetensors_header(path, size=size, limits=limits)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    spooled.path.unlink(missing_ok=True)
    report = {"state_dict_key": origin, "dropped": dropped, "tie_groups": tie_groups}
    return Ingested(path, digest, size, header, source_format, tie_groups, report, snapshot)


def extract_state_dict(
    loaded: Any, *, ema: bool
) -> tuple[dict[str, torch.Tensor], str | None, dict[str, Any], list[str]]:
    """The state_dict in ``loaded``, where it was, the JSON-able rest, and what was dropped."""
    if _is_state_dict(loaded):
        return dict(loaded), None, {}, []
    if not isinstance(loaded, Mapping):
        raise InvalidCheckpoint(
            f"the checkpoint holds a {type(loaded).__name__}, not a state_dict or snapshot"
        )
    order = (*EMA_KEYS, *STATE_DICT_KEYS) if ema else (*STATE_DICT_KEYS, *EMA_KEYS)
    for key in order:
        value = loaded.get(key)
        if _is_state_dict(value):
            return dict(value), key, _snapshot_rest(loaded, key), _dropped(loaded)
        if isinstance(value, Mapping) and _is_state_dict(value.get("state_dict")):
            rest = _snapshot_rest(loaded, key)
            return dict(value["state_dict"]), f"{key}.state_dict", rest, _dropped(loaded)
    raise InvalidCheckpoint(
        "no state_dict found: the checkpoint's top-level keys are "
        f"{sorted(str(k) for k in loaded)[:20]}",
        detail={"keys": sorted(str(k) for k in loaded)[:100]},
    )


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _dropped(loaded: Mapping[str, Any]) -> list[str]:
    return sorted(str(k) for k in loaded if k in OPTIMIZER_KEYS or k in EMA_KEYS)


def _snapshot_rest(loaded: Mapping[str, Any], used: str) -> dict[str, Any]:
    rest: dict[str, Any] = {}
    for key, value in loaded.items():
        if key == used or key in OPTIMIZER_KEYS or key in EMA_KEYS or key in STATE_DICT_KEYS:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        rest[str(key)] = value
    return rest


def _dedupe_shared(
    state_dict: dict[str, torch.Tensor],
) -> tuple[list[tuple[str, torch.Tensor]], list[list[str]]]:
    """Keys that are the same view of one storage are written once, as a tie group."""
    first_of: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    groups: dict[str, list[str]] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    for key, tensor in state_dict.items():
        if tensor.numel() == 0:
            tensors.append((key, tensor))
            continue
        identity = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if identity in first_of:
            groups.setdefault(first_of[identity], [first_of[identity]]).append(key)
            continue
        first_of[identity] = key
        tensors.append((key, tensor))
    return tensors, list(groups.values())


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, int]:
    """Write ``tensors`` in order as safetensors, one tensor in memory at a time."""
    specs = [TensorSpec(k, tuple(t.shape), dtype_code(t.dtype)) for k, t in tensors]
    header = build_header(specs)
    digest = hashlib.sha256(header)
    size = len(header)
    with open(path, "wb") as handle:
        handle.write(header)
        for _, tensor in tensors:
            data = tensor_bytes(tensor)
            digest.update(data)
            handle.write(data)
            size += len(data)
    return digest.hexdigest(), size


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())



