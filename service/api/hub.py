"""The Hugging Face Hub protocol's download routes (``HF_ENDPOINT=<statehub>/hf``), so
``huggingface_hub``, ``transformers`` and ``timm`` load from statehub unchanged
(``service.hub``)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service import folders, hub, registry
from service.api.bodies import AuthFirstRoute, raw_body
from service.api.deps import (
    BlobStoreDep,
    DatabaseDep,
    ModelNameDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    spool_request,
)
from service.api.models import blob_response
from service.core.names import ModelName
from service.errors import HubNotFound, InvalidCheckpoint, InvalidRequest, NotFound
from service.storage import repositories as repo

router = APIRouter(prefix="/hf", tags=["hugging face hub"], route_class=AuthFirstRoute)


def _revision(session: Any, principal: Any, name: ModelName, revision: str) -> hub.Revision:
    try:
        principal.require("read", name)
    except NotFound:
        raise hub.repo_not_found(name) from None
    return hub.resolve(session, name, revision)


@router.get("/api/models/{namespace}/{name}")
def model_info(name: ModelNameDep, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    """The repo at ``main`` (its latest version)."""
    return hub.model_info(_revision(session, principal, name, hub.MAIN))


@router.get("/api/models/{namespace}/{name}/revision/{revision}")
def model_info_at(
    name: ModelNameDep, revision: str, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    return hub.model_info(_revision(session, principal, name, revision))


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
def tree(
    name: ModelNameDep,
    revision: str,
    session: SessionDep,
    principal: PrincipalDep,
    path: str = "",
    recursive: bool = Query(default=False),
) -> list[dict[str, Any]]:
    """Files (as LFS files: oid = sha256) and folders; one page holds them all."""
    return hub.tree(_revision(session, principal, name, revision), path, recursive=recursive)


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve(
    request: Request,
    name: ModelNameDep,
    revision: str,
    path: str,
    session: SessionDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """A file: ``X-Repo-Commit``, ``ETag`` and ``X-Linked-Etag`` (its quoted sha256),
    ``X-Linked-Size``; ``Range`` answers 206. HEAD answers from stored metadata."""
    at = _revision(session, principal, name, revision)
    entry = at.file(path)
    response = blob_response(
        request,
        blobs,
        settings,
        digest=entry.sha256,
        size=entry.size,
        extents=entry.extents,
        filename=path.rsplit("/", 1)[-1],
    )
    response.headers["X-Repo-Commit"] = at.commit
    response.headers["X-Linked-Etag"] = f'"{entry.sha256}"'
    response.headers["X-Linked-Size"] = str(entry.size)
    return response


# -- the write side (HF_HUB_DISABLE_XET=1: LFS "basic" transfers) ------------------------------


class CreateRepo(BaseModel):
    name: str = Field(max_length=200)
    organization: str | None = Field(default=None, max_length=96)
    private: bool | None = None
    type: str | None = Field(default=None, max_length=20)


@router.post("/api/repos/create")
def create_repo(
    request: Request, body: CreateRepo, session: SessionDep, principal: PrincipalDep
) -> JSONResponse:
    """A model ``organization/name`` (409 when it exists: ``exist_ok`` clients go on)."""
    if body.type not in (None, "model"):
        raise InvalidRequest("statehub holds model repositories only")
    namespace, _, short = body.name.rpartition("/")
    name = ModelName.parse(f"{body.organization or namespace}/{short}")
    principal.require("write", name)
    url = f"{_endpoint(request)}/{name}"
    if repo.find_model(session, name) is not None:
        # The Hub answers 409 with the repo's url, which exist_ok clients then read.
        exists = {"url": url, "error": f"{name} exists already"}
        return JSONResponse(exists, status_code=409, headers={"X-Error-Code": "conflict"})
    registry.create_model(
        session=session, name=name, description="", tags=["hf-hub"], actor=principal.actor
    )
    return JSONResponse({"url": url, "name": str(name), "id": str(name)})


def _endpoint(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/hf"


class YamlCheck(BaseModel):
    content: str = Field(default="", max_length=1024 * 1024)
    repoType: str | None = Field(default=None, max_length=20)  # the Hub's field name


@router.post("/api/validate-yaml")
def validate_yaml(body: YamlCheck, principal: PrincipalDep) -> dict[str, Any]:
    """The Hub checks a README's front matter before a commit; statehub keeps any README."""
    return {"errors": [], "warnings": []}


