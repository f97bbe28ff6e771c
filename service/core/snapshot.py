"""What a torch checkpoint holds: its weights, where they were, and the rest as JSON.

Works on the tree the restricted unpickler gives (dicts, lists, ``TensorRef``,
``Placeholder``), never on live objects:

- **weights** are a state_dict (names to tensors), a pickled ``nn.Module`` (its
  ``_parameters`` and persistent ``_buffers``, walked through ``_modules`` in the order
  ``state_dict()`` uses), or either of those under a training snapshot's key (``model``,
  ``state_dict``, ... or, when the uploader asks for them, ``state_dict_ema``,
  ``model_ema``, ...), nested at most one level (``{"model": {"state_dict": ...}}``);
- **the rest** of a snapshot (epoch, metrics, config) becomes bounded JSON: numpy scalars
  and small arrays decoded from their bytes, other placeholders as
  ``{"__global__": "argparse.Namespace", "state": {...}}``;
- **training state** (optimizer, scheduler, grad scaler) and weights not chosen are
  dropped, and listed as dropped.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.core.unpickle import (
    DType,
    GlobalRef,
    Placeholder,
    StorageType,
    TensorRef,
    TypedStorage,
)
from service.errors import InvalidCheckpoint, UnsafePickle

# Where snapshots keep their weights, in the order they are looked for.
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
TRAINING_STATE_KEYS = frozenset(
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
EXTRA_STATE_SUFFIX = "_extra_state"  # nn.Module.get_extra_state(): any object, not a tensor
MAX_MODULE_VISITS = 1_000_000
MAX_MODULE_DEPTH = 128


@dataclass
class Weights:
    tensors: dict[str, TensorRef]
    module_class: str | None = None  # the pickled nn.Module they were read from
    unsupported: dict[str, str] = field(default_factory=dict)  # key -> how it is stored
    skipped: list[str] = field(default_factory=list)  # non-tensor entries (extra state)


@dataclass
class Extracted:
    weights: Weights
    origin: str | None  # where in the snapshot: "model", "model.state_dict"; None: the file
    ema: bool  # the weights are EMA weights
    rest: dict[str, Any]  # the snapshot's other entries, still as unpickled data
    dropped: list[str]
    snapshot_class: str | None = None  # a snapshot pickled as an object of this class


# -- weights -------------------------------------------------------------------------------


def extract_weights(root: Any, *, ema: bool) -> Extracted:
    """The weights in ``root`` and the rest of the snapshot; InvalidCheckpoint if none."""
    return _Finder().extract(root, ema=ema)


def weights_of(value: Any) -> Weights | None:
    """``value`` as weights: a state_dict or a pickled module; None if it is neither."""
    return _Finder().weights_of(value)


def module_weights(module: Placeholder) -> Weights | None:
    """A pickled nn.Module's state_dict, read from its ``__dict__`` without its class."""
    return _Finder().module_weights(module)


