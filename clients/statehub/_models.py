"""What the client returns: plain dataclasses over the server's JSON."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class Version:
    """One immutable version of a model (``created`` is False when a push was a duplicate)."""

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
    spec: dict[str, Any] | None = None
    created: bool = True
    created_by: str = ""
    created_at: str = ""
    # A version pushed as a folder: its files ({path, size, sha256}) where the answer lists
    # them, and their identity.
    files: list[dict[str, Any]] | None = None
    files_digest: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], *, created: bool = True) -> Version:
        return cls(
            model=data["model"],
            version=data["version"],
            ref=data["ref"],
            digest=data["digest"],
            size=data["size"],
            arch_fp=data["arch_fp"],
            shape_fp=data["shape_fp"],
            tensor_count=data["tensor_count"],
            param_count=data["param_count"],
            source_format=data["source_format"],
            aliases=data.get("aliases", []),
            ingest=data.get("ingest", {}),
            metadata=data.get("metadata", {}),
            spec=data.get("spec"),
            created=created,
            created_by=data.get("created_by", ""),
            created_at=str(data.get("created_at", "")),
            files=data.get("files"),
            files_digest=data.get("files_digest"),
        )


@dataclass(frozen=True)
class PlanEntry:
    """Where one target tensor comes from (``source``) and how (``action``, ``ops``)."""

    target: str
    source: str | None
    action: str
    stage: str
    rule: str
    ops: list[dict[str, Any]]
    evidence: dict[str, Any] | None = None
    tied_to: str | None = None
    # Every checkpoint key the entry reads when it joins several (a concat, a stack).
    sources: list[str] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanEntry:
        # Fields a newer server adds are left out, not an error (a plan is read-only here).
        return cls(**{k: v for k, v in data.items() if k in _ENTRY_FIELDS})


_ENTRY_FIELDS = frozenset(PlanEntry.__dataclass_fields__)


@dataclass(frozen=True)
class Plan:
    """How a stored checkpoint maps onto a target: one entry per target key, in order."""

    verdict: str
    entries: list[PlanEntry]
    coverage: dict[str, Any]
    unused: list[str]
    dropped: list[str]
    warnings: list[str]
    reasons: list[str]
    adapters: list[dict[str, Any]]
    plan_id: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], plan_id: str = "") -> Plan:
        return cls(
            verdict=data["verdict"],
            entries=[PlanEntry.from_json(e) for e in data["entries"]],
            coverage=data["coverage"],
            unused=data["unused"],
            dropped=data.get("dropped", []),
            warnings=data["warnings"],
            reasons=data["reasons"],
            adapters=data.get("adapters", []),
            plan_id=plan_id,
            raw=data,
        )

    @property
    def keep_target(self) -> list[str]:
        return [e.target for e in self.entries if e.action == "keep_target"]

    def entry(self, target_key: str) -> PlanEntry:
        for e in self.entries:
            if e.target == target_key:
                return e
        raise KeyError(target_key)


class FetchedStateDict(dict[str, Any]):
    """What :meth:`Client.fetch` returns: a plain dict of tensors for ``load_state_dict``,
    carrying the plan it was fitted by (``.plan``: every entry, the kept keys, the recipes
    applied) and the version it came from (``.source``, ``ns/name:N``)."""

    source: str = ""
    _plan_json: str = ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Saved (torch.save) or copied, it is the plain state_dict torch knows: a file of a
        # class of statehub's would not load with torch.load(weights_only=True).
        return (OrderedDict, (list(self.items()),))

    @cached_property
    def plan(self) -> Plan | None:
        # Parsed when first asked for: a plan of 10,000 entries is megabytes of JSON.
        if not self._plan_json:
            return None
        plan_id = hashlib.sha256(self._plan_json.encode()).hexdigest()
        return Plan.from_json(json.loads(self._plan_json), plan_id)

    @classmethod
    def of(cls, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> FetchedStateDict:
        result = cls(tensors)
        result._plan_json = metadata.get("statehub.plan", "")
        result.source = metadata.get("statehub.source", "")
        return result
