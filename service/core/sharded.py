"""HF-style sharded safetensors checkpoints, uploaded together as one tar: the pure parts.

The upload is an uncompressed POSIX tar (ustar, pax or GNU) holding one
``*.safetensors.index.json`` and the shard files its ``weight_map`` names, relative to the
index's directory. Other members (``config.json``, a README) are ignored and reported.

This module parses tar headers (checksummed and bounded: regular files and directories only,
no links, devices or sparse files, no absolute or ``..`` names), the index, and the merged
file's tensor order: the index's ``weight_map`` order, every key found in the shard the index
names, and no shard tensor the index does not list. Reading bytes is the caller's: it passes
``read_at(offset, size)``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.core.safetensors_format import Limits, SafetensorsHeader, StoredTensor
from service.errors import InvalidCheckpoint, TooLarge

BLOCK = 512
MAX_MEMBERS = 4096
MAX_EXTENDED_HEADER = 64 * 1024  # a pax record or GNU long name is a name, not a payload
INDEX_SUFFIX = ".safetensors.index.json"
SHARD_SUFFIX = ".safetensors"
_REGULAR = (b"0", b"\x00", b"7")
_DIRECTORY = b"5"

ReadAt = Callable[[int, int], bytes]


def is_tar(head: bytes) -> bool:
    """ustar magic at offset 257: POSIX (``ustar\\0``) and GNU (``ustar  \\0``) archives."""
    return len(head) >= 263 and head[257:262] == b"ustar"


@dataclass(frozen=True)
class TarMember:
    name: str  # normalised relative path
    offset: int  # of its data in the archive
    size: int


def read_tar_members(
    read_at: ReadAt, size: int, *, max_members: int = MAX_MEMBERS
) -> list[TarMember]:
    """The regular files of a tar archive, in order; directories are skipped."""
    members: list[TarMember] = []
    names: set[str] = set()
    pos = 0
    pending: dict[str, str] = {}  # pax "path"/"size" or a GNU long name for the next member
    while pos + BLOCK <= size:
        block = read_at(pos, BLOCK)
        if block == b"\x00" * BLOCK:
            break  # end of archive
        header = _parse_header(block)
        data_size = int(pending.get("size", header.size))
        data_offset = pos + BLOCK
        pos = data_offset + _padded(data_size)
        if data_size < 0 or data_offset + data_size > size:
            raise InvalidCheckpoint("the tar archive is truncated")
        if header.kind in (b"x", b"g", b"L"):
            if data_size > MAX_EXTENDED_HEADER:
                raise InvalidCheckpoint("a tar extended header is too large")
            if header.kind != b"g":  # global pax headers hold nothing statehub needs
                pending = _extended(header.kind, read_at(data_offset, data_size))
            continue
        name = safe_member_name(pending.get("path", header.name))
        pending = {}
        if header.kind == _DIRECTORY or name is None:
            continue
        if header.kind not in _REGULAR:
            raise InvalidCheckpoint(
                f"tar member {name!r} is a link, device or sparse file (type "
                f"{header.kind.decode('ascii', 'replace')!r}); only regular files are accepted"
            )
        if name in names:
            raise InvalidCheckpoint(f"the tar archive holds {name!r} twice")
        names.add(name)
        members.append(TarMember(name, data_offset, data_size))
        if len(members) > max_members:
            raise TooLarge(f"the tar archive holds more than {max_members} files")
    else:
        if pos < size:
            raise InvalidCheckpoint("the tar archive is truncated")
    return members


@dataclass(frozen=True)
class _Header:
    name: str
    size: int
    kind: bytes


def _parse_header(block: bytes) -> _Header:
    stored = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise InvalidCheckpoint("a tar header fails its checksum: the archive is damaged")
    name = _text(block[0:100])
    if block[257:263] == b"ustar\x00" and block[345] != 0:  # POSIX: a name prefix
        name = f"{_text(block[345:500])}/{name}"
    return _Header(name, _number(block[124:136]), block[156:157])


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        if field[0] != 0x80:
            raise InvalidCheckpoint("a tar header holds a negative or absurd number")
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\x00", b" ").strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise InvalidCheckpoint("a tar header holds a number that is not octal") from None


def _text(field: bytes) -> str:
    try:
        return field.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCheckpoint("a tar member name is not UTF-8") from None


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _extended(kind: bytes, data: bytes) -> dict[str, str]:
    if kind == b"L":
        return {"path": _text(data)}
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
            record = data[space + 1 : pos + length]
            key, _, value = record.removesuffix(b"\n").partition(b"=")
            records[key.decode("utf-8")] = value.decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise InvalidCheckpoint("a tar pax header is malformed") from None
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise InvalidCheckpoint("a tar pax header is malformed")
        pos += length
    if "size" in records and not records["size"].isdigit():
        raise InvalidCheckpoint("a tar pax header holds a size that is not a number")
    return {k: v for k, v in records.items() if k in ("path", "size")}


def safe_member_name(name: str) -> str | None:
    """A member name as a normalised relative path; None for the archive's root (``./``)."""
    if "\x00" in name or "\\" in name or name.startswith("/") or len(name) > 4096:
        raise InvalidCheckpoint(f"tar member name {name[:200]!r} is absolute or malformed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidCheckpoint(f"tar member name {name[:200]!r} climbs out of the archive")
    return "/".join(parts) or None


# -- the index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    name: str
    weight_map: dict[str, str]  # tensor key -> shard member name
    metadata: dict[str, Any]

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))


