"""Built-in recipes: well-known conversions between libraries' layouts, as adapter data
(DESIGN section 6, "Derived tensors and built-in recipes").

A recipe is an adapter (name, rules) with a *layout signature* instead of a scope: key
patterns that must be present, or absent, on the checkpoint's side and on the model's side,
and shape relations between a checkpoint tensor and a model tensor. The signature is what
makes a recipe safe to apply by itself: GPT-2's ``transformer.h.0.attn.c_attn.weight``
exists in both transformers' and nanoGPT's layouts, and only the relation "the model's
shape is the checkpoint's transposed" tells which conversion is wanted. A signature whose
patterns would match any model (``.*``) is refused when the recipe is read.

Pure: the recipes' JSON is read by ``service.recipes``; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.adapters import AdapterSpec, Pattern, compile_pattern
from service.core.spec import ArchSpec

# A signature pattern must pin a layout: at least this many literal characters (a pattern
# such as ``.*\.weight`` says nothing about which library wrote the keys).
MIN_LITERAL_CHARS = 8


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _literal_chars(pattern: str) -> int:
    """Characters of ``pattern`` outside regex syntax (escaped dots count as literal)."""
    count, i = 0, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            count += pattern[i + 1] in ".-_[](){}"
            i += 2
            continue
        count += char.isalnum() or char == "_"
        i += 1
    return count


class Side(_Frozen):
    """Key patterns (full matches): each of ``present`` matches some key, none of
    ``absent`` matches any."""

    present: list[Pattern] = Field(min_length=1, max_length=32)
    absent: list[Pattern] = Field(default_factory=list, max_length=32)

    @field_validator("present", "absent")
    @classmethod
    def _specific(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            compile_pattern(pattern)
            if _literal_chars(pattern) < MIN_LITERAL_CHARS:
                raise ValueError(
                    f"signature pattern '{pattern}' is too broad: it must name the layout "
                    f"(at least {MIN_LITERAL_CHARS} literal characters)"
                )
        return patterns

    def matches(self, keys: Sequence[str]) -> bool:
        present = [compile_pattern(p) for p in self.present]
        absent = [compile_pattern(p) for p in self.absent]
        return all(any(r.fullmatch(k) for k in keys) for r in present) and not any(
            r.fullmatch(k) for r in absent for k in keys
        )


class ShapeRelation(_Frozen):
    """How the shape of checkpoint key ``source`` relates to that of model key ``target``
    (both exact keys; the relation fails when either is missing)."""

    source: str = Field(min_length=1, max_length=1000)
    target: str = Field(min_length=1, max_length=1000)
    relation: Literal["equal", "transposed", "a_third", "three_times"]

    def holds(self, source: ArchSpec, target: ArchSpec) -> bool:
        if self.source not in source or self.target not in target:
            return False
        s, t = source[self.source].shape, target[self.target].shape
        if self.relation == "equal":
            return s == t
        if self.relation == "transposed":  # a non-square 2-D tensor and its transpose
            return len(s) == 2 and s != t and s == t[::-1]
        # The model's tensor is a third of the checkpoint's rows (a fused qkv split into q, k,
        # v of equal size), or three times (q, k, v fused).
        fused, third = (s, t) if self.relation == "a_third" else (t, s)
        return len(s) == len(t) >= 1 and fused[0] == 3 * third[0] and fused[1:] == third[1:]


class Signature(_Frozen):
    source: Side
    target: Side
    shapes: list[ShapeRelation] = Field(default_factory=list, max_length=16)

    def matches(self, source: ArchSpec, target: ArchSpec) -> bool:
        return (
            self.source.matches(source.keys)
            and self.target.matches(target.keys)
            and all(r.holds(source, target) for r in self.shapes)
        )


class Recipe(_Frozen):
    """A built-in conversion: adapter rules, the layout signature that scopes them, and
    where it comes from (the libraries and what was checked)."""

    name: str = Field(pattern=r"^builtin-[a-z0-9][a-z0-9.-]*$", max_length=100)
    version: int = Field(ge=1)
    description: str = Field(min_length=1, max_length=2000)
    signature: Signature
    rules: list[dict[str, Any]] = Field(min_length=1)

    @cached_property
    def adapter(self) -> AdapterSpec:
        return AdapterSpec.model_validate(
            {"name": self.name, "description": self.description, "rules": self.rules}
        )

    @property
    def meta(self) -> dict[str, Any]:
        """What a plan records for it (like a registered adapter's name and version)."""
        return {"name": self.name, "version": self.version, "builtin": True}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_recipe(data: Any) -> Recipe:
    recipe = Recipe.model_validate(data)
    recipe.adapter  # noqa: B018 - the rules are validated when the recipe is read
    return recipe


def matching_recipes(
    recipes: Sequence[Recipe], source: ArchSpec, target: ArchSpec, named: Sequence[str] = ()
) -> list[Recipe]:
    """The recipes whose signature matches this checkpoint and model, plus those named."""
    return [r for r in recipes if r.name in named or r.signature.matches(source, target)]
