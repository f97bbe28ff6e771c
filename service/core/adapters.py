"""Adapters are data, not code (DESIGN section 6).

An adapter is a name, a scope and an ordered list of rules:

    {"type": "rename", "pattern": "backbone\\.(.*)", "replacement": "encoder.\\1"}
    {"type": "drop",   "pattern": ".*\\.num_batches_tracked"}
    {"type": "prefix", "strip": "module.", "add": "model."}
    {"type": "op",     "key": "head\\.weight", "op": {"op": "slice", "dim": 0, ...}}
    {"type": "split",  "source": "blocks\\.(\\d+)\\.attn\\.qkv\\.weight",
                       "targets": ["l.\\1.q.weight", "l.\\1.k.weight", "l.\\1.v.weight"], "dim": 0}
    {"type": "concat", "target": "l\\.(\\d+)\\.qkv\\.weight",
                       "sources": ["l.\\1.q.weight", "l.\\1.k.weight", "l.\\1.v.weight"], "dim": 0}

Key rules (rename, drop, prefix) rewrite checkpoint keys, in order, before the planner's
heuristics run. Op rules attach ops to the *target* keys their ``key`` pattern matches.
Derive rules make tensors that are not one-to-one: a ``split`` cuts a checkpoint tensor
(matched by ``source``, after the key rules) into the target keys its ``targets`` templates
name, pieces sized by ``sizes`` or by the targets' shapes; a ``concat`` / ``stack`` builds
a target key (matched by ``target``) from the checkpoint tensors its ``sources`` templates
name. Templates use the matched pattern's groups, so one rule covers every layer; optional
``ops`` follow (a transpose, a reshape chain).
Patterns are full matches, compiled with RE2: matching runs in linear time, so a pattern such
as ``(a+)+$`` cannot make the server backtrack for ever. Replacements use Python's syntax,
``\\1`` or ``\\g<name>``; we expand them ourselves (RE2's Python binding would pass the
literal parts through ``unicode_escape``). Nothing here touches torch or I/O.

Applying adapters is bounded (``AdapterBudget``): every key a rule produces is at most
``max_key_length`` characters, checked at each step (a rename to ``\\1\\1...`` would
otherwise grow keys geometrically, rule after rule), and all the rule evaluations of one
request together cost at most ``max_steps``. Either bound crossed is InvalidAdapter.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
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

from service.core.ops import COMBINING_OPS, describe_op, validate_op
from service.errors import InvalidAdapter

MAX_RULES = 1000
MAX_PATTERN = 1000
# The work of applying adapters, in steps: one rule evaluation (an RE2 set match, a pattern
# match, a rewrite) is one step, plus one per 64 characters of key (and of matches) it reads.
# A real adapter costs 2-4 steps per key (a match, a rewrite, a match of the new name), one
# per target key for its op rules; a plan may take 32 per key (checkpoint and target keys
# together) plus BASE_STEPS, so the work is linear in the keys, whatever the rules.
DEFAULT_STEPS_PER_KEY = 32
DEFAULT_MAX_KEY_LENGTH = 1024
BASE_STEPS = 10_000
_STEP_CHARS = 64

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


@dataclass(frozen=True)
class AdapterLimits:
    """Bounds on applying adapters (from the settings): keys no longer than
    ``max_key_length`` at any step, ``steps_per_key`` rule evaluations per key."""

    max_key_length: int = DEFAULT_MAX_KEY_LENGTH
    steps_per_key: int = DEFAULT_STEPS_PER_KEY

    def budget(self, keys: int) -> AdapterBudget:
        """The budget of one plan over ``keys`` keys (checkpoint and target together)."""
        return AdapterBudget(self.max_key_length, BASE_STEPS + self.steps_per_key * keys)


@dataclass
class AdapterBudget:
    """What applying adapters may still cost one plan; crossing it is InvalidAdapter."""

    max_key_length: int = DEFAULT_MAX_KEY_LENGTH
    max_steps: int = BASE_STEPS + DEFAULT_STEPS_PER_KEY * 200_000
    steps: int = 0

    def charge(self, chars: int = 0) -> None:
        self.steps += 1 + chars // _STEP_CHARS
        if self.steps > self.max_steps:
            raise InvalidAdapter(
                f"applying the adapters takes more than {self.max_steps} rule evaluations "
                f"for these keys (STATEHUB_ADAPTER_STEPS_PER_KEY per key): refused; scope "
                "the adapter, or give it fewer rules that match every key",
                detail={"limit": "adapter_steps_per_key", "max_steps": self.max_steps},
            )

    def check_key(self, key: str, original: str, rule: str) -> None:
        if len(key) > self.max_key_length:
            raise InvalidAdapter(
                f"{rule} renames '{_clip(original)}' to a key of {len(key)} characters, over "
                f"the limit of {self.max_key_length} (STATEHUB_MAX_KEY_LENGTH): refused",
                detail={"limit": "max_key_length", "max_key_length": self.max_key_length},
            )


def _clip(key: str, keep: int = 80) -> str:
    return key if len(key) <= keep else f"{key[:keep]}... ({len(key)} characters)"


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
        valid = validate_op(op)  # InvalidAdapter is a ValueError: pydantic reports it
        if valid["op"] in COMBINING_OPS:
            raise ValueError(
                f"{valid['op']} joins several checkpoint tensors: write a "
                f"{valid['op']!r} rule with its sources, not an op rule"
            )
        return valid

    @cached_property
    def regex(self) -> Any:
        return compile_pattern(self.key)

    def matches(self, target_key: str) -> bool:
        return self.regex.fullmatch(target_key) is not None

    def describe(self) -> str:
        return f"{describe_op(self.op)} on '{self.key}'"


MAX_PIECES = 1024  # targets of one split, sources of one concat (experts of a fused MoE)


def _valid_chain(ops: list[Any]) -> list[dict[str, Any]]:
    chain = [validate_op(op) for op in ops]
    for op in chain:
        if op["op"] in COMBINING_OPS or op["op"] == "fill":
            raise ValueError(f"{op['op']} cannot follow a split or concat; it has no place here")
    return chain


def _check_templates(templates: Sequence[str], regex: Any, pattern: str) -> None:
    for template in templates:
        for kind, ref in parse_template(template):
            if kind != "group":
                continue
            if isinstance(ref, int) and ref > regex.groups:
                raise ValueError(
                    f"'{template}' refers to group {ref} but '{pattern}' has "
                    f"{regex.groups} group(s)"
                )
            if isinstance(ref, str) and ref not in regex.groupindex:
                raise ValueError(f"'{template}' refers to unknown group '{ref}'")


def _expand(regex: Any, templates: Sequence[list[_Piece]], key: str) -> list[str] | None:
    match = regex.fullmatch(key)
    if match is None:
        return None
    return [
        "".join(v if kind == "text" else (match.group(v) or "") for kind, v in template)  # type: ignore[misc]
        for template in templates
    ]


# In the sources of a ``repeat`` combine rule (the targets of a split): the index counted
# up from 0 (an expert's).
REPEAT_INDEX = "{n}"


def _check_repeat(repeat: bool, keys: Sequence[str], what: str, kind: str) -> None:
    if repeat and not all(REPEAT_INDEX in k for k in keys):
        raise ValueError(f"every {what} of a repeat rule names the index {REPEAT_INDEX}")
    if not repeat and len(keys) < 2:
        raise ValueError(f"a {kind} needs two {what}s or more (or repeat over {REPEAT_INDEX})")


def _repeated(repeat: bool, names: list[str], holds: Callable[[str], bool]) -> list[str]:
    """``names`` (the expanded templates) for every index n whose first key ``holds``."""
    if not repeat:
        return names
    found: list[str] = []
    for n in range(MAX_PIECES // len(names)):
        keys = [name.replace(REPEAT_INDEX, str(n)) for name in names]
        if not holds(keys[0]):
            break
        found += keys
    return found


class _DeriveBase(_Frozen):
    """What split and concat/stack rules share: a pattern, key templates over its groups,
    a dimension and the ops that follow."""

    dim: int = Field(default=0, ge=0, lt=64)
    ops: list[dict[str, Any]] = Field(default_factory=list, max_length=16)

    @field_validator("ops", mode="before")
    @classmethod
    def _valid_ops(cls, ops: Any) -> list[dict[str, Any]]:
        return _valid_chain(ops if isinstance(ops, list) else [ops])

    @property
    def pattern(self) -> str:
        raise NotImplementedError

    @property
    def keys(self) -> list[str]:
        raise NotImplementedError

    def _check_keys(self) -> None:
        compile_pattern(self.pattern)
        for template in self.keys:
            parse_template(template)
        _check_templates(self.keys, self.regex, self.pattern)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"a {getattr(self, 'type', 'rule')} names one key twice")

    @cached_property
    def regex(self) -> Any:
        return compile_pattern(self.pattern)

    @cached_property
    def templates(self) -> list[list[_Piece]]:
        return [parse_template(t) for t in self.keys]

    def expand(self, key: str) -> list[str] | None:
        """The keys the templates name for ``key``, or None when the pattern does not match."""
        return _expand(self.regex, self.templates, key)


class SplitRule(_DeriveBase):
    """One checkpoint tensor -> several target tensors, cut along ``dim`` (a fused qkv).

    ``before``: ops on the source before it is cut (``flatten`` a fused experts tensor
    ``[experts, rows, cols]`` to cut it into each expert's rows). With ``repeat``, the
    targets are templates over an index ``{n}``, expanded for n = 0, 1, ... while the model
    holds the first of them (n-major), as a repeat combine rule's sources are."""

    type: Literal["split"]
    source: Pattern
    targets: list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN)]] = Field(
        min_length=1, max_length=MAX_PIECES
    )
    # Sizes of the pieces along ``dim``; None: each target's own size along ``dim``.
    sizes: list[Annotated[int, Field(ge=0)]] | None = None
    before: list[dict[str, Any]] = Field(default_factory=list, max_length=16)
    repeat: bool = False

    @field_validator("before", mode="before")
    @classmethod
    def _valid_before(cls, ops: Any) -> list[dict[str, Any]]:
        return _valid_chain(ops if isinstance(ops, list) else [ops])

    @model_validator(mode="after")
    def _consistent(self) -> SplitRule:
        self._check_keys()
        _check_repeat(self.repeat, self.targets, "target", self.type)
        if self.sizes is not None and (self.repeat or len(self.sizes) != len(self.targets)):
            raise ValueError(f"{len(self.sizes)} sizes for {len(self.targets)} targets")
        return self

    def repeated(self, names: list[str], holds: Callable[[str], bool]) -> list[str]:
        return _repeated(self.repeat, names, holds)

    @property
    def pattern(self) -> str:
        return self.source

    @property
    def keys(self) -> list[str]:
        return self.targets

    def describe(self) -> str:
        return f"split '{self.source}' along dim {self.dim} into {len(self.targets)}"


