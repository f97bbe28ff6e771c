"""Adapters are data, not code (DESIGN section 6).

An adapter is a name, a scope and an ordered list of rules:

    {"type": "rename", "pattern": "backbone\\.(.*)", "replacement": "encoder.\\1"}
    {"type": "drop",   "pattern": ".*\\.num_batches_tracked"}
    {"type": "prefix", "strip": "module.", "add": "model."}
    {"type": "op",     "key": "head\\.weight", "op": {"op": "slice", "dim": 0, ...}}

Key rules (rename, drop, prefix) rewrite checkpoint keys, in order, before the planner's
heuristics run. Op rules attach ops to the *target* keys their ``key`` pattern matches.
Patterns are full matches, compiled with RE2: matching runs in linear time, so a pattern such
as ``(a+)+$`` cannot make the server backtrack for ever. Replacements use Python's syntax,
``\\1`` or ``\\g<name>``; we expand them ourselves (RE2's Python binding would pass the
literal parts through ``unicode_escape``). Nothing here touches torch or I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.core.ops import describe_op, validate_op
from service.errors import InvalidAdapter

MAX_RULES = 1000
MAX_PATTERN = 1000

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are reported to the user, not to the server's stderr
_RE2_OPTIONS.max_mem = 2 << 20  # per pattern; RE2 refuses patterns that would need more
_RE2_SET_OPTIONS = re2.Options()
_RE2_SET_OPTIONS.log_errors = False
_RE2_SET_OPTIONS.max_mem = 32 << 20  # one automaton for all of an adapter's patterns

Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN)]
ArchFp = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

# A parsed replacement template: literal text, or a group reference (number or name).
_Piece = tuple[Literal["text"], str] | tuple[Literal["group"], int | str]


def compile_pattern(pattern: str) -> Any:
    """Compile a user regex with RE2; ValueError with RE2's message when it is invalid."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise ValueError(f"invalid regex '{pattern}': {reason}") from None


def parse_template(template: str) -> list[_Piece]:
    r"""Split a replacement into text and group references: ``\1``..``\99``, ``\g<n>``,
    ``\g<name>``; ``\\`` is a literal backslash. Other escapes are refused, not guessed."""
    pieces: list[_Piece] = []
    text: list[str] = []
    i = 0
    while i < len(template):
        char = template[i]
        if char != "\\":
            text.append(char)
            i += 1
            continue
        nxt = template[i + 1 : i + 2]
        if nxt == "\\":
            text.append("\\")
            i += 2
            continue
        if nxt.isdigit() and nxt != "0":
            end = i + 2 if not template[i + 2 : i + 3].isdigit() else i + 3
            ref: int | str = int(template[i + 1 : end])
        elif nxt == "g" and template[i + 2 : i + 3] == "<" and ">" in template[i + 3 :]:
            end = template.index(">", i + 3) + 1
            name = template[i + 3 : end - 1]
            if not name:
                raise ValueError(f"empty group reference in replacement '{template}'")
            ref = int(name) if name.isdigit() else name
        else:
            raise ValueError(
                f"unsupported escape '{template[i : i + 2]}' in replacement '{template}' "
                r"(use \1, \g<1> or \g<name> for groups, \\ for a backslash)"
            )
        if text:
            pieces.append(("text", "".join(text)))
            text = []
        pieces.append(("group", ref))
        i = end
    if text:
        pieces.append(("text", "".join(text)))
    return pieces


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterScope(_Frozen):
    """Where an adapter applies by itself; every field that is set must match."""

    model: str | None = Field(default=None, min_length=1, max_length=256)
    source_arch_fp: ArchFp | None = None
    target_arch_fp: ArchFp | None = None

    @property
    def is_empty(self) -> bool:
        return self.model is None and self.source_arch_fp is None and self.target_arch_fp is None

    def matches(self, *, model: str, source_arch_fp: str, target_arch_fp: str) -> bool:
        """True when the scope is set and every field that is set matches. An empty scope
        never matches by itself: such an adapter applies only when the policy names it."""
        return (
            not self.is_empty
            and self.model in (None, model)
            and self.source_arch_fp in (None, source_arch_fp)
            and self.target_arch_fp in (None, target_arch_fp)
        )


