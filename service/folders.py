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

A safetensors file whose tensors are mostly stored already (a fine-tuned shard: every tensor
but the new head) need not be uploaded whole: the client uploads the missing tensors, then
asks for the file to be composed from its header and its tensors' hashes (``compose_file``).
It is recorded as a *composed file* (``composed_files``: extents into the blobs holding its
bytes) under its own sha256, checked against the composed bytes, and read through those
extents wherever a file is read (``file_sources``), so it stays byte-identical to the file
pushed while a fine-tune stores only its new tensors.

A file blob uploaded but not yet committed is protected by gc's grace period, like a tensor
uploaded for a deduplicated push; the commit's leases protect it from then on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service import dedup, registry
from service.core.names import ModelName, validate_alias
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
from service.ingest import Ingested, check_stored, describe, sniff_bytes
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobNotFound, BlobStore, validate_digest
from service.storage.composed import Extent, version_bytes
from service.storage.db import Database
from service.storage.models import ComposedFile
from service.storage.sources import ByteSource
from service.storage.spool import Spooled, SpoolFile, spool_bytes

# Ingested.path of weights read from the store: no spool file holds them (nothing to remove).
STORED_WEIGHTS = Path(os.devnull)


def file_limits(settings: Settings) -> FileLimits:
    return FileLimits(
        max_files=settings.max_version_files,
        max_file_bytes=settings.max_upload_bytes,
        max_total_bytes=settings.max_version_bytes,
    )


def missing_files(db: Database, blobs: BlobStore, hashes: Sequence[str]) -> list[str]:
    """Which of these files the registry lacks, as a blob or composed (sorted, distinct)."""
    with db.session() as session:
        composed = repo.composed_files(session, hashes)
    return sorted({sha for sha in hashes if sha not in composed and not blobs.exists(sha)})


def stored_size(db: Database, blobs: BlobStore, sha256: str) -> int | None:
    """The size of the file ``sha256`` as stored, blob or composed; None when it is not."""
    with db.session() as session:
        composed = repo.composed_files(session, [sha256]).get(sha256)
    if composed is not None:
        return composed.size
    try:
        return blobs.size(sha256)
    except BlobNotFound:
        return None


def compose_file(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    sha256: str,
    header_json: str,
    size: int,
    tensor_hashes: dict[str, str],
) -> None:
    """A safetensors file from its header and the hashes of its tensors, all stored: kept
    as the composed file ``sha256`` once its composed bytes are checked to hash to that.

    Raises:
        TensorsMissing (``tensors_missing``, 409): some tensors are not stored.
        InvalidCheckpoint: a header that is not safetensors, or bytes that hash otherwise.
    """
    if stored_size(db, blobs, sha256) == size:
        return  # stored already, whole or composed
    header, hashes, spooled = registry.composed_header(settings, header_json, size, tensor_hashes)
    stored: dedup.Stored | None = None
    try:
        stored, digest = dedup.compose_from_hashes(
            db=db, blobs=blobs, settings=settings, header_file=spooled, header=header, hashes=hashes
        )
        if digest != sha256:
            raise InvalidCheckpoint(
                f"the composed file hashes to {digest}, not {sha256}: the header or a "
                "tensor hash does not describe the file",
                detail={"expected": sha256, "actual": digest},
            )
        assert stored.extents is not None
        with db.session() as session:
            repo.add_composed_file(
                session, sha256, size, [e.to_json() for e in stored.extents], stored.refs
            )
            for lease_id in stored.leases:
                repo.release_lease(session, lease_id)
        stored.leases = []
    finally:
        spooled.path.unlink(missing_ok=True)
        if stored is not None and stored.leases:
            dedup.release(db, stored.leases)


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
        with db.session() as session:
            stored_files = StoredFiles.of(session, blobs, (f.sha256 for f in files))
        _require_stored(blobs, files, stored_files.composed)
        if weights.kind == "torch":
            spooled = _spool_blob(stored_files, settings, weights.file)
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
            ingested, stored, hashes = _single(db, stored_files, settings, weights.file)
        else:
            ingested, stored, hashes = _sharded(db, stored_files, settings, weights.file, files)
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
        dedup.release(db, leases)


