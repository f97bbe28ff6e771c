"""Reading an uploaded checkpoint into the stored form: one validated safetensors file.

What the upload is comes from its first bytes, never from its name:

- **safetensors**: validated strictly and stored byte for byte;
- **torch zip / legacy** (``.pth``, ``.pt``, ``.bin``): read by statehub's own restricted
  unpickler (``service.core.unpickle``), which turns every global it does not know into an
  inert placeholder and refuses files that name code-running globals. The weights are
  taken from the state_dict, the pickled module or the training snapshot
  (``service.core.snapshot``), read record by record from the mapped file (no copy of a
  stored record, CUDA locations read on the CPU), and written as safetensors in state_dict
  order; keys that are the same view of the same bytes are written once, as a tie group;
- **a tar of an HF-style sharded safetensors checkpoint** (index + shards): merged into one
  file, shard after shard as they lie (``service.core.sharded.merge_order``).

Why not ``torch.load(weights_only=True)`` first: with ``mmap=True`` it trusts the pickle's
byte counts over the zip's record sizes (a short record is read past its end, into the next
one) and its C++ zip reader would see the bytes before anything validated them; without
``mmap`` it holds every storage in memory. One reader for every torch file also gives every
version the same report. Nothing here imports what a pickle names or calls it.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from service.core import ops
from service.core.planner import WRAPPERS
from service.core.safetensors_format import (
    Limits,
    SafetensorsHeader,
    build_header,
    parse_header,
    read_header_length,
)
from service.core.sharded import (
    ReadAt,
    TarMember,
    common_metadata,
    find_index,
    is_tar,
    merge_order,
    parse_index,
    read_tar_members,
)
from service.core.snapshot import (
    Extracted,
    clean_text,
    dedupe_ties,
    extract_weights,
    render_snapshot,
)
from service.core.spec import TensorSpec
from service.core.torch_format import (
    MAX_PICKLE_BYTES,
    TorchCheckpoint,
    inflation_budget,
    read_record,
    read_torch_checkpoint,
)
from service.core.unpickle import RestrictedUnpickler, TensorRef
from service.errors import InvalidCheckpoint, StatehubError, TooLarge, UnsafePickle
from service.storage.spool import Spooled

WRAPPER_PREFIXES = tuple(f"{wrapper}." for wrapper in WRAPPERS)  # the planner's, as prefixes
MAX_REPORTED_NAMES = 200
COPY_CHUNK = 8 * 1024 * 1024

# First bytes of files people upload by mistake, for an error that says what they sent.
_NOT_CHECKPOINTS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip file (upload the tar or checkpoint uncompressed)"),
    (b"BZh", "a bzip2 file"),
    (b"\xfd7zXZ\x00", "an xz file"),
    (b"\x7fELF", "an executable"),
    (b"\x93NUMPY", "a numpy .npy file"),
)


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
        return sniff_bytes(handle.read(512))


def sniff_bytes(head: bytes) -> str:
    """The format a file's first 512 bytes announce (safetensors when none other)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    if is_tar(head):
        return "safetensors-sharded"
    return "safetensors"


def ingest(spooled: Spooled, *, limits: Limits, work_dir: Path, ema: bool = False) -> Ingested:
    """The upload as a validated safetensors file (the spooled file itself, or a conversion).

    Raises InvalidCheckpoint (UnsafePickle for pickles built to run code) or TooLarge; a
    conversion's partial output is removed then, the spooled file is the caller's.
    """
    source_format = sniff_format(spooled.path)
    if source_format == "safetensors":
        ingested = _ingest_safetensors(spooled, limits=limits, ema=ema)
    elif source_format == "safetensors-sharded":
        ingested = _ingest_sharded(spooled, limits=limits, work_dir=work_dir, ema=ema)
    else:
        ingested = _ingest_torch(spooled, source_format, limits=limits, work_dir=work_dir, ema=ema)
    try:
        check_stored(ingested.header, limits)
    except BaseException:
        if ingested.path != spooled.path:
            ingested.path.unlink(missing_ok=True)
        raise
    describe(ingested, source_format)
    return ingested


def describe(ingested: Ingested, source_format: str) -> None:
    """Complete the version's ``ingest`` report with what every format shares."""
    ingested.report = {"source_format": source_format, **ingested.report}
    ingested.report["wrapper_prefixes"] = wrapper_prefixes(t.key for t in ingested.header.tensors)
    ingested.report["dtypes"] = ingested.header.spec().dtypes
    ingested.report.setdefault("tie_groups", ingested.tie_groups)


