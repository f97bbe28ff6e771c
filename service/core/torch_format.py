"""The two torch checkpoint containers, read from the uploaded bytes without running them.

- **zip** (``torch.save`` since 1.6): ``<archive>/data.pkl`` (the pickle),
  ``<archive>/data/<key>`` (one record of raw bytes per storage) and ``<archive>/byteorder``.
  Records are found through the central directory; each local header must agree with it,
  each record's size must be what the pickle says its storage holds, and the record must
  match its CRC when it is read. Compressed records (torch writes none) are inflated with a
  bound: a zip bomb stops at the size it declared.
- **legacy** (``_use_new_zipfile_serialization=False``, and every file before 1.6): five
  pickles back to back (magic number, protocol version, system info, the object, the
  sorted storage keys), then per key an 8-byte little-endian element count and the raw
  little-endian bytes. Every count must match the pickle and the file must end there.

Pure: the input is a bytes-like view of the whole file (the caller maps it, so nothing is
held twice); the output is the unpickled tree and, per storage, where its bytes lie.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core.safetensors_format import Limits
from service.core.unpickle import (
    RestrictedUnpickler,
    StorageRef,
    StorageType,
    TypedStorage,
    UnpickleReport,
)
from service.errors import InvalidCheckpoint, TooLarge

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# A checkpoint's pickle is its structure, not its weights: megabytes even for huge models.
MAX_PICKLE_BYTES = 32 * 1024 * 1024
# Compressed records may inflate to at most this many times the upload (plus the slack).
MAX_INFLATION = 16
INFLATION_SLACK = 64 * 1024 * 1024
MAX_EXTRA_MEMBERS = 64  # zip members beside one per tensor (data.pkl, byteorder, version...)


@dataclass(frozen=True)
class Record:
    """Where one storage's bytes (or the pickle) lie in the file."""

    name: str
    offset: int
    size: int  # bytes in the file
    nbytes: int  # bytes once inflated
    compressed: bool
    crc32: int | None  # the legacy format has no checksum


@dataclass
class TorchCheckpoint:
    source_format: str  # "torch-zip" | "torch-legacy"
    root: Any
    storages: dict[str, StorageRef]
    records: dict[str, Record]  # storage key -> its bytes
    byteorder: str  # "little" | "big"
    globals: UnpickleReport


def read_torch_checkpoint(buffer: Any, source_format: str, *, limits: Limits) -> TorchCheckpoint:
    if source_format == "torch-zip":
        return read_torch_zip(buffer, limits=limits)
    return read_torch_legacy(buffer, limits=limits)


def inflation_budget(file_size: int) -> int:
    """How many bytes a checkpoint of ``file_size`` bytes may expand to when converted."""
    return MAX_INFLATION * file_size + INFLATION_SLACK


# -- storages claimed by the pickle ---------------------------------------------------------


class _Storages:
    """Storage keys as the pickle claims them; one key must always mean one size."""

    def __init__(self) -> None:
        self.refs: dict[str, StorageRef] = {}

    def claim(self, storage_type: Any, key: Any, location: Any, numel: Any) -> StorageRef:
        key, location = _ascii(key), _ascii(location)
        if not isinstance(storage_type, StorageType):
            raise InvalidCheckpoint("corrupt pickle: a storage of an unknown type")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise InvalidCheckpoint("corrupt pickle: a storage key is not a short string")
        if not isinstance(location, str) or len(location) > 64:
            raise InvalidCheckpoint(f"corrupt pickle: storage {key!r} has no device location")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise InvalidCheckpoint(f"corrupt pickle: storage {key!r} has no element count")
        itemsize = storage_type.dtype.itemsize
        ref = self.refs.setdefault(key, StorageRef(key, numel * itemsize, location, itemsize))
        if ref.nbytes != numel * itemsize:
            raise InvalidCheckpoint(
                f"storage {key!r} is claimed as {ref.nbytes} and {numel * itemsize} bytes",
                detail={"storage": key},
            )
        return ref


def _ascii(value: Any) -> Any:
    # Python 2 pickles give torch's internal strings as bytes.
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _zip_persistent_load(storages: _Storages) -> Callable[[Any], Any]:
    def load(pid: Any) -> TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and _ascii(pid[0]) == "storage"):
            raise InvalidCheckpoint("corrupt pickle: an unknown persistent id")
        _, storage_type, key, location, numel = pid
        ref = storages.claim(storage_type, key, location, numel)
        return TypedStorage(ref, storage_type.dtype)

    return load