class StoredFiles:
    """Files as stored, by sha256: each read from its blob, or through its extents when it
    is a composed file (only those are looked up: one query for any number of files)."""

    def __init__(self, blobs: BlobStore, composed: dict[str, ComposedFile]) -> None:
        self.blobs = blobs
        self.composed = composed

    @classmethod
    def of(cls, session: Session, blobs: BlobStore, hashes: Iterable[str]) -> StoredFiles:
        return cls(blobs, repo.composed_files(session, hashes))

    def extents(self, sha256: str) -> list[Any] | None:
        row = self.composed.get(sha256)
        return None if row is None else list(row.extents)

    def source(self, sha256: str) -> ByteSource:
        return version_bytes(self.blobs, sha256, self.extents(sha256))

    def read_range(self, sha256: str, start: int, end: int) -> bytes:
        return self.source(sha256).read_range(sha256, start, end)


def push_stored(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    sha256: str,
    metadata: dict[str, Any],
    alias: str | None,
    ema: bool,
    actor: str,
) -> registry.PushResult:
    """The next version of ``name`` from one stored blob (a checkpoint pushed straight to
    the store): the same version a push of its bytes through the server makes. A
    safetensors file is read where it lies; anything else (a torch file, a tar of shards,
    EMA weights asked for) is spooled from the store and ingested as an upload is.

    Raises:
        FilesMissing (``files_missing``, 409): the blob is not stored (upload it first).
    """
    if alias is not None:
        validate_alias(alias)
    size = stored_size(db, blobs, validate_digest(sha256))
    if size is None:
        raise FilesMissing(
            "the checkpoint is not stored: upload it, then push again",
            detail={"missing": [sha256]},
        )
    entry = FileEntry(path="checkpoint", size=size, sha256=sha256)
    leases = dedup.lease(db, settings, [sha256])
    try:
        with db.session() as session:
            files = StoredFiles.of(session, blobs, [sha256])
        if not ema and sniff_bytes(files.read_range(sha256, 0, min(size, 512))) == "safetensors":
            try:
                ingested, stored, hashes = _single(db, files, settings, entry)
            except InvalidCheckpoint:
                pass  # not safetensors after all: ingest names what it is
            else:
                ingested.report.pop("weights")  # a checkpoint, not a file of a folder
                return registry.commit_version(
                    db, name, ingested, stored, hashes, metadata=metadata, alias=alias, actor=actor
                )
        return registry.push_version(
            db=db,
            blobs=blobs,
            settings=settings,
            name=name,
            spooled=_spool_blob(files, settings, entry),
            metadata=metadata,
            alias=alias,
            ema=ema,
            actor=actor,
        )
    finally:
        dedup.release(db, leases)


def _require_stored(
    blobs: BlobStore, files: Sequence[FileEntry], composed: dict[str, ComposedFile]
) -> None:
    missing, wrong = [], []
    for entry in files:
        try:
            row = composed.get(entry.sha256)
            size = row.size if row is not None else blobs.size(entry.sha256)
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


def _header_of(source: ByteSource, entry: FileEntry, settings: Settings) -> tuple[bytes, Any]:
    """A stored safetensors file's raw header JSON and its parsed header (ranged reads)."""
    limits = registry.limits_from(settings)
    prefix = source.read_range(entry.sha256, 0, min(8, entry.size))
    try:
        length = read_header_length(prefix, file_size=entry.size, limits=limits)
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{entry.path}: {exc.message}", detail=exc.detail) from None
    raw = source.read_range(entry.sha256, 8, 8 + length)
    try:
        header = parse_header(raw, file_size=entry.size, limits=limits)
    except InvalidCheckpoint as exc:
        raise InvalidCheckpoint(f"{entry.path}: {exc.message}", detail=exc.detail) from None
    return raw, header


