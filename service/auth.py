"""Access control use cases: the auth mode, authentication, and tokens.

Modes (``STATEHUB_AUTH``):

- ``auto`` (default): tokens are enforced as soon as one exists (revoked ones count, so
  revoking every token never reopens the server) or ``STATEHUB_BOOTSTRAP_TOKEN`` is set.
  Without any, the server is *open*: every caller is ``anonymous`` and may do anything,
  and the server refuses to listen on anything but loopback.
- ``tokens``: always enforced; at a first start without any token an admin token is
  generated and written to the log once.

Tokens are ``shb_`` + 43 url-safe characters (256 random bits). The server keeps their
sha256 and their first 12 characters (to tell them apart), never the value.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from service.core.access import Principal, Scope, parse_scopes
from service.core.names import validate_segment
from service.errors import Forbidden, InvalidRequest, Misconfigured, NotFound, Unauthorized
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.db import Database
from service.storage.models import Token, utcnow

log = logging.getLogger("statehub")

TOKEN_PREFIX = "shb_"
SHOWN_CHARS = 12
BOOTSTRAP_NAME = "bootstrap"
ADMIN_ALL = "admin:*"
# last_used_at is written at most this often per token: not a write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)
ANONYMOUS = Principal(actor="anonymous", unrestricted=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def new_token_value() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def actor_of(token: Token) -> str:
    return f"{token.name} ({token.prefix})"


def token_scopes(token: Token) -> tuple[Scope, ...]:
    return tuple(Scope.parse(s) for s in token.scopes)


class AccessControl:
    """Whether tokens are enforced, and who the bearer of a request is."""

    def __init__(self, db: Database, *, enforced: bool) -> None:
        self._db = db
        self._enforced = enforced

    @property
    def enforced(self) -> bool:
        # Open mode looks again on every request: the first token created (through the API
        # of this or another process) closes the server at once. Once closed it stays so.
        if not self._enforced:
            with self._db.session() as session:
                self._enforced = repo.any_token(session)
        return self._enforced

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value.

        Raises:
            Unauthorized: tokens are enforced and the header holds no valid token.
        """
        if not self.enforced:
            return ANONYMOUS
        value = _bearer(authorization)
        with self._db.session() as session:
            token = repo.find_token_by_value(session, value)
            now = utcnow()
            if token is None:
                raise Unauthorized("unknown token")
            if token.revoked_at is not None:
                raise Unauthorized(f"token {token.prefix}... was revoked")
            if token.expires_at is not None and _aware(token.expires_at) <= now:
                raise Unauthorized(f"token {token.prefix}... has expired")
            if token.last_used_at is None or _aware(token.last_used_at) < now - (
                LAST_USED_RESOLUTION
            ):
                token.last_used_at = now
            return Principal(actor=actor_of(token), scopes=token_scopes(token), token_id=token.id)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized(
            "this server needs a token: send 'Authorization: Bearer <token>' "
            "(the client and CLI read STATEHUB_TOKEN)"
        )
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or len(value) > 200:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return value


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; they were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- start ------------------------------------------------------------------------------


def start(settings: Settings, db: Database) -> AccessControl:
    """Bootstrap tokens, decide the mode, refuse an open server off loopback; log the mode.

    Raises:
        Misconfigured: no token is configured and the server would listen beyond loopback.
    """
    generated = None
    with db.session() as session:
        if settings.bootstrap_token is not None:
            _ensure_bootstrap(session, settings.bootstrap_token.get_secret_value())
        exists = repo.any_token(session)
        if not exists and settings.auth == "tokens":
            generated = new_token_value()
            _add_admin_token(session, generated)
    enforced = exists or generated is not None
    if generated is not None:
        log.warning(
            "auth: no token existed, so an admin token was generated; it is shown this once, "
            "store it now: %s",
            generated,
        )
    if not enforced and not is_loopback(settings.host):
        message = (
            f"refusing to listen on {settings.host}: no token is configured, so the server "
            "would be open to anyone. Set STATEHUB_BOOTSTRAP_TOKEN (an admin token, 32+ "
            "random characters) or STATEHUB_AUTH=tokens (one is generated and logged once), "
            "or listen on 127.0.0.1"
        )
        log.critical(message)
        raise Misconfigured(message)
    if enforced:
        log.info("auth: bearer tokens required on every /v1 endpoint")
    else:
        log.warning(
            "auth: open (no token configured): every caller may do anything; listening on "
            "loopback (%s) only. Create a token to close it.",
            settings.host,
        )
    return AccessControl(db, enforced=enforced)


def _ensure_bootstrap(session: Session, value: str) -> None:
    existing = repo.find_token_by_value(session, value)
    if existing is None:
        _add_admin_token(session, value)
    elif existing.revoked_at is not None:
        log.warning("auth: STATEHUB_BOOTSTRAP_TOKEN was revoked; it stays revoked")


def _add_admin_token(session: Session, value: str) -> None:
    session.add(
        Token(
            name=BOOTSTRAP_NAME,
            prefix=value[:SHOWN_CHARS],
            token_hash=repo.hash_token(value),
            scopes=[ADMIN_ALL],
            created_by="server start",
        )
    )
    repo.record_event(
        session,
        actor="server start",
        action="token.create",
        object_type="token",
        object_ref=BOOTSTRAP_NAME,
        detail={"scopes": [ADMIN_ALL]},
    )
    session.flush()


# -- tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreatedToken:
    token: Token
    value: str  # shown once, in the response to the request that created it


def create_token(
    *,
    session: Session,
    principal: Principal,
    name: str,
    scopes: Sequence[str],
    expires_at: datetime | None,
) -> CreatedToken:
    """A new token with ``scopes``, which the caller must hold with ``admin``.

    Raises:
        InvalidName, InvalidRequest: a bad name, scope or expiry.
        Forbidden: a scope the caller does not administer (no token mints a stronger one).
    """
    validate_segment(name, what="token name")
    parsed = parse_scopes(scopes)
    if not principal.covers(parsed):
        raise Forbidden(
            "a token can only grant what its creator holds with admin scope",
            detail={"scopes": [str(s) for s in parsed]},
        )
    if expires_at is not None and _aware(expires_at) <= utcnow():
        raise InvalidRequest("expires_at is in the past", detail={"expires_at": str(expires_at)})
    value = new_token_value()
    token = Token(
        name=name,
        prefix=value[:SHOWN_CHARS],
        token_hash=repo.hash_token(value),
        scopes=[str(s) for s in parsed],
        created_by=principal.actor,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    repo.record_event(
        session,
        actor=principal.actor,
        action="token.create",
        object_type="token",
        object_ref=f"{token.id}",
        detail={"name": name, "prefix": token.prefix, "scopes": token.scopes},
    )
    return CreatedToken(token, value)


def visible_tokens(*, session: Session, principal: Principal) -> list[Token]:
    """The tokens the caller administers (every scope covered by one of its admin scopes)."""
    return [t for t in repo.list_tokens(session) if principal.covers(token_scopes(t))]


def revoke_token(*, session: Session, principal: Principal, token_id: int) -> Token:
    """Revoke a token the caller administers; others read as missing. Idempotent.

    Raises:
        NotFound: no such token, or one the caller does not administer.
    """
    token = session.get(Token, token_id)
    if token is None or not principal.covers(token_scopes(token)):
        raise NotFound(f"token {token_id} does not exist", detail={"token": token_id})
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        repo.record_event(
            session,
            actor=principal.actor,
            action="token.revoke",
            object_type="token",
            object_ref=f"{token.id}",
            detail={"name": token.name, "prefix": token.prefix},
        )
    return token
