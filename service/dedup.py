"""Tensor-level deduplication: each tensor's bytes are stored once across the registry.

Every push records each tensor's sha256 and where its bytes lie (``stored_tensors``: a
range of some blob). A push whose bytes are mostly stored already (a fine-tune that
changed its head) is stored *composed*: one new blob holding its header and the tensors
not stored yet, and for every other tensor a range of the blob that first brought it
(``Version.extents``). The version's digest is still the sha256 of the whole safetensors
file, so references, ETags and verification do not change; reads go through
``storage.composed.ComposedBlob``.

A client can also skip *uploading* what is stored: it asks which tensor hashes are missing,
uploads those alone (``store_tensor``), then sends the header with every tensor's hash
(``compose_from_hashes``).

Against gc: every blob a composition reads is leased before the composition trusts the
index (gc removes a blob's index rows in the transaction that deletes it), and the leases
are released in the transaction that commits the version and its ``blob_refs``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from service.core.safetensors_format import SafetensorsHeader
from service.errors import Conflict, InvalidCheckpoint, StatehubError, TensorsMissing
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.composed import ComposedBlob, Extent, merge_extents
from service.storage.db import Database
from service.storage.spool import Spooled, SpoolFile

log = logging.getLogger("statehub")

HASH_CHUNK = 8 * 1024 * 1024
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass
class Stored:
    """How a version's bytes went into the blob store, to be recorded with its row."""

    extents: list[Extent] | None  # None: the whole file is the blob named by its digest
    index: list[tuple[str, str, int, int]]  # (sha256, blob, start, size) rows to record
    leases: list[int] = field(default_factory=list)
    shared_bytes: int = 0
    new_bytes: int = 0

    @property
    def refs(self) -> set[str]:
        return {e.blob for e in self.extents} if self.extents else set()

    def report(self) -> dict[str, Any]:
        return {
            "composed": self.extents is not None,
            "shared_bytes": self.shared_bytes,
            "new_bytes": self.new_bytes,
        }


def hash_tensors(path: Path, header: SafetensorsHeader) -> list[str]:
    """sha256 of each tensor's bytes (``header.tensors`` order: data order), one pass."""
    hashes = []
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as handle:
        handle.seek(header.data_start)
        for tensor in header.tensors:
            hasher, remaining = hashlib.sha256(), tensor.nbytes
            while remaining:
                got = handle.readinto(view[: min(remaining, HASH_CHUNK)])
                if not got:
                    raise InvalidCheckpoint(f"the file ends inside tensor {tensor.key!r}")
                hasher.update(view[:got])
                remaining -= got
            hashes.append(hasher.hexdigest())
    return hashes


def store_version(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    path: Path,
    header: SafetensorsHeader,
    hashes: Sequence[str],
    digest: str,
) -> Stored:
    """Store the safetensors file at ``path``: composed when enough of it is stored, else
    whole. The caller commits the version with ``record`` and releases ``Stored.leases``
    in that transaction."""
    with db.session() as session:
        found = repo.find_stored_tensors(session, hashes)
    shared = _shared_bytes(header, hashes, found)
    data = header.data_size
    if shared and shared >= settings.dedup_min_shared_fraction * data:
        stored = _store_composed(db, blobs, settings, path, header, hashes, found)
        if stored is not None:
            return stored
    return _store_whole(db, blobs, settings, path, header, hashes, digest)


def _shared_bytes(header: SafetensorsHeader, hashes: Sequence[str], found: dict[str, Any]) -> int:
    return sum(t.nbytes for t, sha in zip(header.tensors, hashes, strict=True) if sha in found)


def _store_whole(
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    path: Path,
    header: SafetensorsHeader,
    hashes: Sequence[str],
    digest: str,
) -> Stored:
    leases = put_leased(db, blobs, settings, digest, path)
    index = [
        (sha, digest, header.data_start + t.begin, t.nbytes)
        for t, sha in zip(header.tensors, hashes, strict=True)
        if t.nbytes
    ]
    return Stored(None, index, leases, new_bytes=header.total_size)


