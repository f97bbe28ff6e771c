"""Request and response bodies of the v1 API."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.core.jsondata import servable_metadata
from service.core.plan import ALL_OPS, Plan, Policy
from service.core.spec import ArchSpec
from service.storage.models import Adapter, Model, Token, Version

# Version numbers are at most 12 digits wherever a client names one (paths, refs, aliases).
MAX_VERSION_NUMBER = 10**12
# A gc grace period longer than this (a century) is a mistake, and would overflow a date.
MAX_GRACE_S = 100 * 365 * 24 * 3600


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: str = "default"
    name: str
    # No NUL: PostgreSQL text cannot hold it.
    description: str = Field(default="", max_length=10_000, pattern=r"^[^\x00]*$")
    tags: list[str] = Field(default_factory=list, max_length=64)


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    shape: list[int]
    dtype: str


class SpecIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensors: list[TensorIn]
    tie_groups: list[list[str]] = Field(default_factory=list)

    def to_spec(self) -> ArchSpec:
        return ArchSpec.of(((t.key, t.shape, t.dtype) for t in self.tensors), self.tie_groups)


Facts = dict[
    Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")],
    Annotated[int, Field(ge=1, le=1 << 20)],
]


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strict: bool = False
    allow_structural: bool = True
    head: Literal["keep", "slice"] = "keep"
    embedding: Literal["keep", "resize"] = "keep"
    on_missing: Literal["keep", "error"] = "keep"
    allow_ops: list[Literal[ALL_OPS]] | None = None  # type: ignore[valid-type]
    adapters: list[str] = Field(default_factory=list, max_length=32)
    # Built-in recipes apply where their layout signature matches; false turns them off.
    builtin: bool = True
    # Model facts recipes need (``{"head_dim": 128}``), where the version's files lack them.
    params: Facts = Field(default_factory=dict, max_length=16)

    def to_policy(self) -> Policy:
        return Policy(
            strict=self.strict,
            allow_structural=self.allow_structural,
            head=self.head,
            embedding=self.embedding,
            on_missing=self.on_missing,
            allow_ops=tuple(sorted(set(self.allow_ops))) if self.allow_ops is not None else ALL_OPS,
            adapters=tuple(sorted(set(self.adapters))),
            builtin=self.builtin,
            params=tuple(sorted(self.params.items())),
        )


class FitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: SpecIn
    policy: PolicyIn = Field(default_factory=PolicyIn)
    # What the target model says of itself (a transformers config's head_dim), for recipes
    # that need it; the policy's params win.
    facts: Facts = Field(default_factory=dict, max_length=16)

    def to_policy(self) -> Policy:
        facts = tuple(sorted(self.facts.items()))
        return dataclasses.replace(self.policy.to_policy(), target_facts=facts)


class SearchRequest(FitRequest):
    limit: int = Field(default=10, ge=1, le=100)


class AliasSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_VERSION_NUMBER)


class FileOut(BaseModel):
    path: str
    size: int
    sha256: str


class VersionOut(BaseModel):
    model: str
    version: int
    ref: str
    digest: str
    size: int
    arch_fp: str
    shape_fp: str
    tensor_count: int
    param_count: int
    source_format: str
    aliases: list[str]
    ingest: dict[str, Any]
    metadata: dict[str, Any]
    created_by: str
    created_at: datetime
    spec: dict[str, Any] | None = None
    # With the spec: each tensor's sha256 (versions pushed before deduplication have none).
    tensor_sha256: dict[str, str] | None = None
    # A version pushed as a folder: the identity of its files, and (on a single version)
    # the files themselves, each downloadable from .../files/{path}.
    files_digest: str | None = None
    files: list[FileOut] | None = None

    @classmethod
    def of(
        cls,
        version: Version,
        *,
        aliases: list[str],
        with_spec: bool,
        files: list[FileOut] | None = None,
    ) -> VersionOut:
        model = f"{version.model.namespace}/{version.model.name}"
        spec = hashes = None
        if with_spec:
            hashes = {t["key"]: t["sha256"] for t in version.spec["tensors"] if "sha256" in t}
            spec = {
                "tensors": [
                    {"key": t["key"], "shape": t["shape"], "dtype": t["dtype"]}
                    for t in version.spec["tensors"]
                ],
                "tie_groups": version.spec.get("tie_groups", []),
            }
        return cls(
            model=model,
            version=version.number,
            ref=f"{model}:{version.number}",
            digest=version.digest,
            size=version.size,
            arch_fp=version.arch_fp,
            shape_fp=version.shape_fp,
            tensor_count=version.tensor_count,
            param_count=version.param_count,
            source_format=version.source_format,
            aliases=aliases,
            ingest=version.ingest,
            metadata=servable_metadata(version.user_metadata),
            created_by=version.created_by,
            created_at=version.created_at,
            spec=spec,
            tensor_sha256=hashes,
            files_digest=version.files_digest,
            files=files,
        )


class ModelOut(BaseModel):
    namespace: str
    name: str
    description: str
    tags: list[str]
    created_by: str
    created_at: datetime
    updated_at: datetime
    latest_version: int | None
    versions: list[VersionOut] | None = None
    aliases: dict[str, int] | None = None

    @classmethod
    def of(cls, model: Model, *, detailed: bool = False) -> ModelOut:
        live = [v for v in model.versions if v.deleted_at is None]  # soft-deleted: invisible
        by_id = {v.id: v.number for v in live}
        aliases = {a.name: by_id[a.version_id] for a in model.aliases if a.version_id in by_id}
        versions = None
        if detailed:
            names: dict[int, list[str]] = {}
            for alias in model.aliases:
                names.setdefault(alias.version_id, []).append(alias.name)
            versions = [
                VersionOut.of(v, aliases=names.get(v.id, []), with_spec=False) for v in live
            ]
        return cls(
            namespace=model.namespace,
            name=model.name,
            description=model.description,
            tags=model.tags or [],
            created_by=model.created_by,
            created_at=model.created_at,
            updated_at=model.updated_at,
            latest_version=aliases.get("latest"),
            versions=versions,
            aliases=aliases if detailed else None,
        )


class ModelList(BaseModel):
    items: list[ModelOut]
    total: int
    limit: int
    offset: int


class AliasOut(BaseModel):
    model: str
    alias: str
    version: int


class PlanOut(BaseModel):
    model: str
    version: int
    digest: str
    plan_id: str
    plan: dict[str, Any]

    @classmethod
    def of(cls, version: Version, plan: Plan) -> PlanOut:
        return cls(
            model=f"{version.model.namespace}/{version.model.name}",
            version=version.number,
            digest=version.digest,
            plan_id=plan.plan_id,
            plan=plan.to_json(),
        )


class SearchHit(BaseModel):
    ref: str
    model: str
    version: int
    digest: str
    verdict: str
    coverage: dict[str, Any]


class AdapterOut(BaseModel):
    name: str
    version: int
    description: str
    scope: dict[str, str | None]
    rules: list[dict[str, Any]]
    created_by: str
    created_at: datetime

    @classmethod
    def of(cls, adapter: Adapter) -> AdapterOut:
        return cls(
            name=adapter.name,
            version=adapter.version,
            description=adapter.description,
            scope={
                "model": adapter.scope_model,
                "source_arch_fp": adapter.scope_source_arch_fp,
                "target_arch_fp": adapter.scope_target_arch_fp,
            },
            rules=adapter.rules,
            created_by=adapter.created_by,
            created_at=adapter.created_at,
        )


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=96)
    scopes: list[str] = Field(min_length=1, max_length=64)
    expires_at: datetime | None = None


class TokenOut(BaseModel):
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: Token) -> TokenOut:
        return cls(
            id=token.id,
            name=token.name,
            prefix=token.prefix,
            scopes=list(token.scopes),
            created_by=token.created_by,
            created_at=token.created_at,
            expires_at=token.expires_at,
            last_used_at=token.last_used_at,
            revoked_at=token.revoked_at,
        )


class TokenCreated(TokenOut):
    token: str = Field(description="the bearer token; shown in this response only")


class GcRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dry_run: bool = False
    grace_s: int | None = Field(
        default=None, ge=0, le=MAX_GRACE_S, description="default: STATEHUB_GC_GRACE_S"
    )


class GcOut(BaseModel):
    dry_run: bool
    grace_s: int
    blobs_deleted: list[str]
    bytes_freed: int
    blobs_kept: int
    temp_files_deleted: list[str]
    leases_expired: int
