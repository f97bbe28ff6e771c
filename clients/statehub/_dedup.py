"""What a deduplicated push needs to know about a checkpoint before sending any of it.

The safetensors header exactly as the file has it, each tensor's sha256, and the whole
file's sha256 (to check the version the server composes); tensor bytes are read again only
for the tensors the registry lacks.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from statehub._tensors import _contiguous_cpu, iter_safetensors, safetensors_header, tensor_bytes

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Pushable:
    header: bytes  # the 8-byte length and the JSON, as in the file
    hashes: dict[str, str]  # tensor key -> sha256 of its bytes, in file order
    sizes: dict[str, int]  # sha256 -> size in bytes
    read: Callable[[str], bytes]  # tensor key -> its bytes
    # sha256 of the whole file, computed only when a version is composed (another pass)
    file_digest: Callable[[], str]
    # the whole file as a stream for a plain upload, from the same host copies (a state_dict
    # on a GPU is not copied again); None for a file, which is uploaded as it is
    body: Callable[[], Iterator[bytes | memoryview]] | None = None

    @property
    def size(self) -> int:
        return len(self.header) + sum(self.sizes[sha] for sha in self.hashes.values())

    def compose_body(self) -> dict[str, object]:
        return {"header": self.header[8:].decode(), "size": self.size, "tensors": self.hashes}


def of_state_dict(items: list[tuple[str, torch.Tensor]]) -> Pushable:
    # One host copy per tensor, kept for hashing, uploading and the file digest: a module on
    # a GPU is copied to the CPU once, not once per pass (a CPU tensor is not copied at all).
    items = [(key, _contiguous_cpu(tensor)) for key, tensor in items]
    header = safetensors_header(items)
    hashes, sizes = {}, {}
    for key, tensor in items:
        data = tensor_bytes(tensor)
        hashes[key] = hashlib.sha256(data).hexdigest()
        sizes[hashes[key]] = len(data)
    tensors = dict(items)

    def file_digest() -> str:
        whole = hashlib.sha256(header)
        for _, tensor in items:
            whole.update(tensor_bytes(tensor))
        return whole.hexdigest()

    return Pushable(
        header,
        hashes,
        sizes,
        lambda k: bytes(tensor_bytes(tensors[k])),
        file_digest,
        body=lambda: iter_safetensors(items, header),
    )


def of_safetensors_file(path: Path) -> Pushable | None:
    """None for a file that is not plain safetensors (the server will say what is wrong)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            return None
        raw = handle.read(length)
        try:
            entries = json.loads(raw)
            offsets = {
                k: tuple(v["data_offsets"]) for k, v in entries.items() if k != "__metadata__"
            }
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
    start = 8 + length
    order = sorted(offsets, key=lambda k: offsets[k])
    hashes, sizes = {}, {}
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for key in order:
            lo, hi = offsets[key]
            hashes[key] = hashlib.sha256(mm[start + lo : start + hi]).hexdigest()
            sizes[hashes[key]] = hi - lo

    def read(key: str) -> bytes:
        lo, hi = offsets[key]
        with open(path, "rb") as handle:
            handle.seek(start + lo)
            return handle.read(hi - lo)

    def file_digest() -> str:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    return Pushable(prefix + raw, hashes, sizes, read, file_digest)
