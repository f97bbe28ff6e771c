"""Built-in recipes: well-known conversions between libraries' layouts, as adapter data
(DESIGN section 6, "Derived tensors and built-in recipes").

A recipe is an adapter (name, rules) with a *layout signature* instead of a scope: key
patterns that must be present, or absent, on the checkpoint's side and on the model's side,
and shape relations between a checkpoint tensor and a model tensor. The signature is what
makes a recipe safe to apply by itself: GPT-2's ``transformer.h.0.attn.c_attn.weight``
exists in both transformers' and nanoGPT's layouts, and only the relation "the model's
shape is the checkpoint's transposed" tells which conversion is wanted. A signature whose
patterns would match any model (``.*``) is refused when the recipe is read.

A recipe's op arguments may name a model fact that shapes do not tell (``"{head_dim/2}"``:
Llama's rotary permutation works per head, and ``q_proj`` ``[heads * head_dim, hidden]``
does not say how its rows split into heads). The recipe lists the facts it needs in
``params``; the plan fills them from the policy's ``params``, else from the version's
``config.json`` (transformers) or ``params.json`` (Meta), and refuses the recipe, naming
what is missing, when neither has them: a rotary permutation guessed wrong loads strictly
and gives other outputs.

Pure: the recipes' JSON is read by ``service.recipes``; nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.adapters import AdapterSpec, Pattern, compile_pattern, parse_adapter
from service.core.spec import ArchSpec
from service.errors import RecipeParamsMissing

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


# The model facts a recipe may ask for, and what each means.
RECIPE_PARAMS = {
    "head_dim": "the width of one attention head (transformers' config head_dim, or "
    "hidden_size / num_attention_heads; Meta's params.json dim / n_heads)",
}
# An op argument that names a fact: "{head_dim}" or "{head_dim/2}".
_PLACEHOLDER = re.compile(r"^\{([a-z_]+)(?:/([1-9][0-9]*))?\}$")
# Stands in for every fact when a recipe's rules are checked as it is read.
_PROBE_VALUE = 64


def _substitute(value: Any, params: Mapping[str, int], recipe: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, params, recipe) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, params, recipe) for k, v in value.items()}
    if not isinstance(value, str) or not (m := _PLACEHOLDER.fullmatch(value)):
        return value
    name, divisor = m.group(1), int(m.group(2) or 1)
    if name not in params:
        return value  # not a fact the recipe lists: the op refuses it as an argument
    number = params[name]
    if number % divisor:
        raise RecipeParamsMissing(
            f"recipe {recipe} needs {name} divisible by {divisor}, got {number}",
            detail={"recipe": recipe, "param": name, "value": number},
        )
    return number // divisor


def params_from_config(config: Mapping[str, Any]) -> dict[str, int]:
    """The facts a transformers ``config.json`` or a Meta ``params.json`` gives."""

    def number(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value if value > 0 else None

    if head_dim := number("head_dim"):
        return {"head_dim": head_dim}
    for width, heads in (("hidden_size", "num_attention_heads"), ("dim", "n_heads")):
        w, h = number(width), number(heads)
        if w and h and w % h == 0:
            return {"head_dim": w // h}
    return {}


class Recipe(_Frozen):
    """A built-in conversion: adapter rules, the layout signature that scopes them, the
    model facts its ops need, and where it comes from (the libraries, what was checked)."""

    name: str = Field(pattern=r"^builtin-[a-z0-9][a-z0-9.-]*$", max_length=100)
    version: int = Field(ge=1)
    description: str = Field(min_length=1, max_length=2000)
    signature: Signature
    params: list[Literal[tuple(RECIPE_PARAMS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    rules: list[dict[str, Any]] = Field(min_length=1)

    @cached_property
    def adapter(self) -> AdapterSpec:
        """The rules as an adapter; only for a recipe without params."""
        return self.adapter_for({})

    def adapter_for(self, params: Mapping[str, int]) -> AdapterSpec:
        """The rules with the model facts filled in; RecipeParamsMissing names any the
        recipe needs and ``params`` lacks."""
        missing = [p for p in self.params if p not in params]
        if missing:
            raise RecipeParamsMissing(
                f"recipe {self.name} matches this checkpoint and model but needs "
                f"{', '.join(f'{p} ({RECIPE_PARAMS[p]})' for p in missing)}: push the version "
                "with its config.json or params.json, or give policy params "
                f"{{{', '.join(f'{p!r}: N' for p in missing)}}}, or turn built-in recipes off "
                "(policy builtin=false)",
                detail={"recipe": self.name, "missing": missing},
            )
        rules = _substitute(self.rules, {p: params[p] for p in self.params}, self.name)
        return parse_adapter({"name": self.name, "description": self.description, "rules": rules})

    @property
    def meta(self) -> dict[str, Any]:
        """What a plan records for it (like a registered adapter's name and version)."""
        return {"name": self.name, "version": self.version, "builtin": True}

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_recipe(data: Any) -> Recipe:
    recipe = Recipe.model_validate(data)
    # The rules are validated when the recipe is read, with a stand-in for each fact.
    recipe.adapter_for(dict.fromkeys(recipe.params, _PROBE_VALUE))
    return recipe


def matching_recipes(
    recipes: Sequence[Recipe], source: ArchSpec, target: ArchSpec, named: Sequence[str] = ()
) -> list[Recipe]:
    """The recipes whose signature matches this checkpoint and model, plus those named."""
    return [r for r in recipes if r.name in named or r.signature.matches(source, target)]
