"""Plan (the CI gate), fetch (a fitted state_dict, streamed) and compatibility search."""

from __future__ import annotations

from fastapi import APIRouter, Header
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from service import fetching, fitting
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
from service.integrity import CLIENT_VERIFIES, client_verifies
from service.settings import Settings

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
    blobs: BlobStoreDep,
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
        policy=body.to_policy(),
        settings=settings,
        blobs=blobs,
    )
    return PlanOut.of(version, result)


@router.post(
    "/v1/models/{namespace}/{name}/versions/{ref}/fetch",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "the requested byte range"},
        303: {"description": "the body is at ``Location``, a presigned blob store URL"},
        304: {"description": "not modified: the client holds the body ``If-None-Match`` names"},
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
    request = fitting.FetchRequest(
        name,
        ref,
        _target(body, settings),
        body.to_policy(),
        range_header,
        if_range,
        if_none_match,
    )
    answer = fetching.fetch(
        session=session,
        db=db,
        blobs=blobs,
        settings=settings,
        request=request,
        client_verifies=client_verifies(verifies),
    )
    if answer.body is None:
        return Response(status_code=answer.status, headers=answer.headers)
    return StreamingResponse(
        answer.body,
        status_code=answer.status,
        media_type="application/octet-stream",
        headers=answer.headers,
        background=BackgroundTask(answer.after) if answer.after else None,
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
        policy=body.to_policy(),
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