def _legacy_persistent_load(storages: _Storages) -> Callable[[Any], Any]:
    def load(pid: Any) -> Any:
        kind = _ascii(pid[0]) if isinstance(pid, tuple) and pid else None
        if kind == "module" and len(pid) == 4:
            return pid[1]  # a module's class, saved with its source; the source is ignored
        if kind != "storage" or len(pid) != 6:
            raise InvalidCheckpoint("corrupt pickle: an unknown persistent id")
        _, storage_type, key, location, numel, view = pid
        ref = storages.claim(storage_type, key, location, numel)
        typed = TypedStorage(ref, storage_type.dtype)
        return typed if view is None else _legacy_view(typed, view)

    return load


def _legacy_view(storage: TypedStorage, view: Any) -> TypedStorage:
    # Storage views (torch < 0.4): (view key, offset, size) in elements of the root storage.
    if not (isinstance(view, tuple) and len(view) == 3):
        raise InvalidCheckpoint("corrupt pickle: a storage view is not (key, offset, size)")
    _, offset, size = view
    itemsize = storage.dtype.itemsize
    if not all(isinstance(v, int) and v >= 0 for v in (offset, size)) or (
        (offset + size) * itemsize > storage.ref.nbytes
    ):
        raise InvalidCheckpoint(f"a storage view lies outside storage {storage.ref.key!r}")
    return TypedStorage(storage.ref, storage.dtype, offset * itemsize, size * itemsize)


# -- zip -------------------------------------------------------------------------------------


class _BufferFile(io.RawIOBase):
    """A read-only file over a bytes-like object (the mapped upload), for ``zipfile``."""

    def __init__(self, buffer: Any) -> None:
        self._view = memoryview(buffer).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, target: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(target)]
        target[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_EOCD = b"PK\x05\x06"


def read_torch_zip(buffer: Any, *, limits: Limits) -> TorchCheckpoint:
    view = memoryview(buffer).cast("B")
    members = _zip_members(view, max_members=limits.max_tensors + MAX_EXTRA_MEMBERS)
    prefix = _archive_prefix(members)
    storages = _Storages()
    report = UnpickleReport()
    pickle_record = _record(view, members[prefix + "data.pkl"])
    if pickle_record.nbytes > min(MAX_PICKLE_BYTES, inflation_budget(len(view))):
        raise TooLarge(
            f"the checkpoint's pickle is {pickle_record.nbytes} bytes; the limit is "
            f"{MAX_PICKLE_BYTES}",
            detail={"pickle_bytes": pickle_record.nbytes, "limit": MAX_PICKLE_BYTES},
        )
    root = RestrictedUnpickler(
        read_record(view, pickle_record),
        limits=limits,
        persistent_load=_zip_persistent_load(storages),
        report=report,
    ).load()
    records = {
        key: _storage_record(view, members, prefix, ref) for key, ref in storages.refs.items()
    }
    inflated = sum(r.nbytes for r in records.values() if r.compressed) + pickle_record.nbytes
    if inflated > inflation_budget(len(view)):
        raise TooLarge(
            f"the archive's compressed records would inflate to {inflated} bytes, more than "
            f"{MAX_INFLATION}x the upload: refused as a zip bomb",
            detail={"inflated_bytes": inflated},
        )
    byteorder = _byteorder(view, members.get(prefix + "byteorder"))
    return TorchCheckpoint("torch-zip", root, storages.refs, records, byteorder, report)


def _zip_members(view: memoryview, *, max_members: int) -> dict[str, zipfile.ZipInfo]:
    declared = _declared_entries(view)
    if declared is not None and declared > max_members:
        raise TooLarge(
            f"the archive declares {declared} members; the limit is {max_members}",
            detail={"members": declared, "limit": max_members},
        )
    try:
        with zipfile.ZipFile(_BufferFile(view)) as archive:
            infos = archive.infolist()
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        ValueError,  # UnicodeDecodeError of a member name among them
        EOFError,
        struct.error,
        OverflowError,
        NotImplementedError,  # "zip file version 12.8"
    ) as exc:
        raise InvalidCheckpoint(f"a damaged or truncated zip archive: {exc}") from exc
    if len(infos) > max_members:
        raise TooLarge(f"the archive has {len(infos)} members; the limit is {max_members}")
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in members:
            raise InvalidCheckpoint(f"the archive names member {info.filename!r} twice")
        members[info.filename] = info
    return members


