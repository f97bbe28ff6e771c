"""Queries over the metadata schema. Each takes an explicit session; none commits."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    delete,
    false,
    func,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, undefer

from service.core.access import Scope
from service.core.names import LATEST, ModelName, VersionRef
from service.core.repo_files import FileEntry
from service.errors import Conflict, NotFound
from service.storage.models import (
    Adapter,
    Alias,
    AuditEvent,
    BlobLease,
    BlobRef,
    ComposedFile,
    ComposedFilePart,
    FitCacheEntry,
    Model,
    StoredTensor,
    Token,
    Version,
    VersionFile,
    utcnow,
)


def find_model(session: Session, name: ModelName, *, include_deleted: bool = False) -> Model | None:
    statement = select(Model).where(Model.namespace == name.namespace, Model.name == name.name)
    if not include_deleted:
        statement = statement.where(Model.deleted_at.is_(None))
    return session.scalar(statement)


def get_model(session: Session, name: ModelName) -> Model:
    model = find_model(session, name)
    if model is None:
        raise NotFound(f"model {name} does not exist", detail={"model": str(name)})
    return model


def get_or_create_model(session: Session, name: ModelName, *, actor: str) -> Model:
    """The model, created on first upload; a concurrent creator wins without an error.

    Raises:
        Conflict: the model is soft-deleted (restore it, or delete it for good, first).
    """
    model = find_model(session, name, include_deleted=True)
    if model is None:
        try:
            with session.begin_nested():
                model = Model(namespace=name.namespace, name=name.name, created_by=actor, tags=[])
                session.add(model)
            return model
        except IntegrityError:
            model = find_model(session, name, include_deleted=True)
            assert model is not None
    if model.deleted_at is not None:
        raise deleted_model_conflict(name)
    return model


def deleted_model_conflict(name: ModelName) -> Conflict:
    return Conflict(
        f"model {name} is deleted: restore it (POST /v1/models/{name}/restore) or delete it "
        f"for good (DELETE /v1/models/{name}?hard=true) before using its name again",
        detail={"model": str(name), "deleted": True},
    )


def visible_models(readable: Sequence[Scope] | None) -> ColumnElement[bool]:
    """A condition on ``Model`` for the models a caller may read (None: every model)."""
    if readable is None:
        return true()
    conditions = [
        Model.namespace == s.namespace
        if s.name is None
        else and_(Model.namespace == s.namespace, Model.name == s.name)
        for s in readable
    ]
    return or_(*conditions) if conditions else false()


def list_models(
    session: Session,
    *,
    query: str | None,
    namespace: str | None,
    tag: str | None,
    arch_fp: str | None,
    limit: int,
    offset: int,
    readable: Sequence[Scope] | None = None,
) -> tuple[list[Model], int]:
    if any("\x00" in f for f in (query, namespace, tag, arch_fp) if f):
        return [], 0  # no stored string holds NUL, and PostgreSQL would refuse the query
    statement = select(Model).where(Model.deleted_at.is_(None), visible_models(readable))
    if query:
        pattern = f"%{query.lower()}%"
        statement = statement.where(
            or_(func.lower(Model.name).like(pattern), func.lower(Model.description).like(pattern))
        )
    if namespace:
        statement = statement.where(Model.namespace == namespace)
    if arch_fp:
        statement = statement.where(
            Model.id.in_(
                select(Version.model_id).where(
                    Version.arch_fp == arch_fp, Version.deleted_at.is_(None)
                )
            )
        )
    models = list(session.scalars(statement.order_by(Model.namespace, Model.name)))
    if tag:  # tags are a JSON list; filtered here to stay portable across SQLite and PostgreSQL
        models = [m for m in models if tag in (m.tags or [])]
    return models[offset : offset + limit], len(models)


def lock_model(session: Session, model: Model) -> None:
    """Hold the model's row until the commit, so that a check-then-insert (a push looking
    for a version of the same digest) is not raced by a concurrent one. A no-op UPDATE:
    PostgreSQL locks the row; SQLite (whose SELECT FOR UPDATE does not exist) takes its
    database write lock, which a deferred transaction otherwise takes only at the insert."""
    session.execute(
        update(Model).where(Model.id == model.id).values(last_version=Model.last_version)
    )


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
    return session.scalar(_live_with_digest(model, digest).limit(1))


def find_same_push(
    session: Session, model: Model, digest: str, files_digest: str | None
) -> Version | None:
    """The live version a push of these weights and files (None: none) would repeat."""
    same_files = (
        Version.files_digest.is_(None)
        if files_digest is None
        else Version.files_digest == files_digest
    )
    return session.scalar(_live_with_digest(model, digest).where(same_files).limit(1))


def _live_with_digest(model: Model, digest: str) -> Select[Version]:
    return (
        select(Version)
        .options(selectinload(Version.model))
        .where(Version.model_id == model.id, Version.digest == digest, Version.deleted_at.is_(None))
        .order_by(Version.number)
    )


def add_version_files(session: Session, version: Version, files: Iterable[FileEntry]) -> None:
    session.add_all(
        VersionFile(version_id=version.id, path=f.path, size=f.size, sha256=f.sha256) for f in files
    )


def version_files(session: Session, version: Version) -> list[VersionFile]:
    return list(
        session.scalars(
            select(VersionFile)
            .where(VersionFile.version_id == version.id)
            .order_by(VersionFile.path)
        )
    )


def composed_files(session: Session, hashes: Iterable[str]) -> dict[str, ComposedFile]:
    """The composed files among these sha256s (a file stored as ranges of other blobs)."""
    return _by_sha256(session, ComposedFile, hashes)


def composed_extents(session: Session, sha256: str) -> list[Any] | None:
    """How a file's bytes are stored: None for a blob of its own, else its extents."""
    row = session.get(ComposedFile, sha256)
    return None if row is None else list(row.extents)


