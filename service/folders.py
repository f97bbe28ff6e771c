"""Versions pushed as folders: every file kept byte for byte, the weights among them planned.

A client uploads the files the registry lacks as blobs named by their sha256
(``store_file``), then commits a manifest (``push_folder``). The commit leases every file's
blob, checks it is stored with its size, reads the weights from those blobs by ranged reads
and commits one version with its files:

- one ``.safetensors`` file: the version's bytes *are* that blob (same digest);
- an index and its shards: the version is composed (``Version.extents``) of a header blob and
  the shard blobs' data, shard after shard as they lie (``merge_order``), so reading it reads
  each shard as one run; the shards are stored once, as pushed;
- one torch file: converted as a plain upload would be, the original kept as a file.

A file blob uploaded but not yet committed is protected by gc's grace period, like a tensor
uploaded for a deduplicated push; the commit's leases protect it from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from service import dedup, registry
from service.core.names import ModelName
from service.core.repo_files import (
    FileEntry,
    FileLimits,
    find_weights,
    shard_files,
    validate_manifest,
)
from service.core.safetensors_format import (
    SafetensorsHeader,
    build_header,
    parse_header,
    read_header_length,
)
from service.core.sharded import common_metadata, merge_order, parse_index
from service.core.spec import TensorSpec
from service.errors import FilesMissing, InvalidCheckpoint, TooLarge
from service.ingest import Ingested, check_stored, describe
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobNotFound, BlobStore
from service.storage.db import Database
from service.storage.spool import Spooled, SpoolFile, spool_bytes

# Ingested.path of weights read from the store: no spool file holds them (nothing to remove).
STORED_WEIGHTS = Path(os.devnull)


def file_limits(settings: Settings) -> FileLimits:
    return FileLimits(
        max_files=settings.max_version_files,
        max_file_bytes=settings.max_upload_bytes,
        max_total_bytes=settings.max_version_bytes,
    )


def missing_files(blobs: BlobStore, hashes: Sequence[str]) -> list[str]:
    """Which of these blobs the store lacks (sorted, distinct)."""
    return sorted({sha for sha in hashes if not blobs.exists(sha)})


def store_file(
    *, db: Database, blobs: BlobStore, settings: Settings, sha256: str, spooled: Spooled
) -> None:
    """One file's bytes: stored only if they hash to ``sha256``."""
    try:
        dedup.require_digest(spooled, sha256)
        dedup.release(db, dedup.put_leased(db, blobs, settings, sha256, spooled.path))
    finally:
        spooled.path.unlink(missing_ok=True)


def push_folder(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    manifest: Sequence[Any],
    metadata: dict[str, Any],
    alias: str | None,
    actor: str,
) -> registry.PushResult:
    """The next version of ``name``: the manifest's files, with its weights as tensors.

    Raises:
        FilesMissing (``files_missing``, 409): some files are not stored (upload, retry).
    """
    files = validate_manifest(manifest, file_limits(settings))
    weights = find_weights(files)
    leases = dedup.lease(db, settings, {f.sha256 for f in files})
    try:
        _require_stored(blobs, files)
        if weights.kind == "torch":
            spooled = _spool_blob(blobs, settings, weights.file)
            return registry.push_version(
                db=db,
                blobs=blobs,
                settings=settings,
                name=name,
                spooled=spooled,
                metadata=metadata,
                alias=alias,
                ema=False,
                actor=actor,
                files=files,
            )
        if weights.kind == "safetensors":
            ingested, stored, hashes = _single(db, blobs, settings, weights.file)
        else:
            ingested, stored, hashes = _sharded(db, blobs, settings, weights.file, files)
        try:
            return registry.commit_version(
                db,
                name,
                ingested,
                stored,
                hashes,
                metadata=metadata,
                alias=alias,
                actor=actor,
                files=files,
            )
        finally:
            if stored.leases:
                dedup.release(db, stored.leases)
    finally:
        dedup.release(db, leases)


def _require_stored(blobs: BlobStore, files: Sequence[FileEntry]) -> None:
    missing, wrong = [], []
    for entry in files:
        try:
            size = blobs.size(entry.sha256)
        except BlobNotFound:
            missing.append(entry.sha256)
            continue
        if size != entry.size:
            wrong.append(entry.path)
    if wrong:
        raise InvalidCheckpoint(
            f"{len(wrong)} file(s) have a sha256 whose stored bytes are another size, "
            f"e.g. {wrong[0]!r}: the manifest does not describe those files",
            detail={"paths": wrong[:50]},
        )
    if missing:
        raise FilesMissing(
            f"{len(missing)} file(s) are not stored: upload them, then commit again",
            detail={"missing": sorted(set(missing))},
        )


def _header_of(blobs: BlobStore, entry: FileEntry, settings: Settings) -> tuple[bytes, Any]:
    """A stored safetensors file's raw header JSON and its parsed header (ranged reads)."""
    limits = registry.limits_from(settings)
    prefix = blobs.read_range(entry.sha256, 0, min(8, entry.size))
    try:
        length = read_header_length(prefix, file_size=entry.size, limits=limits)
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{entry.path}: {exc.message}", detail=exc.detail) from None
    raw = blobs.read_range(entry.sha256, 8, 8 + length)
    try:
        header = parse_header(raw, file_size=entry.size, limits=limits)
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{entry.path}: {exc.message}", detail=exc.detail) from None
    return raw, header


