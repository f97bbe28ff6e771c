"""The planner's vocabulary: policy in, plan out (DESIGN section 5).

A plan says, for every target key in target order, where its tensor comes from and through
which ops, or that the target keeps its own value. Plans serialise to canonical JSON so that
the same inputs give byte-identical plans (and ETags).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Verdict = Literal["exact", "adapted", "partial", "incompatible"]
Action = Literal["copy", "transform", "fill", "keep_target"]

# Stage names, in the order the planner runs them.
STAGES = (
    "adapter",
    "prefix",
    "exact",
    "normalized",
    "structural",
    "shape_ops",
    "dtype",
    "buffers",
    "missing",
)
# Ops the heuristic stages may use; `allow_ops` in the policy narrows this set.
HEURISTIC_OPS = ("adapt_in_channels", "slice", "pad", "resample_pos_embed", "cast", "fill")
# Only adapters and recipes write these (a split is slices of one source).
ALL_OPS = (*HEURISTIC_OPS, "reshape", "transpose", "unflatten", "flatten", "concat", "stack")


@dataclass(frozen=True)
class Policy:
    strict: bool = False
    allow_structural: bool = True
    # Classifier head whose row count differs: keep the target's, or take the first rows.
    head: Literal["keep", "slice"] = "keep"
    # Embedding rows (vocabulary) that differ: keep the target's, or truncate / zero-pad.
    embedding: Literal["keep", "resize"] = "keep"
    on_missing: Literal["keep", "error"] = "keep"
    allow_ops: tuple[str, ...] = ALL_OPS
    # Adapters with an empty scope, and built-in recipes whose signature does not match,
    # apply only when named here.
    adapters: tuple[str, ...] = ()
    # Built-in recipes (service/recipes) apply where their layout signature matches.
    builtin: bool = True
    # Facts about the model that recipes need and shapes do not tell (``head_dim``), as
    # sorted (name, value) pairs; they win over what the version's config files say.
    params: tuple[tuple[str, int], ...] = ()
    # The same facts as the target model states them (a transformers model's config, sent
    # by the client). Not part of the plan's policy: a plan records the facts a recipe used
    # (``Plan.adapters``), so a model and its state_dict as targets give one plan id.
    target_facts: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["allow_ops"] = sorted(self.allow_ops)
        data["adapters"] = list(self.adapters)
        data["params"] = dict(self.params)
        del data["target_facts"]
        return data


@dataclass
class Entry:
    target: str
    source: str | None
    action: Action
    stage: str
    rule: str = ""
    ops: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, Any] | None = None
    # Set on tie-group members written once under another key (the canonical member).
    tied_to: str | None = None
    # Every checkpoint tensor the entry reads, in order, when it derives its tensor from
    # several (``ops[0]`` is then concat or stack); ``source`` is the first of them.
    sources: list[str] | None = None

    @property
    def inputs(self) -> list[str]:
        """The checkpoint keys this entry reads (none for a fill or a kept key)."""
        if self.sources is not None:
            return list(self.sources)
        return [self.source] if self.source is not None else []

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "source": self.source,
            "action": self.action,
            "stage": self.stage,
            "rule": self.rule,
            "ops": self.ops,
        }
        if self.evidence is not None:
            data["evidence"] = self.evidence
        if self.tied_to is not None:
            data["tied_to"] = self.tied_to
        if self.sources is not None:
            data["sources"] = self.sources
        return data


@dataclass
class Coverage:
    exact: int = 0
    adapted: int = 0
    kept: int = 0

    @property
    def total(self) -> int:
        return self.exact + self.adapted + self.kept

    def to_json(self) -> dict[str, Any]:
        total = self.total
        loaded = self.exact + self.adapted
        return {
            "exact": self.exact,
            "adapted": self.adapted,
            "kept": self.kept,
            "total": total,
            "fraction": round(loaded / total, 6) if total else 0.0,
        }


@dataclass
class Plan:
    verdict: Verdict
    entries: list[Entry]
    unused: list[str]
    dropped: list[str]
    keys: Coverage
    params: Coverage
    warnings: list[str]
    reasons: list[str]
    adapters: list[dict[str, Any]]
    policy: Policy
    source_arch_fp: str
    target_arch_fp: str

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "entries": [e.to_json() for e in self.entries],
            "unused": self.unused,
            "dropped": self.dropped,
            "coverage": {"keys": self.keys.to_json(), "params": self.params.to_json()},
            "warnings": self.warnings,
            "reasons": self.reasons,
            "adapters": self.adapters,
            "policy": self.policy.to_json(),
            "source_arch_fp": self.source_arch_fp,
            "target_arch_fp": self.target_arch_fp,
        }

    def canonical_json(self) -> str:
        return canonical_json(self.to_json())

    @property
    def plan_id(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def loaded(self) -> list[Entry]:
        """Entries whose tensor the fetch stream carries (not kept, not a tied alias)."""
        return [e for e in self.entries if e.action != "keep_target" and e.tied_to is None]

    @property
    def keep_target(self) -> list[str]:
        return [e.target for e in self.entries if e.action == "keep_target"]

    @property
    def tied(self) -> dict[str, str]:
        return {e.target: e.tied_to for e in self.entries if e.tied_to is not None}


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