def _store_composed(
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    path: Path,
    header: SafetensorsHeader,
    hashes: Sequence[str],
    found: dict[str, Any],
) -> Stored | None:
    """Header + new tensors in one new blob, the rest as ranges of stored blobs; None when
    a stored tensor vanished meanwhile (gc): the caller stores the file whole instead."""
    leases = lease(db, settings, {row.blob_digest for row in found.values()})
    try:
        places = _confirm(db, found)
        if places is None:
            release(db, leases)
            return None
        delta, new_at = _write_delta(settings, path, header, hashes, places)
        try:
            leases += put_leased(db, blobs, settings, delta.digest, delta.path)
        finally:
            delta.path.unlink(missing_ok=True)
    except BaseException:
        release(db, leases)
        raise
    sizes = {sha: t.nbytes for t, sha in zip(header.tensors, hashes, strict=True)}
    index = [(sha, delta.digest, start, sizes[sha]) for sha, start in new_at.items()]
    new_tensor_bytes = delta.size - header.data_start
    return Stored(
        _extents(header, hashes, delta.digest, places, new_at),
        index,
        leases,
        shared_bytes=header.data_size - new_tensor_bytes,
        new_bytes=delta.size,
    )


def _extents(
    header: SafetensorsHeader,
    hashes: Sequence[str],
    head_blob: str,
    places: dict[str, tuple[str, int, int]],
    new_at: dict[str, int],
) -> list[Extent]:
    """The file in order: its header (the start of ``head_blob``), then each tensor's bytes:
    a new one from ``head_blob`` at ``new_at``, a stored one where ``places`` says."""
    extents = [Extent(head_blob, 0, header.data_start)]
    for tensor, sha in zip(header.tensors, hashes, strict=True):
        if not tensor.nbytes:
            continue
        blob, start = (head_blob, new_at[sha]) if sha in new_at else places[sha][:2]
        extents.append(Extent(blob, start, start + tensor.nbytes))
    return merge_extents(extents)


def _confirm(db: Database, found: dict[str, Any]) -> dict[str, tuple[str, int, int]] | None:
    """Where the found tensors are, re-read under the leases; None if any row changed."""
    expected = {sha: (row.blob_digest, row.start, row.size) for sha, row in found.items()}
    with db.session() as session:
        now = repo.find_stored_tensors(session, expected)
        current = {sha: (row.blob_digest, row.start, row.size) for sha, row in now.items()}
    return expected if current == expected else None


def _write_delta(
    settings: Settings,
    path: Path,
    header: SafetensorsHeader,
    hashes: Sequence[str],
    places: dict[str, tuple[str, int, int]],
) -> tuple[Spooled, dict[str, int]]:
    """The header and the tensors not stored yet (each distinct one once), in data order."""
    spool = SpoolFile(
        settings.effective_spool_dir,
        max_bytes=settings.max_upload_bytes,
        min_free_bytes=settings.spool_min_free_bytes,
    )
    new_at: dict[str, int] = {}
    try:
        with open(path, "rb") as handle:
            _copy(handle, spool, header.data_start)
            position = header.data_start
            for tensor, sha in zip(header.tensors, hashes, strict=True):
                if not tensor.nbytes or sha in places or sha in new_at:
                    continue
                handle.seek(header.data_start + tensor.begin)
                _copy(handle, spool, tensor.nbytes)
                new_at[sha] = position
                position += tensor.nbytes
        return spool.finish(), new_at
    except BaseException:
        spool.discard()
        raise


def _copy(handle: Any, spool: SpoolFile, size: int) -> None:
    while size:
        block = handle.read(min(size, HASH_CHUNK))
        if not block:
            raise InvalidCheckpoint("the file ended early")
        spool.write(block)
        size -= len(block)


def lease(db: Database, settings: Settings, digests: Iterable[str]) -> list[int]:
    ttl = timedelta(seconds=settings.upload_lease_s)
    leases = []
    for digest in sorted(set(digests)):
        with db.session() as session:
            leases.append(repo.take_lease(session, digest, ttl=ttl).id)
    return leases


def put_leased(
    db: Database, blobs: BlobStore, settings: Settings, digest: str, path: Path
) -> list[int]:
    """Store ``path`` as blob ``digest`` under a lease (released here only on failure)."""
    leases = lease(db, settings, [digest])
    try:
        blobs.put_file(digest, path)
    except BaseException:
        release(db, leases)
        raise
    return leases


