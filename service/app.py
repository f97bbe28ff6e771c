"""The FastAPI application: routers, the one error mapping, request ids, lifespan."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth, metrics, ui
from service.api import adapters, admin, files, fitting, hub, models, tensors, tokens, uploads
from service.api.bodies import takes_raw_body
from service.errors import HubNotFound, StatehubError, StorageError, TooLarge, Unauthorized
from service.observability import Drain, RequestContextMiddleware, request_id_var
from service.settings import Settings
from service.storage import db as database
from service.storage.blobs import open_blob_store
from service.storage.db import safe_url

log = logging.getLogger("statehub")

HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody receives it; not a 5xx


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.effective_spool_dir.mkdir(parents=True, exist_ok=True)
        if settings.migrate_on_start:
            database.upgrade(settings.effective_database_url)
        app.state.settings = settings
        app.state.db = database.Database(settings.effective_database_url)
        app.state.blobs = open_blob_store(settings)
        app.state.access = auth.start(settings, app.state.db)  # refuses an open non-loopback
        log.info(
            "statehub ready",
            extra={
                "database": safe_url(settings.effective_database_url),
                "blobs": repr(app.state.blobs),
                "migrate_on_start": settings.migrate_on_start,
            },
        )
        try:
            yield
        finally:
            app.state.db.dispose()

    app = FastAPI(
        title="statehub",
        version="1",
        summary="A registry that fits stored PyTorch checkpoints to the model that asks.",
        lifespan=lifespan,
    )
    app.include_router(models.router)
    app.include_router(models.aliases_router)
    app.include_router(fitting.router)
    app.include_router(tensors.router)
    app.include_router(files.router)
    app.include_router(uploads.router)
    app.include_router(hub.router)
    app.include_router(adapters.router)
    app.include_router(tokens.router)
    app.include_router(admin.router)
    app.mount("/ui/static", ui.static_files(), name="ui-static")  # before the UI catch-all
    app.include_router(ui.router)
    _add_health_routes(app)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_spec_bytes)
    app.state.drain = Drain()
    app.add_middleware(RequestContextMiddleware, drain=app.state.drain)  # outermost
    return app


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """The database and the blob store answer, and the process is not shutting down."""
        if request.app.state.drain.active:
            return JSONResponse({"status": "shutting_down", "checks": {}}, status_code=503)
        checks: dict[str, str] = {}
        for name, check in (
            ("database", request.app.state.db.check),
            ("blobs", request.app.state.blobs.check),
        ):
            try:
                check()
                checks[name] = "ok"
            except StatehubError as exc:
                checks[name] = exc.message
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics() -> Response:
        """Prometheus text format: requests, latencies, bytes, verdicts, storage errors."""
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


def error_response(
    request: Request, status: int, code: str, message: str, detail: dict[str, Any]
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "") or request_id_var.get()
    headers = {"X-Error-Code": code, "X-Request-ID": request_id}
    if status == 503:
        headers["Retry-After"] = "5"
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="statehub"'
    body = {"error": {"code": code, "message": message, "detail": detail}}
    return ErrorJSONResponse(body, status_code=status, headers=headers)


class ErrorJSONResponse(JSONResponse):
    """An error body, ASCII-escaped: a message or detail may echo what the client sent
    (an unpaired surrogate too), and rendering it must never fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StatehubError)
    async def statehub_error(request: Request, exc: StatehubError) -> JSONResponse:
        if isinstance(exc, StorageError):
            metrics.STORAGE_ERRORS.inc(exc.code)
        if exc.status >= 500:
            log.error("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ or exc)
        response = error_response(request, exc.status, exc.code, exc.message, exc.detail)
        hub_code = exc.hub_code if isinstance(exc, HubNotFound) else None
        if isinstance(exc, Unauthorized) and request.url.path.startswith("/hf/"):
            hub_code = "RepoNotFound"  # as the Hub answers for a private repo without a token
        if hub_code is not None:  # the Hub's clients read their own error codes
            response.headers["X-Error-Code"] = hub_code
            response.headers["X-Error-Message"] = exc.message.encode("ascii", "replace").decode()
            if isinstance(exc, HubNotFound) and exc.commit:
                response.headers["X-Repo-Commit"] = exc.commit
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client's doing, not the server's: no traceback, counted as 499 (not a 5xx).
        log.info(
            "client disconnected before its request body was complete",
            extra={"method": request.method, "path": request.url.path},
        )
        message = "the client closed the connection mid-request"
        return error_response(request, CLIENT_CLOSED, "client_disconnected", message, {})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(
            request, 422, "invalid_request", f"{where}: {first['msg']}", {"errors": errors}
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__  # FastAPI answers 400 for whatever failed while reading a body
        if isinstance(cause, StatehubError):
            return await statehub_error(request, cause)
        if isinstance(cause, ClientDisconnect):
            return await client_disconnected(request, cause)
        code = HTTP_CODES.get(exc.status_code, "invalid_request")
        return error_response(request, exc.status_code, code, str(exc.detail), {})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(request, 500, "internal", "internal server error", {})


class BodyLimitMiddleware:
    """Bounds JSON request bodies (specs, policies); routes marked ``raw_body`` spool their
    uploads under ``max_upload_bytes`` instead (service.api.bodies)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if takes_raw_body(scope):  # uploads: spooled, bounded by max_upload_bytes
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise TooLarge(f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = error_response(
            request,
            413,
            TooLarge.code,
            f"request body exceeds the limit of {self.max_bytes} bytes",
            {"limit": self.max_bytes},
        )
        await response(scope, receive, send)
