"""Fit cache: a fitted fetch body, kept as a blob, answers the same fetch again.

A fetch that rewrites or transforms tensors costs ranged reads (and decoding) on every
call, although its body depends only on the version and the plan, which its ETag names. A
full-length miss is written to a spool file while it streams (``FitTee``); once the last
byte went out, a background thread stores the file as a content-addressed blob and records
``FitCacheEntry(etag -> blob)``. The next fetch with that ETag is a passthrough of the
blob, verified like any stored blob (``service.integrity``).

The cache never fails a fetch: a spool disk short of ``spool_min_free_bytes``, a client
that disconnects, a store that refuses the write: no entry, and the fetch streams as if
there were no cache. A cached blob found missing or corrupted is forgotten and the fetch
is computed again. Storing takes a blob lease first, as ingestion does (``service.gc``).
gc evicts entries unused for ``fit_cache_ttl_s``; their blobs are then collected like any
other unreferenced blob.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from service import metrics
from service.errors import StatehubError, StorageError, StorageUnavailable
from service.fitting import FetchLayout
from service.integrity import BlobCorrupted, VerifiedBlob, iter_verified
from service.settings import Settings
from service.storage import fit_cache_repository as fit_repo
from service.storage import repositories as repo
from service.storage.blobs import BlobNotFound, BlobStore
from service.storage.db import Database
from service.storage.models import FitCacheEntry, utcnow
from service.storage.spool import Spooled, SpoolFile

log = logging.getLogger("statehub")

# Stores run here, two at a time: a burst of distinct fetches queues its uploads to the
# blob store instead of competing with the fetches for it.
_STORES = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fit-cache")

# Layout modes whose body differs from the stored blob (a passthrough is the blob itself).
CACHEABLE_MODES = frozenset({"rewrite", "transform"})
# A body more than this fraction made from nothing (fills, padded rows) is not kept: those
# bytes cost no read to make again, and keeping them would let a target (a read token's
# choice) decide how much the store holds, for fit_cache_ttl_s.
MAX_SYNTHESIZED_FRACTION = 0.5


def cacheable(layout: FetchLayout, settings: Settings) -> bool:
    """Whether this fetch's body is worth keeping (its copy is made while it streams)."""
    if not settings.fit_cache or layout.mode not in CACHEABLE_MODES:
        return False
    if layout.synthesized > MAX_SYNTHESIZED_FRACTION * layout.length:
        metrics.FIT_CACHE.inc("synthesized")
        return False
    return True


def lookup(session: Session, *, etag: str, version_id: int, size: int) -> FitCacheEntry | None:
    """The entry for this fetch. Versions with equal digests share an ETag, but their bodies
    name their own source in ``__metadata__``: an entry serves only its own version."""
    entry = fit_repo.find_entry(session, etag)
    if entry is None or entry.version_id != version_id or entry.size != size:
        metrics.FIT_CACHE.inc("miss")
        return None
    return entry


def record_hit(db: Database, etag: str) -> None:
    """Its own short transaction: a stream must not hold the database's write lock."""
    with db.session() as session:
        fit_repo.touch_entry(session, etag)
    metrics.FIT_CACHE.inc("hit")


def forget(db: Database, etag: str, reason: str) -> None:
    """Drop an entry whose blob cannot be served; the next fetch computes the body again."""
    log.warning("fit cache entry %s dropped: %s", etag, reason)
    metrics.FIT_CACHE.inc("dropped")
    try:
        with db.session() as session:
            fit_repo.delete_entry(session, etag)
    except StatehubError as exc:
        log.warning("cannot drop fit cache entry %s: %s", etag, exc.message)


def usable(db: Database, blobs: BlobStore, entry: FitCacheEntry) -> bool:
    """Whether the entry's blob is there with its size (a redirect reads nothing more)."""
    try:
        if blobs.size(entry.digest) == entry.size:
            return True
    except StorageUnavailable:
        raise  # the store is down: the entry is not at fault
    except BlobNotFound:
        pass
    forget(db, entry.etag, f"blob {entry.digest} is missing or has the wrong size")
    return False


def open_source(
    db: Database, blobs: BlobStore, settings: Settings, entry: FitCacheEntry
) -> VerifiedBlob | None:
    """The cached blob, verified like any stored blob: up to ``verify_buffer_bytes`` read and
    checked now (None, entry dropped, if corrupted), larger ones while they stream."""
    if not usable(db, blobs, entry):
        return None
    try:
        return VerifiedBlob(
            blobs,
            entry.digest,
            entry.size,
            buffer_limit=settings.verify_buffer_bytes,
            whole_in_order=True,
        )
    except BlobCorrupted as exc:
        forget(db, entry.etag, exc.message)
        return None