def release(db: Database, leases: Iterable[int]) -> None:
    """Release leases outside a commit (after a failure); a lease left expires by itself."""
    try:
        with db.session() as session:
            for lease_id in leases:
                repo.release_lease(session, lease_id)
    except StatehubError as exc:
        log.warning("cannot release blob leases %s: %s", list(leases), exc.message)


def record(session: Any, version: Any, stored: Stored) -> None:
    """Inside a new version's commit: the blobs it reads and the tensors it brought."""
    repo.add_blob_refs(session, version, stored.refs)
    repo.index_stored_tensors(session, stored.index)


# -- pushes that upload only missing tensors ---------------------------------------------------


def missing_tensors(db: Database, hashes: Sequence[str]) -> list[str]:
    with db.session() as session:
        found = repo.find_stored_tensors(session, hashes)
    return sorted({sha for sha in hashes if sha not in found and sha != EMPTY_SHA256})


def require_digest(spooled: Spooled, sha256: str) -> None:
    """Uploaded bytes are stored under a sha256 only if they hash to it."""
    if spooled.digest != sha256:
        raise InvalidCheckpoint(
            f"the uploaded bytes hash to {spooled.digest}, not {sha256}",
            detail={"expected": sha256, "actual": spooled.digest},
        )


def store_tensor(
    *, db: Database, blobs: BlobStore, settings: Settings, sha256: str, spooled: Spooled
) -> None:
    """One tensor's bytes, uploaded alone: checked against its hash, stored, indexed."""
    try:
        require_digest(spooled, sha256)
        leases = put_leased(db, blobs, settings, sha256, spooled.path)
        try:
            with db.session() as session:
                repo.index_stored_tensors(session, [(sha256, sha256, 0, spooled.size)])
                for lease_id in leases:
                    repo.release_lease(session, lease_id)
        except BaseException:
            release(db, leases)
            raise
    finally:
        spooled.path.unlink(missing_ok=True)


def compose_from_hashes(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    header_file: Spooled,
    header: SafetensorsHeader,
    hashes: Sequence[str],
) -> tuple[Stored, str]:
    """A version every tensor of which is stored: its header becomes a blob, the rest are
    ranges. Returns the storage and the file's digest, computed from the stored bytes.

    Raises:
        Conflict (``tensors_missing``): some hashes are not stored (upload them first).
    """
    with db.session() as session:
        found = repo.find_stored_tensors(session, hashes)
    _require_stored(header, hashes, found)
    leases = lease(db, settings, {row.blob_digest for row in found.values()})
    try:
        places = _confirm(db, found)
        if places is None:
            raise Conflict("stored tensors were collected meanwhile; push again")
        leases += put_leased(db, blobs, settings, header_file.digest, header_file.path)
        extents = _extents(header, hashes, header_file.digest, places, {})
        digest = _digest_of(blobs, extents, settings.stream_chunk_bytes)
    except BaseException:
        release(db, leases)
        raise
    stored = Stored(extents, [], leases, shared_bytes=header.data_size, new_bytes=header.data_start)
    return stored, digest


def _require_stored(
    header: SafetensorsHeader, hashes: Sequence[str], found: dict[str, Any]
) -> None:
    missing, wrong = [], []
    for tensor, sha in zip(header.tensors, hashes, strict=True):
        if not tensor.nbytes:
            continue
        row = found.get(sha)
        if row is None:
            missing.append(sha)
        elif row.size != tensor.nbytes:
            wrong.append(tensor.key)
    if wrong:
        raise InvalidCheckpoint(
            f"{len(wrong)} tensor(s) have a hash whose stored bytes are another size, "
            f"e.g. {wrong[0]!r}: the header does not describe those tensors",
            detail={"keys": wrong[:50]},
        )
    if missing:
        raise TensorsMissing(
            f"{len(missing)} tensor(s) are not stored: upload them, then compose again",
            detail={"missing": sorted(set(missing))},
        )


def _digest_of(blobs: BlobStore, extents: list[Extent], chunk: int) -> str:
    composed = ComposedBlob(blobs, "composing", extents)
    hasher = hashlib.sha256()
    for block in composed.iter_range("composing", 0, composed.size, chunk):
        hasher.update(block)
    return hasher.hexdigest()
