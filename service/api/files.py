"""Versions pushed as folders: upload the files the registry lacks, commit the manifest,
list and download a version's files (``service.folders``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from service import folders, registry
from service.api.bodies import AuthFirstRoute, raw_body
from service.api.deps import (
    BlobStoreDep,
    DatabaseDep,
    ModelNameDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    VersionRefDep,
    spool_request,
)
from service.api.models import MAX_METADATA_CHARS, blob_response, parse_metadata_param, pushed
from service.api.schemas import FileOut, VersionOut
from service.api.tensors import ComposeRequest
from service.core.names import validate_alias
from service.storage import repositories as repo
from service.storage.blobs import validate_digest

router = APIRouter(prefix="/v1/models", tags=["files"], route_class=AuthFirstRoute)


class FilesMissingRequest(BaseModel):
    sha256: list[str] = Field(max_length=100_000)


class FilesMissingOut(BaseModel):
    missing: list[str]


class ComposeFileRequest(ComposeRequest):
    sha256: str = Field(description="sha256 of the whole file, checked against the composition")


class FolderCommit(BaseModel):
    files: list[dict[str, Any]] = Field(
        max_length=100_000, description="every file of the folder: {path, size, sha256}"
    )


@router.post("/{namespace}/{name}/files/missing", response_model=FilesMissingOut)
def missing_files(
    name: ModelNameDep,
    body: FilesMissingRequest,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    principal: PrincipalDep,
) -> FilesMissingOut:
    """Which of these file hashes the registry lacks (sorted, distinct): upload those, or
    compose a safetensors file from its tensors (``files/compose``)."""
    principal.require("write", name)
    hashes = [validate_digest(sha) for sha in body.sha256]
    return FilesMissingOut(missing=folders.missing_files(db, blobs, hashes))


@router.put("/{namespace}/{name}/files/{sha256}", response_model=FileOut)
@raw_body
async def upload_file(
    request: Request,
    name: ModelNameDep,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    sha256: str = Path(pattern="^[0-9a-f]{64}$"),
) -> FileOut:
    """One file's raw bytes; refused (``invalid_checkpoint``) unless they hash to ``sha256``."""
    principal.require("write", name)
    spooled = await spool_request(request, settings)
    await run_in_threadpool(
        lambda: folders.store_file(
            db=db, blobs=blobs, settings=settings, sha256=sha256, spooled=spooled
        )
    )
    return FileOut(path="", size=spooled.size, sha256=sha256)


@router.post(
    "/{namespace}/{name}/files/compose",
    response_model=FileOut,
    responses={409: {"description": "tensors_missing: upload them, then compose again"}},
)
def compose_file(
    name: ModelNameDep,
    body: ComposeFileRequest,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> FileOut:
    """A safetensors file of a folder from its header and its tensors' hashes, all stored
    (upload the missing ones with ``PUT tensors/{sha256}`` first): a fine-tuned shard sends
    only its new tensors. Refused unless the composed bytes hash to ``sha256``."""
    principal.require("write", name)
    sha256 = validate_digest(body.sha256)
    folders.compose_file(
        db=db,
        blobs=blobs,
        settings=settings,
        sha256=sha256,
        header_json=body.header,
        size=body.size,
        tensor_hashes=body.tensors,
    )
    return FileOut(path="", size=body.size, sha256=sha256)


@router.post(
    "/{namespace}/{name}/versions/files",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "files_missing: upload them, then commit again"}},
)
def commit_folder(
    response: Response,
    name: ModelNameDep,
    body: FolderCommit,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    alias: str | None = Query(default=None, max_length=96),
    metadata: str | None = Query(default=None, max_length=MAX_METADATA_CHARS),
) -> VersionOut:
    """The next version: every file of the manifest as stored, its weights (one
    ``.safetensors``, an index and its shards, or one torch file) as the version's tensors.
    The same weights and files as an existing version return that version (200)."""
    principal.require("write", name)
    if alias is not None:
        validate_alias(alias)
    result = folders.push_folder(
        db=db,
        blobs=blobs,
        settings=settings,
        name=name,
        manifest=body.files,
        metadata=parse_metadata_param(metadata),
        alias=alias,
        actor=principal.actor,
    )
    with db.session() as session:
        files = [
            FileOut(path=f.path, size=f.size, sha256=f.sha256)
            for f in repo.version_files(session, result.version)
        ]
    return pushed(response, name, result, files=files)


@router.get("/{namespace}/{name}/versions/{ref}/files", response_model=list[FileOut])
def list_files(
    name: ModelNameDep, ref: VersionRefDep, session: SessionDep, principal: PrincipalDep
) -> list[FileOut]:
    """The files of a version pushed as a folder (none for a version pushed as one file)."""
    principal.require("read", name)
    version = registry.get_version(session=session, name=name, ref=ref)
    return [
        FileOut(path=f.path, size=f.size, sha256=f.sha256)
        for f in repo.version_files(session, version)
    ]


@router.api_route("/{namespace}/{name}/versions/{ref}/files/{path:path}", methods=["GET", "HEAD"])
def download_file(
    request: Request,
    name: ModelNameDep,
    ref: VersionRefDep,
    path: str,
    session: SessionDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """One file of a version, byte for byte as pushed; ``Range`` resumes, the ETag is its
    quoted sha256."""
    principal.require("read", name)
    version = registry.get_version(session=session, name=name, ref=ref)
    entry = repo.version_file(session, version, path)
    return blob_response(
        request,
        blobs,
        settings,
        digest=entry.sha256,
        size=entry.size,
        extents=repo.composed_extents(session, entry.sha256),
        filename=path.rsplit("/", 1)[-1],
    )
