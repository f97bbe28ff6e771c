"""Plan (the CI gate), fetch (a fitted state_dict, streamed) and compatibility search."""

from __future__ import annotations

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from service import fitting, metrics
from service.api.deps import (
    BlobStoreDep,
    ModelNameDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    VersionRefDep,
)
from service.api.schemas import FitRequest, PlanOut, SearchHit, SearchRequest
from service.core.spec import ArchSpec, validate_spec
from service.integrity import VerifiedBlob
from service.settings import Settings
from service.storage.blobs import BlobStore
from service.storage.composed import version_bytes

router = APIRouter(tags=["fitting"])


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
    )
    return PlanOut.of(version, result)


@router.post(
    "/v1/models/{namespace}/{name}/versions/{ref}/fetch",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"},
        409: {"description": "incompatible: the policy forbids what the fit needs"},
    },
)
def fetch(
    name: ModelNameDep,
    ref: VersionRefDep,
    body: FitRequest,
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobStoreDep,
    principal: PrincipalDep,
    range_header: str | None = Header(default=None, alias="range"),
    if_range: str | None = Header(default=None, alias="if-range"),
) -> StreamingResponse:
    """A safetensors stream of the checkpoint fitted to the target.

    ``__metadata__`` carries the plan, the keys the target keeps (``statehub.keep_target``)
    and tied keys written once (``statehub.tied``). ``ETag`` identifies digest + plan;
    ``Range`` (with ``If-Range``) resumes an interrupted fetch.
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
    )
    layout, total = result.layout, result.layout.length
    metrics.FETCHES.inc(layout.mode)
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
        headers["Content-Range"] = f"bytes {result.start}-{result.end - 1}/{total}"
    return StreamingResponse(
        fitting.stream_fetch(
            result, _source(result, blobs, settings), chunk=settings.stream_chunk_bytes
        ),
        status_code=206 if result.partial else 200,
        media_type="application/octet-stream",
        headers=headers,
    )


def _source(result: fitting.FetchResult, blobs: BlobStore, settings: Settings) -> VerifiedBlob:
    """The stored bytes the body reads, checked against the digest (``service.integrity``)."""
    version = result.version
    return VerifiedBlob(
        version_bytes(blobs, version.digest, version.extents),
        result.version.digest,
        result.version.size,
        buffer_limit=settings.verify_buffer_bytes,
        whole_in_order=result.layout.mode == "passthrough",
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