def _hash_tensors(
    blobs: BlobStore, digest: str, header: SafetensorsHeader, chunk: int
) -> list[str]:
    """sha256 of each tensor (data order) in one streamed read of the blob's data region."""
    hashers = [hashlib.sha256() for _ in header.tensors]
    ends = [header.data_start + t.end for t in header.tensors]
    starts = [header.data_start + t.begin for t in header.tensors]
    if not header.tensors:
        return []
    position, index = header.data_start, 0
    for piece in blobs.iter_range(digest, header.data_start, header.total_size, chunk):
        view = memoryview(piece)
        while view and index < len(hashers):
            lo = max(starts[index] - position, 0)
            take = min(ends[index] - position, len(view))
            if take > lo:
                hashers[index].update(view[lo:take])
            if position + take >= ends[index]:
                index += 1
                consumed = take
            else:
                consumed = len(view)
            view, position = view[consumed:], position + consumed
    return [h.hexdigest() for h in hashers]


def _single(
    db: Database, blobs: BlobStore, settings: Settings, entry: FileEntry
) -> tuple[Ingested, dedup.Stored, list[str]]:
    """A folder's one safetensors file: the version's blob is the file's own."""
    _, header = _header_of(blobs, entry, settings)
    check_stored(header, registry.limits_from(settings))
    hashes = _hash_tensors(blobs, entry.sha256, header, settings.stream_chunk_bytes)
    index = [
        (sha, entry.sha256, header.data_start + t.begin, t.nbytes)
        for t, sha in zip(header.tensors, hashes, strict=True)
        if t.nbytes
    ]
    stored = dedup.Stored(None, index, [], new_bytes=entry.size)
    ingested = Ingested(STORED_WEIGHTS, entry.sha256, entry.size, header, "safetensors")
    ingested.report = {"weights": entry.path}
    describe(ingested, "safetensors")
    return ingested, stored, hashes


def _sharded(
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    index_entry: FileEntry,
    files: Sequence[FileEntry],
) -> tuple[Ingested, dedup.Stored, list[str]]:
    """An index and its shards: indexed where they lie, composed shard after shard."""
    limits = registry.limits_from(settings)
    if index_entry.size > limits.max_header_bytes:
        raise TooLarge(f"{index_entry.path} exceeds {limits.max_header_bytes} bytes")
    raw_index = blobs.read_range(index_entry.sha256, 0, index_entry.size)
    index = parse_index(index_entry.path, raw_index, limits=limits)
    shards = shard_files(index_entry.path, index.shards, files)
    headers = {path: _header_of(blobs, entry, settings)[1] for path, entry in shards.items()}
    order = merge_order(index, headers)
    # Every shard tensor is indexed where it lies, so the composition reads the shards.
    by_key: dict[str, str] = {}
    rows = []
    for path, entry in shards.items():
        header = headers[path]
        hashes = _hash_tensors(blobs, entry.sha256, header, settings.stream_chunk_bytes)
        for tensor, sha in zip(header.tensors, hashes, strict=True):
            by_key[tensor.key] = sha
            if tensor.nbytes:
                rows.append((sha, entry.sha256, header.data_start + tensor.begin, tensor.nbytes))
    with db.session() as session:
        repo.index_stored_tensors(session, rows)
    specs = [TensorSpec(key, stored.shape, stored.dtype) for key, _, stored in order]
    header_bytes = build_header(specs, common_metadata(headers.values()))
    if len(header_bytes) > limits.max_header_bytes:
        raise TooLarge(f"the merged header exceeds {limits.max_header_bytes} bytes")
    size = len(header_bytes) + sum(s.nbytes for s in specs)
    logical = parse_header(header_bytes[8:], file_size=size, limits=limits)
    check_stored(logical, limits)
    hashes = [by_key[t.key] for t in logical.tensors]
    header_file = spool_bytes(
        settings.effective_spool_dir, header_bytes, min_free_bytes=settings.spool_min_free_bytes
    )
    try:
        stored, digest = dedup.compose_from_hashes(
            db=db,
            blobs=blobs,
            settings=settings,
            header_file=header_file,
            header=logical,
            hashes=hashes,
        )
    finally:
        header_file.path.unlink(missing_ok=True)
    ingested = Ingested(STORED_WEIGHTS, digest, size, logical, "safetensors-sharded")
    ingested.report = {"index": index_entry.path, "shards": sorted(shards)}
    describe(ingested, "safetensors-sharded")
    return ingested, stored, hashes


def _spool_blob(blobs: BlobStore, settings: Settings, entry: FileEntry) -> Spooled:
    """A stored file copied to the spool, for the conversion a torch file needs."""
    spool = SpoolFile(
        settings.effective_spool_dir,
        max_bytes=settings.max_upload_bytes,
        min_free_bytes=settings.spool_min_free_bytes,
        expected_bytes=entry.size,
    )
    try:
        for piece in _pieces(blobs, entry, settings.stream_chunk_bytes):
            spool.write(piece)
        return spool.finish()
    except BaseException:
        spool.discard()
        raise


def _pieces(blobs: BlobStore, entry: FileEntry, chunk: int) -> Iterator[bytes]:
    if entry.size:
        yield from blobs.iter_range(entry.sha256, 0, entry.size, chunk)
