"""Declarative adapters: register, list, get, delete. Rules are JSON, never code."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Response, status

from service import registry
from service.api.deps import ActorDep, SessionDep
from service.api.schemas import AdapterOut
from service.storage import repositories as repo

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=AdapterOut)
def register_adapter(
    session: SessionDep, actor: ActorDep, body: dict[str, Any] = Body(...)
) -> AdapterOut:
    """Register an adapter; registering an existing name adds its next version."""
    return AdapterOut.of(registry.register_adapter(session=session, data=body, actor=actor))


@router.get("", response_model=list[AdapterOut])
def list_adapters(session: SessionDep) -> list[AdapterOut]:
    """The newest version of every adapter."""
    return [AdapterOut.of(a) for a in repo.latest_adapters(session)]


@router.get("/{name}", response_model=list[AdapterOut])
def get_adapter(name: str, session: SessionDep) -> list[AdapterOut]:
    """Every version of one adapter, oldest first."""
    return [AdapterOut.of(a) for a in registry.get_adapter(session=session, name=name)]


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_adapter(name: str, session: SessionDep, actor: ActorDep) -> Response:
    registry.delete_adapter(session=session, name=name, actor=actor)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
