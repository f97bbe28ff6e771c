"""Pushes that upload only what the registry lacks (tensor-level deduplication).

A client hashes each tensor, asks which hashes are missing, uploads those one by one, then
composes the version from its header and every tensor's hash. All three are writes to the
model: the same scope a push needs.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service import dedup, registry
from service.api.bodies import AuthFirstRoute, raw_body
from service.api.deps import (
    BlobStoreDep,
    DatabaseDep,
    ModelNameDep,
    PrincipalDep,
    SettingsDep,
    spool_request,
)
from service.api.models import MAX_METADATA_CHARS, parse_metadata_param, pushed
from service.api.schemas import VersionOut
from service.storage.blobs import validate_digest

router = APIRouter(prefix="/v1/models", tags=["deduplication"], route_class=AuthFirstRoute)


class MissingRequest(BaseModel):
    sha256: list[str] = Field(max_length=200_000)


class MissingOut(BaseModel):
    missing: list[str]
    # Below this fraction of bytes stored already, a plain upload is the better push.
    min_shared_fraction: float


class TensorOut(BaseModel):
    sha256: str
    size: int


class ComposeRequest(BaseModel):
    header: str = Field(description="the safetensors header JSON, exactly as in the file")
    size: int = Field(gt=0, description="size of the whole safetensors file in bytes")
    tensors: dict[str, str] = Field(description="tensor key -> sha256 of its bytes")


@router.post("/{namespace}/{name}/tensors/missing", response_model=MissingOut)
def missing_tensors(
    name: ModelNameDep,
    body: MissingRequest,
    db: DatabaseDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> MissingOut:
    """Which of these tensor hashes the registry does not store (sorted, distinct)."""
    principal.require("write", name)
    hashes = [validate_digest(sha) for sha in body.sha256]
    return MissingOut(
        missing=dedup.missing_tensors(db, hashes),
        min_shared_fraction=settings.dedup_min_shared_fraction,
    )


@router.put("/{namespace}/{name}/tensors/{sha256}", response_model=TensorOut)
@raw_body
async def upload_tensor(
    request: Request,
    name: ModelNameDep,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    sha256: str = Path(pattern="^[0-9a-f]{64}$"),
) -> TensorOut:
    """One tensor's raw bytes; refused (``invalid_checkpoint``) unless they hash to ``sha256``."""
    principal.require("write", name)
    spooled = await spool_request(request, settings)
    await run_in_threadpool(
        lambda: dedup.store_tensor(
            db=db, blobs=blobs, settings=settings, sha256=sha256, spooled=spooled
        )
    )
    return TensorOut(sha256=sha256, size=spooled.size)


@router.post(
    "/{namespace}/{name}/versions/compose",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "tensors_missing: upload them, then compose again"}},
)
def compose_version(
    response: Response,
    name: ModelNameDep,
    body: ComposeRequest,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    alias: str | None = Query(default=None, max_length=96),
    metadata: str | None = Query(default=None, max_length=MAX_METADATA_CHARS),
) -> VersionOut:
    """The next version, from its header and its tensors' hashes: the same version a plain
    upload of the whole file makes (same digest), without sending stored bytes again."""
    principal.require("write", name)
    result = registry.compose_version(
        db=db,
        blobs=blobs,
        settings=settings,
        name=name,
        header_json=body.header,
        size=body.size,
        tensor_hashes=body.tensors,
        metadata=parse_metadata_param(metadata),
        alias=alias,
        actor=principal.actor,
    )
    return pushed(response, name, result)
