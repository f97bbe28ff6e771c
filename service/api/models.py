"""Models, versions (upload, metadata, blob) and aliases."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service import metrics, registry
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
from service.api.schemas import (
    AliasOut,
    AliasSet,
    FileOut,
    ModelCreate,
    ModelList,
    ModelOut,
    VersionOut,
)
from service.core.jsondata import parse_metadata
from service.core.layout import etag_matches, range_applies
from service.core.names import ModelName, validate_alias, validate_segment
from service.errors import StorageError
from service.fitting import parse_range
from service.integrity import CLIENT_VERIFIES, VerifiedBlob, client_verifies
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.composed import version_bytes

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=AuthFirstRoute)

MAX_METADATA_CHARS = 64 * 1024
MAX_OFFSET = 2**31  # a database integer on both backends


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelOut)
def create_model(body: ModelCreate, session: SessionDep, principal: PrincipalDep) -> ModelOut:
    name = ModelName.of(body.namespace, body.name)
    principal.require("write", name)
    model = registry.create_model(
        session=session,
        name=name,
        description=body.description,
        tags=body.tags,
        actor=principal.actor,
    )
    return ModelOut.of(model)


@router.get("", response_model=ModelList)
def list_models(
    session: SessionDep,
    principal: PrincipalDep,
    q: str | None = Query(default=None, max_length=200, pattern=r"^[^\x00-\x1f]*$"),
    namespace: str | None = Query(default=None, max_length=96),
    tag: str | None = Query(default=None, max_length=96),
    arch_fp: str | None = Query(default=None, pattern="^[0-9a-f]{64}$"),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
) -> ModelList:
    """Live models the caller may read (others are left out, never refused)."""
    if namespace is not None:
        validate_segment(namespace, what="namespace")
    if tag is not None:
        validate_segment(tag, what="tag")
    models, total = repo.list_models(
        session,
        query=q,
        namespace=namespace,
        tag=tag,
        arch_fp=arch_fp,
        limit=limit,
        offset=offset,
        readable=principal.readable(),
    )
    return ModelList(
        items=[ModelOut.of(m) for m in models], total=total, limit=limit, offset=offset
    )


@router.get("/{namespace}/{name}", response_model=ModelOut)
def get_model(name: ModelNameDep, session: SessionDep, principal: PrincipalDep) -> ModelOut:
    principal.require("read", name)
    return ModelOut.of(repo.get_model(session, name), detailed=True)


@router.delete("/{namespace}/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_model(
    name: ModelNameDep,
    session: SessionDep,
    principal: PrincipalDep,
    hard: bool = Query(default=False, description="remove for good instead of soft delete"),
) -> Response:
    """Soft delete (restorable with ``POST .../restore``) unless ``hard=true``. Admin."""
    principal.require("admin", name)
    registry.delete_model(session=session, name=name, actor=principal.actor, hard=hard)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{namespace}/{name}/restore", response_model=ModelOut)
def restore_model(name: ModelNameDep, session: SessionDep, principal: PrincipalDep) -> ModelOut:
    """Undo a soft delete of the model. Admin."""
    principal.require("admin", name)
    model = registry.restore_model(session=session, name=name, actor=principal.actor)
    return ModelOut.of(model, detailed=True)


@router.post(
    "/{namespace}/{name}/versions",
    response_model=VersionOut,
    status_code=status.HTTP_201_CREATED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in ("application/octet-stream", "application/x-tar")
            },
        }
    },
)
@raw_body
async def upload_version(
    request: Request,
    response: Response,
    name: ModelNameDep,
    settings: SettingsDep,
    db: DatabaseDep,
    blobs: BlobStoreDep,
    principal: PrincipalDep,
    alias: str | None = Query(default=None, max_length=96),
    metadata: str | None = Query(default=None, max_length=MAX_METADATA_CHARS),
    ema: bool = Query(default=False, description="take EMA weights from a training snapshot"),
) -> VersionOut:
    """Upload a checkpoint as the raw request body; what it is comes from its first bytes.

    - **safetensors**: validated and stored byte for byte.
    - **torch.save files** (.pth/.pt/.bin; zip or legacy format, tensors saved on any device):
      read without executing anything, and converted to safetensors in state_dict order. The
      weights come from a state_dict, a pickled module, or a training snapshot (``model``,
      ``state_dict``, ``model_state_dict``, ``net``, ... or with ``ema=true``
      ``state_dict_ema``, ``model_ema``, ...); the snapshot's other plain data (epoch,
      metrics, config) is kept in the version's ``ingest.snapshot``; optimizer and
      scheduler state are dropped. ``ema=true`` on a file without EMA weights is refused
      rather than answered with the other weights. A pickle that would run code is refused
      with ``unsafe_pickle``, naming its globals.
    - **sharded safetensors** (Hugging Face style): an uncompressed tar, sent with
      ``Content-Type: application/x-tar``, holding one ``*.safetensors.index.json`` and the
      shards its ``weight_map`` names, relative to the index (``tar -cf - -C model_dir
      model.safetensors.index.json model-00001-of-00002.safetensors ...``). The shards are
      merged into one stored file, shard after shard as they lie. At most 4096 members,
      regular files and directories only, no absolute or ``..`` names; other members
      (``config.json``) are ignored and listed in the report.

    What ingestion found (source format, where the weights came from, wrapper prefixes,
    placeholder globals, dtypes, dropped parts, tie groups) is the version's ``ingest``.
    The body is spooled to disk while it is hashed. An upload whose stored bytes equal an
    existing version of this model returns that version with status 200 instead.
    """
    principal.require("write", name)  # before a byte of the body is read
    if alias is not None:
        validate_alias(alias)
    user_metadata = parse_metadata_param(metadata)
    spooled = await spool_request(request, settings)
    result = await run_in_threadpool(
        lambda: registry.push_version(
            db=db,
            blobs=blobs,
            settings=settings,
            name=name,
            spooled=spooled,
            metadata=user_metadata,
            alias=alias,
            ema=ema,
            actor=principal.actor,
        )
    )
    return pushed(response, name, result)


def pushed(
    response: Response,
    name: ModelName,
    result: registry.PushResult,
    *,
    files: list[FileOut] | None = None,
) -> VersionOut:
    """A push's answer, whichever route made it: 201 for a new version, 200 for bytes that
    already were one; where it is (``Location``)."""
    if not result.created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = f"/v1/models/{name}/versions/{result.version.number}"
    return VersionOut.of(result.version, aliases=result.aliases, with_spec=False, files=files)


def parse_metadata_param(text: str | None) -> dict[str, Any]:
    """The ``metadata`` query parameter, checked (depth, numbers, text) before the upload
    is read, so that what is stored can always be served back."""
    return parse_metadata(text) if text else {}


@router.get("/{namespace}/{name}/versions", response_model=list[VersionOut])
def list_versions(
    name: ModelNameDep, session: SessionDep, principal: PrincipalDep
) -> list[VersionOut]:
    principal.require("read", name)
    model = repo.get_model(session, name)
    aliases = repo.aliases_by_version(session, model)
    return [
        VersionOut.of(v, aliases=aliases.get(v.id, []), with_spec=False)
        for v in repo.list_versions(session, model)
    ]


@router.get("/{namespace}/{name}/versions/{ref}", response_model=VersionOut)
def get_version(
    name: ModelNameDep, ref: VersionRefDep, session: SessionDep, principal: PrincipalDep
) -> VersionOut:
    principal.require("read", name)
    version = registry.get_version(session=session, name=name, ref=ref)
    aliases = repo.aliases_by_version(session, version.model).get(version.id, [])
    return VersionOut.of(version, aliases=aliases, with_spec=True)


@router.delete("/{namespace}/{name}/versions/{ref}", status_code=status.HTTP_204_NO_CONTENT)
def delete_version(
    name: ModelNameDep,
    ref: VersionRefDep,
    session: SessionDep,
    principal: PrincipalDep,
    hard: bool = Query(default=False, description="remove for good instead of soft delete"),
) -> Response:
    """Soft delete (restorable) unless ``hard=true``; ``latest`` moves back. Admin."""
    principal.require("admin", name)
    registry.delete_version(session=session, name=name, ref=ref, actor=principal.actor, hard=hard)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{namespace}/{name}/versions/{number}/restore", response_model=VersionOut)
def restore_version(
    name: ModelNameDep,
    session: SessionDep,
    principal: PrincipalDep,
    number: int = Path(ge=1, le=10**12),
) -> VersionOut:
    """Undo a soft delete of version ``number``. Admin."""
    principal.require("admin", name)
    version = registry.restore_version(
        session=session, name=name, number=number, actor=principal.actor
    )
    aliases = repo.aliases_by_version(session, version.model).get(version.id, [])
    return VersionOut.of(version, aliases=aliases, with_spec=False)


@router.get(
    "/{namespace}/{name}/versions/{ref}/blob",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {},
        303: {"description": "the blob is at ``Location``, a presigned blob store URL"},
    },
)
def download_blob(
    request: Request,
    name: ModelNameDep,
    ref: VersionRefDep,
    session: SessionDep,
    blobs: BlobStoreDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> Response:
    """The stored safetensors bytes, unchanged. ``Range`` requests resume.

    With ``STATEHUB_PRESIGN_FETCH`` on an S3 store, a whole-blob request is answered ``303``
    to a presigned URL (ranges are served here); ``X-Statehub-Digest`` is what to check.
    """
    principal.require("read", name)
    version = registry.get_version(session=session, name=name, ref=ref)
    return blob_response(
        request,
        blobs,
        settings,
        digest=version.digest,
        size=version.size,
        extents=version.extents,
        filename=f"{name.name}-{version.number}.safetensors",
    )


def blob_response(
    request: Request,
    blobs: BlobStore,
    settings: Settings,
    *,
    digest: str,
    size: int,
    extents: list[Any] | None,
    filename: str,
) -> Response:
    """Stored bytes as they are (a version's blob, a file of a version): Range and If-Range,
    a presigned redirect where configured, checked against the digest; HEAD gets the headers
    alone, from stored metadata."""
    etag = f'"{digest}"'
    headers = {"ETag": etag, "X-Statehub-Digest": digest, "X-Statehub-Body-Digest": digest}
    if etag_matches(request.headers.get("if-none-match"), digest):  # the client has it
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if_range = request.headers.get("if-range")
    wanted = request.headers.get("range") if range_applies(if_range, digest) else None
    byte_range = parse_range(wanted, size)
    start, end = byte_range or (0, size)
    headers |= {
        "Accept-Ranges": "bytes",
        "Content-Length": str(end - start),
        "Content-Disposition": f'attachment; filename="{filename}"',
    }
    if byte_range:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    status_code = 206 if byte_range else 200
    if request.method == "HEAD":
        return Response(status_code=status_code, headers=headers)
    if extents is None and blobs.size(digest) != size:  # fail now, not mid-body
        raise StorageError(f"stored blob {digest} has the wrong size", detail={"digest": digest})
    if settings.presign_fetch and byte_range is None and extents is None:
        url = blobs.presigned_url(digest, settings.presign_expires_s)  # None: a local store
        if url is not None:  # the client fetches it without its token and checks the digest
            metrics.PRESIGNED_REDIRECTS.inc("blob")
            redirect = {k: v for k, v in headers.items() if k.startswith(("ETag", "X-"))}
            redirect |= {"Location": url, "Cache-Control": "private, no-store"}
            return Response(status_code=status.HTTP_303_SEE_OTHER, headers=redirect)
    # Checked against its digest: before the response when small, else while streaming.
    source = VerifiedBlob(
        version_bytes(blobs, digest, extents),
        digest,
        size,
        buffer_limit=settings.verify_buffer_bytes,
        whole_in_order=True,
        client_verifies=client_verifies(request.headers.get(CLIENT_VERIFIES)),
    )
    return StreamingResponse(
        source.iter_range(digest, start, end, settings.stream_chunk_bytes),
        status_code=status_code,
        media_type="application/octet-stream",
        headers=headers,
    )


aliases_router = APIRouter(prefix="/v1/models", tags=["aliases"], route_class=AuthFirstRoute)


@aliases_router.get("/{namespace}/{name}/aliases", response_model=list[AliasOut])
def list_aliases(
    name: ModelNameDep, session: SessionDep, principal: PrincipalDep
) -> list[AliasOut]:
    principal.require("read", name)
    model = repo.get_model(session, name)
    return [
        AliasOut(model=str(name), alias=a.name, version=a.version.number)
        for a in model.aliases
        if a.version.deleted_at is None
    ]


@aliases_router.put("/{namespace}/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(
    name: ModelNameDep, alias: str, body: AliasSet, session: SessionDep, principal: PrincipalDep
) -> AliasOut:
    principal.require("write", name)
    alias, version = registry.set_alias(
        session=session, name=name, alias=alias, number=body.version, actor=principal.actor
    )
    return AliasOut(model=str(name), alias=alias, version=version.number)


@aliases_router.delete(
    "/{namespace}/{name}/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT
)
def delete_alias(
    name: ModelNameDep, alias: str, session: SessionDep, principal: PrincipalDep
) -> Response:
    principal.require("write", name)
    registry.delete_alias(session=session, name=name, alias=alias, actor=principal.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
