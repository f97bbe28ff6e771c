"""A restricted unpickler: reads a checkpoint's pickle as data and never runs any of it.

A pickle is a small stack machine whose ``GLOBAL`` and ``REDUCE`` opcodes import and call
whatever it names. Here a global resolves against three tables and nothing is ever imported:

- **allowed**: the few callables a checkpoint needs, implemented in this module as builders
  of plain data: torch's tensor and parameter rebuild helpers (they yield a ``TensorRef``, a
  view of a stored storage; no byte of it is read here), ``OrderedDict``, ``set``,
  ``slice``, ``complex``, torch dtypes, storage types, ``torch.Size``, ``torch.device``;
- **denied**: globals whose use in a pickle is running code (``os.system``, ``subprocess``,
  ``builtins.eval``, ...). They only decide that a file is refused: ``UnsafePickle`` names
  every one the pickle mentions. Like all others, they are never resolved;
- **everything else** (numpy scalars, ``argparse.Namespace``, config classes, a pickled
  ``nn.Module``'s class) becomes an inert ``Placeholder`` that records the global's name,
  the arguments it would have been called with and the state it would have received.

Module names are normalised before either table is consulted: protocol-2 pickles spell
``builtins`` as ``__builtin__``, and Python 2 names map through the stdlib's compat tables.

No torch, no numpy, no I/O: input is the pickle's bytes, output is dicts, lists, tuples,
numbers, strings, ``TensorRef`` and ``Placeholder``.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from service.core.safetensors_format import Limits
from service.errors import InvalidCheckpoint, StatehubError, TooLarge, UnsafePickle

# -- torch dtypes and storage types, as data ----------------------------------------------


@dataclass(frozen=True)
class DType:
    """A torch dtype: its torch name, element size and safetensors code (None: no such code)."""

    name: str
    itemsize: int
    code: str | None


_DTYPE_LIST = (
    DType("float64", 8, "F64"),
    DType("float32", 4, "F32"),
    DType("float16", 2, "F16"),
    DType("bfloat16", 2, "BF16"),
    DType("int64", 8, "I64"),
    DType("int32", 4, "I32"),
    DType("int16", 2, "I16"),
    DType("int8", 1, "I8"),
    DType("uint8", 1, "U8"),
    DType("bool", 1, "BOOL"),
    DType("uint16", 2, "U16"),
    DType("uint32", 4, "U32"),
    DType("uint64", 8, "U64"),
    DType("float8_e4m3fn", 1, "F8_E4M3"),
    DType("float8_e5m2", 1, "F8_E5M2"),
    # Readable, but safetensors has no code for them: refused if the weights hold one.
    DType("complex32", 4, None),
    DType("complex64", 8, None),
    DType("complex128", 16, None),
    DType("float8_e4m3fnuz", 1, None),
    DType("float8_e5m2fnuz", 1, None),
    DType("float8_e8m0fnu", 1, None),
    DType("float4_e2m1fn_x2", 1, None),
    DType("qint8", 1, None),
    DType("quint8", 1, None),
    DType("qint32", 4, None),
    DType("quint4x2", 1, None),
    DType("quint2x4", 1, None),
)
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPE_LIST}
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
    "chalf": "complex32",
}
UINT8 = DTYPES["uint8"]


@dataclass(frozen=True)
class StorageType:
    """``torch.FloatStorage`` and friends (``torch.UntypedStorage``: bytes, uint8)."""

    name: str
    dtype: DType


_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8",
    "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}


# -- what a pickle yields --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class StorageRef:
    """One stored storage (a data record of the checkpoint): its key, size and device."""

    key: str
    nbytes: int
    location: str
    itemsize: int  # element size it was saved with (the legacy format counts elements)


@dataclass(frozen=True, eq=False)
class TypedStorage:
    """A storage as a pickle hands it to a tensor rebuild: bytes seen as ``dtype``."""

    ref: StorageRef
    dtype: DType
    byte_offset: int = 0  # legacy storage views start inside their root storage
    nbytes: int = -1

    @property
    def size(self) -> int:
        return self.ref.nbytes - self.byte_offset if self.nbytes < 0 else self.nbytes


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A strided view of a stored storage, checked to lie inside it. Nothing is read."""

    storage: StorageRef
    dtype: DType
    byte_offset: int  # of element [0, 0, ...] from the start of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool = False
    parameter: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def identity(self) -> tuple[object, ...]:
        """Equal for two keys that are the same view of the same bytes (tied weights)."""
        return (self.storage.key, self.byte_offset, self.shape, self.stride, self.dtype.name)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


@dataclass(frozen=True, eq=False)
class GlobalRef:
    """A global the pickle names and statehub does not resolve: a class or a function."""

    name: str  # normalised, dotted: "argparse.Namespace"
    denied: bool = False