def find_index(members: Iterable[TarMember]) -> TarMember:
    indexes = [m for m in members if m.name.endswith(INDEX_SUFFIX)]
    if len(indexes) != 1:
        what = "no" if not indexes else "more than one"
        raise InvalidCheckpoint(
            f"the tar archive holds {what} *{INDEX_SUFFIX}: a sharded upload is the index "
            "and its shards",
            detail={"members": [m.name for m in members][:50]},
        )
    return indexes[0]


def parse_index(name: str, raw: bytes, *, limits: Limits) -> ShardIndex:
    """The index's weight_map with shard names resolved against the index's directory."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCheckpoint(f"{name} is not valid JSON: {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidCheckpoint(f"{name} has no weight_map object")
    if len(weight_map) > limits.max_tensors:
        raise TooLarge(f"{name} lists {len(weight_map)} tensors; the limit is {limits.max_tensors}")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidCheckpoint(f"{name}: metadata must be an object")
    directory = posixpath.dirname(name)
    resolved: dict[str, str] = {}
    for key, shard in weight_map.items():
        if not key or len(key) > limits.max_key_length:
            raise InvalidCheckpoint(f"{name}: tensor key of length {len(key)} is empty or too long")
        if not isinstance(shard, str) or not shard.endswith(SHARD_SUFFIX):
            raise InvalidCheckpoint(f"{name}: {key!r} maps to {shard!r}, not a .safetensors file")
        path = safe_member_name(posixpath.join(directory, shard))
        if path is None:
            raise InvalidCheckpoint(f"{name}: {key!r} maps to an empty shard name")
        resolved[key] = path
    return ShardIndex(name, resolved, metadata)


def _no_constant(token: str) -> Any:
    raise InvalidCheckpoint(f"the index holds {token}, which is not JSON")


def merge_order(
    index: ShardIndex, headers: Mapping[str, SafetensorsHeader]
) -> list[tuple[str, str, StoredTensor]]:
    """(key, shard, tensor) as the shards lay them out: shard by shard in name order
    (``model-00001-of-00004`` first), each shard's tensors by their offset. So a version
    composed of the shards reads each shard as one run of bytes, not a range per tensor
    (the index lists keys sorted, which is no shard's order). The index and the shards
    must agree."""
    by_shard = {shard: header.by_key() for shard, header in headers.items()}
    for key, shard in index.weight_map.items():
        if key not in by_shard[shard]:
            raise InvalidCheckpoint(
                f"the index puts {key!r} in {shard}, which does not hold it",
                detail={"key": key, "shard": shard},
            )
    for shard, tensors in by_shard.items():
        unlisted = [k for k in tensors if index.weight_map.get(k) != shard]
        if unlisted:
            raise InvalidCheckpoint(
                f"shard {shard} holds {len(unlisted)} tensors the index does not put there, "
                f"e.g. {unlisted[0]!r}",
                detail={"shard": shard, "keys": unlisted[:50]},
            )
    return [
        (tensor.key, shard, tensor)
        for shard in sorted(headers)
        for tensor in headers[shard].tensors  # sorted by offset
    ]


def common_metadata(headers: Iterable[SafetensorsHeader]) -> dict[str, str]:
    """The ``__metadata__`` entries every shard agrees on (``format: pt`` typically)."""
    common: dict[str, str] | None = None
    for header in headers:
        items = header.metadata
        common = (
            dict(items)
            if common is None
            else {k: v for k, v in common.items() if items.get(k) == v}
        )
    return common or {}
