"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.core.names import ModelName, VersionRef
from service.settings import Settings
from service.storage.blobs import BlobStore
from service.storage.db import Database


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Database:
    return request.app.state.db


def get_blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.session() as session:
        yield session


def get_actor(request: Request) -> str:
    # Tokens come with the access-control work; until then every caller is anonymous.
    return "anonymous"


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
ActorDep = Annotated[str, Depends(get_actor)]
ModelNameDep = Annotated[ModelName, Depends(model_name)]
VersionRefDep = Annotated[VersionRef, Depends(version_ref)]