class RenameRule(_Frozen):
    type: Literal["rename"]
    pattern: Pattern
    replacement: str = Field(max_length=MAX_PATTERN)

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    @field_validator("replacement")
    @classmethod
    def _valid_template(cls, replacement: str) -> str:
        parse_template(replacement)
        return replacement

    @model_validator(mode="after")
    def _groups_exist(self) -> RenameRule:
        for kind, ref in self.template:
            if kind != "group":
                continue
            if isinstance(ref, int) and ref > self.regex.groups:
                raise ValueError(
                    f"replacement refers to group {ref} but '{self.pattern}' has "
                    f"{self.regex.groups} group(s)"
                )
            if isinstance(ref, str) and ref not in self.regex.groupindex:
                raise ValueError(f"replacement refers to unknown group '{ref}'")
        return self

    # Compiled once per rule; cached_property keeps them out of pydantic's fields and equality.
    @cached_property
    def regex(self) -> Any:
        return compile_pattern(self.pattern)

    @cached_property
    def template(self) -> list[_Piece]:
        return parse_template(self.replacement)

    def rewrite(self, key: str) -> str | None:
        """The renamed key, or None when the pattern does not match ``key`` in full."""
        match = self.regex.fullmatch(key)
        if match is None:
            return None
        return "".join(
            value if kind == "text" else (match.group(value) or "")  # type: ignore[misc]
            for kind, value in self.template
        )

    def describe(self) -> str:
        return f"rename '{self.pattern}' -> '{self.replacement}'"


class DropRule(_Frozen):
    type: Literal["drop"]
    pattern: Pattern

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    @cached_property
    def regex(self) -> Any:
        return compile_pattern(self.pattern)

    def matches(self, key: str) -> bool:
        return self.regex.fullmatch(key) is not None

    def describe(self) -> str:
        return f"drop '{self.pattern}'"


class PrefixRule(_Frozen):
    """``strip`` alone removes a prefix, ``add`` alone prepends one to every key; both
    replace ``strip`` by ``add`` on the keys that start with ``strip``."""

    type: Literal["prefix"]
    strip: str | None = Field(default=None, max_length=MAX_PATTERN)
    add: str | None = Field(default=None, max_length=MAX_PATTERN)

    @model_validator(mode="after")
    def _something_to_do(self) -> PrefixRule:
        if not self.strip and not self.add:
            raise ValueError("a prefix rule needs a non-empty 'strip' or 'add'")
        return self

    def rewrite(self, key: str) -> str | None:
        if self.strip:
            if not key.startswith(self.strip):
                return None
            key = key[len(self.strip) :]
        return (self.add or "") + key

    def describe(self) -> str:
        parts = [f"strip '{self.strip}'"] if self.strip else []
        parts += [f"add '{self.add}'"] if self.add else []
        return "prefix " + " ".join(parts)


class OpRule(_Frozen):
    type: Literal["op"]
    key: Pattern
    op: dict[str, Any]

    @field_validator("key")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    @field_validator("op", mode="before")
    @classmethod
    def _valid_op(cls, op: Any) -> dict[str, Any]:
        return validate_op(op)  # InvalidAdapter is a ValueError: pydantic reports it

    @cached_property
    def regex(self) -> Any:
        return compile_pattern(self.key)

    def matches(self, target_key: str) -> bool:
        return self.regex.fullmatch(target_key) is not None

    def describe(self) -> str:
        return f"{describe_op(self.op)} on '{self.key}'"