def add_composed_file(
    session: Session, sha256: str, size: int, extents: Sequence[Any], parts: Iterable[str]
) -> None:
    """Record a composed file; one recorded already (the same bytes again) stays as it is.
    Under the file's lock (the transaction's first statement), so two pushes composing the
    same file at once record it once."""
    lock_blob(session, sha256)
    if session.get(ComposedFile, sha256) is not None:
        return
    session.add(ComposedFile(sha256=sha256, size=size, extents=list(extents)))
    session.flush()
    session.add_all(ComposedFilePart(file_sha256=sha256, blob_digest=b) for b in sorted(set(parts)))


def stale_composed_files(session: Session, *, before: datetime) -> list[str]:
    """Composed files no version file names, recorded before ``before`` (gc's candidates)."""
    named = select(VersionFile.sha256).where(VersionFile.sha256 == ComposedFile.sha256)
    statement = select(ComposedFile.sha256).where(ComposedFile.created_at < before, ~named.exists())
    return list(session.scalars(statement.order_by(ComposedFile.sha256)))


def delete_composed_file(session: Session, sha256: str) -> None:
    session.execute(delete(ComposedFilePart).where(ComposedFilePart.file_sha256 == sha256))
    session.execute(delete(ComposedFile).where(ComposedFile.sha256 == sha256))


def version_file(session: Session, version: Version, path: str) -> VersionFile:
    found = session.get(VersionFile, (version.id, path))
    if found is None:
        raise NotFound(
            f"version {version.number} has no file {path!r}",
            detail={"path": path},
        )
    return found


def resolve_version(
    session: Session, model: Model, ref: VersionRef, *, include_deleted: bool = False
) -> Version:
    """The version ``ref`` names; soft-deleted versions only by number and on request."""
    if ref.number is not None:
        version = session.scalar(
            select(Version).where(Version.model_id == model.id, Version.number == ref.number)
        )
    elif ref.digest is not None:
        version = find_version_by_digest(session, model, ref.digest)
    else:
        alias = session.get(Alias, (model.id, ref.alias or LATEST))
        version = alias.version if alias else None
    if version is not None and version.deleted_at is not None and not include_deleted:
        version = None
    if version is None:
        raise NotFound(
            f"{model.namespace}/{model.name} has no version {ref}",
            detail={"model": f"{model.namespace}/{model.name}", "ref": str(ref)},
        )
    return version


def list_versions(session: Session, model: Model) -> Sequence[Version]:
    return session.scalars(
        select(Version)
        .where(Version.model_id == model.id, Version.deleted_at.is_(None))
        .order_by(Version.number)
    ).all()