class _Finder:
    """Looks for weights in one checkpoint: results cached per object, one visit budget.

    A hostile snapshot may reference one huge module from a million keys; every lookup
    after the first is a cache hit, and all module walks together stay within the budget.
    """

    def __init__(self) -> None:
        self._cache: dict[int, Weights | None] = {}
        self._visits = 0

    def extract(self, root: Any, *, ema: bool) -> Extracted:
        direct = self.weights_of(root)
        if direct is not None:
            if ema:
                raise InvalidCheckpoint(
                    "EMA weights were asked for, but the file is a plain "
                    + ("pickled module" if direct.module_class else "state_dict")
                    + ": push it without ema=true"
                )
            return Extracted(_checked(direct), None, False, {}, [])
        snapshot, snapshot_class = _as_snapshot(root)
        if snapshot is None:
            raise InvalidCheckpoint(
                f"the checkpoint holds {describe(root)}, not a state_dict, a module or a "
                "training snapshot"
            )
        top, sub, weights, is_ema = self._find(snapshot, ema=ema)
        rest, dropped = self._split_rest(snapshot, top, sub)
        origin = str(top) if sub is None else f"{top}.{sub}"
        return Extracted(_checked(weights), origin, is_ema, rest, dropped, snapshot_class)

    def weights_of(self, value: Any) -> Weights | None:
        if id(value) not in self._cache:
            if isinstance(value, Placeholder):
                self._cache[id(value)] = self.module_weights(value)
            else:
                self._cache[id(value)] = _state_dict_weights(value)
        return self._cache[id(value)]

    def module_weights(self, module: Placeholder) -> Weights | None:
        if not isinstance(module.attributes.get("_parameters"), Mapping):
            return None
        weights = Weights({}, module_class=module.name)
        self._visit(weights, module, "", frozenset({id(module)}))
        return weights if weights.tensors or weights.unsupported else None

    def _visit(
        self, weights: Weights, node: Placeholder, prefix: str, ancestors: frozenset[int]
    ) -> None:
        # state_dict() order: own parameters, persistent buffers, then each child in turn.
        self._visits += 1
        if self._visits > MAX_MODULE_VISITS or len(ancestors) > MAX_MODULE_DEPTH:
            raise InvalidCheckpoint("the pickled module tree is too large or too deep")
        attributes = node.attributes
        non_persistent = attributes.get("_non_persistent_buffers_set")
        skip = non_persistent if isinstance(non_persistent, (set, frozenset, list)) else ()
        for group in ("_parameters", "_buffers"):
            entries = attributes.get(group)
            for name, value in entries.items() if isinstance(entries, Mapping) else ():
                if isinstance(name, str) and value is not None and name not in skip:
                    _add_module_entry(weights, prefix + name, value)
        children = attributes.get("_modules")
        for name, child in children.items() if isinstance(children, Mapping) else ():
            # The same child may sit under two names (state_dict lists both); a cycle may not.
            cyclic = id(child) in ancestors
            if isinstance(name, str) and isinstance(child, Placeholder) and not cyclic:
                self._visit(weights, child, f"{prefix}{name}.", ancestors | {id(child)})

    def _find(
        self, snapshot: Mapping[Any, Any], *, ema: bool
    ) -> tuple[Any, str | None, Weights, bool]:
        """(top key, nested key or None, weights, whether they are EMA weights)."""
        for key in EMA_KEYS if ema else STATE_DICT_KEYS:
            hit = self._weights_under(snapshot, key)
            if hit is not None:
                return key, hit[0], hit[1], ema
        if ema:
            raise InvalidCheckpoint(
                "EMA weights were asked for, but the snapshot has none under "
                f"{', '.join(EMA_KEYS)}; its keys are {_shown_keys(snapshot)}",
                detail={"keys": _shown_keys(snapshot)},
            )
        for key in EMA_KEYS:  # a snapshot that holds only EMA weights
            hit = self._weights_under(snapshot, key)
            if hit is not None:
                return key, hit[0], hit[1], True
        others = [
            (key, hit)
            for key in snapshot
            if key not in TRAINING_STATE_KEYS
            and (hit := self._weights_under(snapshot, key)) is not None
        ]
        if len(others) == 1:
            key, (sub, weights) = others[0]
            return key, sub, weights, False
        if others:
            keys = _shown_keys(key for key, _ in others)
            raise InvalidCheckpoint(
                f"the snapshot holds several sets of weights ({keys}) and none under a key "
                "statehub knows; save the one to push as a state_dict",
                detail={"keys": keys},
            )
        _refuse_unreachable(snapshot)
        raise InvalidCheckpoint(
            f"no state_dict found: the snapshot's keys are {_shown_keys(snapshot)}",
            detail={"keys": _shown_keys(snapshot)},
        )

    def _weights_under(
        self, snapshot: Mapping[Any, Any], key: Any
    ) -> tuple[str | None, Weights] | None:
        value = snapshot.get(key)
        weights = self.weights_of(value)
        if weights is not None:
            return None, weights
        if isinstance(value, Mapping):
            for sub in (*STATE_DICT_KEYS, *EMA_KEYS):
                nested = self.weights_of(value.get(sub))
                if nested is not None:
                    return sub, nested
        return None

    def _split_rest(
        self, snapshot: Mapping[Any, Any], top: Any, sub: str | None
    ) -> tuple[dict[str, Any], list[str]]:
        rest: dict[str, Any] = {}
        dropped: list[str] = []
        for key, value in snapshot.items():
            name = str(key)
            if key == top:
                if sub is not None and isinstance(value, Mapping):
                    siblings = {str(k): v for k, v in value.items() if k != sub}
                    kept, gone = self._split_rest(siblings, None, None)
                    dropped += [f"{name}.{g}" for g in gone]
                    if kept:
                        rest[name] = kept
                continue
            if key in TRAINING_STATE_KEYS or self._weights_under(snapshot, key) is not None:
                dropped.append(name)
            else:
                rest[name] = value
        return rest, dropped


