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
from typing import Annotated, Any, Literal

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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
    _regex: Any = PrivateAttr(None)
    _template: list[_Piece] = PrivateAttr(default_factory=list)

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    @model_validator(mode="after")
    def _compile(self) -> RenameRule:
        regex = compile_pattern(self.pattern)
        template = parse_template(self.replacement)
        for kind, ref in template:
            if kind != "group":
                continue
            if isinstance(ref, int) and ref > regex.groups:
                raise ValueError(
                    f"replacement refers to group {ref} but '{self.pattern}' has "
                    f"{regex.groups} group(s)"
                )
            if isinstance(ref, str) and ref not in regex.groupindex:
                raise ValueError(f"replacement refers to unknown group '{ref}'")
        self._regex, self._template = regex, template
        return self

    def rewrite(self, key: str) -> str | None:
        """The renamed key, or None when the pattern does not match ``key`` in full."""
        match = self._regex.fullmatch(key)
        if match is None:
            return None
        return "".join(
            value if kind == "text" else (match.group(value) or "")  # type: ignore[misc]
            for kind, value in self._template
        )

    def describe(self) -> str:
        return f"rename '{self.pattern}' -> '{self.replacement}'"


class DropRule(_Frozen):
    type: Literal["drop"]
    pattern: Pattern
    _regex: Any = PrivateAttr(None)

    @field_validator("pattern")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    def model_post_init(self, context: Any) -> None:
        self._regex = compile_pattern(self.pattern)

    def matches(self, key: str) -> bool:
        return self._regex.fullmatch(key) is not None

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
    _regex: Any = PrivateAttr(None)

    @field_validator("key")
    @classmethod
    def _valid_regex(cls, pattern: str) -> str:
        compile_pattern(pattern)
        return pattern

    @field_validator("op", mode="before")
    @classmethod
    def _valid_op(cls, op: Any) -> dict[str, Any]:
        return validate_op(op)  # InvalidAdapter is a ValueError: pydantic reports it

    def model_post_init(self, context: Any) -> None:
        self._regex = compile_pattern(self.key)

    def matches(self, target_key: str) -> bool:
        return self._regex.fullmatch(target_key) is not None

    def describe(self) -> str:
        return f"{describe_op(self.op)} on '{self.key}'"


Rule = Annotated[RenameRule | DropRule | PrefixRule | OpRule, Field(discriminator="type")]
KeyRule = RenameRule | DropRule | PrefixRule


class AdapterSpec(_Frozen):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = Field(default="", max_length=10_000)
    scope: AdapterScope = AdapterScope()
    rules: list[Rule] = Field(min_length=1, max_length=MAX_RULES)
    _op_rules: list[tuple[int, OpRule]] = PrivateAttr(default_factory=list)

    def model_post_init(self, context: Any) -> None:
        self._op_rules = [(i, r) for i, r in enumerate(self.rules) if isinstance(r, OpRule)]

    def matching_op_rules(self, target_key: str) -> list[tuple[int, OpRule]]:
        """(rule index, rule) of the op rules whose ``key`` matches ``target_key``."""
        return [(i, rule) for i, rule in self._op_rules if rule.matches(target_key)]

    def op_rules_for(self, target_key: str) -> list[dict[str, Any]]:
        """The ops this adapter attaches to ``target_key``, in rule order."""
        return [rule.op for _, rule in self.matching_op_rules(target_key)]

    @property
    def op_rules(self) -> list[tuple[int, OpRule]]:
        """(rule index, rule) of every op rule, in rule order."""
        return list(self._op_rules)

    @property
    def has_op_rules(self) -> bool:
        return bool(self._op_rules)

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


@dataclass(frozen=True)
class _LabelledRule:
    adapter: int
    rule: KeyRule
    label: str


def _key_rules(adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]]) -> list[_LabelledRule]:
    return [
        _LabelledRule(a, rule, f"adapter {adapter_label(meta, spec)} rule {r}: {rule.describe()}")
        for a, (meta, spec) in enumerate(adapters)
        for r, rule in enumerate(spec.rules)
        if not isinstance(rule, OpRule)
    ]


def apply_key_rules(
    adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]], source_keys: Sequence[str]
) -> AdapterApplication:
    """Run every rename, drop and prefix rule, adapter by adapter and rule by rule, over each
    key. Conflicts are reported in ``errors`` (the first key in input order keeps the name;
    the others are left out), never raised: they make the plan incompatible, with a reason."""
    rules = _key_rules(adapters)
    result = AdapterApplication()
    applied: set[int] = set()
    owner: dict[str, str] = {}  # final name -> first original key that took it
    for original in source_keys:
        name, notes, dropped_by = original, [], None
        for lr in rules:
            if isinstance(lr.rule, DropRule):
                if lr.rule.matches(name):
                    dropped_by = lr
                    break
                continue
            new = lr.rule.rewrite(name)
            if new is not None and new != name:
                name = new
                notes.append(lr.label)
                applied.add(lr.adapter)
        if dropped_by is not None:
            result.dropped[original] = dropped_by.label
            applied.add(dropped_by.adapter)
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
