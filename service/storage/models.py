"""The metadata schema (DESIGN section 2), as SQLAlchemy 2 declarative models.

Schema changes go through alembic migrations (``migrations/versions``); ``alembic check``
in CI keeps these models and the migrations from drifting.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(96))
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[Any]] = mapped_column(default=list)
    # Last version number handed out; bumped with an atomic UPDATE so concurrent uploads
    # get distinct numbers.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Soft delete: set, the model and its versions are invisible until restored.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    versions: Mapped[list[Version]] = relationship(
        back_populates="model", order_by="Version.number", cascade="all, delete-orphan"
    )
    aliases: Mapped[list[Alias]] = relationship(
        back_populates="model", order_by="Alias.name", cascade="all, delete-orphan"
    )


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # Offset of the first tensor byte in the stored safetensors blob.
    data_start: Mapped[int] = mapped_column(BigInteger)
    # {"tensors": [{key, shape, dtype}...], "tie_groups": [...]} with byte offsets per tensor.
    spec: Mapped[dict[str, Any]] = mapped_column(deferred=True)  # large: loaded when used
    arch_fp: Mapped[str] = mapped_column(String(64), index=True)
    shape_fp: Mapped[str] = mapped_column(String(64), index=True)
    tensor_count: Mapped[int] = mapped_column(Integer)
    param_count: Mapped[int] = mapped_column(BigInteger)
    source_format: Mapped[str] = mapped_column(String(32))
    ingest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    user_metadata: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Soft delete: set, the version is invisible until restored (its blob stays referenced).
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # None: the version's bytes are the blob ``digest``. Otherwise the safetensors file is
    # composed of ranges of other blobs, [[blob_digest, start, end], ...] in file order
    # (tensor-level deduplication: its tensors are stored once, wherever they first came).
    extents: Mapped[list[Any] | None] = mapped_column(default=None, deferred=True)
    # A version pushed as a folder: sha256 of its sorted "{path}\t{sha256}\n" lines
    # (core.repo_files.files_digest), part of its identity beside ``digest``; None otherwise.
    files_digest: Mapped[str | None] = mapped_column(String(64), default=None)

    model: Mapped[Model] = relationship(back_populates="versions")


class Alias(Base):
    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(96), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="aliases")
    version: Mapped[Version] = relationship()


class Adapter(Base):
    """One version of a named, declarative adapter (DESIGN section 6)."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(96))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    scope_model: Mapped[str | None] = mapped_column(String(200), index=True)
    scope_source_arch_fp: Mapped[str | None] = mapped_column(String(64))
    scope_target_arch_fp: Mapped[str | None] = mapped_column(String(64))
    rules: Mapped[list[Any]] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_object", "object_type", "object_ref"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_ref: Mapped[str] = mapped_column(String(300))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Token(Base):
    """A bearer token, stored as the sha256 of its value: the value itself is never kept."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(96))
    # The first characters of the token, shown to tell tokens apart (not a secret).
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # ["read:vision/*", "write:vision/resnet", "admin:*"] (service.core.access).
    scopes: Mapped[list[Any]] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class BlobLease(Base):
    """An upload's claim on a blob from before it is stored until its version is committed.

    ``gc`` never deletes a blob with a live lease; a lease left by a crashed upload expires.
    """

    __tablename__ = "blob_leases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BlobRef(Base):
    """A blob that a composed version (``Version.extents``) reads: gc keeps it."""

    __tablename__ = "blob_refs"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    blob_digest: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class VersionFile(Base):
    """A file of a version pushed as a folder, stored byte for byte as the blob ``sha256``
    (config, tokenizer, README, the weight files themselves): gc keeps those blobs."""

    __tablename__ = "version_files"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class ComposedFile(Base):
    """A file stored as ranges of other blobs, read as the blob ``sha256`` would be.

    A fine-tuned shard whose tensors are mostly stored already (every one but the new head)
    is uploaded tensor by tensor: its header becomes a blob, its tensors are ranges of the
    blobs that first brought them. Version files name it by its sha256 like any file; its
    ``parts`` keep those blobs from gc while the row lives, and gc deletes the row once no
    version file names it (after the grace period).
    """

    __tablename__ = "composed_files"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    # [[blob_digest, start, end], ...] in file order (``storage.composed.Extent``).
    extents: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ComposedFilePart(Base):
    """A blob that a composed file reads: gc keeps it while the composed file exists."""

    __tablename__ = "composed_file_parts"

    file_sha256: Mapped[str] = mapped_column(
        ForeignKey("composed_files.sha256", ondelete="CASCADE"), primary_key=True
    )
    blob_digest: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class StoredTensor(Base):
    """Where the bytes of a tensor with this sha256 are stored: a range of one blob.

    Filled at every push, so a later push that repeats tensors (a fine-tune) stores only
    the new ones. Rows go when gc deletes their blob.
    """

    __tablename__ = "stored_tensors"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    blob_digest: Mapped[str] = mapped_column(String(64), index=True)
    start: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FitCacheEntry(Base):
    """A fitted fetch body stored as a blob, keyed by its ETag (sha256 of digest + plan):
    the same fetch again is a passthrough of that blob."""

    __tablename__ = "fit_cache"

    etag: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )
    digest: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    hits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
