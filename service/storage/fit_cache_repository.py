"""Queries over the fit cache (``fit_cache``). Each takes an explicit session; none commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.storage.models import FitCacheEntry, Version, utcnow


def find_entry(session: Session, etag: str) -> FitCacheEntry | None:
    return session.get(FitCacheEntry, etag)


def touch_entry(session: Session, etag: str) -> None:
    """One more hit; an atomic UPDATE, so concurrent hits all count."""
    session.execute(
        update(FitCacheEntry)
        .where(FitCacheEntry.etag == etag)
        .values(hits=FitCacheEntry.hits + 1, last_used_at=utcnow())
    )


def add_entry(session: Session, *, etag: str, version_id: int, digest: str, size: int) -> bool:
    """Record a stored body; ``False`` when the version is gone or the ETag is cached already
    (a concurrent identical fetch won)."""
    if session.get(Version, version_id) is None or session.get(FitCacheEntry, etag) is not None:
        return False
    try:
        with session.begin_nested():
            now = utcnow()
            session.add(
                FitCacheEntry(
                    etag=etag,
                    version_id=version_id,
                    digest=digest,
                    size=size,
                    hits=0,
                    created_at=now,
                    last_used_at=now,
                )
            )
    except IntegrityError:  # the version was deleted, or the same ETag stored, meanwhile
        return False
    return True


def delete_entry(session: Session, etag: str) -> None:
    session.execute(delete(FitCacheEntry).where(FitCacheEntry.etag == etag))


def evict_unused(session: Session, *, before: datetime, dry_run: bool) -> int:
    """Entries last used before ``before``: deleted (counted only, when ``dry_run``)."""
    stale = FitCacheEntry.last_used_at < before
    if dry_run:
        return int(
            session.scalar(select(func.count()).select_from(FitCacheEntry).where(stale)) or 0
        )
    result = session.execute(delete(FitCacheEntry).where(stale))
    return int(getattr(result, "rowcount", 0) or 0)
