"""Direct pushes (``service.direct``): upload a blob straight to the S3 store, have the
server check it, then make the version from it. All writes to the model: a push's scope."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service import direct, folders
from service.api.bodies import AuthFirstRoute
from service.api.deps import BlobStoreDep, DatabaseDep, ModelNameDep, PrincipalDep, SettingsDep
from service.api.models import MAX_METADATA_CHARS, parse_metadata_param, pushed
from service.api.schemas import FileOut, VersionOut

router = APIRouter(prefix="/v1/models", tags=["direct push"], route_class=AuthFirstRoute)


class UploadRequest(BaseModel):
    size: int = Field(ge=0)


class UploadOffer(BaseModel):
    offered: bool = Field(description="false: upload through the server (PUT files/{sha256})")
    upload: str | None = Field(description="what to send back to uploads/complete")
    part_bytes: int = Field(description="every part but the last holds this many bytes")
    part_urls: list[str] = Field(description="PUT part N (1-based) to the N-th, no token")
    expires_in: int


class UploadComplete(BaseModel):
    upload: str = Field(max_length=4096)
    etags: list[str] = Field(max_length=direct.MAX_PARTS, description="each part's, in order")
    sha256: str = Field(max_length=64, description="of the whole blob: checked, then its name")


class StoredPush(BaseModel):
    sha256: str = Field(max_length=64, description="a blob stored by a direct upload")


@router.post("/{namespace}/{name}/uploads", response_model=UploadOffer)
def offer_upload(
    name: ModelNameDep,
    body: UploadRequest,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> UploadOffer:
    """How to upload a blob of this size: straight to the S3 store in parts (presigned
    URLs), or through the server (a local store, a small blob)."""
    principal.require("write", name)
    offer = direct.offer(blobs=blobs, settings=settings, name=name, size=body.size)
    return UploadOffer(**vars(offer))


@router.post("/{namespace}/{name}/uploads/complete", response_model=FileOut)
async def complete_upload(
    name: ModelNameDep,
    body: UploadComplete,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> FileOut:
    """Complete a direct upload: stored under ``sha256`` once its bytes hash to it, else
    refused (``invalid_checkpoint``) and deleted."""
    principal.require("write", name)
    size = await run_in_threadpool(
        lambda: direct.finish(
            db=db,
            blobs=blobs,
            settings=settings,
            name=name,
            upload=body.upload,
            etags=body.etags,
            sha256=body.sha256,
        )
    )
    return FileOut(path="", size=size, sha256=body.sha256)


@router.post(
    "/{namespace}/{name}/versions/stored",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "files_missing: upload the blob, then push again"}},
)
async def push_stored(
    response: Response,
    name: ModelNameDep,
    body: StoredPush,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    alias: str | None = Query(default=None, max_length=96),
    metadata: str | None = Query(default=None, max_length=MAX_METADATA_CHARS),
    ema: bool = Query(default=False, description="take EMA weights from a training snapshot"),
) -> VersionOut:
    """The next version from a stored blob: the same version ``POST versions`` makes of
    its bytes (identical bytes again return that version, 200)."""
    principal.require("write", name)
    user_metadata = parse_metadata_param(metadata)
    result = await run_in_threadpool(
        lambda: folders.push_stored(
            db=db,
            blobs=blobs,
            settings=settings,
            name=name,
            sha256=body.sha256,
            metadata=user_metadata,
            alias=alias,
            ema=ema,
            actor=principal.actor,
        )
    )
    return pushed(response, name, result)
