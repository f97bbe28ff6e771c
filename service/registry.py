"""Registry use cases: models, versions (upload), aliases, adapters.

Every function takes its collaborators explicitly (keyword-only). Transactions belong to
``Database.session``; a version row is committed only after its blob is durable.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import dedup
from service.core.adapters import AdapterSpec, parse_adapter
from service.core.names import LATEST, ModelName, VersionRef, validate_alias, validate_segment
from service.core.repo_files import FileEntry, files_digest
from service.core.safetensors_format import Limits, SafetensorsHeader, parse_header
from service.errors import Conflict, InvalidAdapter, InvalidRequest, NotFound, TooLarge
from service.ingest import Ingested, check_stored, describe, ingest
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore, validate_digest
from service.storage.composed import Extent
from service.storage.db import Database
from service.storage.models import Adapter, Alias, Model, Version, utcnow
from service.storage.spool import Spooled, spool_bytes

log = logging.getLogger(__name__)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_header_bytes=settings.max_header_bytes,
        max_tensors=settings.max_tensors,
        max_rank=settings.max_rank,
        max_dim=settings.max_dim,
        max_key_length=settings.max_key_length,
    )


# -- models -----------------------------------------------------------------------------


def create_model(
    *, session: Session, name: ModelName, description: str, tags: list[str], actor: str
) -> Model:
    existing = repo.find_model(session, name, include_deleted=True)
    if existing is not None and existing.deleted_at is not None:
        raise repo.deleted_model_conflict(name)
    if existing is not None:
        raise Conflict(f"model {name} already exists", detail={"model": str(name)})
    for tag in tags:
        validate_segment(tag, what="tag")
    model = repo.get_or_create_model(session, name, actor=actor)
    model.description = description
    model.tags = sorted(set(tags))
    repo.record_event(
        session, actor=actor, action="model.create", object_type="model", object_ref=str(name)
    )
    session.flush()
    return model


def delete_model(*, session: Session, name: ModelName, actor: str, hard: bool) -> None:
    """Soft by default: the model and its versions vanish from every read until restored.

    ``hard`` removes the rows (a soft-deleted model too) for good; blobs stay until ``gc``
    finds them unreferenced.
    """
    model = repo.find_model(session, name, include_deleted=hard)
    if model is None:
        raise NotFound(f"model {name} does not exist", detail={"model": str(name)})
    if hard:
        session.delete(model)
    else:
        model.deleted_at = utcnow()
    repo.record_event(
        session,
        actor=actor,
        action="model.delete",
        object_type="model",
        object_ref=str(name),
        detail={"hard": hard},
    )


def restore_model(*, session: Session, name: ModelName, actor: str) -> Model:
    """Undo a soft delete (a no-op for a live model)."""
    model = repo.find_model(session, name, include_deleted=True)
    if model is None:
        raise NotFound(f"model {name} does not exist", detail={"model": str(name)})
    if model.deleted_at is not None:
        model.deleted_at = None
        repo.record_event(
            session, actor=actor, action="model.restore", object_type="model", object_ref=str(name)
        )
        session.flush()
    return model


# -- versions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    version: Version
    created: bool
    aliases: list[str]


def push_version(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    spooled: Spooled,
    metadata: dict[str, Any],
    alias: str | None,
    ema: bool,
    actor: str,
    files: Sequence[FileEntry] = (),
) -> PushResult:
    """Ingest a spooled upload, store its blob durably, then commit the version row (with
    ``files``, the files of a folder push whose weights these are).

    Identical bytes already stored as a version of this model are not stored again: that
    version is returned (``created=False``), which also makes a retried push harmless.
    """
    try:
        if alias is not None:
            validate_alias(alias)
        ingested = _ingest(spooled, settings=settings, ema=ema)
    except BaseException:
        spooled.path.unlink(missing_ok=True)  # the spool never keeps a refused upload
        raise
    try:
        # Leases keep gc from deleting a blob between the store's "already there" and the
        # commit of the version that references it (dedup.store_version takes them).
        hashes = dedup.hash_tensors(ingested.path, ingested.header)
        stored = dedup.store_version(
            db=db,
            blobs=blobs,
            settings=settings,
            path=ingested.path,
            header=ingested.header,
            hashes=hashes,
            digest=ingested.digest,
        )
        return commit_version(
            db,
            name,
            ingested,
            stored,
            hashes,
            metadata=metadata,
            alias=alias,
            actor=actor,
            files=files,
        )
    finally:
        ingested.path.unlink(missing_ok=True)


def compose_version(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    header_json: str,
    size: int,
    tensor_hashes: dict[str, str],
    metadata: dict[str, Any],
    alias: str | None,
    actor: str,
) -> PushResult:
    """A version from its safetensors header and the sha256 of every tensor, all of which
    the registry stores already (the client uploaded the missing ones first)."""
    if alias is not None:
        validate_alias(alias)
    header, hashes, spooled = composed_header(settings, header_json, size, tensor_hashes)
    stored: dedup.Stored | None = None
    try:
        stored, digest = dedup.compose_from_hashes(
            db=db,
            blobs=blobs,
            settings=settings,
            header_file=spooled,
            header=header,
            hashes=hashes,
        )
        ingested = Ingested(spooled.path, digest, size, header, "safetensors")
        describe(ingested, "safetensors")
        return commit_version(
            db, name, ingested, stored, hashes, metadata=metadata, alias=alias, actor=actor
        )
    finally:
        spooled.path.unlink(missing_ok=True)
        if stored is not None and stored.leases:
            dedup.release(db, stored.leases)


def composed_header(
    settings: Settings, header_json: str, size: int, tensor_hashes: dict[str, str]
) -> tuple[SafetensorsHeader, list[str], Spooled]:
    """A file to compose from stored tensors: its parsed header, each tensor's hash in data
    order, and the header's bytes (length prefix and JSON, as in the file) spooled; the
    caller removes the spool file."""
    limits = limits_from(settings)
    raw = header_json.encode()
    if len(raw) > limits.max_header_bytes:
        raise TooLarge(f"the header exceeds {limits.max_header_bytes} bytes")
    header = parse_header(raw, file_size=size, limits=limits)
    check_stored(header, limits)
    unknown = set(tensor_hashes) - {t.key for t in header.tensors}
    absent = [t.key for t in header.tensors if t.key not in tensor_hashes]
    if unknown or absent:
        raise InvalidRequest(
            "tensors must name every tensor of the header, and only those",
            detail={"not_in_header": sorted(unknown)[:50], "without_hash": absent[:50]},
        )
    hashes = [validate_digest(tensor_hashes[t.key]) for t in header.tensors]
    spooled = spool_bytes(
        settings.effective_spool_dir,
        struct.pack("<Q", len(raw)) + raw,
        min_free_bytes=settings.spool_min_free_bytes,
    )
    return header, hashes, spooled


def commit_version(
    db: Database,
    name: ModelName,
    ingested: Ingested,
    stored: dedup.Stored,
    hashes: list[str],
    *,
    metadata: dict[str, Any],
    alias: str | None,
    actor: str,
    files: Sequence[FileEntry] = (),
) -> PushResult:
    """The version row, what it reads, its new tensors and its files, and the leases'
    release: one transaction. The leases are released on a failure too."""
    ingested.report["storage"] = stored.report()
    try:
        with db.session() as session:
            result = _commit_version(
                session,
                name,
                ingested,
                hashes,
                metadata=metadata,
                alias=alias,
                actor=actor,
                extents=stored.extents,
                files_digest=files_digest(files) if files else None,
            )
            if result.created:
                dedup.record(session, result.version, stored)
                repo.add_version_files(session, result.version, files)
            for lease_id in stored.leases:
                repo.release_lease(session, lease_id)
    except BaseException:
        dedup.release(db, stored.leases)
        raise
    finally:
        stored.leases = []
    return result


def _commit_version(
    session: Session,
    name: ModelName,
    ingested: Ingested,
    hashes: list[str],
    *,
    metadata: dict[str, Any],
    alias: str | None,
    actor: str,
    extents: list[Extent] | None,
    files_digest: str | None,
) -> PushResult:
    model = repo.get_or_create_model(session, name, actor=actor)
    repo.lock_model(session, model)  # identical concurrent pushes: one version, not several
    existing = repo.find_same_push(session, model, ingested.digest, files_digest)
    if existing is not None:
        if alias is not None:
            repo.set_alias(session, model, alias, existing)
        aliases = repo.aliases_by_version(session, model).get(existing.id, [])
        repo.record_event(
            session,
            actor=actor,
            action="version.push_existing",
            object_type="version",
            object_ref=f"{name}:{existing.number}",
            detail={"digest": existing.digest, "alias": alias},
        )
        return PushResult(existing, created=False, aliases=aliases)
    version = _add_version(
        session, model, ingested, hashes, metadata=metadata, actor=actor, extents=extents
    )
    version.files_digest = files_digest  # flushed with the aliases below
    repo.set_alias(session, model, LATEST, version)
    if alias is not None:
        repo.set_alias(session, model, alias, version)
    aliases = repo.aliases_by_version(session, model).get(version.id, [])
    repo.record_event(
        session,
        actor=actor,
        action="version.create",
        object_type="version",
        object_ref=f"{name}:{version.number}",
        detail={"digest": version.digest, "size": version.size},
    )
    session.flush()
    return PushResult(version, created=True, aliases=aliases)


def _ingest(spooled: Spooled, *, settings: Settings, ema: bool) -> Ingested:
    try:
        return ingest(
            spooled,
            limits=limits_from(settings),
            work_dir=settings.effective_spool_dir,
            ema=ema,
        )
    except BaseException:
        spooled.path.unlink(missing_ok=True)
        raise


def _add_version(
    session: Session,
    model: Model,
    ingested: Ingested,
    hashes: list[str],
    *,
    metadata: dict[str, Any],
    actor: str,
    extents: list[Extent] | None,
) -> Version:
    header = ingested.header
    spec = header.spec(ingested.tie_groups)
    stored_spec = {
        "tensors": [
            {
                "key": t.key,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "offsets": [t.begin, t.end],
                "sha256": sha,
            }
            for t, sha in zip(header.tensors, hashes, strict=True)
        ],
        "tie_groups": ingested.tie_groups,
    }
    ingest_report = dict(ingested.report)
    if ingested.snapshot:
        ingest_report["snapshot"] = ingested.snapshot
    version = Version(
        model_id=model.id,  # not model=: that would load every version of the model
        number=repo.next_version_number(session, model),
        digest=ingested.digest,
        size=ingested.size,
        data_start=header.data_start,
        spec=stored_spec,
        arch_fp=spec.arch_fp,
        shape_fp=spec.shape_fp,
        tensor_count=len(spec),
        param_count=spec.param_count,
        source_format=ingested.source_format,
        ingest=ingest_report,
        user_metadata=metadata,
        created_by=actor,
        extents=[e.to_json() for e in extents] if extents is not None else None,
    )
    session.add(version)
    session.flush()
    session.refresh(version, attribute_names=["model"])  # usable after the session closes
    return version


def get_version(*, session: Session, name: ModelName, ref: VersionRef) -> Version:
    return repo.resolve_version(session, repo.get_model(session, name), ref)


def delete_version(
    *, session: Session, name: ModelName, ref: VersionRef, actor: str, hard: bool
) -> Version:
    """Soft by default: the version vanishes from reads, plans, fetches and search.

    ``hard`` removes the row for good (a soft-deleted version too, by number) with the
    aliases on it; its blob stays until ``gc`` finds it unreferenced. ``latest`` moves to
    the newest remaining version.
    """
    model = repo.get_model(session, name)
    version = repo.resolve_version(session, model, ref, include_deleted=hard)
    if hard:
        for row in session.scalars(select(Alias).where(Alias.version_id == version.id)):
            session.delete(row)
        session.delete(version)
    else:
        version.deleted_at = utcnow()
    session.flush()
    _move_latest(session, model)
    repo.record_event(
        session,
        actor=actor,
        action="version.delete",
        object_type="version",
        object_ref=f"{name}:{version.number}",
        detail={"hard": hard, "digest": version.digest},
    )
    return version


def restore_version(*, session: Session, name: ModelName, number: int, actor: str) -> Version:
    """Undo a soft delete (a no-op for a live version); ``latest`` follows if it is newest."""
    model = repo.get_model(session, name)
    version = repo.resolve_version(session, model, VersionRef(number=number), include_deleted=True)
    if version.deleted_at is not None:
        version.deleted_at = None
        session.flush()
        _move_latest(session, model)
        repo.record_event(
            session,
            actor=actor,
            action="version.restore",
            object_type="version",
            object_ref=f"{name}:{number}",
        )
    session.refresh(version, attribute_names=["model"])
    return version


def _move_latest(session: Session, model: Model) -> None:
    newest = repo.newest_version(session, model)
    if newest is not None:
        repo.set_alias(session, model, LATEST, newest)
        return
    row = session.get(Alias, (model.id, LATEST))
    if row is not None:
        session.delete(row)
        session.flush()


def set_alias(
    *, session: Session, name: ModelName, alias: str, number: int, actor: str
) -> tuple[str, Version]:
    validate_alias(alias)
    if alias == LATEST:
        raise InvalidRequest("'latest' moves by itself to the newest version; use another alias")
    model = repo.get_model(session, name)
    version = repo.resolve_version(session, model, VersionRef(number=number))
    repo.set_alias(session, model, alias, version)
    repo.record_event(
        session,
        actor=actor,
        action="alias.set",
        object_type="alias",
        object_ref=f"{name}@{alias}",
        detail={"version": number},
    )
    return alias, version


def delete_alias(*, session: Session, name: ModelName, alias: str, actor: str) -> None:
    validate_alias(alias)
    if alias == LATEST:
        raise InvalidRequest("'latest' cannot be removed while the model has versions")
    model = repo.get_model(session, name)
    row = next((a for a in model.aliases if a.name == alias), None)
    if row is None:
        raise NotFound(f"{name} has no alias {alias!r}")
    session.delete(row)
    repo.record_event(
        session,
        actor=actor,
        action="alias.delete",
        object_type="alias",
        object_ref=f"{name}@{alias}",
    )


# -- adapters ---------------------------------------------------------------------------


def register_adapter(*, session: Session, data: dict[str, Any], actor: str) -> Adapter:
    """Validate an adapter (never code: JSON rules) and store it as the name's next version."""
    spec = parse_adapter(data)
    validate_segment(spec.name, what="adapter name")
    if spec.name.startswith("builtin"):
        raise InvalidAdapter(
            f"adapter name '{spec.name}': names starting with 'builtin' are the built-in "
            "recipes' (GET /v1/adapters/builtin lists them); choose another"
        )
    scope_model = str(ModelName.parse(spec.scope.model)) if spec.scope.model else None
    previous = repo.adapter_versions(session, spec.name)
    adapter = Adapter(
        name=spec.name,
        version=(previous[-1].version + 1) if previous else 1,
        description=spec.description,
        scope_model=scope_model,
        scope_source_arch_fp=spec.scope.source_arch_fp,
        scope_target_arch_fp=spec.scope.target_arch_fp,
        rules=[rule.model_dump(mode="json") for rule in spec.rules],
        created_by=actor,
    )
    try:
        with session.begin_nested():
            session.add(adapter)
    except IntegrityError as exc:
        raise Conflict(
            f"adapter {spec.name!r} was registered concurrently; register it again",
            detail={"adapter": spec.name},
        ) from exc
    repo.record_event(
        session,
        actor=actor,
        action="adapter.register",
        object_type="adapter",
        object_ref=f"{spec.name}:{adapter.version}",
    )
    return adapter


def adapter_spec(adapter: Adapter) -> AdapterSpec:
    return parse_adapter(
        {
            "name": adapter.name,
            "description": adapter.description,
            "scope": {
                "model": adapter.scope_model,
                "source_arch_fp": adapter.scope_source_arch_fp,
                "target_arch_fp": adapter.scope_target_arch_fp,
            },
            "rules": adapter.rules,
        }
    )


def get_adapter(*, session: Session, name: str) -> list[Adapter]:
    validate_segment(name, what="adapter name")
    versions = repo.adapter_versions(session, name)
    if not versions:
        raise NotFound(f"adapter {name!r} does not exist", detail={"adapter": name})
    return versions


def delete_adapter(*, session: Session, name: str, actor: str) -> None:
    for adapter in get_adapter(session=session, name=name):
        session.delete(adapter)
    repo.record_event(
        session, actor=actor, action="adapter.delete", object_type="adapter", object_ref=name
    )