def _state_dict_weights(value: Any) -> Weights | None:
    if not isinstance(value, Mapping) or not value:
        return None
    weights = Weights({})
    for key, item in value.items():
        if not isinstance(key, str):
            return None
        if isinstance(item, TensorRef):
            weights.tensors[key] = item
        elif _is_unsupported_tensor(item):
            weights.unsupported[key] = item.name
        elif key.endswith(EXTRA_STATE_SUFFIX):
            weights.skipped.append(key)
        else:
            return None
    return weights if weights.tensors or weights.unsupported else None


def _is_unsupported_tensor(value: Any) -> bool:
    # Quantized, sparse, nested or wrapper-subclass tensors: torch's other rebuild helpers.
    return isinstance(value, Placeholder) and (
        value.name.startswith("torch._utils._rebuild_")
        or value.name == "torch._tensor._rebuild_from_type_v2"
    )


def _add_module_entry(weights: Weights, key: str, value: Any) -> None:
    if isinstance(value, TensorRef):
        weights.tensors[key] = value
    else:
        weights.unsupported[key] = describe(value)


def _checked(weights: Weights) -> Weights:
    if weights.unsupported:
        shown = ", ".join(f"{k} ({v})" for k, v in list(weights.unsupported.items())[:5])
        raise InvalidCheckpoint(
            f"{len(weights.unsupported)} entries of the weights are not plain dense tensors "
            f"statehub can convert, e.g. {shown}",
            detail={"keys": list(weights.unsupported)[:100]},
        )
    return weights


def _as_snapshot(root: Any) -> tuple[Mapping[Any, Any] | None, str | None]:
    if isinstance(root, Mapping):
        return root, None
    if isinstance(root, Placeholder) and root.attributes:
        return root.attributes, root.name  # a checkpoint object: its attributes are the snapshot
    return None, None


def _refuse_unreachable(snapshot: Mapping[Any, Any]) -> None:
    """Tensors that only a placeholder's code could hand over: name the globals."""
    holders = sorted(
        {p.name for p in _placeholders_holding_tensors(snapshot.values())}
        - {"torch._tensor._rebuild_from_type_v2"}
    )
    if holders:
        raise UnsafePickle(
            "the checkpoint's tensors can only be reached by running "
            f"{', '.join(holders[:10])}; statehub never runs pickled code",
            detail={"globals": holders[:100]},
        )


def _placeholders_holding_tensors(values: Any, limit: int = 100_000) -> list[Placeholder]:
    found: list[Placeholder] = []
    seen: set[int] = set()
    todo: list[tuple[Any, Placeholder | None]] = [(v, None) for v in values]
    while todo and len(seen) < limit:
        value, holder = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, TensorRef):
            if holder is not None:
                found.append(holder)
        elif isinstance(value, Placeholder):
            parts = [*value.args, value.state, *value.items.values(), *value.appended]
            todo.extend((part, value) for part in parts)
        elif isinstance(value, Mapping):
            todo.extend((v, holder) for v in value.values())
        elif isinstance(value, (list, tuple)):
            todo.extend((v, holder) for v in value)
    return found


def _shown_keys(keys: Any) -> list[str]:
    return sorted(str(k)[:100] for k in list(keys)[:100])


def describe(value: Any) -> str:
    if isinstance(value, Placeholder):
        return f"a {value.name}"
    if isinstance(value, TensorRef):
        return "a single tensor"
    return f"a {type(value).__name__}"


def dedupe_ties(
    tensors: Mapping[str, TensorRef],
) -> tuple[list[tuple[str, TensorRef]], list[list[str]]]:
    """Keys that are the same view of the same bytes are written once, as a tie group."""
    first: dict[tuple[object, ...], str] = {}
    groups: dict[str, list[str]] = {}
    unique: list[tuple[str, TensorRef]] = []
    for key, ref in tensors.items():
        if ref.numel == 0:  # empty tensors address no bytes: never tied
            unique.append((key, ref))
            continue
        owner = first.setdefault(ref.identity, key)
        if owner == key:
            unique.append((key, ref))
        else:
            groups.setdefault(owner, [owner]).append(key)
    return unique, list(groups.values())