def check_stored(header: SafetensorsHeader, limits: Limits) -> None:
    """What every stored version must be: some tensors, under keys any JSON store takes."""
    if not header.tensors:
        raise InvalidCheckpoint("the checkpoint holds no tensors")
    for tensor in header.tensors:
        check_key(tensor.key, limits)


def check_key(key: str, limits: Limits) -> str:
    if not key or len(key) > limits.max_key_length:
        raise InvalidCheckpoint(f"tensor key of length {len(key)} is empty or too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key) or clean_text(key) != key:
        raise InvalidCheckpoint(
            f"tensor key {key[:100]!r} holds control characters or invalid Unicode",
            detail={"key": clean_text(key[:200])},
        )
    return key


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


# -- safetensors -----------------------------------------------------------------------------


def _ingest_safetensors(spooled: Spooled, *, limits: Limits, ema: bool) -> Ingested:
    try:
        header = read_safetensors_header(spooled.path, size=spooled.size, limits=limits)
    except InvalidCheckpoint as exc:
        _refuse_hostile_pickle(spooled.path, size=spooled.size, limits=limits)
        looks_like = _what_it_looks_like(spooled.path)
        if looks_like is None:
            raise
        raise InvalidCheckpoint(
            f"not a checkpoint: the upload is {looks_like}. statehub takes safetensors, "
            "torch.save files and tars of sharded safetensors"
        ) from exc
    if ema:
        raise InvalidCheckpoint(
            "EMA weights were asked for, but a safetensors file holds one set of weights: "
            "push it without ema=true"
        )
    return Ingested(spooled.path, spooled.digest, spooled.size, header, "safetensors")


def read_safetensors_header(path: Path, *, size: int, limits: Limits) -> SafetensorsHeader:
    with open(path, "rb") as handle:
        length = read_header_length(handle.read(8), file_size=size, limits=limits)
        raw = handle.read(length)
    return parse_header(raw, file_size=size, limits=limits)


def _refuse_hostile_pickle(path: Path, *, size: int, limits: Limits) -> None:
    """Protocol 0/1 pickles have no header to sniff: one built to run code is still named."""
    if size > MAX_PICKLE_BYTES:
        return
    try:
        RestrictedUnpickler(
            path.read_bytes(), limits=limits, persistent_load=lambda pid: pid
        ).load()
    except UnsafePickle:
        raise
    except StatehubError:
        pass  # not a pickle, or not a hostile one: the safetensors error stands


def _what_it_looks_like(path: Path) -> str | None:
    with open(path, "rb") as handle:
        head = handle.read(512)
    for magic, what in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(c.isprintable() or c.isspace() for c in text)
    return "a text file" if head and printable == len(text) else None


# -- torch files -----------------------------------------------------------------------------


def _ingest_torch(
    spooled: Spooled, source_format: str, *, limits: Limits, work_dir: Path, ema: bool
) -> Ingested:
    buffer = _map(spooled.path)
    checkpoint = read_torch_checkpoint(buffer, source_format, limits=limits)
    if not checkpoint.storages:
        raise InvalidCheckpoint("the checkpoint holds no tensors")
    extracted = extract_weights(checkpoint.root, ema=ema)
    tensors = extracted.weights.tensors
    if len(tensors) > limits.max_tensors:
        raise TooLarge(
            f"{len(tensors)} tensors exceed the limit of {limits.max_tensors}",
            detail={"tensors": len(tensors), "limit": limits.max_tensors},
        )
    unique, tie_groups = dedupe_ties(tensors)
    specs = [_spec_of(key, ref, limits) for key, ref in unique]
    _check_expansion(specs, spooled.size)
    reader = StorageReader(buffer, checkpoint)
    snapshot, omitted = render_snapshot(extracted.rest, scalar_of=reader.scalar)
    chunks = (reader.raw_bytes(ref) for _, ref in unique)
    converted = _write_converted(work_dir, specs, chunks, limits=limits)
    spooled.path.unlink(missing_ok=True)
    report = _torch_report(checkpoint, extracted, unique, tie_groups, omitted)
    return replace(
        converted,
        source_format=source_format,
        tie_groups=tie_groups,
        report=report,
        snapshot=snapshot,
    )


def _map(path: Path) -> mmap.mmap:
    # Copy-on-write: writable for torch.frombuffer, yet nothing is ever written back.
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)


def _spec_of(key: str, ref: TensorRef, limits: Limits) -> TensorSpec:
    if ref.dtype.code is None:
        raise InvalidCheckpoint(
            f"tensor {key!r} has dtype {ref.dtype.name}, which safetensors cannot store",
            detail={"key": key, "dtype": ref.dtype.name},
        )
    return TensorSpec(check_key(key, limits), ref.shape, ref.dtype.code)