def _declared_entries(view: memoryview) -> int | None:
    """The member count the end-of-central-directory record declares, before parsing it."""
    tail_start = max(0, len(view) - 22 - 65535)
    tail = bytes(view[tail_start:])
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        return None
    (entries,) = struct.unpack_from("<H", tail, at + 10)
    if entries != 0xFFFF or at < 20:
        return int(entries)
    (zip64_eocd,) = struct.unpack_from("<Q", tail, at - 20 + 8)  # from the zip64 locator
    if zip64_eocd + 40 > len(view) or bytes(view[zip64_eocd : zip64_eocd + 4]) != b"PK\x06\x06":
        return None
    (total,) = struct.unpack_from("<Q", view, zip64_eocd + 32)
    return int(total)


def _archive_prefix(members: dict[str, zipfile.ZipInfo]) -> str:
    """torch keeps every record under one top directory, named after the saved file."""
    pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        if any(n.endswith("/constants.pkl") for n in members):
            raise InvalidCheckpoint(
                "a TorchScript archive (torch.jit.save): statehub reads torch.save files; "
                "save the model's state_dict() instead"
            )
        what = "no" if not pickles else "more than one"
        raise InvalidCheckpoint(
            f"a zip archive with {what} <archive>/data.pkl: not a torch checkpoint (sharded "
            "safetensors are uploaded as a tar, see the upload route)"
        )
    prefix = pickles[0].removesuffix("data.pkl")
    if any(n.startswith(prefix + "code/") for n in members):
        raise InvalidCheckpoint("a TorchScript archive (torch.jit.save) is not supported")
    return prefix


def _record(view: memoryview, info: zipfile.ZipInfo) -> Record:
    """Where a member's bytes lie, after checking its local header against the directory."""
    start = info.header_offset
    if start < 0 or start + _LOCAL_HEADER.size > len(view):
        raise InvalidCheckpoint(f"zip member {info.filename!r} lies outside the file")
    signature, _, flags, method, _, _, _, csize, usize, name_len, extra_len = (
        _LOCAL_HEADER.unpack_from(view, start)
    )
    name_start = start + _LOCAL_HEADER.size
    raw_name = bytes(view[name_start : name_start + name_len])
    if signature != b"PK\x03\x04" or raw_name != _raw_name(info):
        raise InvalidCheckpoint(
            f"zip member {info.filename!r}: its local header disagrees with the directory"
        )
    if flags & 0x1:
        raise InvalidCheckpoint(f"zip member {info.filename!r} is encrypted")
    if method != info.compress_type or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InvalidCheckpoint(f"zip member {info.filename!r}: unsupported compression {method}")
    sizes_in_header = not flags & 0x8 and 0xFFFFFFFF not in (csize, usize)
    if sizes_in_header and (csize, usize) != (info.compress_size, info.file_size):
        raise InvalidCheckpoint(f"zip member {info.filename!r}: its sizes disagree")
    offset = name_start + name_len + extra_len
    stored = method == zipfile.ZIP_STORED
    if offset + info.compress_size > len(view) or (stored and info.compress_size != info.file_size):
        raise InvalidCheckpoint(
            f"zip member {info.filename!r} is truncated or lies about its size",
            detail={"member": info.filename},
        )
    return Record(info.filename, offset, info.compress_size, info.file_size, not stored, info.CRC)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    return info.orig_filename.encode(encoding, "replace")


def _storage_record(
    view: memoryview, members: dict[str, zipfile.ZipInfo], prefix: str, ref: StorageRef
) -> Record:
    info = members.get(f"{prefix}data/{ref.key}")
    if info is None:
        raise InvalidCheckpoint(
            f"the pickle refers to storage {ref.key!r} but the archive has no data/{ref.key}",
            detail={"storage": ref.key},
        )
    record = _record(view, info)
    if record.nbytes != ref.nbytes:
        raise InvalidCheckpoint(
            f"data record data/{ref.key} holds {record.nbytes} bytes but the pickle says its "
            f"storage has {ref.nbytes}",
            detail={"storage": ref.key, "record_bytes": record.nbytes, "expected": ref.nbytes},
        )
    return record


def _byteorder(view: memoryview, info: zipfile.ZipInfo | None) -> str:
    if info is None:
        return "little"  # files from before torch wrote the record are little-endian
    record = _record(view, info)
    if record.nbytes > 16:
        raise InvalidCheckpoint("the archive's byteorder record is not 'little' or 'big'")
    value = bytes(read_record(view, record))
    if value not in (b"little", b"big"):
        raise InvalidCheckpoint("the archive's byteorder record is not 'little' or 'big'")
    return value.decode()


