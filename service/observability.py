"""Request context, structured logs and request metrics.

- Every HTTP request gets an id: the caller's ``X-Request-ID`` when it is sane, a fresh one
  otherwise. It is echoed on the response and held in a contextvar, so every log line
  written while the request is served (thread-pool routes and streamed bodies included)
  carries it.
- Logs are one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, ``request_id``
  and any ``extra`` fields), or plain text for people (``STATEHUB_LOG_FORMAT=text``).
  Both pass through ``Redactor``: bearer tokens, ``Authorization`` values, ``token=`` /
  ``secret=`` style parameters, URL passwords and the configured secrets never reach a log;
  botocore's signer records (canonical requests, signatures) are dropped before that, so a
  presigned URL's ``X-Amz-Signature`` is never logged, even at debug level.
- ``RequestContextMiddleware`` counts and times each request by route *template* (bounded
  label values) and status, writes the access log, and refuses new work while draining.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import ShuttingDown
from service.settings import Settings

request_id_var: ContextVar[str] = ContextVar("statehub_request_id", default="")

access_log = logging.getLogger("statehub.access")

# Probes and scrapes are frequent and uninteresting: logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Still answered while draining: the orchestrator watches the drain through them.
DRAIN_PATHS = QUIET_PATHS
UNMATCHED_ROUTE = "<unmatched>"

# -- redaction ----------------------------------------------------------------------------

REDACTED = "[REDACTED]"
_KEY = r"[\w.-]*(?:token|secret[\w-]*|password|passwd|(?:api|private)[_-]?key|signature|credential)"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: <anything>   (headers, dict reprs, b'' values)
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*b?[\"']?)[^\"'\r\n,}]+"), rf"\1{REDACTED}"),
    # Bearer <token> wherever it appears
    (re.compile(r"(?i)\b(bearer)\s+[\w\-.~+/]+=*"), rf"\1 {REDACTED}"),
    # token=..., X-Amz-Signature=..., password=... (queries, forms, libpq strings)
    (re.compile(rf"(?i)\b({_KEY})=[^&\s\"',;]+"), rf"\1={REDACTED}"),
    # "token": "...", 'secret_access_key': '...'  (JSON and dict reprs)
    (re.compile(rf"(?i)([\"']{_KEY}[\"']\s*:\s*b?[\"'])[^\"']*"), rf"\1{REDACTED}"),
    # botocore's "Signature:\n<hex>" and any signature-like hex after "signature"
    (re.compile(r"(?i)(signature[\"']?\s*[:=]\s*[\"']?)[0-9a-f]{32,}"), rf"\1{REDACTED}"),
    # scheme://user:password@host
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s/]+@"), rf"\1{REDACTED}@"),
)


class Redactor:
    """Removes secrets from text: known values first, then anything shaped like one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is removed whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def settings_secrets(settings: Settings) -> list[str]:
    """Values of the settings that are secrets: named so, or a database URL's password."""
    found = []
    for name, value in settings.model_dump().items():
        secret = getattr(value, "get_secret_value", None)
        value = secret() if secret else value
        if isinstance(value, str) and re.search(r"secret|token|password", name):
            found.append(value)
    try:
        password = make_url(settings.database_url).password if settings.database_url else None
    except ArgumentError:
        password = None
    if password:
        found.append(str(password))
    return found


# -- log formats --------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "color_message",  # uvicorn's ANSI copy of msg
    "taskName",
}


# botocore's signer logs, at debug, the canonical request, the string to sign and the
# signature itself: for a presigned URL that signature is the credential a client holds
# until the URL expires. Its records are dropped whole; the redactor catches stray copies.
SIGNER_LOGGERS = ("botocore.auth", "botocore.signers")


class _SignerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        signer = record.name in SIGNER_LOGGERS or record.name.startswith("botocore.auth.")
        return not (signer and record.levelno < logging.INFO)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, every string value redacted."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps({k: self._clean(v) for k, v in entry.items()}, default=str)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.redact(str(value))


class TextFormatter(logging.Formatter):
    """``ts level logger [request id] message``, redacted: for a terminal."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


def configure_logging(settings: Settings) -> None:
    """Route every logger (uvicorn's included) to one redacting handler on stderr."""
    redact = Redactor(settings_secrets(settings))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_SignerFilter())
    handler.addFilter(_RequestIdFilter())
    json_logs = settings.log_format == "json"
    handler.setFormatter(JsonFormatter(redact) if json_logs else TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # SQLAlchemy logs every statement and row once its logger is enabled: that is what its
    # own ``echo`` flag is for, not the service's debug level.
    logging.getLogger("sqlalchemy").setLevel(max(root.level, logging.WARNING))
    logging.captureWarnings(True)


# -- request context ----------------------------------------------------------------------


class Drain:
    """Set once the process is told to stop: readiness fails, new requests are refused."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def begin(self) -> None:
        self._event.set()

    @property
    def active(self) -> bool:
        return self._event.is_set()


def request_id_from(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            incoming = value.decode("latin-1")
            if 0 < len(incoming) <= 128 and incoming.isprintable():
                return incoming
            break
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's path template (``/v1/models/{namespace}/{name}``), never the
    raw path: label values stay bounded whatever clients send."""
    route = scope.get("route")
    return str(getattr(route, "path", UNMATCHED_ROUTE))


class RequestContextMiddleware:
    """Request id, access log and request metrics for every HTTP request (outermost)."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope)
        # Not reset afterwards: each request runs in its own task and context, and the
        # error handlers outside this middleware still log with the id.
        request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status, sent = 500, 0  # 500 unless a response starts: an exception escaped

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        metrics.HTTP_IN_FLIGHT.inc()
        try:
            if self.drain.active and scope["path"] not in DRAIN_PATHS:
                await _refuse(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            metrics.HTTP_IN_FLIGHT.dec()
            self._record(scope, status, sent, time.perf_counter() - started)

    @staticmethod
    def _record(scope: Scope, status: int, sent: int, seconds: float) -> None:
        method, route = scope["method"], route_template(scope)
        metrics.HTTP_REQUESTS.inc(method, route, str(status))
        metrics.HTTP_LATENCY.observe(seconds, method, route, str(status))
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        if access_log.isEnabledFor(level):
            client = scope.get("client")
            access_log.log(
                level,
                "%s %s %s",
                method,
                scope["path"],  # never the query string: it may carry credentials
                status,
                extra={
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "bytes": sent,
                    "client": client[0] if client else None,
                },
            )


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    error = ShuttingDown("the server is shutting down; retry on another replica")
    body = {"error": {"code": error.code, "message": error.message, "detail": {}}}
    headers = {"X-Error-Code": error.code, "Retry-After": "1", "Connection": "close"}
    await JSONResponse(body, status_code=error.status, headers=headers)(scope, receive, send)
