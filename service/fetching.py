"""Fetch, the use case: what to answer a request for a fitted state_dict.

One function decides everything a fetch response is, in order: plan and lay out the body
(``fitting.prepare_fetch``), ``304`` when the client's cache holds it, ``303`` to a
presigned store URL for a whole stored blob, a fit cache hit streamed (or redirected), or
the body computed from the stored bytes (checked against their digest, copied to the fit
cache while it streams). It returns a :class:`FetchAnswer` (status, headers, a body and
work to run once the body is sent); ``api/fitting.py`` only adapts that to HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from sqlalchemy.orm import Session

from service import fit_cache, fitting, metrics
from service.integrity import VerifiedBlob
from service.settings import Settings
from service.storage.blobs import BlobStore
from service.storage.composed import version_bytes
from service.storage.db import Database
from service.storage.models import FitCacheEntry

# What a body-less answer (303, 304) drops: the length and range are of a body it lacks.
_BODY_HEADERS = ("Content-Length", "Content-Range")


@dataclass
class FetchAnswer:
    status: int
    headers: dict[str, str]
    body: Iterator[bytes | memoryview] | None = None
    after: Callable[[], None] | None = None  # once the whole body went out (the fit cache)


def fetch(
    *,
    session: Session,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    request: fitting.FetchRequest,
    client_verifies: bool,
) -> FetchAnswer:
    """The answer to a fetch. Raises ``Incompatible`` and the registry's errors."""
    result = fitting.prepare_fetch(session=session, blobs=blobs, settings=settings, request=request)
    layout = result.layout
    headers = _headers(result)
    if result.not_modified:
        metrics.FETCHES.inc("not_modified")
        return FetchAnswer(304, _without_body(headers))
    if layout.mode == "passthrough":
        headers["X-Statehub-Body-Digest"] = result.version.digest
        if _whole_stored_blob(result) and (url := _presigned(blobs, settings, headers)):
            return _see_other(url, headers)
    cacheable = fit_cache.cacheable(layout, settings)
    if cacheable:
        entry = fit_cache.lookup(
            session, etag=layout.etag, version_id=result.version.id, size=layout.length
        )
        if entry is not None and (cached := _serve_cached(result, entry, db, blobs, settings)):
            return cached
    metrics.FETCHES.inc(layout.mode)
    body = fitting.stream_fetch(
        result,
        _source(result, blobs, settings, client_verifies=client_verifies),
        chunk=settings.stream_chunk_bytes,
        # A client that checks the digest frees a passthrough from being hashed in order
        # here: its stored bytes can be read as parts in flight, like any other body's.
        in_parts=client_verifies,
    )
    after = None
    tee = None
    if cacheable and not result.partial:  # only a whole body is worth keeping
        tee = fit_cache.FitTee.open(settings, layout.length)
    if tee is not None:
        body = tee.wrap(body)
        after = partial(
            tee.store_later,
            db=db,
            blobs=blobs,
            settings=settings,
            etag=layout.etag,
            version_id=result.version.id,
        )
    return FetchAnswer(_status(result), headers, body, after)


def _headers(result: fitting.FetchResult) -> dict[str, str]:
    layout = result.layout
    headers = {
        "ETag": f'"{layout.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Length": str(result.end - result.start),
        "X-Statehub-Verdict": layout.plan.verdict,
        "X-Statehub-Fetch-Mode": layout.mode,
        "X-Statehub-Plan-Id": layout.plan_id,
        "X-Statehub-Digest": result.version.digest,
    }
    if result.partial:
        headers["Content-Range"] = f"bytes {result.start}-{result.end - 1}/{layout.length}"
    return headers


def _without_body(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in _BODY_HEADERS}


def _status(result: fitting.FetchResult) -> int:
    return 206 if result.partial else 200


def _whole_stored_blob(result: fitting.FetchResult) -> bool:
    """A whole body that is one stored blob (a composed version's is several)."""
    return not result.partial and result.version.extents is None


def _presigned(blobs: BlobStore, settings: Settings, headers: dict[str, str]) -> str | None:
    """A presigned URL of the body's blob, if configured and the store has them."""
    if not settings.presign_fetch:
        return None
    return blobs.presigned_url(headers["X-Statehub-Body-Digest"], settings.presign_expires_s)


def _see_other(url: str, headers: dict[str, str]) -> FetchAnswer:
    """303 to the store: the body's headers stay (the client checks the digest), the
    length and range are the store's to send."""
    metrics.FETCHES.inc("redirect")
    metrics.PRESIGNED_REDIRECTS.inc("fetch")
    # The URL is a bearer capability for its lifetime: no shared cache may keep it.
    kept = _without_body(headers) | {"Location": url, "Cache-Control": "private, no-store"}
    return FetchAnswer(303, kept)


def _serve_cached(
    result: fitting.FetchResult,
    entry: FitCacheEntry,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
) -> FetchAnswer | None:
    """A fit cache hit, streamed (or redirected); None when the entry turned out unusable."""
    headers = _headers(result) | {
        "X-Statehub-Fetch-Mode": "cached",
        "X-Statehub-Body-Digest": entry.digest,
    }
    if not result.partial and settings.presign_fetch:
        if not fit_cache.usable(db, blobs, entry):  # dropped: computed afresh
            return None
        url = _presigned(blobs, settings, headers)
        if url is not None:
            fit_cache.record_hit(db, entry.etag)
            return _see_other(url, headers)
    source = fit_cache.open_source(db, blobs, settings, entry)
    if source is None:
        return None
    fit_cache.record_hit(db, entry.etag)
    metrics.FETCHES.inc("cached")
    body = fit_cache.stream_cached(
        db, source, entry, start=result.start, end=result.end, chunk=settings.stream_chunk_bytes
    )
    return FetchAnswer(_status(result), headers, body)


def _source(
    result: fitting.FetchResult, blobs: BlobStore, settings: Settings, *, client_verifies: bool
) -> VerifiedBlob:
    """The stored bytes the body reads, checked against the digest (``service.integrity``)."""
    version = result.version
    return VerifiedBlob(
        version_bytes(blobs, version.digest, version.extents),
        version.digest,
        version.size,
        buffer_limit=settings.verify_buffer_bytes,
        whole_in_order=result.layout.mode == "passthrough",
        client_verifies=client_verifies,
    )