class CombineRule(_DeriveBase):
    """Several checkpoint tensors -> one target tensor: ``concat`` along ``dim`` (q, k, v into
    a fused qkv), or ``stack`` on a new ``dim`` (per-expert weights into one).

    With ``repeat``, the sources are templates over an index ``{n}``, expanded for n = 0,
    1, 2, ... while the checkpoint holds the first of them, in that order (n-major): the
    count of experts comes from the checkpoint, and the target's shape checks it."""

    type: Literal["concat", "stack"]
    target: Pattern
    sources: list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN)]] = Field(
        min_length=1, max_length=MAX_PIECES
    )
    repeat: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> CombineRule:
        self._check_keys()
        _check_repeat(self.repeat, self.sources, "source", self.type)
        return self

    def repeated(self, names: list[str], holds: Callable[[str], bool]) -> list[str]:
        return _repeated(self.repeat, names, holds)

    @property
    def pattern(self) -> str:
        return self.target

    @property
    def keys(self) -> list[str]:
        return self.sources

    def describe(self) -> str:
        return f"{self.type} {len(self.sources)} into '{self.target}' along dim {self.dim}"


DeriveRule = SplitRule | CombineRule
Rule = Annotated[
    RenameRule | DropRule | PrefixRule | OpRule | SplitRule | CombineRule,
    Field(discriminator="type"),
]
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

    def candidates(self, key: str, budget: AdapterBudget | None = None) -> list[int] | None:
        """Indices (as given) of the patterns that match ``key``, ascending; None when the
        set could not be built and the caller must try each pattern itself."""
        if not self.indices:
            return []
        if self.set is None:
            return None
        found = sorted(self.indices[i] for i in self.set.Match(key) or ())
        if budget is not None:
            budget.charge(len(key) + len(found))
        return found


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
    def derive_rules(self) -> list[tuple[int, DeriveRule]]:
        """(rule index, rule) of every split, concat and stack rule, in rule order."""
        return [(i, r) for i, r in enumerate(self.rules) if isinstance(r, SplitRule | CombineRule)]

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

    def matching_op_rules(
        self, target_key: str, budget: AdapterBudget | None = None
    ) -> list[tuple[int, OpRule]]:
        """(rule index, rule) of the op rules whose ``key`` matches ``target_key``."""
        found = self._op_set.candidates(target_key, budget)
        if found is None:
            matching = []
            for i, rule in self.op_rules:
                if budget is not None:
                    budget.charge(len(target_key))
                if rule.matches(target_key):
                    matching.append((i, rule))
            return matching
        return [(i, self.rules[i]) for i in found]  # type: ignore[misc]

    def op_rules_for(self, target_key: str) -> list[dict[str, Any]]:
        """The ops this adapter attaches to ``target_key``, in rule order."""
        return [rule.op for _, rule in self.matching_op_rules(target_key)]

    def rewrite_key(
        self, key: str, budget: AdapterBudget | None = None
    ) -> tuple[str | None, list[int]]:
        """Run the rename, drop and prefix rules over one key, in rule order, each on the
        key as the earlier rules left it. Returns the new key (None when a drop rule matched)
        and the indices of the rules that changed or dropped it.

        Rules are visited forward only: the patterns are matched again only when a rule
        changed the key, so an adapter of many rules that leave a key as it is costs one
        set match per key, not one per rule."""
        budget = budget if budget is not None else AdapterBudget()
        original = key
        applied: list[int] = []
        start = 0
        candidates = self._key_set.candidates(key, budget)
        while (index := self._next_key_rule(key, start, candidates, budget)) is not None:
            rule = self.rules[index]
            start = index + 1
            if isinstance(rule, DropRule):
                return None, [*applied, index]
            assert isinstance(rule, RenameRule | PrefixRule)
            budget.charge(len(key))
            new = rule.rewrite(key)
            if new is not None and new != key:
                budget.check_key(new, original, f"rule {index} ({rule.describe()})")
                key = new
                applied.append(index)
                candidates = self._key_set.candidates(key, budget)
        return key, applied

    def _next_key_rule(
        self, key: str, start: int, candidates: list[int] | None, budget: AdapterBudget
    ) -> int | None:
        """The first key rule at or after ``start`` that applies to ``key``; ``candidates``
        are the rename and drop rules matching ``key`` (None: try each pattern in turn)."""
        if candidates is None:
            first = None
            for i in range(start, len(self.rules)):
                rule = self.rules[i]
                if isinstance(rule, RenameRule | DropRule):
                    budget.charge(len(key))
                    if rule.regex.fullmatch(key):
                        first = i
                        break
        else:
            found = bisect.bisect_left(candidates, start)
            first = candidates[found] if found < len(candidates) else None
        prefixes = self._prefix_rules
        for position in range(bisect.bisect_left(self._prefix_indices, start), len(prefixes)):
            i, rule = prefixes[position]
            if first is not None and i > first:
                break
            if not rule.strip or key.startswith(rule.strip):
                return i
        return first

    @cached_property
    def _prefix_indices(self) -> list[int]:
        return [i for i, _ in self._prefix_rules]

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
    adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]],
    source_keys: Sequence[str],
    budget: AdapterBudget | None = None,
) -> AdapterApplication:
    """Run every rename, drop and prefix rule, adapter by adapter and rule by rule, over each
    key. Conflicts are reported in ``errors`` (the first key in input order keeps the name;
    the others are left out), never raised: they make the plan incompatible, with a reason.
    A key grown past ``budget.max_key_length`` or work past ``budget.max_steps`` raises
    InvalidAdapter: that is the adapter's fault, not a property of this checkpoint."""
    budget = budget if budget is not None else AdapterBudget()
    result = AdapterApplication()
    applied: set[int] = set()
    owner: dict[str, str] = {}  # final name -> first original key that took it
    for original in source_keys:
        name: str | None = original
        notes: list[str] = []
        for a, (meta, spec) in enumerate(adapters):
            assert name is not None
            try:
                name, indices = spec.rewrite_key(name, budget)
            except InvalidAdapter as exc:
                raise InvalidAdapter(
                    f"adapter {adapter_label(meta, spec)}: {exc.message}", detail=exc.detail
                ) from None
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
    adapters: Sequence[tuple[Mapping[str, Any], AdapterSpec]],
    target_key: str,
    budget: AdapterBudget | None = None,
) -> list[OpMatch]:
    """The op rules of every adapter that match ``target_key``, adapter by adapter."""
    return [
        OpMatch(a, r, rule.op, f"adapter {adapter_label(meta, spec)} rule {r}: {rule.describe()}")
        for a, (meta, spec) in enumerate(adapters)
        if spec.has_op_rules
        for r, rule in spec.matching_op_rules(target_key, budget)
    ]