def _check_expansion(specs: list[TensorSpec], upload_size: int) -> None:
    # Stride-0 views and overlapping slices let a tiny storage claim huge tensors.
    total = sum(spec.nbytes for spec in specs)
    if total > inflation_budget(upload_size):
        raise TooLarge(
            f"the checkpoint's tensors would expand to {total} bytes from a {upload_size}-byte "
            "upload: refused",
            detail={"tensor_bytes": total, "upload_bytes": upload_size},
        )


def _torch_report(
    checkpoint: TorchCheckpoint,
    extracted: Extracted,
    unique: list[tuple[str, TensorRef]],
    tie_groups: list[list[str]],
    omitted: list[str],
) -> dict[str, Any]:
    tensors = extracted.weights.tensors
    report: dict[str, Any] = {
        "reader": "restricted-unpickler",
        "state_dict_key": extracted.origin,
        "ema": extracted.ema,
        "placeholders": _names(checkpoint.globals.placeholders),
        "dropped": [clean_text(d) for d in extracted.dropped],
        "storage_locations": sorted({clean_text(r.storage.location) for r in tensors.values()}),
        "byteorder": checkpoint.byteorder,
        "strided_tensors": sum(not ref.is_contiguous() for _, ref in unique),
        "tie_groups": tie_groups,
    }
    optional = {
        "module_class": extracted.weights.module_class,
        "snapshot_class": extracted.snapshot_class,
        "skipped_entries": extracted.weights.skipped,
        "snapshot_omitted": omitted,
    }
    for name, value in optional.items():
        if value:
            report[name] = clean_text(value) if isinstance(value, str) else _names(value)
    return report


def _names(names: Iterable[str]) -> list[str]:
    return [clean_text(n) for n in sorted(names)[:MAX_REPORTED_NAMES]]


class StorageReader:
    """Tensors of a parsed torch checkpoint, as views of the mapped file where possible."""

    def __init__(self, buffer: mmap.mmap, checkpoint: TorchCheckpoint) -> None:
        self._buffer = buffer
        self._checkpoint = checkpoint
        self._checked: set[str] = set()
        self._inflated: dict[str, torch.Tensor] = {}

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        assert ref.dtype.code is not None
        dtype = ops.TORCH_DTYPES[ref.dtype.code]
        if ref.numel == 0:
            return torch.empty(ref.shape, dtype=dtype)
        itemsize = ref.dtype.itemsize
        span = (1 + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))) * itemsize
        window = self._storage(ref)[ref.byte_offset : ref.byte_offset + span]
        if ref.byte_offset % itemsize or window.data_ptr() % itemsize:
            window = window.clone()  # misaligned in the file: typed views need alignment
        tensor = torch.as_strided(window.view(dtype), ref.shape, ref.stride)
        if self._checkpoint.byteorder == "big" and itemsize > 1:
            tensor = _from_big_endian(tensor)
        return tensor

    def raw_bytes(self, ref: TensorRef) -> memoryview:
        """The tensor's little-endian bytes; a slice of the file when it is contiguous there."""
        if ref.is_contiguous() and self._checkpoint.byteorder == "little" and ref.numel:
            start = ref.byte_offset
            return self._storage(ref)[start : start + ref.nbytes].numpy().data
        return tensor_bytes(self.tensor(ref))

    def scalar(self, ref: TensorRef) -> float | int | bool | None:
        """A one-element tensor's value, for metadata (``best_acc: tensor(0.91)``)."""
        if ref.dtype.code is None or ref.numel != 1:
            return None
        value: float | int | bool = self.tensor(ref).reshape(-1)[0].item()
        return value

    def _storage(self, ref: TensorRef) -> torch.Tensor:
        record = self._checkpoint.records[ref.storage.key]
        if record.compressed:
            if record.name not in self._inflated:
                data = read_record(self._buffer, record)
                self._inflated[record.name] = torch.frombuffer(data, dtype=torch.uint8)
            return self._inflated[record.name]
        if record.name not in self._checked:
            read_record(self._buffer, record)  # checks the record's CRC
            self._checked.add(record.name)
        return torch.frombuffer(
            self._buffer, dtype=torch.uint8, count=record.nbytes, offset=record.offset
        )