def stream_cached(
    db: Database,
    source: VerifiedBlob,
    entry: FitCacheEntry,
    *,
    start: int,
    end: int,
    chunk: int,
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of a cached body. A large blob found corrupted mid-stream cuts
    the response short (``service.integrity``) and is forgotten."""
    metrics.FETCHES_IN_FLIGHT.inc()
    try:
        for piece in source.iter_range(entry.digest, start, end, chunk):
            metrics.BYTES_FETCHED.inc(amount=len(piece))
            yield piece
    except BlobCorrupted as exc:
        metrics.STORAGE_ERRORS.inc(exc.code)
        forget(db, entry.etag, exc.message)
        raise
    except StorageError as exc:
        metrics.STORAGE_ERRORS.inc(exc.code)
        raise
    finally:
        metrics.FETCHES_IN_FLIGHT.dec()


class FitTee:
    """A fetch body copied to a spool file (and hashed) while it streams.

    ``store`` runs after the response: it keeps the file only if every byte went through.
    A failed spool write stops the copy, never the stream.
    """

    def __init__(self, spool: SpoolFile, length: int) -> None:
        self._spool: SpoolFile | None = spool
        self._length = length
        self._written = 0
        self._complete = False
        self._lock = threading.Lock()  # the stream's thread and the background task's

    @classmethod
    def open(cls, settings: Settings, length: int) -> FitTee | None:
        """A tee for a body of ``length`` bytes; None when the spool disk is short."""
        try:
            spool = SpoolFile(
                settings.effective_spool_dir,
                max_bytes=length,
                min_free_bytes=settings.spool_min_free_bytes,
                expected_bytes=length,
            )
        except (StatehubError, OSError) as exc:
            log.info("fit cache: body not kept: %s", exc)
            metrics.FIT_CACHE.inc("skipped")
            return None
        return cls(spool, length)

    def wrap(self, chunks: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        try:
            for chunk in chunks:
                self._write(chunk)
                yield chunk
            with self._lock:
                self._complete = self._spool is not None and self._written == self._length
        finally:
            if not self._complete:  # cut short (disconnect, storage error): nothing to keep
                self._abandon()

    def _write(self, chunk: bytes | memoryview) -> None:
        with self._lock:
            if self._spool is None:
                return
            try:
                self._spool.write(chunk)
                self._written += len(chunk)
            except (StatehubError, OSError) as exc:
                log.info("fit cache: spool write failed, body not kept: %s", exc)
                metrics.FIT_CACHE.inc("skipped")
                self._discard_locked()

    def discard(self) -> None:
        with self._lock:
            self._discard_locked()

    def _discard_locked(self) -> None:
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    def _abandon(self) -> None:
        """Drop the copy of a body cut short, counted once by whichever side sees it first
        (the stream closing, or the background store running before the stream is closed)."""
        with self._lock:
            abandoned = self._spool is not None
            self._discard_locked()
        if abandoned:
            metrics.FIT_CACHE.inc("abandoned")

    def _take(self) -> Spooled | None:
        if not self._complete:
            self._abandon()
            return None
        with self._lock:
            if self._spool is None:
                return None
            spool, self._spool = self._spool, None
        try:
            return spool.finish()
        except OSError as exc:
            log.info("fit cache: spool flush failed, body not kept: %s", exc)
            spool.discard()
            return None

    def store_later(self, **kwargs: Any) -> None:
        """The response's background task: hands ``store`` to the cache's own threads, so
        the request (its access log line, its latency) ends with its last byte."""
        _STORES.submit(self.store, **kwargs).add_done_callback(_log_failure)

    def store(
        self, *, db: Database, blobs: BlobStore, settings: Settings, etag: str, version_id: int
    ) -> None:
        """Store the body as a blob and record the entry, or nothing."""
        spooled = self._take()
        if spooled is None:
            return
        try:
            if _store(db, blobs, settings, spooled, etag=etag, version_id=version_id):
                metrics.FIT_CACHE.inc("stored")
        except StatehubError as exc:  # the response is long gone: log, never raise
            log.warning("fit cache: cannot store the body of %s: %s", etag, exc.message)
            metrics.FIT_CACHE.inc("failed")
        finally:
            spooled.path.unlink(missing_ok=True)


def _log_failure(future: Future[None]) -> None:
    if (exc := future.exception()) is not None:
        log.error("fit cache: storing a body failed", exc_info=exc)


def _store(
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    spooled: Spooled,
    *,
    etag: str,
    version_id: int,
) -> bool:
    """Lease, put, then the entry and the lease's release in one transaction: gc can
    neither delete the blob between the put and the entry nor see it unclaimed."""
    lease_id: int | None = None
    try:
        with db.session() as session:
            ttl = timedelta(seconds=settings.upload_lease_s)
            lease_id = repo.take_lease(session, spooled.digest, ttl=ttl).id
        if not blobs.put_file(spooled.digest, spooled.path):
            # A blob of that name was there already: point at it only if it is intact.
            for _ in iter_verified(
                blobs, spooled.digest, spooled.size, 0, spooled.size, settings.stream_chunk_bytes
            ):
                pass
        with db.session() as session:
            added = fit_repo.add_entry(
                session, etag=etag, version_id=version_id, digest=spooled.digest, size=spooled.size
            )
            repo.release_lease(session, lease_id)
        lease_id = None
        return added
    finally:
        if lease_id is not None:
            _release_quietly(db, lease_id)


def _release_quietly(db: Database, lease_id: int) -> None:
    try:
        with db.session() as session:
            repo.release_lease(session, lease_id)
    except StatehubError as exc:  # the lease expires by itself
        log.warning("cannot release blob lease %s: %s", lease_id, exc.message)


def evict_unused(session: Session, settings: Settings, *, dry_run: bool) -> int:
    """Entries unused for ``fit_cache_ttl_s`` (counted only when ``dry_run``)."""
    before = utcnow() - timedelta(seconds=settings.fit_cache_ttl_s)
    evicted = fit_repo.evict_unused(session, before=before, dry_run=dry_run)
    if evicted and not dry_run:
        metrics.FIT_CACHE.inc("evicted", amount=evicted)
    return evicted
