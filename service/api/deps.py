"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated, NoReturn

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from service import metrics
from service.auth import AccessControl
from service.core.access import Action, Principal, Scope
from service.core.jsondata import storable_text
from service.core.names import ModelName, VersionRef
from service.errors import StatehubError, Unauthorized
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.db import Database
from service.storage.spool import Spooled, SpoolFile

log = logging.getLogger("statehub")


async def spool_request(request: Request, settings: Settings) -> Spooled:
    """The request body on the spool disk, hashed on the way (never whole in memory)."""
    length = request.headers.get("content-length")
    spool = SpoolFile(
        settings.effective_spool_dir,
        max_bytes=settings.max_upload_bytes,
        min_free_bytes=settings.spool_min_free_bytes,
        expected_bytes=int(length) if length and length.isdigit() else None,
    )
    try:
        async for chunk in request.stream():
            spool.write(chunk)
        spooled = spool.finish()
    except BaseException:
        spool.discard()
        raise
    metrics.BYTES_PUSHED.inc(amount=spooled.size)
    return spooled


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.session() as session:
        yield session


class Caller:
    """The principal of a request, and the one way routes ask for permission.

    Every denial (and every request without a valid token) is written to the audit log,
    in a transaction of its own: the request's own transaction rolls back.
    """

    def __init__(self, principal: Principal, request: Request) -> None:
        self.principal = principal
        self._request = request

    @property
    def actor(self) -> str:
        return self.principal.actor

    def require(self, action: Action, name: ModelName) -> None:
        """Raises ``NotFound`` for a read it may not make (what a missing model answers),
        ``Forbidden`` for a write or admin action it lacks (``service.core.access``)."""
        self._check(action, name, object_type="model", object_ref=str(name))

    def require_global(self, action: Action, *, object_type: str, object_ref: str) -> None:
        """``action`` over every namespace (``admin:*``): adapters, gc."""
        self._check(action, None, object_type=object_type, object_ref=object_ref)

    def readable(self) -> tuple[Scope, ...] | None:
        """What this caller may read, to filter lists and search; None: everything."""
        return self.principal.readable()

    def _check(
        self, action: Action, name: ModelName | None, *, object_type: str, object_ref: str
    ) -> None:
        error = self.principal.denial(action, name)
        if error is None:
            return
        audit_denial(self._request, self.actor, error, object_type, object_ref, action)
        raise error

    def deny(self, error: StatehubError, *, object_type: str, object_ref: str) -> NoReturn:
        """Audit and raise a denial decided by a use case (tokens)."""
        audit_denial(self._request, self.actor, error, object_type, object_ref, None)
        raise error


def audit_denial(
    request: Request,
    actor: str,
    error: StatehubError,
    object_type: str,
    object_ref: str,
    action: Action | None,
) -> None:
    # The path and the object come from the client (a %00 in the URL): recorded cleaned,
    # so that the audit write itself cannot fail on them.
    detail = {
        "status": error.status,
        "code": error.code,
        "method": request.method,
        "path": storable_text(request.url.path, limit=300),
        "required": action,
        "request_id": getattr(request.state, "request_id", ""),
    }
    try:
        with request.app.state.db.session() as session:
            repo.record_event(
                session,
                actor=actor,
                action="access.denied",
                object_type=object_type,
                object_ref=storable_text(object_ref, limit=300),
                detail=detail,
            )
    except Exception as exc:  # the denial stands whatever the audit write met
        metrics.AUDIT_WRITE_FAILURES.inc()
        message = exc.message if isinstance(exc, StatehubError) else repr(exc)[:500]
        log.warning("cannot audit a denied request (%s): %s", detail, message)


PRINCIPAL_STATE = "statehub_principal"


def _authenticate(request: Request) -> Principal:
    access: AccessControl = request.app.state.access
    try:
        return access.authenticate(request.headers.get("authorization"))
    except Unauthorized as exc:
        audit_denial(request, "unauthenticated", exc, "request", request.url.path, None)
        raise


async def authenticate_first(request: Request) -> None:
    """Authenticate before the body is read (``service.api.bodies.AuthFirstRoute``): a
    caller without a valid token gets its 401 without the server parsing a byte. The
    principal is kept for ``get_principal``; the database is read in a worker thread."""
    principal = await run_in_threadpool(_authenticate, request)
    setattr(request.state, PRINCIPAL_STATE, principal)


def get_principal(request: Request) -> Caller:
    """Authenticates the request (401 ``unauthorized`` without a valid token), or takes the
    principal ``authenticate_first`` found."""
    principal = getattr(request.state, PRINCIPAL_STATE, None)
    if principal is None:
        principal = _authenticate(request)
    return Caller(principal, request)


def model_name(namespace: str, name: str) -> ModelName:
    return ModelName.of(namespace, name)


def version_ref(ref: str) -> VersionRef:
    return VersionRef.parse(ref)


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_db)]
BlobStoreDep = Annotated[BlobStore, Depends(get_blobs)]
# "function" scope: the transaction commits before the response is sent, so a client that
# sees a success can rely on it (and the next request sees the change).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
PrincipalDep = Annotated[Caller, Depends(get_principal)]
ModelNameDep = Annotated[ModelName, Depends(model_name)]
VersionRefDep = Annotated[VersionRef, Depends(version_ref)]
