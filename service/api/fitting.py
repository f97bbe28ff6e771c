"""Plan (the CI gate), fetch (a fitted state_dict, streamed) and compatibility search."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Header, status
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from service import fit_cache, fitting, metrics
from service.api.bodies import AuthFirstRoute
from service.api.deps import (
    BlobStoreDep,
    DatabaseDep,
    ModelNameDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    VersionRefDep,
)
from service.api.schemas import FitRequest, PlanOut, SearchHit, SearchRequest
from service.core.spec import ArchSpec, validate_spec
from service.integrity import CLIENT_VERIFIES, VerifiedBlob, client_verifies
from service.settings import Settings
from service.storage.blobs import BlobStore
from service.storage.composed import version_bytes
from service.storage.db import Database
from service.storage.models import FitCacheEntry

router = APIRouter(tags=["fitting"], route_class=AuthFirstRoute)


def _target(body: FitRequest, settings: Settings) -> ArchSpec:
    return validate_spec(
        body.target.to_spec(),
        max_tensors=settings.max_tensors,
        max_rank=settings.max_rank,
        max_dim=settings.max_dim,
        max_key_length=settings.max_key_length,
    )


@router.post("/v1/models/{namespace}/{name}/versions/{ref}/plan", response_model=PlanOut)
def plan(
    name: ModelNameDep,
    ref: VersionRefDep,
    body: FitRequest,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> PlanOut:
    """How the stored checkpoint maps onto the target; moves no weights.

    Always 200 for a valid request: the verdict (``incompatible`` included) is the answer.
    """
    principal.require("read", name)
    version, result = fitting.plan_version(
        session=session,
        name=name,
        ref=ref,
        target=_target(body, settings),
        policy=body.policy.to_policy(),
        settings=settings,
    )
    return PlanOut.of(version, result)


@router.post(
    "/v1/models/{namespace}/{name}/versions/{ref}/fetch",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"},
        304: {"description": "not modified: the client holds the body ``If-None-Match`` names"},
        303: {"description": "the body is at ``Location``, a presigned blob store URL"},
        409: {"description": "incompatible: the policy forbids what the fit needs"},
    },
)
def fetch(
    name: ModelNameDep,
    ref: VersionRefDep,
    body: FitRequest,
    session: SessionDep,
    db: DatabaseDep,
    settings: SettingsDep,
    blobs: BlobStoreDep,
    principal: PrincipalDep,
    range_header: str | None = Header(default=None, alias="range"),
    if_range: str | None = Header(default=None, alias="if-range"),
    if_none_match: str | None = Header(default=None, alias="if-none-match"),
    verifies: str | None = Header(default=None, alias=CLIENT_VERIFIES),
) -> Response:
    """A safetensors stream of the checkpoint fitted to the target.

    ``__metadata__`` carries the plan, the keys the target keeps (``statehub.keep_target``)
    and tied keys written once (``statehub.tied``). ``ETag`` identifies digest + plan;
    ``Range`` (with ``If-Range``) resumes an interrupted fetch; ``If-None-Match`` naming
    the ETag is answered ``304`` without a body and without reading the store (the
    client's cache holds it).

    ``X-Statehub-Fetch-Mode`` says how the body is made: ``passthrough`` (the stored blob),
    ``rewrite``, ``transform``, or ``cached`` (a fitted body kept by the fit cache);
    ``X-Statehub-Body-Digest``, when present, is the sha256 of the whole body. With
    ``STATEHUB_PRESIGN_FETCH`` on an S3 store, a whole-body request for a stored or cached
    blob is answered ``303`` to a presigned URL, with the same headers.
    """
    principal.require("read", name)
    result = fitting.prepare_fetch(
        session=session,
        blobs=blobs,
        settings=settings,
        name=name,
        ref=ref,
        target=_target(body, settings),
        policy=body.policy.to_policy(),
        range_header=range_header,
        if_range=if_range,
        if_none_match=if_none_match,
    )
    layout = result.layout
    headers = _headers(result)
    if result.not_modified:
        metrics.FETCHES.inc("not_modified")
        kept = {k: v for k, v in headers.items() if k not in ("Content-Length", "Accept-Ranges")}
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=kept)
    if layout.mode == "passthrough":
        headers["X-Statehub-Body-Digest"] = result.version.digest
        if _whole_stored_blob(result) and (url := _presigned(blobs, settings, headers)):
            return _see_other(url, headers, route="fetch")
    cacheable = fit_cache.cacheable(layout, settings)
    if cacheable:
        entry = fit_cache.lookup(
            session, etag=layout.etag, version_id=result.version.id, size=layout.length
        )
        if entry is not None and (cached := _serve_cached(result, entry, db, blobs, settings)):
            return cached
    metrics.FETCHES.inc(layout.mode)
    stream = fitting.stream_fetch(
        result,
        _source(result, blobs, settings, verifying_client=client_verifies(verifies)),
        chunk=settings.stream_chunk_bytes,
    )
    background = None
    tee = None
    if cacheable and not result.partial:  # only a whole body is worth keeping
        tee = fit_cache.FitTee.open(settings, layout.length)
    if tee is not None:
        stream = tee.wrap(stream)
        background = BackgroundTask(
            tee.store_later,
            db=db,
            blobs=blobs,
            settings=settings,
            etag=layout.etag,
            version_id=result.version.id,
        )
    return _streamed(stream, result, headers, background=background)


def _headers(result: fitting.FetchResult) -> dict[str, str]:
    layout = result.layout
    headers = {
        "ETag": f'"{layout.etag}"',
        "Accept-Ranges": "bytes",
        "Content-Length": str(result.end - result.start),
        "X-Statehub-Verdict": layout.plan.verdict,
        "X-Statehub-Fetch-Mode": layout.mode,
        "X-Statehub-Plan-Id": layout.plan.plan_id,
        "X-Statehub-Digest": result.version.digest,
    }
    if result.partial:
        headers["Content-Range"] = f"bytes {result.start}-{result.end - 1}/{layout.length}"
    return headers


def _streamed(
    stream: Iterator[bytes | memoryview],
    result: fitting.FetchResult,
    headers: dict[str, str],
    *,
    background: BackgroundTask | None = None,
) -> StreamingResponse:
    return StreamingResponse(
        stream,
        status_code=206 if result.partial else 200,
        media_type="application/octet-stream",
        headers=headers,
        background=background,
    )


def _whole_stored_blob(result: fitting.FetchResult) -> bool:
    """A whole body that is one stored blob (a composed version's is several)."""
    return not result.partial and result.version.extents is None


def _presigned(blobs: BlobStore, settings: Settings, headers: dict[str, str]) -> str | None:
    """A presigned URL of the body's blob, if configured and the store has them."""
    if not settings.presign_fetch:
        return None
    return blobs.presigned_url(headers["X-Statehub-Body-Digest"], settings.presign_expires_s)


def _see_other(url: str, headers: dict[str, str], *, route: str) -> Response:
    """303 to the store: the body's headers stay (the client checks the digest), the
    length and range are the store's to send."""
    kept = {k: v for k, v in headers.items() if k not in ("Content-Length", "Content-Range")}
    if route == "fetch":
        metrics.FETCHES.inc("redirect")
    metrics.PRESIGNED_REDIRECTS.inc(route)
    # The URL is a bearer capability for its lifetime: no shared cache may keep it.
    kept |= {"Location": url, "Cache-Control": "private, no-store"}
    return Response(status_code=status.HTTP_303_SEE_OTHER, headers=kept)


def _serve_cached(
    result: fitting.FetchResult,
    entry: FitCacheEntry,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
) -> Response | None:
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
            return _see_other(url, headers, route="fetch")
    source = fit_cache.open_source(db, blobs, settings, entry)
    if source is None:
        return None
    fit_cache.record_hit(db, entry.etag)
    metrics.FETCHES.inc("cached")
    stream = fit_cache.stream_cached(
        db, source, entry, start=result.start, end=result.end, chunk=settings.stream_chunk_bytes
    )
    return _streamed(stream, result, headers)


def _source(
    result: fitting.FetchResult, blobs: BlobStore, settings: Settings, *, verifying_client: bool
) -> VerifiedBlob:
    """The stored bytes the body reads, checked against the digest (``service.integrity``)."""
    version = result.version
    return VerifiedBlob(
        version_bytes(blobs, version.digest, version.extents),
        result.version.digest,
        result.version.size,
        buffer_limit=settings.verify_buffer_bytes,
        whole_in_order=result.layout.mode == "passthrough",
        client_verifies=verifying_client,
    )


@router.post("/v1/search/compatible", response_model=list[SearchHit])
def search_compatible(
    body: SearchRequest, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> list[SearchHit]:
    """Ranked versions among those the caller may read."""
    ranked = fitting.search_compatible(
        readable=principal.readable(),
        session=session,
        target=_target(body, settings),
        policy=body.policy.to_policy(),
        limit=body.limit,
        settings=settings,
    )
    hits = []
    for version, result in ranked:
        model = f"{version.model.namespace}/{version.model.name}"
        hits.append(
            SearchHit(
                ref=f"{model}:{version.number}",
                model=model,
                version=version.number,
                digest=version.digest,
                verdict=result.verdict,
                coverage=result.to_json()["coverage"],
            )
        )
    return hits