def newest_version(session: Session, model: Model) -> Version | None:
    return session.scalar(
        select(Version)
        .where(Version.model_id == model.id, Version.deleted_at.is_(None))
        .order_by(Version.number.desc())
        .limit(1)
    )


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
    session: Session,
    *,
    arch_fp: str,
    shape_fp: str,
    limit: int,
    readable: Sequence[Scope] | None = None,
) -> Sequence[Version]:
    """Versions worth planning against a target: same fingerprints first, then the rest.

    Only live versions of live models the caller may read (``readable``; None: all).
    """
    exact = (Version.arch_fp == arch_fp) | (Version.shape_fp == shape_fp)
    ordered = (
        select(Version)
        .join(Model, Version.model_id == Model.id)
        .where(Version.deleted_at.is_(None), Model.deleted_at.is_(None), visible_models(readable))
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


# -- tokens -----------------------------------------------------------------------------


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits: a plain sha256 cannot be reversed or brute-forced.
    return hashlib.sha256(token.encode()).hexdigest()


def find_token_by_value(session: Session, token: str) -> Token | None:
    return session.scalar(select(Token).where(Token.token_hash == hash_token(token)))


def any_token(session: Session) -> bool:
    """Whether a token was ever created (revoked ones count: revoking never reopens)."""
    return session.scalar(select(Token.id).limit(1)) is not None


def list_tokens(session: Session) -> Sequence[Token]:
    return session.scalars(select(Token).order_by(Token.id)).all()


def get_token(session: Session, token_id: int) -> Token:
    token = session.get(Token, token_id)
    if token is None:
        raise NotFound(f"token {token_id} does not exist", detail={"token": token_id})
    return token


# -- blob leases (gc safety) ------------------------------------------------------------


def lock_blob(session: Session, digest: str) -> None:
    """Serialise gc's check-and-delete of ``digest`` with uploads taking a lease on it.

    Held until the transaction ends. PostgreSQL: a transaction-level advisory lock on the
    digest. SQLite: the database write lock (a write statement takes it, even one that
    changes nothing), so this must be the transaction's first statement.
    """
    if session.get_bind().dialect.name == "postgresql":
        key = int(digest[:15], 16)  # 60 bits: fits PostgreSQL's signed bigint
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
    else:
        session.execute(delete(BlobLease).where(BlobLease.id < 0))


def take_lease(session: Session, digest: str, *, ttl: timedelta) -> BlobLease:
    lock_blob(session, digest)
    now = utcnow()
    lease = BlobLease(digest=digest, created_at=now, expires_at=now + ttl)
    session.add(lease)
    session.flush()
    return lease


def release_lease(session: Session, lease_id: int) -> None:
    session.execute(delete(BlobLease).where(BlobLease.id == lease_id))


def blob_in_use(session: Session, digest: str, *, now: datetime) -> bool:
    """Referenced by a version (soft-deleted ones included: they can be restored), read by
    a composed version or a composed file, a file of a version, holding a cached fetch body,
    or leased."""
    for column, key in (
        (Version.id, Version.digest),
        (BlobRef.version_id, BlobRef.blob_digest),
        (FitCacheEntry.etag, FitCacheEntry.digest),
        (VersionFile.version_id, VersionFile.sha256),
        (ComposedFilePart.file_sha256, ComposedFilePart.blob_digest),
    ):
        if session.scalar(select(column).where(key == digest).limit(1)) is not None:
            return True
    leased = session.scalar(
        select(BlobLease.id).where(BlobLease.digest == digest, BlobLease.expires_at > now).limit(1)
    )
    return leased is not None


def digests_in_use(session: Session, *, now: datetime) -> set[str]:
    versions = session.scalars(select(Version.digest).distinct())
    refs = session.scalars(select(BlobRef.blob_digest).distinct())
    cached = session.scalars(select(FitCacheEntry.digest).distinct())
    files = session.scalars(select(VersionFile.sha256).distinct())
    parts = session.scalars(select(ComposedFilePart.blob_digest).distinct())
    leases = session.scalars(select(BlobLease.digest).where(BlobLease.expires_at > now))
    return set(versions) | set(refs) | set(cached) | set(files) | set(parts) | set(leases)


def forget_stored_tensors(session: Session, blob_digest: str) -> None:
    """The blob is going: tensors found only in it are no longer stored."""
    session.execute(delete(StoredTensor).where(StoredTensor.blob_digest == blob_digest))


def delete_expired_leases(session: Session, *, now: datetime) -> int:
    result = session.execute(delete(BlobLease).where(BlobLease.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)


# -- tensor-level deduplication ------------------------------------------------------------

IN_BATCH = 500  # values per IN (...) list: well under every driver's parameter limit


def find_stored_tensors(session: Session, hashes: Iterable[str]) -> dict[str, StoredTensor]:
    """Where each of these tensor hashes is stored, for those that are."""
    return _by_sha256(session, StoredTensor, hashes)


_Row = TypeVar("_Row", StoredTensor, ComposedFile)


def _by_sha256(session: Session, table: type[_Row], hashes: Iterable[str]) -> dict[str, _Row]:
    """The rows of ``table`` keyed by these sha256s, for those it holds (IN lists batched)."""
    wanted = sorted(set(hashes))
    found: dict[str, _Row] = {}
    for i in range(0, len(wanted), IN_BATCH):
        batch = wanted[i : i + IN_BATCH]
        for row in session.scalars(select(table).where(table.sha256.in_(batch))):
            found[row.sha256] = row
    return found


def tensors_in_blob(session: Session, blob_digest: str) -> dict[int, tuple[str, int]]:
    """The tensors recorded as lying in this blob: start -> (sha256, size)."""
    statement = select(StoredTensor.start, StoredTensor.sha256, StoredTensor.size).where(
        StoredTensor.blob_digest == blob_digest
    )
    return {start: (sha, size) for start, sha, size in session.execute(statement)}


def index_stored_tensors(session: Session, rows: Iterable[tuple[str, str, int, int]]) -> None:
    """Record (sha256, blob digest, start, size) rows; a hash already stored keeps its place."""
    values = [
        {"sha256": sha, "blob_digest": blob, "start": start, "size": size, "created_at": utcnow()}
        for sha, blob, start, size in rows
    ]
    if not values:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql_insert if dialect == "postgresql" else sqlite_insert
    for i in range(0, len(values), IN_BATCH):
        statement = insert_fn(StoredTensor).values(values[i : i + IN_BATCH])
        session.execute(statement.on_conflict_do_nothing(index_elements=["sha256"]))


def add_blob_refs(session: Session, version: Version, digests: Iterable[str]) -> None:
    for digest in sorted(set(digests)):
        session.add(BlobRef(version_id=version.id, blob_digest=digest))
