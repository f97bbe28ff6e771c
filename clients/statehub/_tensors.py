"""Specs of local objects, and safetensors written and read as streams.

The client never sends a module, only its spec: ``(key, shape, dtype)`` in state_dict order
and the tie groups (keys sharing storage).
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import torch

from statehub._errors import StatehubError

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


def state_dict_of(obj: Any, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of a module, or a mapping of tensors as it is.

    ``keep_vars`` keeps the module's own Parameter objects (a tied weight is one object
    under two keys: how ties are found on ``meta``, where no tensor has storage).
    """
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(keep_vars=keep_vars)
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise TypeError(
        f"expected an nn.Module or a dict of tensors, got {type(obj).__name__}; "
        "a training snapshot? pass its path and the server extracts the weights"
    )


def tie_groups(state_dict: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Keys that are the same view of one storage (a module registered twice, tied weights).

    A ``meta`` tensor has no storage to compare: keys holding the same tensor object are
    tied (a module's ``state_dict(keep_vars=True)`` keeps its Parameter objects).
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in state_dict.items():
        if t.numel() == 0:
            continue
        identity: tuple[Any, ...]
        if t.device.type == "meta":
            identity = ("meta", id(t))
        else:
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
    # keep_vars: a meta module's tied weights are found by identity (shapes and dtypes come
    # from the module; no value is read).
    return spec_of_state_dict(state_dict_of(target, keep_vars=True))


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


STREAM_CHUNK = 1024 * 1024


def iter_safetensors(
    items: list[tuple[str, torch.Tensor]], header: bytes
) -> Iterator[bytes | memoryview]:
    """The file as a stream of views of each tensor's bytes (a CPU tensor is not copied,
    another is copied to the host one tensor at a time), in parts of ``STREAM_CHUNK``."""
    yield header
    for _, tensor in items:
        data = tensor_bytes(tensor)
        for start in range(0, len(data), STREAM_CHUNK):
            yield data[start : start + STREAM_CHUNK]


# -- reading ----------------------------------------------------------------------------


class StreamReader:
    """Exact reads over an iterator of byte chunks, copying straight into destinations."""

    def __init__(self, chunks: Iterator[bytes | memoryview]) -> None:
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


Entry = tuple[str, list[int], torch.dtype]  # key, shape, dtype, in stream order


class TensorSink(Protocol):
    """Where a safetensors stream's tensors go, one at a time, as their bytes arrive."""

    def begin(self, entries: list[Entry], metadata: dict[str, str]) -> None:
        """The header, before any tensor byte is read: refuse here what cannot be loaded."""

    def buffer(self, key: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor of ``shape`` and ``dtype`` for the bytes of ``key``."""
        ...

    def done(self, key: str, tensor: torch.Tensor) -> None:
        """``tensor`` (the buffer) now holds the bytes of ``key``."""


class DictSink:
    """Every tensor into a dict, each placed on ``device`` as it arrives (so a GPU target
    holds one tensor on the host at a time, never the whole dict)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}

    def begin(self, entries: list[Entry], metadata: dict[str, str]) -> None:
        pass

    def buffer(self, key: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def done(self, key: str, tensor: torch.Tensor) -> None:
        self.tensors[key] = tensor if self.device is None else tensor.to(self.device)


def read_into(reader: StreamReader, sink: TensorSink) -> dict[str, str]:
    """A safetensors stream into ``sink``, each tensor read directly into the buffer the
    sink gives; returns the header's ``__metadata__``."""
    (length,) = struct.unpack("<Q", reader.read(8))
    header = json.loads(reader.read(length))
    metadata = header.pop("__metadata__", None) or {}
    entries = [
        (key, list(info["shape"]), TORCH_DTYPES[info["dtype"]])
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ]
    sink.begin(entries, metadata)
    for key, shape, dtype in entries:
        tensor = sink.buffer(key, shape, dtype)
        if tensor.numel():
            reader.readinto(tensor.reshape(-1).view(torch.uint8).numpy().data)
        sink.done(key, tensor)
    return metadata


def read_safetensors_stream(
    reader: StreamReader,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors from a safetensors stream, each read directly into its own storage."""
    sink = DictSink()
    metadata = read_into(reader, sink)
    return sink.tensors, metadata


def valueless_keys(target: Any) -> set[str]:
    """Keys of ``target`` that have no values to keep: tensors on ``meta``, or every key of
    a spec or a file (which only describe a model)."""
    try:
        state_dict = state_dict_of(target)
    except TypeError:
        return {t["key"] for t in spec_of(target)["tensors"]}
    return {key for key, t in state_dict.items() if t.device.type == "meta"}


def meta_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the module's parameters and buffers (persistent or not) still on ``meta``."""
    named: list[tuple[str, torch.Tensor]] = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    return [name for name, t in named if t.device.type == "meta"]


class ModuleLoader:
    """A fetch stream loaded into a module tensor by tensor, as the bytes arrive.

    Peak memory is the model plus about one tensor: with ``assign=False`` the bytes land in
    the module's own storage (a CPU tensor of the same dtype) or in one buffer copied into
    it (``load_state_dict`` semantics: the module's tensors stay where they are, cast to
    their dtype). With ``assign=True`` each fetched tensor, placed on ``device``, becomes the
    module's tensor (``load_state_dict(sd, assign=True)`` semantics: a parameter keeps its
    ``requires_grad``; keys that held one object, tied weights, get one new object). The
    header is checked against the module strictly (missing and unexpected keys, shapes)
    before any tensor byte is read.
    """

    def __init__(
        self, module: torch.nn.Module, *, assign: bool, device: torch.device | None
    ) -> None:
        self.module = module
        self.assign = assign
        self.device = device
        self._current = module.state_dict(keep_vars=True)
        # key -> (owning module, attribute name, is a parameter), as state_dict names them;
        # a key without a slot (a module with its own _save_to_state_dict) is loaded through
        # load_state_dict once the stream ended.
        self._slots: dict[str, tuple[torch.nn.Module, str, bool]] = {}
        for prefix, owner in module.named_modules(remove_duplicate=False):
            base = f"{prefix}." if prefix else ""
            for name, value in owner._parameters.items():
                if value is not None:
                    self._slots[base + name] = (owner, name, True)
            for name, value in owner._buffers.items():
                if value is not None and name not in owner._non_persistent_buffers_set:
                    self._slots[base + name] = (owner, name, False)
        # id of a current tensor -> (the tensor, every key holding it): one replacement each
        self._holders: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for key, value in self._current.items():
            if key in self._slots:
                self._holders.setdefault(id(value), (value, []))[1].append(key)
        self._new: dict[str, torch.Tensor] = {}
        self._others: dict[str, torch.Tensor] = {}
        self._keep: list[str] = []
        self._tied: dict[str, str] = {}

    def begin(self, entries: list[Entry], metadata: dict[str, str]) -> None:
        self._keep = json.loads(metadata.get("statehub.keep_target", "[]"))
        self._tied = json.loads(metadata.get("statehub.tied", "{}"))
        arriving = {key: shape for key, shape, _ in entries}
        covered = set(arriving) | set(self._keep) | set(self._tied)
        missing = sorted(set(self._current) - covered)
        unexpected = sorted(covered - set(self._current))
        if missing or unexpected:
            raise ValueError(
                f"the fetched state_dict does not fit the module: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        wrong = [k for k, shape in arriving.items() if list(self._current[k].shape) != shape]
        if wrong:
            key = wrong[0]
            raise ValueError(
                f"{len(wrong)} fetched tensor(s) differ in shape from the module's, e.g. "
                f"{key!r}: {arriving[key]} vs {list(self._current[key].shape)}"
            )
        kept_meta = [k for k in self._keep if self._current[k].device.type == "meta"]
        if kept_meta:
            raise no_values_error(kept_meta)

    def buffer(self, key: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        current = self._current[key]
        if (
            not self.assign
            and key in self._slots
            and type(current) in (torch.Tensor, torch.nn.Parameter)
            and current.device.type == "cpu"
            and current.dtype == dtype
            and current.is_contiguous()
        ):
            return current.detach()  # the bytes land in the module's own storage
        return torch.empty(shape, dtype=dtype)

    def done(self, key: str, tensor: torch.Tensor) -> None:
        current = self._current.pop(key)  # no reference kept: a replaced tensor is freed
        if key not in self._slots:
            self._others[key] = self._placed(tensor)
        elif not self.assign:
            if tensor.data_ptr() != current.data_ptr():  # not read in place
                with torch.no_grad():
                    current.copy_(tensor)
        else:
            self._replace(key, current, self._placed(tensor))

    def finish(self) -> None:
        """Tied keys, kept keys (moved to ``device`` with ``assign``) and keys without a
        slot; warns about tensors still on ``meta`` (buffers no state_dict carries)."""
        for key, canonical in self._tied.items():
            current = self._current.pop(key)
            if self.assign:
                source = self._new.get(canonical)
                if source is None:
                    source = self._tensor_at(canonical)
                self._replace(key, current, source)
            else:
                source = self._tensor_at(canonical)
                if current.data_ptr() != source.data_ptr():
                    with torch.no_grad():
                        current.copy_(source)
        if self.assign and self.device is not None:
            for key in self._keep:
                current = self._current.pop(key)
                self._replace(key, current, self._placed(current.detach()))
        if self._others:
            result = self.module.load_state_dict(self._others, strict=False, assign=self.assign)
            if result.unexpected_keys:
                raise ValueError(f"the module took none of {result.unexpected_keys[:5]}")
        left = meta_tensors(self.module)
        if left:
            owners = {name.rpartition(".")[0] for name in left}
            named = sorted(
                f"{o or '(root)'} ({type(self.module.get_submodule(o)).__name__})" for o in owners
            )
            warnings.warn(
                f"{len(left)} tensor(s) of the module are still on the meta device "
                f"(e.g. {left[:3]}): they are in no state_dict (buffers registered with "
                "persistent=False, computed by their module), so no checkpoint has them; "
                f"rebuild the module(s) holding them off meta: {', '.join(named[:5])}",
                UserWarning,
                stacklevel=3,
            )

    def _placed(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device is None else tensor.to(self.device)

    def _tensor_at(self, key: str) -> torch.Tensor:
        owner, name, is_param = self._slots[key]
        tensor = (owner._parameters if is_param else owner._buffers)[name]
        assert tensor is not None  # slots are only made for tensors that are set
        return tensor

    def _replace(self, key: str, old: torch.Tensor, new: torch.Tensor) -> None:
        """Every slot holding ``old`` (tied keys share one) gets ``new`` (as a Parameter
        with ``old``'s requires_grad where ``old`` was one)."""
        if isinstance(old, torch.nn.Parameter) and not isinstance(new, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        _, keys = self._holders.pop(id(old), (old, [key]))
        for held in keys:
            owner, name, is_param = self._slots[held]
            # A parameter tied to a buffer (rare) shares its storage, not its object.
            if is_param:
                if not isinstance(new, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                owner._parameters[name] = new
            else:
                owner._buffers[name] = new.detach() if isinstance(new, torch.nn.Parameter) else new
            self._new[held] = new


def no_values_error(keys: list[str]) -> StatehubError:
    """The plan keeps ``keys`` from a target that has no values for them."""
    return StatehubError(
        f"the plan keeps {len(keys)} tensor(s) from the target (e.g. {keys[:5]}), but the "
        "target has no values for them (on the meta device, or a spec): fetch a checkpoint "
        "that covers them, or pass a target that holds them (a model or its state_dict "
        "built off meta)",
        detail={"keep_target": keys},
    )


def model_facts(target: Any) -> dict[str, int]:
    """What a transformers model's config says that recipes need and shapes do not tell
    (``head_dim``), read as the server reads a version's ``config.json``
    (``service.core.recipes.params_from_config``; tests/test_parity.py holds them together).
    {} for any other target."""
    to_dict = getattr(getattr(target, "config", None), "to_dict", None)
    if not callable(to_dict):
        return {}
    config = to_dict()
    if not isinstance(config, Mapping):
        return {}

    def number(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value if value > 0 else None

    if head_dim := number("head_dim"):
        return {"head_dim": head_dim}
    for width, heads in (("hidden_size", "num_attention_heads"), ("dim", "n_heads")):
        w, h = number(width), number(heads)
        if w and h and w % h == 0:
            return {"head_dim": w // h}
    return {}