def _from_big_endian(tensor: torch.Tensor) -> torch.Tensor:
    width = tensor.element_size()
    flat = tensor.contiguous().reshape(-1).view(torch.uint8).view(-1, width)
    return flat.flip(1).contiguous().view(tensor.dtype).reshape(tensor.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


# -- writing -----------------------------------------------------------------------------------


def _write_converted(
    work_dir: Path,
    specs: list[TensorSpec],
    chunks: Iterable[bytes | memoryview],
    *,
    limits: Limits,
    metadata: dict[str, str] | None = None,
) -> Ingested:
    """Write a converted upload under a unique ``.incomplete`` name; removed on failure."""
    path = work_dir / f"{uuid.uuid4().hex}.converted.incomplete"
    try:
        digest, size = write_safetensors(path, specs, chunks, metadata=metadata)
        header = read_safetensors_header(path, size=size, limits=limits)  # it must parse
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Ingested(path, digest, size, header, source_format="")


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    chunks: Iterable[bytes | memoryview],
    *,
    metadata: dict[str, str] | None = None,
) -> tuple[str, int]:
    """Write the header for ``specs``, then ``chunks`` (their bytes, in order); hash both."""
    header = build_header(specs, metadata)
    expected = len(header) + sum(spec.nbytes for spec in specs)
    digest = hashlib.sha256(header)
    size = len(header)
    with open(path, "wb") as handle:
        handle.write(header)
        for chunk in chunks:
            digest.update(chunk)
            handle.write(chunk)
            size += len(chunk)
    if size != expected:
        raise StatehubError(f"converted {size} bytes where the header promises {expected}")
    return digest.hexdigest(), size


# -- sharded safetensors -------------------------------------------------------------------


def _ingest_sharded(spooled: Spooled, *, limits: Limits, work_dir: Path, ema: bool) -> Ingested:
    if ema:
        raise InvalidCheckpoint(
            "EMA weights were asked for, but sharded safetensors hold one set of weights"
        )
    with open(spooled.path, "rb") as handle:
        read_at = _reader(handle)
        members = read_tar_members(read_at, spooled.size)
        index_member = find_index(members)
        if index_member.size > limits.max_header_bytes:
            raise TooLarge(f"{index_member.name} exceeds {limits.max_header_bytes} bytes")
        raw_index = read_at(index_member.offset, index_member.size)
        index = parse_index(index_member.name, raw_index, limits=limits)
        by_name = {m.name: m for m in members}
        headers = {shard: _shard_header(read_at, by_name, shard, limits) for shard in index.shards}
        order = merge_order(index, headers)
        specs = [TensorSpec(key, stored.shape, stored.dtype) for key, _, stored in order]
        ranges = (
            (by_name[shard].offset + headers[shard].data_start + stored.begin, stored.nbytes)
            for _, shard, stored in order
        )
        chunks = itertools.chain.from_iterable(_chunks(read_at, *r) for r in ranges)
        metadata = common_metadata(headers.values())
        converted = _write_converted(work_dir, specs, chunks, limits=limits, metadata=metadata)
    spooled.path.unlink(missing_ok=True)
    used = {index.name, *index.shards}
    rendered_metadata, _ = render_snapshot(index.metadata, scalar_of=lambda _: None)
    report = {
        "index": clean_text(index.name),
        "shards": [clean_text(s) for s in index.shards],
        "index_metadata": rendered_metadata,
        "ignored_members": _names(m.name for m in members if m.name not in used),
    }
    return replace(converted, source_format="safetensors-sharded", report=report)


def _reader(handle: BinaryIO) -> ReadAt:
    def read_at(offset: int, size: int) -> bytes:
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise InvalidCheckpoint("the tar archive is truncated")
        return data

    return read_at


def _shard_header(
    read_at: ReadAt, members: dict[str, TarMember], shard: str, limits: Limits
) -> SafetensorsHeader:
    member = members.get(shard)
    if member is None:
        raise InvalidCheckpoint(
            f"the index names shard {shard}, which the tar archive does not hold",
            detail={"shard": shard},
        )
    try:
        prefix = read_at(member.offset, 8) if member.size >= 8 else b""
        length = read_header_length(prefix, file_size=member.size, limits=limits)
        raw = read_at(member.offset + 8, length)
        return parse_header(raw, file_size=member.size, limits=limits)
    except (InvalidCheckpoint, TooLarge) as exc:
        detail = {"shard": shard, **exc.detail}
        raise type(exc)(f"shard {shard}: {exc.message}", detail=detail) from exc


def _chunks(read_at: ReadAt, offset: int, size: int) -> Iterator[bytes]:
    for start in range(0, size, COPY_CHUNK):
        yield read_at(offset + start, min(COPY_CHUNK, size - start))