class Placeholder:
    """What the pickle would have built by calling ``name``: kept as data, never built.

    ``args``/``kwargs`` are the call's arguments, ``state`` what ``BUILD`` (``__setstate__``)
    would have received, ``items``/``appended`` what ``SETITEM``/``APPEND`` added to it.
    """

    __slots__ = ("appended", "args", "items", "kwargs", "name", "state")

    def __init__(
        self, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> None:
        self.name = name
        self.args = args
        self.kwargs: dict[str, Any] = kwargs or {}
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.appended: list[Any] = []

    def __repr__(self) -> str:
        return f"Placeholder({self.name})"

    @property
    def attributes(self) -> dict[str, Any]:
        """The instance ``__dict__`` that ``state`` describes (``(dict, slots)`` or a dict)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return state if isinstance(state, dict) else {}


@dataclass(frozen=True)
class _Builder:
    """An allowed callable, implemented here as a builder of data."""

    name: str
    build: Callable[..., Any]
    new: Callable[[], Any] | None = None  # what ``cls.__new__(cls)`` gives (NEWOBJ)


@dataclass(frozen=True)
class _TensorClass:
    """``torch.Tensor`` named as the type of a rebuilt tensor (``_rebuild_from_type_v2``)."""

    name: str


# -- the three tables ----------------------------------------------------------------------

# Roots of modules whose globals a checkpoint never needs and an exploit always does.
DENIED_MODULES = frozenset(
    {
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket",
        "_socket", "ssl", "importlib", "imp", "zipimport", "pkgutil", "runpy", "pty", "ctypes",
        "_ctypes", "cffi", "multiprocessing", "concurrent", "threading", "_thread", "signal",
        "asyncio", "code", "codeop", "compileall", "py_compile", "pickle", "_pickle", "marshal",
        "dill", "cloudpickle", "joblib", "shelve", "webbrowser", "pdb", "bdb", "trace",
        "profile", "cProfile", "timeit", "urllib", "urllib2", "http", "httplib", "ftplib",
        "smtplib", "telnetlib", "xmlrpc", "requests", "io", "_io", "fcntl", "resource", "mmap",
        "gc", "inspect", "site", "ensurepip", "venv", "distutils", "setuptools", "pip",
    }
)  # fmt: skip
# Single globals and everything under them (``torch.hub`` covers ``torch.hub.load``).
DENIED_GLOBALS = frozenset(
    {
        "builtins.eval", "builtins.exec", "builtins.execfile", "builtins.compile",
        "builtins.open", "builtins.file", "builtins.getattr", "builtins.setattr",
        "builtins.delattr", "builtins.__import__", "builtins.globals", "builtins.locals",
        "builtins.vars", "builtins.input", "builtins.raw_input", "builtins.breakpoint",
        "builtins.exit", "builtins.quit", "builtins.help", "builtins.reload",
        "builtins.__build_class__", "operator.attrgetter", "operator.methodcaller",
        "types.FunctionType", "types.LambdaType", "types.CodeType", "types.MethodType",
        "types.ModuleType", "torch.load", "torch.hub", "torch.storage._load_from_bytes",
        "torch.serialization.load", "torch.serialization._load", "torch.jit.load",
        "torch.utils.cpp_extension", "torch.package", "numpy.load", "numpy.lib.npyio",
        "numpy.testing", "numpy.f2py", "numpy.distutils", "numpy.ctypeslib",
    }
)  # fmt: skip
# Attribute paths through an innocent module to a dangerous object ("posixpath" "os.system").
_DENIED_ATTRIBUTES = frozenset(
    {
        "os", "sys", "subprocess", "posix", "nt", "builtins", "__builtins__", "importlib",
        "ctypes", "shutil", "socket", "pty", "runpy", "pickle", "marshal", "system", "popen",
        "eval", "exec", "execfile", "compile", "__import__", "getattr", "setattr", "open",
    }
)  # fmt: skip


def normalize_global(module: str, name: str) -> tuple[str, str]:
    """Python 2 spellings to Python 3 ones, as ``pickle`` itself maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def is_denied(module: str, name: str) -> bool:
    """Whether naming this (normalised) global is reason enough to refuse the file."""
    qualname = f"{module}.{name}"
    if module.split(".")[0] in DENIED_MODULES:
        return True
    if any(qualname == d or qualname.startswith(d + ".") for d in DENIED_GLOBALS):
        return True
    parts = name.split(".")
    return any(p in _DENIED_ATTRIBUTES or (p.startswith("__") and p.endswith("__")) for p in parts)


# -- allowed builders ----------------------------------------------------------------------


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidCheckpoint(f"corrupt pickle: {what} is not an integer")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise InvalidCheckpoint(f"corrupt pickle: {what} is not a tuple of integers")
    return tuple(_int(v, what) for v in value)


def checked_view(
    storage: TypedStorage,
    dtype: DType,
    offset: Any,
    size: Any,
    stride: Any,
    *,
    limits: Limits,
) -> TensorRef:
    """A TensorRef after proving that every element it addresses lies inside the storage."""
    offset = _int(offset, "a tensor's storage offset")
    shape = _int_tuple(size, "a tensor's size")
    strides = _int_tuple(stride, "a tensor's stride")
    if len(shape) != len(strides) or len(shape) > limits.max_rank:
        raise InvalidCheckpoint(
            f"a tensor has size {list(shape)} and stride {list(strides)}: ranks differ or "
            f"exceed {limits.max_rank}"
        )
    if offset < 0 or any(d < 0 or d > limits.max_dim for d in shape) or min(strides, default=0) < 0:
        raise InvalidCheckpoint(
            f"a tensor has a negative or absurd offset, size or stride ({offset}, {list(shape)})"
        )
    byte_offset = storage.byte_offset + offset * dtype.itemsize
    if all(shape):  # a tensor with a zero dimension addresses nothing
        last = offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        if (last + 1) * dtype.itemsize > storage.size:
            raise InvalidCheckpoint(
                f"a tensor of size {list(shape)} and stride {list(strides)} at offset {offset} "
                f"reads past the end of its {storage.size}-byte storage {storage.ref.key!r}",
                detail={"storage": storage.ref.key},
            )
    return TensorRef(storage.ref, dtype, byte_offset, shape, strides)


def _refuse_lazy_views(metadata: Any) -> None:
    # torch records lazily conjugated / negated views here; reading them raw would be wrong.
    if isinstance(metadata, dict) and any(metadata.values()):
        raise InvalidCheckpoint(
            f"a tensor is saved as a lazy view ({sorted(map(str, metadata))[:5]}); "
            "statehub reads only materialised tensors"
        )


def _typed(storage: Any) -> TypedStorage:
    if not isinstance(storage, TypedStorage):
        raise InvalidCheckpoint("corrupt pickle: a tensor is rebuilt from something not a storage")
    return storage


def _rebuild_tensor(limits: Limits) -> Callable[..., TensorRef]:
    def rebuild(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
        typed = _typed(storage)
        return checked_view(typed, typed.dtype, offset, size, stride, limits=limits)

    return rebuild


def _rebuild_tensor_v2(limits: Limits) -> Callable[..., TensorRef]:
    def rebuild(
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> TensorRef:
        typed = _typed(storage)
        _refuse_lazy_views(metadata)
        view = checked_view(typed, typed.dtype, offset, size, stride, limits=limits)
        return replace(view, requires_grad=requires_grad is True)

    return rebuild


def _rebuild_tensor_v3(limits: Limits) -> Callable[..., TensorRef]:
    # Dtypes without a legacy storage class: an untyped storage plus the dtype.
    def rebuild(
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> TensorRef:
        if not isinstance(dtype, DType):
            raise InvalidCheckpoint("corrupt pickle: a tensor's dtype is not a torch dtype")
        _refuse_lazy_views(metadata)
        view = checked_view(_typed(storage), dtype, offset, size, stride, limits=limits)
        return replace(view, requires_grad=requires_grad is True)

    return rebuild


def _as_parameter(data: Any, requires_grad: Any = True, *_: Any) -> Any:
    if isinstance(data, TensorRef):
        return replace(data, parameter=True, requires_grad=requires_grad is True)
    return data  # a parameter of a kind statehub does not read (quantized...): keep its name


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # A tensor (or subclass) with Python attributes: the data is what ``func(*args)`` gives.
    if isinstance(func, _Builder) and isinstance(args, tuple):
        return func.build(*args)
    return Placeholder("torch._tensor._rebuild_from_type_v2", (func, new_type, args, state))


def _torch_size(sizes: Any = ()) -> tuple[int, ...]:
    return _int_tuple(sizes, "a torch.Size")


def _torch_device(kind: Any, index: Any = None) -> str:
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise InvalidCheckpoint("corrupt pickle: a torch.device is not a string and index")
    return kind if index is None else f"{kind}:{index}"


def _ordered_dict(pairs: Any = ()) -> OrderedDict[Any, Any]:
    result: OrderedDict[Any, Any] = OrderedDict()
    for key, value in _pairs(pairs):
        result[key] = value
    return result


def _plain_dict(*args: Any) -> dict[Any, Any]:
    # defaultdict(factory, items) and Counter(items): the factory is never called.
    source = args[-1] if args and isinstance(args[-1], dict) else ()
    return dict(_pairs(source))


def _pairs(pairs: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(pairs, dict):
        items: Iterable[Any] = list(pairs.items())
    elif isinstance(pairs, (list, tuple)):
        items = pairs
    else:
        raise InvalidCheckpoint("corrupt pickle: a dict is built from something not pairs")
    for pair in items:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InvalidCheckpoint("corrupt pickle: a dict is built from something not pairs")
        yield check_key(pair[0]), pair[1]


def _elements(items: Any) -> list[Any]:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise InvalidCheckpoint("corrupt pickle: a set is built from something not a sequence")
    return [check_key(item) for item in items]


def _set(items: Any = ()) -> set[Any]:
    return set(_elements(items))


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_elements(items))


def _slice(*args: Any) -> slice:
    if not 1 <= len(args) <= 3:
        raise InvalidCheckpoint("corrupt pickle: slice() takes 1 to 3 arguments")
    return slice(*args)


def _complex(real: Any = 0, imag: Any = 0) -> complex:
    if not all(isinstance(v, (int, float)) for v in (real, imag)):
        raise InvalidCheckpoint("corrupt pickle: complex() of something not a number")
    return complex(real, imag)


def _byte_string(source: Any = b"") -> bytes:
    # Never bytes(n): an integer argument would allocate n bytes.
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if isinstance(source, list) and all(isinstance(v, int) and 0 <= v < 256 for v in source):
        return bytes(source)
    raise InvalidCheckpoint("corrupt pickle: bytes() of something not bytes")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # How protocol 2 spells a bytes object: _codecs.encode("\xff...", "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "ascii"):
        raise InvalidCheckpoint("corrupt pickle: _codecs.encode of something not text")
    return codecs.encode(text, encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg._reconstructor(cls, object, None): protocol 0/1's "cls.__new__(cls)".
    return new_instance(cls, () if state is None else (state,))


def _newobj(cls: Any, *args: Any) -> Any:
    return new_instance(cls, args)


def _newobj_ex(cls: Any, args: Any, kwargs: Any) -> Any:
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise InvalidCheckpoint("corrupt pickle: __newobj_ex__ needs a tuple and a dict")
    return new_instance(cls, args, kwargs)


def new_instance(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """What ``cls.__new__(cls, *args)`` stands for: a placeholder, or an empty container."""
    if isinstance(cls, GlobalRef):
        return Placeholder(cls.name, args, kwargs)
    if isinstance(cls, _Builder):
        return cls.new() if cls.new is not None else cls.build(*args)
    if isinstance(cls, _TensorClass):
        return Placeholder(cls.name, args, kwargs)
    raise InvalidCheckpoint(f"corrupt pickle: instantiates a {type(cls).__name__}, not a class")


def allowed_globals(limits: Limits) -> dict[tuple[str, str], Any]:
    """(module, name) -> what the global resolves to; every entry is data or a builder."""
    builders = [
        _Builder("torch._utils._rebuild_tensor", _rebuild_tensor(limits)),
        _Builder("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2(limits)),
        _Builder("torch._utils._rebuild_tensor_v3", _rebuild_tensor_v3(limits)),
        _Builder("torch._utils._rebuild_parameter", _as_parameter),
        _Builder("torch._utils._rebuild_parameter_with_state", _as_parameter),
        _Builder("torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2),
        _Builder("torch.Size", _torch_size, new=tuple),
        _Builder("torch.device", _torch_device),
        _Builder("collections.OrderedDict", _ordered_dict, new=OrderedDict),
        _Builder("collections.defaultdict", _plain_dict, new=dict),
        _Builder("collections.Counter", _plain_dict, new=dict),
        _Builder("builtins.set", _set, new=set),
        _Builder("builtins.frozenset", _frozenset, new=frozenset),
        _Builder("builtins.slice", _slice),
        _Builder("builtins.complex", _complex),
        _Builder("builtins.bytes", _byte_string, new=bytes),
        _Builder("builtins.bytearray", lambda s=b"": bytearray(_byte_string(s)), new=bytearray),
        _Builder("_codecs.encode", _codecs_encode),
        _Builder("copyreg._reconstructor", _reconstructor),
        _Builder("copyreg.__newobj__", _newobj),
        _Builder("copyreg.__newobj_ex__", _newobj_ex),
    ]
    table: dict[tuple[str, str], Any] = {
        tuple(b.name.rsplit(".", 1)): b  # type: ignore[misc]
        for b in builders
    }
    table[("torch.nn.parameter", "Parameter")] = _Builder(
        "torch.nn.parameter.Parameter", _as_parameter
    )
    table[("torch", "Tensor")] = _TensorClass("torch.Tensor")
    for name, dtype in DTYPES.items():
        table[("torch", name)] = dtype
    for alias, name in _DTYPE_ALIASES.items():
        table[("torch", alias)] = DTYPES[name]
    for module in ("torch", "torch.cuda"):  # pre-1.0 files name CUDA storages torch.cuda.X
        for storage, dtype_name in _STORAGE_DTYPES.items():
            table[(module, storage)] = StorageType(f"torch.{storage}", DTYPES[dtype_name])
    untyped = StorageType("torch.UntypedStorage", UINT8)
    table[("torch", "UntypedStorage")] = table[("torch.storage", "UntypedStorage")] = untyped
    return table


# -- the machine ---------------------------------------------------------------------------

MAX_KEY_DEPTH = 16
# Each step may allocate an object (``]`` is one byte, an empty list ~60): this bounds the
# memory a hostile pickle can claim. Real checkpoints take ~30 steps per tensor.
MAX_OPCODES = 10_000_000
# Steps bound time, not memory: an empty set is one byte of pickle and ~216 bytes of heap.
# So what the machine builds is charged against a budget (sys.getsizeof of every new value,
# 128 bytes per memo entry, 64 per item added to a container). A torch.save of 10,000
# tensors with optimizer state builds ~20 MB; 10 million empty sets would build 2 GiB.
MAX_BUILT_BYTES = 256 * 1024 * 1024
MAX_STACK = 200_000  # values on one stack level: bounds nesting built by APPEND chains
MAX_MARKS = 1_000  # open MARKs: bounds nesting built by MARK ... TUPLE/LIST
_SLOT_BYTES = 64
_MEMO_BYTES = 128  # a memo entry: the dict slot and its int key (the issue measured ~127)


def check_key(key: Any, depth: int = 0) -> Any:
    """A dict key or set item that hashes in bounded time (no deeply nested tuples)."""
    if isinstance(key, (str, bytes, int, float, complex, type(None))):
        return key
    if isinstance(key, (tuple, frozenset)) and depth < MAX_KEY_DEPTH:
        for item in key:
            check_key(item, depth + 1)
        return key
    if isinstance(key, (Placeholder, GlobalRef, TensorRef, DType, StorageType, _Builder)):
        return key  # hashed by identity or by plain fields
    raise InvalidCheckpoint(f"corrupt pickle: a {type(key).__name__} used as a dict key")


# Opcodes that push no new value (the top is an old one, or nothing was pushed).
_NO_NEW_VALUE = frozenset(b"2ghjqpr\x94abesu\x90\x95\x80\x98(")


class _Truncated(Exception):
    """The pickle runs past the end of the bytes it was given."""


@dataclass
class UnpickleReport:
    """The globals a pickle named, by verdict (normalised dotted names)."""

    placeholders: set[str] = field(default_factory=set)
    denied: set[str] = field(default_factory=set)


class RestrictedUnpickler:
    """Reads one pickle from ``data`` at ``start`` (``end`` is where it stopped).

    ``persistent_load`` turns a persistent id (torch's storage references) into data; a
    pickle with persistent ids and no ``persistent_load`` is corrupt.
    """

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        limits: Limits,
        start: int = 0,
        persistent_load: Callable[[Any], Any] | None = None,
        report: UnpickleReport | None = None,
        allowed: dict[tuple[str, str], Any] | None = None,
    ) -> None:
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = start
        self.end = start
        self.ran_out = False  # the bytes ended before the pickle did
        self.persistent_load = persistent_load
        self.report = report if report is not None else UnpickleReport()
        self.allowed = allowed if allowed is not None else allowed_globals(limits)
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.built = 0  # bytes charged against MAX_BUILT_BYTES
        self.dispatch = self._dispatch_table()

    # reading

    def load(self) -> Any:
        """The pickle's value; UnsafePickle if it names a denied global, even when corrupt."""
        start = self.pos
        try:
            value = self._run()
        except UnsafePickle:
            raise
        except Exception as exc:
            self.ran_out = isinstance(exc, _Truncated)
            if self.report.denied:
                raise self._unsafe() from exc
            if isinstance(exc, StatehubError):
                raise
            reason = "it ends early" if isinstance(exc, _Truncated) else f"{exc}"[:200]
            raise InvalidCheckpoint(
                f"corrupt pickle at byte {self.pos - start}: {reason}",
                detail={"reason": type(exc).__name__},
            ) from exc
        if self.report.denied:
            raise self._unsafe()
        self.end = self.pos
        return value

    def _unsafe(self) -> UnsafePickle:
        names = sorted(self.report.denied)
        return UnsafePickle(
            f"the checkpoint's pickle would call {', '.join(names)}: statehub never runs "
            "pickled code and refuses files built to",
            detail={"globals": names},
        )

    def _run(self) -> Any:
        data, dispatch, end = self.data, self.dispatch, len(self.data)
        for _ in range(MAX_OPCODES):
            if self.pos >= end:
                raise _Truncated()
            opcode = data[self.pos]
            self.pos += 1
            handler = dispatch.get(opcode)
            if handler is None:
                raise InvalidCheckpoint(
                    f"corrupt pickle: unknown opcode 0x{opcode:02x} at byte {self.pos - 1}"
                )
            depth = len(self.stack)
            if handler():
                return self.stack.pop() if self.stack else None
            if len(self.stack) >= depth and self.stack and opcode not in _NO_NEW_VALUE:
                self._charge(sys.getsizeof(self.stack[-1]))
            if len(self.stack) > MAX_STACK or len(self.metastack) > MAX_MARKS:
                raise TooLarge(
                    f"the checkpoint's pickle nests deeper than {MAX_STACK} values or "
                    f"{MAX_MARKS} marks: refused as too large to read",
                    detail={"limit": "max_stack", "max_stack": MAX_STACK, "max_marks": MAX_MARKS},
                )
        raise TooLarge(
            f"the checkpoint's pickle runs more than {MAX_OPCODES} steps: refused as too "
            "large to read",
            detail={"limit": MAX_OPCODES},
        )

    def _charge(self, nbytes: int) -> None:
        self.built += nbytes
        if self.built > MAX_BUILT_BYTES:
            raise TooLarge(
                f"the checkpoint's pickle builds more than {MAX_BUILT_BYTES} bytes of objects "
                "(a real checkpoint's structure needs a few MB): refused as too large to read",
                detail={"limit": "max_built_bytes", "max_built_bytes": MAX_BUILT_BYTES},
            )

    def _read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated()
        chunk = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def _read_byte(self) -> int:
        if self.pos >= len(self.data):
            raise _Truncated()
        value = self.data[self.pos]
        self.pos += 1
        return value

    def _read_uint(self, fmt: str, size: int) -> int:
        if self.pos + size > len(self.data):
            raise _Truncated()
        value: int = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return value

    def _readline(self) -> bytes:
        limit = min(len(self.data), self.pos + 65536)
        for index in range(self.pos, limit):
            if self.data[index] == 0x0A:
                line = bytes(self.data[self.pos : index])
                self.pos = index + 1
                return line
        raise _Truncated()

    # the stack

    def _pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise InvalidCheckpoint("corrupt pickle: a MARK is missing")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _pop(self) -> Any:
        if not self.stack:
            raise InvalidCheckpoint("corrupt pickle: the stack is empty")
        return self.stack.pop()

    def _top(self) -> Any:
        if not self.stack:
            raise InvalidCheckpoint("corrupt pickle: the stack is empty")
        return self.stack[-1]

    # globals and calls

    def _resolve(self, module: str, name: str) -> Any:
        module, name = normalize_global(module, name)
        value = self.allowed.get((module, name))
        if value is not None:
            return value
        qualname = f"{module}.{name}"
        if is_denied(module, name):
            self.report.denied.add(qualname)
            return GlobalRef(qualname, denied=True)
        self.report.placeholders.add(qualname)
        return GlobalRef(qualname)

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise InvalidCheckpoint("corrupt pickle: REDUCE arguments are not a tuple")
        if isinstance(func, _Builder):
            try:
                return func.build(*args)
            except TypeError as exc:
                raise InvalidCheckpoint(
                    f"corrupt pickle: {func.name} called with {len(args)} arguments"
                ) from exc
        if isinstance(func, (GlobalRef, _TensorClass)):
            return Placeholder(func.name, args)
        if isinstance(func, Placeholder):
            return Placeholder(f"{func.name}()", args)
        raise InvalidCheckpoint(f"corrupt pickle: calls a {type(func).__name__}")

    # opcodes

    def _dispatch_table(self) -> dict[int, Callable[[], bool | None]]:
        table: dict[bytes, Callable[[], bool | None]] = {
            b"(": self._mark,
            b".": lambda: True,
            b"0": self._op_pop,
            b"1": self._op_pop_mark,
            b"2": lambda: self.stack.append(self._top()),
            b"F": lambda: self.stack.append(float(self._readline())),
            b"I": self._op_int,
            b"J": lambda: self.stack.append(self._read_uint("<i", 4)),
            b"K": lambda: self.stack.append(self._read_byte()),
            b"L": self._op_long,
            b"M": lambda: self.stack.append(self._read_uint("<H", 2)),
            b"N": lambda: self.stack.append(None),
            b"P": lambda: self._persistent(self._readline().decode("ascii")),
            b"Q": lambda: self._persistent(self._pop()),
            b"R": self._op_reduce,
            b"S": self._op_string,
            b"T": lambda: self.stack.append(self._py2_str(self._read(self._read_uint("<i", 4)))),
            b"U": lambda: self.stack.append(self._py2_str(self._read(self._read_byte()))),
            b"V": lambda: self.stack.append(self._readline().decode("raw-unicode-escape")),
            b"X": lambda: self.stack.append(self._text(self._read_uint("<I", 4))),
            b"a": self._op_append,
            b"b": self._op_build,
            b"c": self._op_global,
            b"d": self._op_dict,
            b"}": lambda: self.stack.append({}),
            b"e": self._op_appends,
            b"g": lambda: self._get(int(self._readline())),
            b"h": lambda: self._get(self._read_byte()),
            b"i": self._op_inst,
            b"j": lambda: self._get(self._read_uint("<I", 4)),
            b"l": lambda: self._push_marked(list),
            b"]": lambda: self.stack.append([]),
            b"o": self._op_obj,
            b"p": lambda: self._put(int(self._readline())),
            b"q": lambda: self._put(self._read_byte()),
            b"r": lambda: self._put(self._read_uint("<I", 4)),
            b"s": self._op_setitem,
            b"t": lambda: self._push_marked(tuple),
            b")": lambda: self.stack.append(()),
            b"u": self._op_setitems,
            b"G": lambda: self.stack.append(struct.unpack(">d", self._read(8))[0]),
            b"\x80": self._op_proto,
            b"\x81": self._op_newobj,
            b"\x82": self._op_ext,
            b"\x83": self._op_ext,
            b"\x84": self._op_ext,
            b"\x85": lambda: self._tuple(1),
            b"\x86": lambda: self._tuple(2),
            b"\x87": lambda: self._tuple(3),
            b"\x88": lambda: self.stack.append(True),
            b"\x89": lambda: self.stack.append(False),
            b"\x8a": lambda: self.stack.append(self._long(self._read_byte())),
            b"\x8b": lambda: self.stack.append(self._long(self._read_uint("<i", 4))),
            b"B": lambda: self.stack.append(self._read(self._read_uint("<I", 4))),
            b"C": lambda: self.stack.append(self._read(self._read_byte())),
            b"\x8c": lambda: self.stack.append(self._text(self._read_byte())),
            b"\x8d": lambda: self.stack.append(self._text(self._read_uint("<Q", 8))),
            b"\x8e": lambda: self.stack.append(self._read(self._read_uint("<Q", 8))),
            b"\x8f": lambda: self.stack.append(set()),
            b"\x90": self._op_additems,
            b"\x91": lambda: self._push_marked(_frozenset),
            b"\x92": self._op_newobj_ex,
            b"\x93": self._op_stack_global,
            b"\x94": lambda: self._put(len(self.memo)),
            b"\x95": self._op_frame,
            b"\x96": lambda: self.stack.append(bytearray(self._read(self._read_uint("<Q", 8)))),
            b"\x97": self._op_next_buffer,
            b"\x98": lambda: None,  # READONLY_BUFFER: nothing to mark read-only here
        }
        return {code[0]: handler for code, handler in table.items()}

    def _push_marked(self, build: Callable[[list[Any]], Any]) -> None:
        # Pop the mark first: ``self.stack`` is another list afterwards.
        items = self._pop_mark()
        self.stack.append(build(items))

    def _mark(self) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def _op_pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def _op_pop_mark(self) -> None:
        self._pop_mark()

    def _op_frame(self) -> None:
        self._read(8)  # a length hint for buffered readers; nothing to do here

    def _op_int(self) -> None:
        line = self._readline()
        booleans = {b"00": False, b"01": True}  # protocol 0 spells True and False this way
        self.stack.append(booleans[line] if line in booleans else int(line))

    def _op_long(self) -> None:
        line = self._readline()
        self.stack.append(int(line[:-1] if line.endswith(b"L") else line))

    def _long(self, n: int) -> int:
        if n < 0:
            raise InvalidCheckpoint("corrupt pickle: negative LONG4 length")
        return int.from_bytes(self._read(n), "little", signed=True)

    def _text(self, n: int) -> str:
        return self._read(n).decode("utf-8", "surrogatepass")

    def _py2_str(self, raw: bytes) -> str | bytes:
        # Python 2 ``str``: torch.load decodes it as UTF-8; raw binary stays bytes.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    def _op_string(self) -> None:
        line = self._readline().rstrip()
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
            raise InvalidCheckpoint("corrupt pickle: the STRING opcode argument is not quoted")
        self.stack.append(self._py2_str(codecs.escape_decode(line[1:-1])[0]))

    def _tuple(self, n: int) -> None:
        if len(self.stack) < n:
            raise InvalidCheckpoint("corrupt pickle: the stack is empty")
        items = tuple(self.stack[len(self.stack) - n :])
        del self.stack[len(self.stack) - n :]
        self.stack.append(items)

    def _get(self, index: int) -> None:
        if index not in self.memo:
            raise InvalidCheckpoint(f"corrupt pickle: memo entry {index} was never stored")
        self.stack.append(self.memo[index])

    def _put(self, index: int) -> None:
        if index < 0:
            raise InvalidCheckpoint("corrupt pickle: negative memo index")
        if index not in self.memo:
            self._charge(_MEMO_BYTES)
        self.memo[index] = self._top()

    def _persistent(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise InvalidCheckpoint("corrupt pickle: a persistent id where none can be")
        self.stack.append(self.persistent_load(pid))

    def _op_proto(self) -> None:
        if self._read_byte() > 5:
            raise InvalidCheckpoint("corrupt pickle: unsupported pickle protocol")

    def _op_global(self) -> None:
        module = self._readline().decode("utf-8")
        name = self._readline().decode("utf-8")
        self.stack.append(self._resolve(module, name))

    def _op_stack_global(self) -> None:
        name, module = self._pop(), self._pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise InvalidCheckpoint("corrupt pickle: STACK_GLOBAL of something not a name")
        self.stack.append(self._resolve(module, name))

    def _op_inst(self) -> None:
        module = self._readline().decode("ascii")
        name = self._readline().decode("ascii")
        args = tuple(self._pop_mark())
        self.stack.append(self._call(self._resolve(module, name), args))

    def _op_obj(self) -> None:
        args = self._pop_mark()
        if not args:
            raise InvalidCheckpoint("corrupt pickle: OBJ without a class")
        self.stack.append(self._call(args[0], tuple(args[1:])))

    def _op_reduce(self) -> None:
        args = self._pop()
        func = self._pop()
        self.stack.append(self._call(func, args))

    def _op_newobj(self) -> None:
        args = self._pop()
        cls = self._pop()
        if not isinstance(args, tuple):
            raise InvalidCheckpoint("corrupt pickle: NEWOBJ arguments are not a tuple")
        self.stack.append(new_instance(cls, args))

    def _op_newobj_ex(self) -> None:
        kwargs, args, cls = self._pop(), self._pop(), self._pop()
        self.stack.append(_newobj_ex(cls, args, kwargs))

    def _op_ext(self) -> None:
        raise InvalidCheckpoint("corrupt pickle: extension-registry codes are not supported")

    def _op_next_buffer(self) -> None:
        raise InvalidCheckpoint("corrupt pickle: out-of-band buffers are not supported")

    def _op_dict(self) -> None:
        items = self._pop_mark()
        if len(items) % 2:
            raise InvalidCheckpoint("corrupt pickle: DICT with an odd number of items")
        self.stack.append({check_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def _set_items(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise InvalidCheckpoint("corrupt pickle: SETITEMS with an odd number of items")
        self._charge(_SLOT_BYTES * (len(items) // 2))
        if isinstance(target, dict):
            for i in range(0, len(items), 2):
                target[check_key(items[i])] = items[i + 1]
        elif isinstance(target, Placeholder):
            for i in range(0, len(items), 2):
                target.items[check_key(items[i])] = items[i + 1]
        else:
            raise InvalidCheckpoint(f"corrupt pickle: sets items on a {type(target).__name__}")

    def _op_setitem(self) -> None:
        value, key = self._pop(), self._pop()
        self._set_items(self._top(), [key, value])

    def _op_setitems(self) -> None:
        items = self._pop_mark()
        self._set_items(self._top(), items)

    def _append(self, target: Any, items: list[Any]) -> None:
        self._charge(_SLOT_BYTES * len(items))
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, Placeholder):
            target.appended.extend(items)
        else:
            raise InvalidCheckpoint(f"corrupt pickle: appends to a {type(target).__name__}")

    def _op_append(self) -> None:
        value = self._pop()
        self._append(self._top(), [value])

    def _op_appends(self) -> None:
        items = self._pop_mark()
        self._append(self._top(), items)

    def _op_additems(self) -> None:
        items = self._pop_mark()
        target = self._top()
        if not isinstance(target, set):
            raise InvalidCheckpoint("corrupt pickle: ADDITEMS on something not a set")
        self._charge(_SLOT_BYTES * len(items))
        target.update(_elements(items))

    def _op_build(self) -> None:
        state = self._pop()
        target = self._top()
        if isinstance(target, Placeholder):
            target.state = state
        elif not isinstance(target, (dict, TensorRef)):
            # dict: OrderedDict's ``_metadata`` (module versions), not needed to read weights;
            # TensorRef: pre-1.0 tensor state (requires_grad, hooks), likewise.
            raise InvalidCheckpoint(f"corrupt pickle: sets the state of a {type(target).__name__}")


def unpickle(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits,
    persistent_load: Callable[[Any], Any] | None = None,
    report: UnpickleReport | None = None,
) -> Any:
    """The value of the pickle in ``data``, read as data (see the module docstring)."""
    return RestrictedUnpickler(
        data, limits=limits, persistent_load=persistent_load, report=report
    ).load()