Rule = Annotated[RenameRule | DropRule | PrefixRule | OpRule, Field(discriminator="type")]
KeyRule = RenameRule | DropRule | PrefixRule


class _PatternSet:
    """Which of many patterns match a key in full, in one linear RE2 pass (calling each
    compiled pattern costs ~10 us in the Python binding; one set match costs ~2 us)."""

    def __init__(self, patterns: list[tuple[int, str]]) -> None:
        self.indices = [index for index, _ in patterns]
        self.set: Any = None
        if not patterns:
            return
        try:
            pattern_set = re2.Set.FullMatchSet(_RE2_SET_OPTIONS)
            for _, pattern in patterns:
                pattern_set.Add(pattern)
            pattern_set.Compile()
            self.set = pattern_set
        except re2.error:
            self.set = None  # too big for one automaton: fall back to one pattern at a time

    def candidates(self, key: str) -> list[int] | None:
        """Indices (as given) of the patterns that match ``key``, ascending; None when the
        set could not be built and the caller must try each pattern itself."""
        if not self.indices:
            return []
        if self.set is None:
            return None
        return sorted(self.indices[i] for i in self.set.Match(key) or ())


class AdapterSpec(_Frozen):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(default="", max_length=10_000)
    scope: AdapterScope = AdapterScope()
    rules: list[Rule] = Field(min_length=1, max_length=MAX_RULES)

    @cached_property
    def op_rules(self) -> list[tuple[int, OpRule]]:
        """(rule index, rule) of every op rule, in rule order."""
        return [(i, rule) for i, rule in enumerate(self.rules) if isinstance(rule, OpRule)]

    @cached_property
    def _op_set(self) -> _PatternSet:
        return _PatternSet([(i, rule.key) for i, rule in self.op_rules])

    @cached_property
    def _key_set(self) -> _PatternSet:
        return _PatternSet(
            [
                (i, r.pattern)
                for i, r in enumerate(self.rules)
                if isinstance(r, RenameRule | DropRule)
            ]
        )

    @cached_property
    def _prefix_rules(self) -> list[tuple[int, PrefixRule]]:
        return [(i, rule) for i, rule in enumerate(self.rules) if isinstance(rule, PrefixRule)]

    @property
    def has_op_rules(self) -> bool:
        return bool(self.op_rules)

    def matching_op_rules(self, target_key: str) -> list[tuple[int, OpRule]]:
        """(rule index, rule) of the op rules whose ``key`` matches ``target_key``."""
        found = self._op_set.candidates(target_key)
        if found is None:
            return [(i, rule) for i, rule in self.op_rules if rule.matches(target_key)]
        return [(i, self.rules[i]) for i in found]  # type: ignore[misc]

    def op_rules_for(self, target_key: str) -> list[dict[str, Any]]:
        """The ops this adapter attaches to ``target_key``, in rule order."""
        return [rule.op for _, rule in self.matching_op_rules(target_key)]

    def rewrite_key(self, key: str) -> tuple[str | None, list[int]]:
        """Run the rename, drop and prefix rules over one key, in rule order, each on the
        key as the earlier rules left it. Returns the new key (None when a drop rule matched)
        and the indices of the rules that changed or dropped it."""
        applied: list[int] = []
        start = 0
        while (index := self._next_key_rule(key, start)) is not None:
            rule = self.rules[index]
            start = index + 1
            if isinstance(rule, DropRule):
                return None, [*applied, index]
            assert isinstance(rule, RenameRule | PrefixRule)
            new = rule.rewrite(key)
            if new is not None and new != key:
                key = new
                applied.append(index)
        return key, applied

    def _next_key_rule(self, key: str, start: int) -> int | None:
        """The first key rule at or after ``start`` that applies to ``key``."""
        candidates = self._key_set.candidates(key)
        if candidates is None:
            candidates = [
                i
                for i, r in enumerate(self.rules)
                if isinstance(r, RenameRule | DropRule) and i >= start and r.regex.fullmatch(key)
            ]
        first = next((i for i in candidates if i >= start), None)
        for i, rule in self._prefix_rules:
            if first is not None and i > first:
                break
            if i >= start and (not rule.strip or key.startswith(rule.strip)):
                return i
        return first

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _format_loc(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "adapter"


def parse_adapter(data: Any) -> AdapterSpec:
    """Validate adapter JSON; every problem becomes InvalidAdapter (listed in ``detail``)."""
    try:
        return AdapterSpec.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"loc": _format_loc(err["loc"]), "message": err["msg"].removeprefix("Value error, ")}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        first = f"{errors[0]['loc']}: {errors[0]['message']}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidAdapter(f"invalid adapter: {first}{more}", detail={"errors": errors}) from None


