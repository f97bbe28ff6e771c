"""Bearer tokens: create (the value is shown once), list, revoke.

Managing tokens needs an ``admin`` scope; a caller creates, sees and revokes only tokens
whose every scope it holds with ``admin`` (``admin:*`` manages all of them), so no token
mints a stronger one. Tokens it does not administer read as missing.
"""

from __future__ import annotations

from fastapi import APIRouter, Path, status

from service import auth
from service.api.bodies import AuthFirstRoute
from service.api.deps import Caller, PrincipalDep, SessionDep
from service.api.schemas import TokenCreate, TokenCreated, TokenOut
from service.errors import Forbidden, NotFound

router = APIRouter(prefix="/v1/tokens", tags=["tokens"], route_class=AuthFirstRoute)


def _require_some_admin(principal: Caller, ref: str) -> None:
    if not principal.principal.administers_anything():
        principal.deny(
            Forbidden("managing tokens needs an admin scope", detail={"required": "admin"}),
            object_type="token",
            object_ref=ref,
        )


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> TokenCreated:
    """A new token; ``token`` in the response is its value, which is never shown again."""
    _require_some_admin(principal, body.name)
    try:
        created = auth.create_token(
            session=session,
            principal=principal.principal,
            name=body.name,
            scopes=body.scopes,
            expires_at=body.expires_at,
        )
    except Forbidden as exc:
        principal.deny(exc, object_type="token", object_ref=body.name)
    return TokenCreated(**TokenOut.of(created.token).model_dump(), token=created.value)


@router.get("", response_model=list[TokenOut])
def list_tokens(session: SessionDep, principal: PrincipalDep) -> list[TokenOut]:
    """The tokens the caller administers, revoked ones included (never their values)."""
    _require_some_admin(principal, "*")
    tokens = auth.visible_tokens(session=session, principal=principal.principal)
    return [TokenOut.of(t) for t in tokens]


@router.delete("/{token_id}", response_model=TokenOut)
def revoke_token(
    session: SessionDep, principal: PrincipalDep, token_id: int = Path(ge=1, le=2**62)
) -> TokenOut:
    """Revoke a token (idempotent); it fails authentication from the next request on."""
    _require_some_admin(principal, str(token_id))
    try:
        token = auth.revoke_token(session=session, principal=principal.principal, token_id=token_id)
    except NotFound as exc:  # missing, or not this caller's to manage: audited alike
        principal.deny(exc, object_type="token", object_ref=str(token_id))
    return TokenOut.of(token)
