"""Garbage collection: blobs no version references, and what interrupted writes left.

Safe against concurrent uploads. An upload takes a *lease* on its blob's digest (committed,
under a per-digest lock) before it stores the blob, and drops it in the transaction that
commits its version (``registry.push_version``). gc deletes a blob only inside a
transaction holding the same lock that sees neither a version (soft-deleted ones included:
they can be restored) nor a live lease for it. So either gc's check-and-delete comes first,
and the upload, waiting for the lock, finds the blob gone and stores it again; or the lease
does, and gc leaves the blob alone. The grace period (blob and temp-file age) is a second
guard, for writes that take no lease; a lease left by a crashed upload expires after
``upload_lease_s``.

Composed files (``service.folders``: a fine-tuned shard stored as ranges of other blobs) keep
the blobs they read while they exist; gc deletes one that no version file names once it is
older than the grace period (it was composed for a push that never committed), under the
same lock a push's lease takes on the file's sha256, and its blobs are then collected like
any other.

Fit cache entries (``service.fit_cache``) reference blobs too. gc first evicts the entries
unused for ``fit_cache_ttl_s``; their blobs are then unreferenced and collected like any
other (grace included). A dry run counts the entries it would evict, and since they stay,
does not list their blobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from service import fit_cache
from service.errors import StorageError
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.db import Database
from service.storage.models import utcnow

log = logging.getLogger("statehub")

TEMP_SUFFIX = ".incomplete"


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    grace_s: int
    blobs_deleted: list[str]
    bytes_freed: int
    blobs_kept: int
    temp_files_deleted: list[str]
    leases_expired: int
    fit_cache_evicted: int = 0  # entries unused for fit_cache_ttl_s (their blobs follow)
    composed_files_deleted: int = 0  # composed files no version names (their blobs follow)


def collect(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    grace_s: int,
    dry_run: bool,
    actor: str,
) -> GcReport:
    """Delete unreferenced blobs and stale temp files older than ``grace_s`` seconds."""
    now = utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    with db.session() as session:
        # First, so an evicted entry's blob is collected by this very run (under the grace).
        evicted = fit_cache.evict_unused(session, settings, dry_run=dry_run)
    composed = _collect_composed_files(db, cutoff, dry_run=dry_run)
    with db.session() as session:
        in_use = repo.digests_in_use(session, now=now)
        expired = 0 if dry_run else repo.delete_expired_leases(session, now=now)
    deleted: list[str] = []
    freed = kept = 0
    for blob in list(blobs.iter_stored()):
        unused = blob.digest not in in_use and blob.modified < cutoff
        if unused and _delete_if_unused(db, blobs, blob.digest, dry_run=dry_run):
            deleted.append(blob.digest)
            freed += blob.size
        else:
            kept += 1
    temp = blobs.remove_stale_temp(cutoff, dry_run=dry_run)
    temp += _remove_stale_spool(settings.effective_spool_dir, cutoff, dry_run=dry_run)
    report = GcReport(dry_run, grace_s, deleted, freed, kept, temp, expired, evicted, composed)
    with db.session() as session:
        repo.record_event(
            session,
            actor=actor,
            action="gc.run",
            object_type="store",
            object_ref=repr(blobs),
            detail={
                "dry_run": dry_run,
                "grace_s": grace_s,
                "blobs_deleted": len(deleted),
                "bytes_freed": freed,
                "temp_files_deleted": len(temp),
                "fit_cache_evicted": evicted,
                "composed_files_deleted": composed,
            },
        )
    log.info(
        "gc: %d blob(s), %d bytes, %d temp file(s), %d fit cache entr(ies)",
        len(deleted),
        freed,
        len(temp),
        evicted,
    )
    return report


def _collect_composed_files(db: Database, cutoff: datetime, *, dry_run: bool) -> int:
    """Composed files older than ``cutoff`` that nothing names: each checked and deleted
    under its lock, so a push leasing it in between keeps it."""
    with db.session() as session:
        candidates = repo.stale_composed_files(session, before=cutoff)
    deleted = 0
    for sha256 in candidates:
        with db.session() as session:
            repo.lock_blob(session, sha256)
            if repo.blob_in_use(session, sha256, now=utcnow()):
                continue
            if not dry_run:
                repo.delete_composed_file(session, sha256)
            deleted += 1
    return deleted


def _delete_if_unused(db: Database, blobs: BlobStore, digest: str, *, dry_run: bool) -> bool:
    """Check and delete under the blob's lock, so no upload can take a lease in between."""
    with db.session() as session:
        repo.lock_blob(session, digest)
        if repo.blob_in_use(session, digest, now=utcnow()):
            return False
        if not dry_run:
            repo.forget_stored_tensors(session, digest)
            blobs.delete(digest)
        return True


def _remove_stale_spool(spool_dir: Path, cutoff: datetime, *, dry_run: bool) -> list[str]:
    """Upload bodies and conversions an interrupted request left in the spool directory."""
    removed = []
    for path in sorted(spool_dir.glob(f"*{TEMP_SUFFIX}")):
        try:
            fresh = path.stat().st_mtime >= cutoff.timestamp()
            if fresh or path.is_symlink() or not path.is_file():
                continue
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot remove spool file {path}: {exc}") from exc
        removed.append(f"spool/{path.name}")
    return removed