def _hash_tensors(
    source: ByteSource, digest: str, header: SafetensorsHeader, chunk: int
) -> list[str]:
    """sha256 of each tensor (data order) in one streamed read of the blob's data region."""
    hashers = [hashlib.sha256() for _ in header.tensors]
    ends = [header.data_start + t.end for t in header.tensors]
    starts = [header.data_start + t.begin for t in header.tensors]
    if not header.tensors:
        return []
    position, index = header.data_start, 0
    for piece in source.iter_range(digest, header.data_start, header.total_size, chunk):
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


def _tensor_hashes(
    db: Database, source: ByteSource, digest: str, header: SafetensorsHeader, chunk: int
) -> list[str]:
    """Each tensor's sha256 (data order): as recorded when this blob was stored, where every
    tensor's is (an unchanged shard pushed again: no read of it), else read and hashed."""
    with db.session() as session:
        known = repo.tensors_in_blob(session, digest)
    hashes = []
    for tensor in header.tensors:
        if not tensor.nbytes:
            hashes.append(dedup.EMPTY_SHA256)
            continue
        sha, size = known.get(header.data_start + tensor.begin, ("", -1))
        if size != tensor.nbytes:
            return _hash_tensors(source, digest, header, chunk)
        hashes.append(sha)
    return hashes


def _single(
    db: Database, files: StoredFiles, settings: Settings, entry: FileEntry
) -> tuple[Ingested, dedup.Stored, list[str]]:
    """A folder's one safetensors file: the version's bytes are the file's own (its blob, or
    the extents of a composed file, whose tensors are indexed where they lie already)."""
    source = files.source(entry.sha256)
    _, header = _header_of(source, entry, settings)
    check_stored(header, registry.limits_from(settings))
    hashes = _tensor_hashes(db, source, entry.sha256, header, settings.stream_chunk_bytes)
    extents = files.extents(entry.sha256)
    if extents is not None:
        composed = [Extent.from_json(e) for e in extents]
        stored = dedup.Stored(composed, [], [], shared_bytes=header.data_size)
    else:
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
    files: StoredFiles,
    settings: Settings,
    index_entry: FileEntry,
    manifest: Sequence[FileEntry],
) -> tuple[Ingested, dedup.Stored, list[str]]:
    """An index and its shards: indexed where they lie, composed shard after shard."""
    blobs = files.blobs
    limits = registry.limits_from(settings)
    if index_entry.size > limits.max_header_bytes:
        raise TooLarge(f"{index_entry.path} exceeds {limits.max_header_bytes} bytes")
    raw_index = files.source(index_entry.sha256).read_range(index_entry.sha256, 0, index_entry.size)
    index = parse_index(index_entry.path, raw_index, limits=limits)
    shards = shard_files(index_entry.path, index.shards, manifest)
    sources = {path: files.source(entry.sha256) for path, entry in shards.items()}
    headers = {
        path: _header_of(sources[path], entry, settings)[1] for path, entry in shards.items()
    }
    order = merge_order(index, headers)
    # Every shard tensor is indexed where it lies, so the composition reads the shards (a
    # composed shard's tensors are indexed in the blobs it reads already).
    by_key: dict[str, str] = {}
    rows = []
    for path, entry in shards.items():
        header = headers[path]
        chunk = settings.stream_chunk_bytes
        hashes = _tensor_hashes(db, sources[path], entry.sha256, header, chunk)
        for tensor, sha in zip(header.tensors, hashes, strict=True):
            by_key[tensor.key] = sha
            if tensor.nbytes and entry.sha256 not in files.composed:
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


def _spool_blob(files: StoredFiles, settings: Settings, entry: FileEntry) -> Spooled:
    """A stored file copied to the spool, for the conversion a torch file needs."""
    spool = SpoolFile(
        settings.effective_spool_dir,
        max_bytes=settings.max_upload_bytes,
        min_free_bytes=settings.spool_min_free_bytes,
        expected_bytes=entry.size,
    )
    try:
        for piece in _pieces(files.source(entry.sha256), entry, settings.stream_chunk_bytes):
            spool.write(piece)
        return spool.finish()
    except BaseException:
        spool.discard()
        raise


def _pieces(source: ByteSource, entry: FileEntry, chunk: int) -> Iterator[bytes | memoryview]:
    if entry.size:
        yield from source.iter_range(entry.sha256, 0, entry.size, chunk)
