"""Queries over the metadata schema. Each takes an explicit session; none commits."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, undefer

from service.core.names import LATEST, ModelName, VersionRef
from service.errors import NotFound
from service.storage.models import Adapter, Alias, AuditEvent, Model, Version, utcnow


def find_model(session: Session, name: ModelName) -> Model | None:
    return session.scalar(
        select(Model).where(Model.namespace == name.namespace, Model.name == name.name)
    )


def get_model(session: Session, name: ModelName) -> Model:
    model = find_model(session, name)
    if model is None:
        raise NotFound(f"model {name} does not exist", detail={"model": str(name)})
    return model


def get_or_create_model(session: Session, name: ModelName, *, actor: str) -> Model:
    """The model, created on first upload; a concurrent creator wins without an error."""
    model = find_model(session, name)
    if model is not None:
        return model
    try:
        with session.begin_nested():
            model = Model(namespace=name.namespace, name=name.name, created_by=actor, tags=[])
            session.add(model)
        return model
    except IntegrityError:
        return get_model(session, name)


def list_models(
    session: Session,
    *,
    query: str | None,
    namespace: str | None,
    tag: str | None,
    arch_fp: str | None,
    limit: int,
    offset: int,
) -> tuple[list[Model], int]:
    statement = select(Model)
    if query:
        pattern = f"%{query.lower()}%"
        statement = statement.where(
            or_(func.lower(Model.name).like(pattern), func.lower(Model.description).like(pattern))
        )
    if namespace:
        statement = statement.where(Model.namespace == namespace)
    if arch_fp:
        statement = statement.where(
            Model.id.in_(select(Version.model_id).where(Version.arch_fp == arch_fp))
        )
    models = list(session.scalars(statement.order_by(Model.namespace, Model.name)))
    if tag:  # tags are a JSON list; filtered here to stay portable across SQLite and PostgreSQL
        models = [m for m in models if tag in (m.tags or [])]
    return models[offset : offset + limit], len(models)


def next_version_number(session: Session, model: Model) -> int:
    """Atomically take the next number: the UPDATE locks the row until the commit."""
    session.execute(
        update(Model)
        .where(Model.id == model.id)
        .values(last_version=Model.last_version + 1, updated_at=utcnow())
    )
    number = session.scalar(select(Model.last_version).where(Model.id == model.id))
    assert number is not None
    return number


def find_version_by_digest(session: Session, model: Model, digest: str) -> Version | None:
    return session.scalar(
        select(Version)
        .options(selectinload(Version.model))
        .where(Version.model_id == model.id, Version.digest == digest)
        .order_by(Version.number)
        .limit(1)
    )


def resolve_version(session: Session, model: Model, ref: VersionRef) -> Version:
    if ref.number is not None:
        version = session.scalar(
            select(Version).where(Version.model_id == model.id, Version.number == ref.number)
        )
    elif ref.digest is not None:
        version = find_version_by_digest(session, model, ref.digest)
    else:
        alias = session.get(Alias, (model.id, ref.alias or LATEST))
        version = alias.version if alias else None
    if version is None:
        raise NotFound(
            f"{model.namespace}/{model.name} has no version {ref}",
            detail={"model": f"{model.namespace}/{model.name}", "ref": str(ref)},
        )
    return version


def list_versions(session: Session, model: Model) -> Sequence[Version]:
    return session.scalars(
        select(Version).where(Version.model_id == model.id).order_by(Version.number)
    ).all()


def set_alias(session: Session, model: Model, alias: str, version: Version) -> Alias:
    row = session.get(Alias, (model.id, alias))
    if row is None:
        row = Alias(model_id=model.id, name=alias, version_id=version.id)
        session.add(row)
    else:
        row.version_id = version.id
        row.updated_at = utcnow()
    session.flush()
    return row


def aliases_by_version(session: Session, model: Model) -> dict[int, list[str]]:
    rows = session.execute(
        select(Alias.version_id, Alias.name).where(Alias.model_id == model.id).order_by(Alias.name)
    )
    result: dict[int, list[str]] = {}
    for version_id, name in rows:
        result.setdefault(version_id, []).append(name)
    return result


def candidate_versions(
    session: Session, *, arch_fp: str, shape_fp: str, limit: int
) -> Sequence[Version]:
    """Versions worth planning against a target: same fingerprints first, then the rest."""
    exact = (Version.arch_fp == arch_fp) | (Version.shape_fp == shape_fp)
    ordered = (
        select(Version)
        .options(selectinload(Version.model), undefer(Version.spec))
        .order_by(exact.desc(), Version.created_at.desc(), Version.id.desc())
        .limit(limit)
    )
    return session.scalars(ordered).all()


def latest_adapters(session: Session) -> list[Adapter]:
    """The newest version of every adapter name, in registration order."""
    newest = (
        select(Adapter.name, func.max(Adapter.version).label("version"))
        .group_by(Adapter.name)
        .subquery()
    )
    statement = (
        select(Adapter)
        .join(newest, (Adapter.name == newest.c.name) & (Adapter.version == newest.c.version))
        .order_by(Adapter.id)
    )
    return list(session.scalars(statement))


def adapter_versions(session: Session, name: str) -> list[Adapter]:
    return list(
        session.scalars(select(Adapter).where(Adapter.name == name).order_by(Adapter.version))
    )


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    object_type: str,
    object_ref: str,
    detail: dict[str, object] | None = None,
) -> None:
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            object_type=object_type,
            object_ref=object_ref[:300],
            detail=detail or {},
        )
    )