# -- the rest as JSON ------------------------------------------------------------------------

MAX_NODES_PER_KEY = 5_000
MAX_DEPTH = 24
MAX_ITEMS = 1_000
MAX_TEXT = 4_096
MAX_SNAPSHOT_BYTES = 256 * 1024
MAX_DECODED_ARRAY = 4_096
NUMPY_MAX_DIMS = 64  # numpy's own limit (NPY_MAXDIMS)
TRUNCATED = "…"

_NUMPY_SCALAR = frozenset({"numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"})
_NUMPY_ARRAY = frozenset(
    {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
)
# numpy dtype strings whose bytes struct decodes exactly.
_STRUCT_FORMATS = {
    "f2": "e",
    "f4": "f",
    "f8": "d",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "b1": "?",
}

ScalarReader = Callable[[TensorRef], float | int | bool | None]


def render_snapshot(
    rest: Mapping[str, Any], *, scalar_of: ScalarReader
) -> tuple[dict[str, Any], list[str]]:
    """The snapshot's other entries as JSON, and the keys left out for their size."""
    rendered: dict[str, Any] = {}
    omitted: list[str] = []
    used = 2
    for key, value in rest.items():
        if used >= MAX_SNAPSHOT_BYTES or len(rendered) >= MAX_ITEMS:
            omitted.append(clean_text(key))  # full already: not even rendered
            continue
        item = _Renderer(scalar_of).render(value, 0, frozenset())
        size = len(json.dumps(item)) + len(key) + 6
        if used + size > MAX_SNAPSHOT_BYTES:
            omitted.append(clean_text(key))
            continue
        used += size
        rendered[clean_text(key)] = item
    return rendered, omitted


def clean_text(text: str) -> str:
    """Text every JSON store takes: no lone surrogates, no NUL, bounded length."""
    text = text[:MAX_TEXT] + (TRUNCATED if len(text) > MAX_TEXT else "")
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


class _Renderer:
    """Plain JSON for unpickled data, within a node budget; cycles and depth cut short."""

    def __init__(self, scalar_of: ScalarReader) -> None:
        self.scalar_of = scalar_of
        self.nodes = MAX_NODES_PER_KEY

    def render(self, value: Any, depth: int, path: frozenset[int]) -> Any:
        self.nodes -= 1
        if self.nodes < 0 or depth > MAX_DEPTH:
            return TRUNCATED
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if value.bit_length() <= 64 else f"<{value.bit_length()}-bit integer>"
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if isinstance(value, str):
            return clean_text(value)
        if id(value) in path:
            return "<cycle>"
        inner = path | {id(value)}
        if isinstance(value, Mapping):
            return self._mapping(value, depth, inner)
        if isinstance(value, (list, tuple)):
            return self._sequence(value, depth, inner)
        if isinstance(value, (set, frozenset)):
            items = self._sequence(list(value), depth, inner)
            return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
        return self._leaf(value, depth, inner)

    def _mapping(self, value: Mapping[Any, Any], depth: int, path: frozenset[int]) -> Any:
        out: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            if index >= MAX_ITEMS or self.nodes <= 0:
                out[TRUNCATED] = f"{len(value) - index} more"
                break
            out[self._key(key)] = self.render(item, depth + 1, path)
        return out

    def _sequence(self, value: Any, depth: int, path: frozenset[int]) -> list[Any]:
        out = []
        for index, item in enumerate(value):
            if index >= MAX_ITEMS or self.nodes <= 0:
                out.append(TRUNCATED)
                break
            out.append(self.render(item, depth + 1, path))
        return out

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return clean_text(key)
        if key is None or isinstance(key, (bool, int, float)):
            return json.dumps(self.render(key, 0, frozenset()))
        return clean_text(describe(key))

    def _leaf(self, value: Any, depth: int, path: frozenset[int]) -> Any:
        if isinstance(value, TensorRef):
            return self._tensor(value)
        if isinstance(value, Placeholder):
            decoded = numpy_value(value)
            if decoded is not None:
                return self.render(decoded, depth + 1, path)
            return self._placeholder(value, depth, path)
        if isinstance(value, (bytes, bytearray)):
            if len(value) <= 64:
                return {"__bytes__": bytes(value).hex()}
            return {"__bytes__": None, "length": len(value)}
        if isinstance(value, DType):
            return f"torch.{value.name}"
        if isinstance(value, complex):
            return {"real": self.render(value.real, depth, path), "imag": value.imag}
        if isinstance(value, slice):
            args = [value.start, value.stop, value.step]
            return {"__global__": "builtins.slice", "args": self.render(args, depth, path)}
        if isinstance(value, TypedStorage):
            return {"__storage__": {"dtype": value.dtype.name, "bytes": value.size}}
        name = getattr(value, "name", None)
        if isinstance(value, (GlobalRef, StorageType)) or isinstance(name, str):
            return {"__global__": name}
        return {"__unknown__": type(value).__name__}

    def _tensor(self, ref: TensorRef) -> Any:
        if ref.numel == 1:
            value = self.scalar_of(ref)
            if value is not None:
                return self.render(value, 0, frozenset())
        return {"__tensor__": {"dtype": ref.dtype.name, "shape": list(ref.shape)}}

    def _placeholder(self, value: Placeholder, depth: int, path: frozenset[int]) -> Any:
        out: dict[str, Any] = {"__global__": clean_text(value.name)}
        parts = (
            ("args", list(value.args)),
            ("kwargs", value.kwargs),
            ("state", value.state),
            ("items", value.items),
            ("list", value.appended),
        )
        for name, part in parts:
            if part is not None and part != [] and part != {}:
                out[name] = self.render(part, depth + 1, path)
        return out


def numpy_value(value: Placeholder) -> Any:
    """A numpy scalar or small array decoded from its dtype and raw bytes; None if not one.

    Pure data: the dtype string picks a ``struct`` format from a fixed table; numpy is
    never imported, let alone called.
    """
    if value.name in _NUMPY_SCALAR and len(value.args) == 2:
        return _numpy_scalar(*value.args)
    if value.name in _NUMPY_ARRAY and isinstance(value.state, tuple) and len(value.state) == 5:
        return _numpy_array(*value.state)
    return None


def _numpy_scalar(dtype: Any, raw: Any) -> Any:
    fmt = _numpy_format(dtype)
    if fmt is not None and isinstance(raw, bytes) and len(raw) == struct.calcsize(fmt):
        return struct.unpack(fmt, raw)[0]
    return None


def _numpy_array(version: Any, shape: Any, dtype: Any, fortran: Any, raw: Any) -> Any:
    # ndarray.__setstate__((version, shape, dtype, is_fortran, raw bytes))
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if len(shape) > NUMPY_MAX_DIMS:
        raise InvalidCheckpoint(
            f"the snapshot holds a numpy array of {len(shape)} dimensions, which numpy cannot "
            f"make (at most {NUMPY_MAX_DIMS}): the file was forged or is damaged",
            detail={"dimensions": len(shape), "limit": NUMPY_MAX_DIMS},
        )
    fmt = _numpy_format(dtype)
    numel = math.prod(shape)
    if (
        len(shape) <= MAX_DEPTH  # deeper than the renderer goes: described, not decoded
        and fmt is not None
        and isinstance(raw, bytes)
        and not (fortran and len(shape) > 1)
        and numel <= MAX_DECODED_ARRAY
        and len(raw) == numel * struct.calcsize(fmt)
    ):
        return _nest([v for (v,) in struct.iter_unpack(fmt, raw)], list(shape))
    code = dtype.args[0] if isinstance(dtype, Placeholder) and dtype.args else None
    return {"__ndarray__": {"dtype": clean_text(str(code)), "shape": list(shape[:MAX_ITEMS])}}


def _numpy_format(dtype: Any) -> str | None:
    if not isinstance(dtype, Placeholder) or dtype.name != "numpy.dtype" or not dtype.args:
        return None
    code = dtype.args[0]
    fmt = _STRUCT_FORMATS.get(code) if isinstance(code, str) else None
    state = dtype.state
    order = state[1] if isinstance(state, tuple) and len(state) > 1 else "<"
    if fmt is None or order not in ("<", ">", "|", "="):
        return None
    return (">" if order == ">" else "<") + fmt


def _nest(flat: list[Any], shape: list[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]
