"""The files of a version pushed as a folder (``save_pretrained`` output): the pure parts.

A folder push sends a manifest, one entry a file: its relative path, size and sha256. Every
file is stored byte for byte as the blob its sha256 names; the weights among them (one
safetensors file, or an index and its shards, or one torch file) also become the version's
tensors. This module checks a manifest (bounded; paths relative, normalised, no ``..``, no
two equal after case folding, no file also used as a folder) and picks the weights.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from service.core.sharded import INDEX_SUFFIX, SHARD_SUFFIX
from service.errors import InvalidCheckpoint, InvalidRequest, TooLarge

TORCH_SUFFIXES = (".bin", ".pth", ".pt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileLimits:
    max_files: int = 1000
    max_file_bytes: int = 64 * 1024**3
    max_total_bytes: int = 1024**4
    max_path_length: int = 512


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def normalise_path(raw: object, limits: FileLimits) -> str:
    """A manifest path as stored: relative, ``/``-separated, each segment a plain name."""
    if not isinstance(raw, str) or not raw:
        raise InvalidRequest("a file path must be a non-empty string")
    shown = raw[:100].encode("unicode_escape").decode()
    if len(raw) > limits.max_path_length:
        raise InvalidRequest(
            f"file path {shown!r}... is longer than {limits.max_path_length} characters"
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in raw) or "\\" in raw:
        raise InvalidRequest(
            f"file path {shown!r} holds a control character or a backslash; use '/'"
        )
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise InvalidRequest(f"file path {shown!r} is absolute; paths are relative to the folder")
    segments = raw.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidRequest(
            f"file path {shown!r} has an empty, '.' or '..' segment; paths stay inside the folder"
        )
    return raw


def validate_manifest(entries: Sequence[object], limits: FileLimits) -> list[FileEntry]:
    """The manifest's files, checked, in path order."""
    if not entries:
        raise InvalidRequest("the manifest lists no files")
    if len(entries) > limits.max_files:
        raise TooLarge(
            f"the folder holds {len(entries)} files; the limit is {limits.max_files} "
            "(STATEHUB_MAX_VERSION_FILES)",
            detail={"limit": "max_version_files", "files": len(entries)},
        )
    files: list[FileEntry] = []
    for raw in entries:
        if not isinstance(raw, dict):
            raise InvalidRequest("each manifest entry is an object {path, size, sha256}")
        path = normalise_path(raw.get("path"), limits)
        size, sha = raw.get("size"), raw.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"{path}: size must be a non-negative integer")
        if size > limits.max_file_bytes:
            raise TooLarge(
                f"{path} has {size} bytes; the limit is {limits.max_file_bytes} "
                "(STATEHUB_MAX_UPLOAD_BYTES)",
                detail={"limit": "max_upload_bytes", "path": path},
            )
        if not isinstance(sha, str) or not _SHA256.match(sha):
            raise InvalidRequest(f"{path}: sha256 must be 64 lowercase hex digits")
        files.append(FileEntry(path, size, sha))
    total = sum(f.size for f in files)
    if total > limits.max_total_bytes:
        raise TooLarge(
            f"the folder holds {total} bytes; the limit is {limits.max_total_bytes}",
            detail={"limit": "max_version_bytes", "bytes": total},
        )
    _check_names(files)
    return sorted(files, key=lambda f: f.path)


def _check_names(files: Iterable[FileEntry]) -> None:
    """No two paths equal after case folding (they collide on macOS and Windows), and no
    path that is both a file and a folder."""
    folded: dict[str, str] = {}
    for entry in files:
        key = entry.path.casefold()
        if key in folded:
            raise InvalidRequest(
                f"{folded[key]!r} and {entry.path!r} are the same name on a case-insensitive "
                "file system; rename one",
                detail={"paths": [folded[key], entry.path]},
            )
        folded[key] = entry.path
    for entry in files:
        parts = entry.path.casefold().split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if folder in folded:
                raise InvalidRequest(
                    f"{folded[folder]!r} is a file and also the folder of {entry.path!r}",
                    detail={"paths": [folded[folder], entry.path]},
                )


def files_digest(files: Iterable[FileEntry]) -> str:
    """The identity of a set of files: sha256 of the sorted ``"{path}\\t{sha256}\\n"`` lines."""
    lines = sorted(f"{f.path}\t{f.sha256}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class Weights:
    kind: str  # "safetensors" | "sharded" | "torch"
    file: FileEntry  # the safetensors or torch file, or the index of a sharded checkpoint


def find_weights(files: Sequence[FileEntry]) -> Weights:
    """The weights of a folder: an index of sharded safetensors, else one safetensors file,
    else one torch file. Anything ambiguous is refused with the files named."""
    indexes = [f for f in files if f.path.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise InvalidRequest(
            f"the folder holds {len(indexes)} *{INDEX_SUFFIX} files: push one checkpoint",
            detail={"paths": [f.path for f in indexes][:20]},
        )
    if indexes:
        return Weights("sharded", indexes[0])
    single = [f for f in files if f.path.endswith(SHARD_SUFFIX)]
    if len(single) == 1:
        return Weights("safetensors", single[0])
    if len(single) > 1:
        raise InvalidRequest(
            f"the folder holds {len(single)} .safetensors files and no index: add the "
            f"*{INDEX_SUFFIX} of the shards, or push one file",
            detail={"paths": [f.path for f in single][:20]},
        )
    torch_files = [f for f in files if f.path.endswith(TORCH_SUFFIXES)]
    if any(posixpath.basename(f.path).endswith(".bin.index.json") for f in files):
        raise InvalidRequest(
            "sharded .bin checkpoints are not supported: save with safe_serialization=True"
        )
    if len(torch_files) == 1:
        return Weights("torch", torch_files[0])
    if torch_files:
        raise InvalidRequest(
            f"the folder holds {len(torch_files)} torch files: push one checkpoint",
            detail={"paths": [f.path for f in torch_files][:20]},
        )
    raise InvalidRequest(
        "the folder holds no weights: a .safetensors file, an index of shards, or a torch file",
        detail={"paths": [f.path for f in files][:20]},
    )


def shard_files(
    index_path: str, shards: Iterable[str], files: Sequence[FileEntry]
) -> dict[str, FileEntry]:
    """The manifest entry of every shard the index names (paths as the index resolves them)."""
    by_path = {f.path: f for f in files}
    found: dict[str, FileEntry] = {}
    missing = []
    for shard in shards:
        entry = by_path.get(shard)
        if entry is None:
            missing.append(shard)
        else:
            found[shard] = entry
    if missing:
        raise InvalidCheckpoint(
            f"{index_path} names shard(s) the folder does not hold: {', '.join(missing[:5])}",
            detail={"missing": missing[:50]},
        )
    return found