def read_record(buffer: Any, record: Record) -> memoryview | bytes:
    """A record's bytes, inflated (bounded by its declared size) and checked against its CRC."""
    stored = memoryview(buffer).cast("B")[record.offset : record.offset + record.size]
    data: memoryview | bytes = _inflate(stored, record) if record.compressed else stored
    if record.crc32 is not None and zlib.crc32(data) != record.crc32:
        raise InvalidCheckpoint(
            f"record {record.name!r} does not match its checksum: the file is damaged",
            detail={"member": record.name},
        )
    return data


def _inflate(data: memoryview, record: Record, chunk: int = 1 << 20) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        for start in range(0, len(data), chunk):
            # Ask for one byte more than declared: getting it proves the record lies.
            out += inflater.decompress(data[start : start + chunk], record.nbytes + 1 - len(out))
            if len(out) > record.nbytes:
                break
    except zlib.error as exc:
        raise InvalidCheckpoint(f"record {record.name!r} is not valid deflate data") from exc
    if len(out) != record.nbytes or not inflater.eof:
        raise InvalidCheckpoint(
            f"record {record.name!r} does not inflate to the {record.nbytes} bytes it declares",
            detail={"member": record.name},
        )
    return bytes(out)


# -- legacy ------------------------------------------------------------------------------------


def read_torch_legacy(buffer: Any, *, limits: Limits) -> TorchCheckpoint:
    view = memoryview(buffer).cast("B")
    storages = _Storages()
    report = UnpickleReport()
    pos = 0

    def next_pickle(persistent_load: Callable[[Any], Any] | None = None) -> Any:
        nonlocal pos
        window = min(len(view), pos + MAX_PICKLE_BYTES)
        unpickler = RestrictedUnpickler(
            view[:window], limits=limits, start=pos, persistent_load=persistent_load, report=report
        )
        try:
            value = unpickler.load()
        except InvalidCheckpoint:
            if unpickler.ran_out and window < len(view):
                raise TooLarge(
                    f"the checkpoint's pickle exceeds {MAX_PICKLE_BYTES} bytes"
                ) from None
            raise
        pos = unpickler.end
        return value

    if next_pickle() != MAGIC_NUMBER:
        raise InvalidCheckpoint(
            "a pickle without torch's magic number: not a torch checkpoint (statehub reads "
            "torch.save files and safetensors)"
        )
    if next_pickle() != PROTOCOL_VERSION:
        raise InvalidCheckpoint("a legacy torch checkpoint of an unknown protocol version")
    if not isinstance(next_pickle(), dict):
        raise InvalidCheckpoint("a legacy torch checkpoint without its system info")
    root = next_pickle(_legacy_persistent_load(storages))
    keys = next_pickle()
    if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
        raise InvalidCheckpoint("a legacy torch checkpoint without its list of storages")
    records = _legacy_records(view, pos, [_ascii(k) for k in keys], storages)
    return TorchCheckpoint("torch-legacy", root, storages.refs, records, "little", report)


def _legacy_records(
    view: memoryview, pos: int, keys: list[str], storages: _Storages
) -> dict[str, Record]:
    if len(set(keys)) != len(keys) or set(keys) != set(storages.refs):
        raise InvalidCheckpoint(
            "the legacy checkpoint's storage list does not match the storages its pickle uses"
        )
    records: dict[str, Record] = {}
    for key in keys:
        ref = storages.refs[key]
        if pos + 8 > len(view):
            raise InvalidCheckpoint(f"the checkpoint ends before storage {key!r}: truncated")
        (count,) = struct.unpack_from("<q", view, pos)
        if count < 0 or count * ref.itemsize != ref.nbytes:
            raise InvalidCheckpoint(
                f"storage {key!r} says it holds {count} elements but the pickle says "
                f"{ref.nbytes // ref.itemsize}",
                detail={"storage": key},
            )
        pos += 8
        if pos + ref.nbytes > len(view):
            raise InvalidCheckpoint(f"the checkpoint ends inside storage {key!r}: truncated")
        records[key] = Record(f"storage {key}", pos, ref.nbytes, ref.nbytes, False, None)
        pos += ref.nbytes
    if pos != len(view):
        raise InvalidCheckpoint(
            f"{len(view) - pos} bytes follow the last storage: not a legacy torch checkpoint"
        )
    return records
