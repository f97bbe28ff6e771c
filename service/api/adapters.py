"""Declarative adapters: register, list, get, delete. Rules are JSON, never code.

Adapters are global (one may apply to any team's fetches), so changing them needs
``admin:*``; any valid token may list and read them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Response, status

from service import registry
from service.api.bodies import AuthFirstRoute
from service.api.deps import PrincipalDep, SessionDep
from service.api.schemas import AdapterOut
from service.recipes import builtin_recipes
from service.storage import repositories as repo

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], route_class=AuthFirstRoute)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AdapterOut)
def register_adapter(
    session: SessionDep, principal: PrincipalDep, body: dict[str, Any] = Body(...)
) -> AdapterOut:
    """Register an adapter; registering an existing name adds its next version. ``admin:*``."""
    name = str(body.get("name", ""))[:96]
    principal.require_global("admin", object_type="adapter", object_ref=name)
    adapter = registry.register_adapter(session=session, data=body, actor=principal.actor)
    return AdapterOut.of(adapter)


@router.get("", response_model=list[AdapterOut])
def list_adapters(session: SessionDep, principal: PrincipalDep) -> list[AdapterOut]:
    """The newest version of every adapter."""
    return [AdapterOut.of(a) for a in repo.latest_adapters(session)]


@router.get("/builtin")
def list_builtin_recipes(principal: PrincipalDep) -> list[dict[str, Any]]:
    """The built-in recipes: adapter rules that apply by themselves where their layout
    signature matches the checkpoint and the model (policy ``builtin: false`` turns them
    off; ``adapters: [name]`` applies one by name)."""
    return [recipe.to_json() for recipe in builtin_recipes()]


@router.get("/{name}", response_model=list[AdapterOut])
def get_adapter(name: str, session: SessionDep, principal: PrincipalDep) -> list[AdapterOut]:
    """Every version of one adapter, oldest first."""
    return [AdapterOut.of(a) for a in registry.get_adapter(session=session, name=name)]


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_adapter(name: str, session: SessionDep, principal: PrincipalDep) -> Response:
    """Delete every version of an adapter. ``admin:*``."""
    principal.require_global("admin", object_type="adapter", object_ref=name[:96])
    registry.delete_adapter(session=session, name=name, actor=principal.actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