def adapter_label(meta: Mapping[str, Any], spec: AdapterSpec) -> str:
    """``name:version`` as a plan shows it (the name alone when there is no version)."""
    name = meta.get("name", spec.name)
    version = meta.get("version")
    return f"{name}:{version}" if version is not None else str(name)


# ------------------------------------------------------------------------------ applying


@dataclass
class AdapterApplication:
    """What the key rules of a list of adapters did to a list of checkpoint keys."""

    # Surviving key (after every rule) -> original key, in the order of the input keys.
    keys: dict[str, str] = field(default_factory=dict)
    # Surviving key -> the rules that changed it, in order (only keys that changed).
    rules: dict[str, list[str]] = field(default_factory=dict)
    # Original key -> the rule that dropped it, in the order of the input keys.
    dropped: dict[str, str] = field(default_factory=dict)
    # Conflicts (two keys renamed to one name, an empty name): reasons for the plan.
    errors: list[str] = field(default_factory=list)
    # Indices (into the adapters given) of the adapters whose key rules changed something.
    applied: list[int] = field(default_factory=list)


def _rule_label(meta: Mapping[str, Any], spec: AdapterSpec, index: int) -> str:
    return f"adapter {adapter_label(meta, spec)} rule {index}: {spec.rules[index].describe()}"


def apply_key_rules(
    adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]], source_keys: Sequence[str]
) -> AdapterApplication:
    """Run every rename, drop and prefix rule, adapter by adapter and rule by rule, over each
    key. Conflicts are reported in ``errors`` (the first key in input order keeps the name;
    the others are left out), never raised: they make the plan incompatible, with a reason."""
    result = AdapterApplication()
    applied: set[int] = set()
    owner: dict[str, str] = {}  # final name -> first original key that took it
    for original in source_keys:
        name: str | None = original
        notes: list[str] = []
        for a, (meta, spec) in enumerate(adapters):
            assert name is not None
            name, indices = spec.rewrite_key(name)
            notes += [_rule_label(meta, spec, i) for i in indices]
            if indices:
                applied.add(a)
            if name is None:
                break
        if name is None:
            result.dropped[original] = notes[-1]
        elif not name:
            result.errors.append(f"{'; '.join(notes)}: '{original}' becomes an empty key")
        elif name in owner:
            result.errors.append(
                f"adapter rules map both '{owner[name]}' and '{original}' to '{name}'"
            )
        else:
            owner[name] = original
            result.keys[name] = original
            if notes:
                result.rules[name] = notes
    result.applied = sorted(applied)
    return result


@dataclass(frozen=True)
class OpMatch:
    adapter: int
    rule: int
    op: dict[str, Any]
    label: str


def match_op_rules(
    adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]], target_key: str
) -> list[OpMatch]:
    """The op rules of every adapter that match ``target_key``, adapter by adapter."""
    return [
        OpMatch(a, r, rule.op, f"adapter {adapter_label(meta, spec)} rule {r}: {rule.describe()}")
        for a, (meta, spec) in enumerate(adapters)
        if spec.has_op_rules
        for r, rule in spec.matching_op_rules(target_key)
    ]