@router.post("/api/models/{namespace}/{name}/branch/{branch}")
def create_branch(
    name: ModelNameDep, branch: str, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    """A branch is an alias (``main`` is the latest version and always exists)."""
    principal.require("write", name)
    hub.create_branch(session, name, branch, actor=principal.actor)
    return {}


class PreuploadFile(BaseModel):
    path: str = Field(max_length=512)
    size: int = Field(ge=0)
    sample: str = Field(default="", max_length=1024)


class Preupload(BaseModel):
    files: list[PreuploadFile] = Field(max_length=100_000)


@router.post("/api/models/{namespace}/{name}/preupload/{revision}")
def preupload(name: ModelNameDep, body: Preupload, principal: PrincipalDep) -> dict[str, Any]:
    """Every file goes through LFS: stored once by its sha256, whatever its size."""
    principal.require("write", name)
    return {
        "files": [{"path": f.path, "uploadMode": "lfs", "shouldIgnore": False} for f in body.files]
    }


class LfsObject(BaseModel):
    oid: str = Field(pattern="^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class LfsBatch(BaseModel):
    operation: str
    objects: list[LfsObject] = Field(max_length=100_000)
    transfers: list[str] = Field(default_factory=lambda: ["basic"])


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch")
def lfs_batch(
    request: Request,
    name: ModelNameDep,
    body: LfsBatch,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    """Upload actions for the objects the store lacks: signed URLs valid for an hour."""
    principal.require("write", name)
    if body.operation != "upload":
        raise InvalidRequest("statehub's LFS endpoint takes uploads; downloads use resolve/")
    secret = settings.hub_upload_secret
    expires = int(time.time()) + hub.UPLOAD_URL_S
    base = f"{_endpoint(request)}/lfs/{name}"
    objects = []
    for obj in body.objects:
        entry: dict[str, Any] = {"oid": obj.oid, "size": obj.size, "authenticated": True}
        if folders.stored_size(db, blobs, obj.oid) != obj.size:
            signature = hub.upload_signature(secret, name, obj.oid, obj.size, expires)
            query = urlencode({"size": obj.size, "expires": expires, "signature": signature})
            entry["actions"] = {
                "upload": {"href": f"{base}/{obj.oid}?{query}", "expires_in": hub.UPLOAD_URL_S},
                "verify": {"href": f"{base}/verify", "expires_in": hub.UPLOAD_URL_S},
            }
        objects.append(entry)
    return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}


@router.put("/lfs/{namespace}/{name}/{oid}")
@raw_body
async def lfs_upload(
    request: Request,
    name: ModelNameDep,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    oid: str = Path(pattern="^[0-9a-f]{64}$"),
    size: int = Query(ge=0),
    expires: int = Query(ge=0, le=2**40),
    signature: str = Query(pattern="^[0-9a-f]{64}$"),
) -> Response:
    """An LFS object's bytes, to a URL the batch answer signed (it carries no token)."""
    hub.check_upload(settings.hub_upload_secret, name, oid, size, expires, signature)
    spooled = await spool_request(request, settings)
    if spooled.size != size:
        spooled.path.unlink(missing_ok=True)
        raise InvalidCheckpoint(f"the upload holds {spooled.size} bytes, not the {size} announced")
    await run_in_threadpool(
        lambda: folders.store_file(
            db=db, blobs=blobs, settings=settings, sha256=oid, spooled=spooled
        )
    )
    return Response(status_code=200)


@router.post("/lfs/{namespace}/{name}/verify")
def lfs_verify(
    name: ModelNameDep,
    body: LfsObject,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    principal.require("write", name)
    if folders.stored_size(db, blobs, body.oid) != body.size:
        raise HubNotFound(f"object {body.oid} is not stored", hub_code="EntryNotFound")
    return {"oid": body.oid, "size": body.size}


@router.post("/api/models/{namespace}/{name}/commit/{revision}")
async def commit(
    request: Request,
    name: ModelNameDep,
    revision: str,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> dict[str, Any]:
    """An NDJSON commit (header, file, lfsFile, deletedFile, deletedFolder) as a version."""
    principal.require("write", name)
    raw = await request.body()
    result, commit_oid = await run_in_threadpool(
        lambda: hub.commit(
            db=db,
            blobs=blobs,
            settings=settings,
            name=name,
            revision=revision,
            raw=raw,
            actor=principal.actor,
        )
    )
    return {
        "success": True,
        "commitOid": commit_oid,
        "commitUrl": f"{_endpoint(request)}/{name}/commit/{commit_oid}",
        "pullRequestUrl": None,
        "version": result.version.number,
    }
