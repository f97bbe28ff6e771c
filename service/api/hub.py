"""The Hugging Face Hub protocol's download routes (``HF_ENDPOINT=<statehub>/hf``), so
``huggingface_hub``, ``transformers`` and ``timm`` load from statehub unchanged
(``service.hub``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response

from service import hub
from service.api.bodies import AuthFirstRoute
from service.api.deps import BlobStoreDep, ModelNameDep, PrincipalDep, SessionDep, SettingsDep
from service.api.models import blob_response
from service.core.names import ModelName
from service.errors import NotFound

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
