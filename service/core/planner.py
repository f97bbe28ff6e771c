"""The compatibility planner (DESIGN section 5): fit a checkpoint's spec to a model's spec.

``plan(source, target)`` decides, for every target key in target order, which checkpoint
tensor fills it and through which ops, or that the model keeps its own value. It works on
specs alone (no tensors, no torch, no I/O), is deterministic (same inputs, byte-identical
``Plan.canonical_json()``) and linear-ish in the number of keys.

Stages run in order, each only on what the earlier ones left unmatched:

    1 adapter     registered adapters: key rules rewrite checkpoint keys, op rules attach ops
    2 prefix      wrappers (``module.``, ``_orig_mod.``), then one prefix substitution
    3 exact       same key and shape (same key, other shape: queued for stage 6)
    4 normalized  case-insensitive, legacy ``gamma/beta`` -> ``weight/bias``, weight norm
                  ``weight_g/weight_v`` <-> ``parametrizations.weight.original0/1``
    5 structural  order-and-shape alignment, accepted only when unambiguous
    6 shape_ops   first conv channels, classifier head, position embeddings, vocabulary
    7 dtype       cast to the target dtype
    8 buffers     ``num_batches_tracked`` filled with 0
    9 missing     the model keeps its own value (or a reason, under on_missing="error")

Then tie groups are made consistent, and the verdict and coverage computed.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.core.adapters import (
    AdapterBudget,
    AdapterLimits,
    AdapterSpec,
    CombineRule,
    SplitRule,
    adapter_label,
    apply_key_rules,
    match_op_rules,
)
from service.core.ops import (
    OpError,
    adapt_in_channels_op,
    cast_op,
    combine_op,
    fill_op,
    infer_chain,
    infer_inputs,
    pad_op,
    resample_pos_embed_op,
    slice_op,
)
from service.core.plan import Coverage, Entry, Plan, Policy, Verdict
from service.core.spec import ArchSpec, TensorSpec, check_spec
from service.errors import InvalidSpec

Shape = tuple[int, ...]
Op = dict[str, Any]
AdapterInput = tuple[Mapping[str, Any], AdapterSpec]

# Leading components that wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPERS = ("module", "_orig_mod")
# Legacy names of LayerNorm / BatchNorm affine parameters (TF ports, old BERT checkpoints).
LEGACY_NAMES = {"gamma": "weight", "beta": "bias"}
# torch's two forms of a weight-normalised parameter: the legacy hook's ``weight_g`` /
# ``weight_v`` and ``parametrizations.weight.original0`` / ``original1`` of
# ``torch.nn.utils.parametrizations.weight_norm`` (same shapes; torch's own load converts
# them). Both normalise to the legacy form, so either side may hold either.
_WEIGHT_NORM_SUFFIX = {"original0": "_g", "original1": "_v"}
# Tokens that precede the patch grid in a ViT's absolute position embedding.
PREFIX_TOKEN_NAMES = ("cls_token", "dist_token", "reg_token")
MAX_GUESSED_PREFIX_TOKENS = 8
# Prefix search: a (suffix, shape) shared by more target keys than this says nothing about
# which prefix maps to which (think "weight" [64]); only this many top candidates are scored.
MAX_BUCKET = 4
MAX_CANDIDATES = 4
# Stage 8 fills num_batches_tracked only when it is this small: torch registers it as a
# 0-d int64 tensor (some ports use shape [1]). Anything larger is the target's own choice.
MAX_BUFFER_FILL_ELEMENTS = 1
# Prefix search: suffixes of at most this many components besides the whole key (real keys
# have about 4-12, e.g. diffusers' "down_blocks.0.attentions.0.transformer_blocks.0.attn1
# .to_q.weight" has 9); a deeper key still matches, under a longer prefix.
MAX_SUFFIX_DEPTH = 32
# Lists of keys inside one message are cut after this many names.
MAX_NAMES_IN_MESSAGE = 10


# ------------------------------------------------------------------------------ entry point


def plan(
    source: ArchSpec,
    target: ArchSpec,
    *,
    policy: Policy = Policy(),
    adapters: Sequence[AdapterInput] = (),
    limits: AdapterLimits = AdapterLimits(),
) -> Plan:
    """Plan how to fill ``target`` from a checkpoint whose spec is ``source``.

    ``adapters`` are the applicable adapters with what the plan records for each (e.g.
    ``{"name": ..., "version": ...}``); their order does not matter: they run sorted by name
    and version. Raises InvalidSpec for specs that cannot be planned (duplicate keys, unknown
    dtypes, inconsistent tie groups), and InvalidAdapter when applying the adapters crosses
    ``limits`` (a key grown too long, too many rule evaluations for the number of keys);
    everything else, however incompatible, is a Plan.
    """
    check_spec(source, "source")
    check_spec(target, "target")
    aliases = _source_aliases(source)
    groups = _target_tie_groups(target)
    ordered = sorted(adapters, key=_adapter_order)
    budget = limits.budget(len(source.tensors) + len(aliases) + len(target.tensors))
    return _Planner(source, target, policy, ordered, aliases, groups, budget).run()


def _adapter_order(adapter: AdapterInput) -> tuple[str, int, str]:
    meta, spec = adapter
    version = meta.get("version")
    number = version if isinstance(version, int) and not isinstance(version, bool) else -1
    return (str(meta.get("name", spec.name)), number, str(version))


# ------------------------------------------------------------------------------ validation


def _check_group_members(group: Sequence[str], claimed: set[str], side: str) -> None:
    if len(set(group)) != len(group):
        raise InvalidSpec(f"{side} tie group {list(group)} names a key twice")
    for key in group:
        if key in claimed:
            raise InvalidSpec(f"{side} tie groups: '{key}' is in more than one group")
        claimed.add(key)


def _source_aliases(source: ArchSpec) -> dict[str, str]:
    """alias -> stored key, from the checkpoint's tie groups (only the first is stored)."""
    aliases: dict[str, str] = {}
    claimed: set[str] = set()
    for group in source.tie_groups:
        if not group:
            continue
        _check_group_members(group, claimed, "source")
        stored = source.get(group[0])
        if stored is None:
            raise InvalidSpec(
                f"source tie group {list(group)}: its first member '{group[0]}' is not stored"
            )
        for key in group[1:]:
            other = source.get(key)
            if other is None:
                aliases[key] = stored.key
            elif other.shape != stored.shape:
                raise InvalidSpec(
                    f"source tie group {list(group)}: '{key}' {list(other.shape)} and "
                    f"'{stored.key}' {list(stored.shape)} cannot share storage"
                )
    return aliases


def _target_tie_groups(target: ArchSpec) -> list[tuple[str, ...]]:
    """Target tie groups, validated, ordered by their first member's position in the
    target (so that the plan does not depend on the order the groups were listed in)."""
    position = {key: i for i, key in enumerate(target.keys)}
    claimed: set[str] = set()
    groups: list[tuple[str, ...]] = []
    for group in target.tie_groups:
        _check_group_members(group, claimed, "target")
        unknown = [k for k in group if k not in position]
        if unknown:
            raise InvalidSpec(f"target tie group {list(group)} names unknown keys {unknown}")
        if len(group) < 2:
            continue
        first = target[group[0]]
        for key in group[1:]:
            other = target[key]
            if (other.shape, other.dtype) != (first.shape, first.dtype):
                raise InvalidSpec(
                    f"target tie group {list(group)}: '{key}' {list(other.shape)} "
                    f"{other.dtype} and '{first.key}' {list(first.shape)} {first.dtype} "
                    "cannot share storage"
                )
        groups.append(tuple(group))
    return sorted(groups, key=lambda g: min(position[k] for k in g))


# ------------------------------------------------------------------------------ helpers


@dataclass(slots=True)
class _Source:
    """A checkpoint tensor as the stages see it, under its current (possibly renamed) name."""

    stored: str  # the key the fetch reads
    original: str  # its name in the checkpoint: the stored key, or a tie alias of it
    shape: Shape
    dtype: str
    position: int | None  # order in the checkpoint; None for aliases (never stored)
    renames: list[str] = field(default_factory=list)  # rules that renamed it, in order
    renamed_by: str | None = None  # the last stage that renamed it ("adapter" / "prefix")
    evidence: dict[str, Any] | None = None  # why the prefix stage renamed it


@dataclass(frozen=True)
class _Decision:
    """What stage 6 decided for one name-paired tensor whose shape differs."""

    ops: list[Op] | None  # None: the model keeps its own value
    rule: str
    evidence: dict[str, Any] | None = None
    warning: str | None = None


def _with_history(src: _Source, rule: str) -> str:
    """A rule prefixed with how the checkpoint key got its current name."""
    notes = list(src.renames)
    if src.original != src.stored:
        notes.append(f"'{src.original}' is stored as '{src.stored}' (tied in the checkpoint)")
    return "; ".join([*notes, rule] if rule else notes)


def _last(key: str) -> str:
    return key.rpartition(".")[2]


def _module(key: str) -> str:
    return key.rpartition(".")[0]


def _dot_cuts(key: str) -> list[int]:
    """Positions where a dot-boundary suffix starts: 0, and after each of the last
    MAX_SUFFIX_DEPTH dots. Every suffix is hashed, so all of them would cost quadratic time
    in a key's depth (a key of 500 one-letter parts: 250 KB hashed)."""
    cuts: list[int] = []
    end = len(key)
    while len(cuts) < MAX_SUFFIX_DEPTH and (dot := key.rfind(".", 0, end)) >= 0:
        cuts.append(dot + 1)
        end = dot
    return [0, *reversed(cuts)]


def _normalized(key: str) -> str:
    lowered = key.lower()
    parts = lowered.rsplit(".", 3)
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] in _WEIGHT_NORM_SUFFIX:
        return ".".join([*parts[:-3], parts[-2] + _WEIGHT_NORM_SUFFIX[parts[-1]]])
    head, dot, last = lowered.rpartition(".")
    return head + dot + LEGACY_NAMES.get(last, last)


def _names(keys: Sequence[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:MAX_NAMES_IN_MESSAGE])
    more = len(keys) - MAX_NAMES_IN_MESSAGE
    return shown + (f" (+{more} more)" if more > 0 else "")


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


# ------------------------------------------------------------------------------ the planner


class _Planner:
    def __init__(
        self,
        source: ArchSpec,
        target: ArchSpec,
        policy: Policy,
        adapters: Sequence[AdapterInput],
        aliases: dict[str, str],
        groups: list[tuple[str, ...]],
        budget: AdapterBudget,
    ) -> None:
        self.source, self.target, self.policy = source, target, policy
        self.budget = budget
        self.adapters, self.groups = adapters, groups
        self.allowed_ops = frozenset(policy.allow_ops)
        self.target_index = {key: i for i, key in enumerate(target.keys)}
        # Unmatched tensors on both sides; dicts keep source / target order.
        self.pool: dict[str, _Source] = {
            t.key: _Source(t.key, t.key, t.shape, t.dtype, i) for i, t in enumerate(source.tensors)
        }
        for alias, stored in sorted(aliases.items(), key=lambda a: self.pool[a[1]].position or 0):
            ref = source[stored]
            self.pool[alias] = _Source(stored, alias, ref.shape, ref.dtype, None)
        self.open: dict[str, TensorSpec] = {t.key: t for t in target.tensors}
        self.entries: dict[str, Entry] = {}
        self.loaded_from: dict[str, _Source] = {}
        self.shape_queue: list[tuple[str, _Source]] = []
        self.warnings: list[str] = []
        self.reasons: list[str] = []
        self.dropped: list[str] = []
        self.used_adapters: set[int] = set()
        # Derive rules: the inputs of each several-source entry, and which rule took each
        # checkpoint tensor (a second rule wanting it is an overlap, said so).
        self.inputs_of: dict[str, list[_Source]] = {}
        self.consumed: dict[str, str] = {}
        # Stage 6 landmarks, found when first needed.
        self.first_conv: str | None = None
        self.head_keys: frozenset[str] = frozenset()

    def run(self) -> Plan:
        self.stage_adapters()
        self.stage_prefix()
        self.stage_exact()
        self.stage_normalized()
        if self.policy.allow_structural:
            self.stage_structural()
        self.stage_shape_ops()
        self.stage_dtype()
        self.stage_buffers()
        self.stage_missing()
        self.apply_tie_groups()
        self.report_missing()
        return self.build_plan()

    # ---------------------------------------------------------------- recording entries

    def load(
        self,
        key: str,
        src: _Source,
        *,
        stage: str,
        rule: str,
        ops: Sequence[Op] = (),
        evidence: dict[str, Any] | None = None,
    ) -> None:
        merged = {**(src.evidence or {}), **(evidence or {})} or None
        self.entries[key] = Entry(
            target=key,
            source=src.stored,
            action="transform" if ops else "copy",
            stage=stage,
            rule=_with_history(src, rule),
            ops=list(ops),
            evidence=merged,
        )
        self.loaded_from[key] = src

    def keep(
        self, key: str, *, stage: str, rule: str, evidence: dict[str, Any] | None = None
    ) -> None:
        self.entries[key] = Entry(key, None, "keep_target", stage, rule, [], evidence)

    def take(self, key: str, name: str | None = None) -> None:
        """Remove a target key (and a source name) from the unmatched pools."""
        del self.open[key]
        if name is not None:
            del self.pool[name]

    def forbidden(self, ops: Sequence[Op]) -> list[str]:
        return sorted({op["op"] for op in ops} - self.allowed_ops)

    # ---------------------------------------------------------------- stage 1: adapters

    def stage_adapters(self) -> None:
        if not self.adapters:
            return
        self.rewrite_source_keys()
        used_rules = self.derive_tensors()
        for key in list(self.open):
            matches = match_op_rules(self.adapters, key, self.budget)
            if matches:
                # Copies: a plan must never share (and so let callers mutate) an adapter's ops.
                ops_and_labels = [(copy.deepcopy(m.op), m.label) for m in matches]
                if self.attach_adapter_ops(key, ops_and_labels):
                    used_rules.update((m.adapter, m.rule) for m in matches)
                    self.used_adapters.update(m.adapter for m in matches)
                continue
            src = self.pool.get(key)
            if (
                src is not None
                and src.renamed_by == "adapter"
                and src.shape == self.open[key].shape
            ):
                self.take(key, key)
                self.load(key, src, stage="adapter", rule="")
        for a, (meta, spec) in enumerate(self.adapters):
            for r, rule in [*spec.op_rules, *spec.derive_rules]:
                if (a, r) not in used_rules:
                    self.warnings.append(
                        f"adapter {adapter_label(meta, spec)} rule {r}: {rule.type} rule "
                        "applied to no key"
                    )

    def derive_tensors(self) -> set[tuple[int, int]]:
        """Split and concat/stack rules, adapter by adapter and rule by rule, over the
        checkpoint keys as the key rules left them. Returns the (adapter, rule) pairs used."""
        used: set[tuple[int, int]] = set()
        for a, (meta, spec) in enumerate(self.adapters):
            for r, rule in spec.derive_rules:
                label = f"adapter {adapter_label(meta, spec)} rule {r}: {rule.describe()}"
                if isinstance(rule, SplitRule):
                    applied = self.split(rule, label)
                else:
                    applied = self.combine(rule, label)
                if applied:
                    used.add((a, r))
                    self.used_adapters.add(a)
        return used

    def overlap(self, key: str, label: str) -> None:
        earlier = self.entries[key].rule if key in self.entries else self.consumed.get(key, "")
        self.reasons.append(f"rules overlap on '{key}': {earlier.split('; ')[-1]} and {label}")

    def split(self, rule: SplitRule, label: str) -> bool:
        applied = False
        for name in [*self.pool, *self.consumed]:
            self.budget.charge(len(name))
            targets = rule.expand(name)
            if targets is None:
                continue
            targets = rule.repeated(targets, lambda t: t in self.open or t in self.entries)
            if not targets:
                continue  # a repeat whose first target the model lacks: not its layout
            if name in self.consumed:  # an earlier rule took it already
                self.overlap(name, label)
                applied = True
                continue
            for target in targets:
                self.budget.check_key(target, name, label)
            if any(t not in self.open for t in targets):
                taken = [t for t in targets if t in self.entries]
                for t in taken:
                    self.overlap(t, label)
                if not taken:
                    continue  # the model has not all the pieces: not its layout
            applied = True
            src = self.pool.pop(name)
            self.consumed[name] = label
            self.split_one(name, src, [t for t in targets if t in self.open], rule, label)
        return applied

    def split_one(
        self, name: str, src: _Source, targets: list[str], rule: SplitRule, label: str
    ) -> None:
        dim = rule.dim
        try:  # the source as the cut sees it: ``before`` may flatten it
            shape, _ = infer_chain(rule.before, src.shape, src.dtype)
        except OpError as exc:
            self.reasons.append(f"{label}: '{name}' {_shape_text(src.shape)}: {exc}")
            shape = None
        if shape is None:
            sizes: list[int] = []  # every target keeps its own value, below
        elif rule.sizes is not None:
            sizes = list(rule.sizes)
        elif rule.ops:
            sizes = []
            self.reasons.append(f"{label}: give 'sizes' (the ops change the pieces' shapes)")
        else:
            sizes = [
                self.open[t].shape[dim] if dim < len(self.open[t].shape) else -1 for t in targets
            ]
        covered = sum(sizes)
        if (
            shape is not None
            and sizes
            and (dim >= len(shape) or -1 in sizes or covered != shape[dim])
        ):
            along = shape[dim] if dim < len(shape) else "no such dim"
            self.reasons.append(
                f"{label}: '{name}' {_shape_text(shape)} cut into pieces of "
                f"{sizes} along dim {dim} ({along}): the pieces must cover it exactly"
            )
            sizes = []
        offset = 0
        for i, target in enumerate(targets):
            self.take(target)
            if not sizes:
                self.keep(target, stage="adapter", rule=label, evidence={"checkpoint_key": name})
                continue
            ops = [
                *copy.deepcopy(rule.before),
                slice_op(dim, offset, offset + sizes[i]),
                *copy.deepcopy(rule.ops),
            ]
            offset += sizes[i]
            self.derived(target, [src], ops, label)

    def combine(self, rule: CombineRule, label: str) -> bool:
        applied = False
        for key in list(self.open):
            self.budget.charge(len(key))
            names = rule.expand(key)
            if names is None:
                continue
            names = rule.repeated(names, lambda n: n in self.pool or n in self.consumed)
            for name in names:
                self.budget.check_key(name, key, label)
            lacking = [n for n in names if n not in self.pool]
            if len(lacking) == len(names) and not any(n in self.consumed for n in names):
                continue  # none of the pieces: not this checkpoint's layout
            applied = True
            self.take(key)
            if taken := [n for n in lacking if n in self.consumed]:
                for name in taken:
                    self.overlap(name, label)
                self.keep(key, stage="adapter", rule=label)
                continue
            if lacking:
                self.reasons.append(
                    f"'{key}': {label} needs {_names(names)}; the checkpoint lacks "
                    f"{_names(lacking)}"
                )
                self.keep(key, stage="adapter", rule=label)
                continue
            sources = [self.pool.pop(n) for n in names]
            for name in names:
                self.consumed[name] = label
            ops = [combine_op(rule.type, rule.dim), *copy.deepcopy(rule.ops)]
            self.derived(key, sources, ops, label)
        return applied

    def derived(self, key: str, sources: list[_Source], ops: list[Op], label: str) -> None:
        """The entry for a target key a derive rule makes, checked: shapes line up, and the
        policy allows the ops; otherwise the model keeps its own value, with the reason."""
        target = self.open.get(key) or self.target[key]
        inputs = [(s.shape, s.dtype) for s in sources]
        try:
            shape, _ = infer_inputs(ops, inputs)
            problem = None if shape == target.shape else f"give {_shape_text(shape)}"
        except OpError as exc:
            problem = str(exc)
        names = [s.stored for s in sources]
        evidence = {"checkpoint_keys": [s.original for s in sources]}
        reason = problem and (
            f"'{key}' {_shape_text(target.shape)}: {label} on {_names(names)}: {problem}"
        )
        if self.refused(key, reason, ops, label, label, evidence):
            return
        if len(sources) == 1:
            self.load(key, sources[0], stage="adapter", rule=label, ops=ops)
        else:
            history = "; ".join(n for s in sources for n in s.renames)
            self.entries[key] = Entry(
                target=key,
                source=names[0],
                action="transform",
                stage="adapter",
                rule=f"{history}; {label}" if history else label,
                ops=ops,
                evidence=evidence,
                sources=names,
            )
            self.loaded_from[key] = sources[0]
            self.inputs_of[key] = sources

    def rewrite_source_keys(self) -> None:
        result = apply_key_rules(self.adapters, list(self.pool), self.budget)
        self.reasons.extend(result.errors)
        self.used_adapters.update(result.applied)
        pool: dict[str, _Source] = {}
        for name, original in result.keys.items():
            src = self.pool[original]
            if name != original:
                src.renames.extend(result.rules[name])
                src.renamed_by = "adapter"
            pool[name] = src
        self.dropped = [
            self.pool[k].stored for k in result.dropped if self.pool[k].position is not None
        ]
        self.pool = pool

    def refused(
        self,
        key: str,
        reason: str | None,
        ops: Sequence[Op],
        labels: str,
        rule: str,
        evidence: dict[str, Any] | None,
    ) -> bool:
        """Adapter ops that cannot apply (``reason``) or that the policy forbids: the model
        keeps its own value and the plan says why. False when the ops may go ahead."""
        if reason is None and (forbidden := self.forbidden(ops)):
            reason = (
                f"'{key}' needs {', '.join(forbidden)} ({labels}), which the policy does not allow"
            )
        if reason is None:
            return False
        self.reasons.append(reason)
        self.keep(key, stage="adapter", rule=rule, evidence=evidence)
        return True

    def attach_adapter_ops(self, key: str, ops_and_labels: list[tuple[Op, str]]) -> bool:
        """Entry for a target key that adapter op rules name. False when the rules have
        nothing to act on (no checkpoint key of that name, and the chain needs an input)."""
        ops = [op for op, _ in ops_and_labels]
        labels = "; ".join(label for _, label in ops_and_labels)
        target = self.open[key]
        produces = ops[0]["op"] == "fill"
        src = None if produces else self.pool.get(key)
        if src is None and not produces:
            return False
        shape, dtype = (target.shape, target.dtype) if src is None else (src.shape, src.dtype)
        try:
            out_shape, _ = infer_chain(ops, shape, dtype)
            problem = None if out_shape == target.shape else _shape_text(out_shape)
        except OpError as exc:
            problem = str(exc)
        self.take(key, None if src is None else key)
        evidence = None if src is None else {"checkpoint_key": src.stored}
        rule = labels if src is None else _with_history(src, labels)
        reason = problem and (
            f"'{key}': adapter ops give {problem} from {_shape_text(shape)}, "
            f"the model expects {_shape_text(target.shape)} ({labels})"
        )
        if self.refused(key, reason, ops, labels, rule, evidence):
            return True
        if src is None:
            self.entries[key] = Entry(key, None, "fill", "adapter", labels, ops)
        else:
            self.load(key, src, stage="adapter", rule=labels, ops=ops)
        return True

    # ---------------------------------------------------------------- stage 2: prefix

    def stage_prefix(self) -> None:
        if self.pool and self.open:
            self.strip_wrappers()
            self.substitute_prefix()

    def rename_pool(
        self, renames: dict[str, str], rule: str, evidence: dict[str, Any] | None
    ) -> None:
        pool: dict[str, _Source] = {}
        for name, src in self.pool.items():
            new = renames.get(name, name)
            if new != name:
                src.renames.append(rule)
                src.renamed_by = "prefix"
                src.evidence = evidence
            pool[new] = src
        self.pool = pool

    def strip_wrappers(self) -> None:
        source_chain = _wrapper_chain(self.pool)
        target_chain = _wrapper_chain(self.open)
        common = 0
        while common < min(len(source_chain), len(target_chain)) and (
            source_chain[common] == target_chain[common]
        ):
            common += 1
        strip = "".join(f"{c}." for c in source_chain[common:])
        add = "".join(f"{c}." for c in target_chain[common:])
        if not strip and not add:
            return
        # Never strip what the model also has somewhere, nor add what the checkpoint has.
        lead = "".join(f"{c}." for c in source_chain[:common])
        if strip and any(k.startswith(lead + strip) for k in self.open):
            return
        if add and any(k.startswith(lead + add) for k in self.pool):
            return
        old, new = lead + strip, lead + add
        if not new:
            rule = f"strip wrapper '{old}'"
        elif not old:
            rule = f"add wrapper '{new}'"
        else:
            rule = f"wrapper '{old}' -> '{new}'"
        self.rename_pool({name: new + name[len(old) :] for name in self.pool}, rule, None)

    def substitute_prefix(self) -> None:
        """The one dot-boundary substitution p_s -> p_t that maximizes exact (key, shape)
        matches, when it gains any. Keys that the model has as they are keep their names."""
        target_shapes = {key: t.shape for key, t in self.open.items()}
        # Names on both sides stay: an exact match, or (other shape) one for stage 6.
        paired = {name for name in self.pool if name in target_shapes}
        if len(paired) in (len(self.pool), len(self.open)):
            return  # nothing left to gain
        unmatched = [(n, s.shape) for n, s in self.pool.items() if n not in paired]
        votes = _vote_prefixes(
            unmatched, [(k, s) for k, s in target_shapes.items() if k not in paired]
        )
        ranked = sorted(votes.items(), key=lambda kv: (-kv[1], _candidate_order(kv[0])))
        best: tuple[tuple[int, tuple[int, str]], tuple[str, str], int] | None = None
        for candidate, _ in ranked[:MAX_CANDIDATES]:
            matches = self.substitution_matches(*candidate, unmatched, target_shapes)
            # One module renamed is not a prefix transform: that is for structural alignment,
            # which checks order and module consistency before it trusts a rename.
            if len({_module(key) for key in matches}) < 2:
                continue
            order = (-len(matches), _candidate_order(candidate))
            if best is None or order < best[0]:
                best = (order, candidate, len(matches))
        if best is None:
            return
        (p_s, p_t), gain = best[1], best[2]
        renames = {
            name: p_t + name[len(p_s) :]
            for name, _ in unmatched
            if name.startswith(p_s) and not self.collides(name, p_s, p_t)
        }
        evidence = {"substitution": [p_s, p_t], "matches": gain}
        self.rename_pool(renames, f"'{p_s}' -> '{p_t}'", evidence)

    def substitution_matches(
        self,
        p_s: str,
        p_t: str,
        unmatched: list[tuple[str, Shape]],
        target_shapes: dict[str, Shape],
    ) -> list[str]:
        """Target keys that the unmatched checkpoint keys under p_s would match exactly."""
        matches = []
        for name, shape in unmatched:
            if name.startswith(p_s):
                new = p_t + name[len(p_s) :]
                if target_shapes.get(new) == shape and not self.collides(name, p_s, p_t):
                    matches.append(new)
        return matches

    def collides(self, name: str, p_s: str, p_t: str) -> bool:
        """A substituted name that another checkpoint key, not renamed, already holds."""
        new = p_t + name[len(p_s) :]
        return new in self.pool and new != name

    # ---------------------------------------------------------------- stage 3: exact

    def stage_exact(self) -> None:
        for key in [k for k in self.open if k in self.pool]:
            src = self.pool[key]
            self.take(key, key)
            if src.shape != self.target[key].shape:
                self.shape_queue.append((key, src))
            elif src.renamed_by is not None:
                self.load(key, src, stage=src.renamed_by, rule="")
            else:
                self.load(key, src, stage="exact", rule="same key and shape")

    # ---------------------------------------------------------------- stage 4: normalized

    def stage_normalized(self) -> None:
        sources: dict[str, list[str]] = defaultdict(list)
        for name in self.pool:
            sources[_normalized(name)].append(name)
        targets: dict[str, list[str]] = defaultdict(list)
        for key in self.open:
            targets[_normalized(key)].append(key)
        for norm, keys in targets.items():
            names = sources.get(norm, [])
            if len(keys) != 1 or len(names) != 1:
                continue
            key, name = keys[0], names[0]
            src = self.pool[name]
            self.take(key, name)
            if src.shape != self.target[key].shape:
                self.shape_queue.append((key, src))
            else:
                self.load(key, src, stage="normalized", rule=_normalized_rule(name, key))

    # ---------------------------------------------------------------- stage 5: structural

    def stage_structural(self) -> None:
        sources = [(n, s) for n, s in self.pool.items() if s.position is not None]
        pairs = _signature_pairs(sources, list(self.open.items()))
        if not pairs:
            return
        refusal = _structural_refusal(pairs, [n for n, _ in sources], list(self.open))
        if refusal is not None:
            self.warnings.append(
                f"structural alignment refused: {refusal}; {len(pairs)} candidate pairs "
                "left unmatched"
            )
            return
        modules = {(_module(n), _module(k)) for n, k in pairs}
        for name, key in pairs:
            src = self.pool[name]
            self.take(key, name)
            src_module, tgt_module = _module(name), _module(key)
            self.load(
                key,
                src,
                stage="structural",
                rule=f"aligned by order and shape: '{name}' -> '{key}'",
                evidence={
                    "module_map": [src_module, tgt_module],
                    "aligned_tensors": len(pairs),
                    "aligned_modules": len(modules),
                },
            )
        self.warnings.append(
            f"structural alignment: {len(pairs)} tensors in {len(modules)} modules paired by "
            "order and shape (names differ)"
        )

    # ---------------------------------------------------------------- stage 6: shape ops

    def stage_shape_ops(self) -> None:
        if not self.shape_queue:
            return
        self.first_conv = next(
            (t.key for t in self.target.tensors if len(t.shape) >= 3 and _last(t.key) == "weight"),
            None,
        )
        self.head_keys = self.find_head()
        for key, src in sorted(self.shape_queue, key=lambda q: self.target_index[q[0]]):
            self.resolve_shape(key, src)

    def find_head(self) -> frozenset[str]:
        """The last >=2-D weight in target order and its sibling bias."""
        weight = next(
            (
                t.key
                for t in reversed(self.target.tensors)
                if len(t.shape) >= 2 and _last(t.key) == "weight"
            ),
            None,
        )
        if weight is None:
            return frozenset()
        bias = weight[: -len("weight")] + "bias"
        return frozenset({weight, bias} if bias in self.target else {weight})

    def resolve_shape(self, key: str, src: _Source) -> None:
        target = self.target[key]
        decision = (
            self.first_conv_channels(key, src.shape, target.shape)
            or self.classifier_head(key, src.shape, target.shape)
            or self.position_embedding(key, src.shape, target.shape)
            or self.embedding_rows(key, src.shape, target.shape)
        )
        if decision is not None and decision.ops is not None:
            try:
                out_shape, _ = infer_chain(decision.ops, src.shape, src.dtype)
            except OpError:
                out_shape = None
            if out_shape != target.shape:
                decision = None  # e.g. an integer tensor: not ours to interpolate
        if decision is None:
            decision = _Decision(
                None,
                f"shape mismatch: checkpoint {_shape_text(src.shape)}, "
                f"model {_shape_text(target.shape)}",
                warning=f"shape mismatch for '{key}': checkpoint '{src.original}' "
                f"{_shape_text(src.shape)}, model {_shape_text(target.shape)}; "
                "keeping the model's value",
            )
        evidence = {**(decision.evidence or {}), "checkpoint_key": src.stored}
        kept_rule = _with_history(src, decision.rule)
        if decision.warning:
            self.warnings.append(decision.warning)
        if decision.ops is None:
            self.keep(key, stage="shape_ops", rule=kept_rule, evidence=evidence)
        elif forbidden := self.forbidden(decision.ops):
            self.reasons.append(
                f"'{key}' needs {', '.join(forbidden)} ({decision.rule}), "
                "which the policy does not allow"
            )
            self.keep(key, stage="shape_ops", rule=kept_rule, evidence=evidence)
        else:
            self.load(
                key,
                src,
                stage="shape_ops",
                rule=decision.rule,
                ops=decision.ops,
                evidence=decision.evidence,
            )

    def first_conv_channels(self, key: str, s: Shape, t: Shape) -> _Decision | None:
        if key != self.first_conv or len(s) != len(t) or s[0] != t[0] or s[2:] != t[2:]:
            return None
        return _Decision(
            [adapt_in_channels_op(t[1])],
            f"first conv input channels {s[1]} -> {t[1]}",
            {"in_chans": [s[1], t[1]]},
        )

    def classifier_head(self, key: str, s: Shape, t: Shape) -> _Decision | None:
        if key not in self.head_keys or len(s) != len(t) or s[1:] != t[1:]:
            return None
        rows = f"classifier head rows {s[0]} -> {t[0]}"
        evidence = {"head_rows": [s[0], t[0]]}
        if self.policy.head == "slice" and t[0] <= s[0]:
            return _Decision([slice_op(0, 0, t[0])], f"{rows}: first {t[0]} rows", evidence)
        why = (
            "policy head='keep'"
            if self.policy.head == "keep"
            else "more rows than the checkpoint has"
        )
        return _Decision(
            None,
            f"{rows}: the model keeps its own ({why})",
            evidence,
            warning=f"classifier head '{key}': checkpoint has {s[0]} rows, the model {t[0]}; "
            f"keeping the model's ({why})",
        )

    def position_embedding(self, key: str, s: Shape, t: Shape) -> _Decision | None:
        last = _last(key)
        if "pos_embed" not in last and "position_embedding" not in last:
            return None
        if len(s) != 3 or len(t) != 3 or s[0] != 1 or t[0] != 1 or s[2] != t[2]:
            return None
        from_tokens = self.prefix_tokens(_module(key))
        if from_tokens is not None:
            # timm's no_embed_class models keep the tokens out of pos_embed: try 0 as well.
            candidates, origin = [from_tokens, 0], "prefix tokens in the model"
        else:
            candidates, origin = list(range(MAX_GUESSED_PREFIX_TOKENS + 1)), "square grids"
        for p in candidates:
            old, new = _square_side(s[1] - p), _square_side(t[1] - p)
            if old is not None and new is not None:
                return _Decision(
                    [resample_pos_embed_op(p, [old, old], [new, new])],
                    f"resample position embedding {old}x{old} -> {new}x{new}, prefix tokens: {p}",
                    {"num_prefix_tokens": p, "prefix_tokens_from": origin},
                )
        return None

    def prefix_tokens(self, module: str) -> int | None:
        """Tokens before the grid: the cls/dist/reg tokens of the pos embed's module."""
        dot = f"{module}." if module else ""
        found = [self.target.get(dot + name) for name in PREFIX_TOKEN_NAMES]
        tokens = [t for t in found if t is not None]
        if not tokens:
            return None
        return sum(t.shape[1] if len(t.shape) == 3 else 1 for t in tokens)

    def embedding_rows(self, key: str, s: Shape, t: Shape) -> _Decision | None:
        if len(s) != 2 or len(t) != 2 or s[1] != t[1] or "embed" not in key.lower():
            return None
        rows = f"embedding rows {s[0]} -> {t[0]}"
        evidence = {"embedding_rows": [s[0], t[0]]}
        if self.policy.embedding != "resize":
            return _Decision(
                None,
                f"{rows}: the model keeps its own (policy embedding='keep')",
                evidence,
                warning=f"embedding '{key}': checkpoint has {s[0]} rows, the model {t[0]}; "
                "keeping the model's (policy embedding='keep')",
            )
        if t[0] < s[0]:
            return _Decision([slice_op(0, 0, t[0])], f"{rows}: truncated", evidence)
        return _Decision([pad_op(0, t[0], 0.0)], f"{rows}: zero-padded", evidence)

    # ---------------------------------------------------------------- stage 7: dtype

    def stage_dtype(self) -> None:
        for key, entry in list(self.entries.items()):
            if entry.action == "keep_target":
                continue
            target, src = self.target[key], self.loaded_from.get(key)
            # Only adapter fills have no source; a fill ignores its input anyway.
            shape, dtype = (src.shape, src.dtype) if src else (target.shape, target.dtype)
            if key in self.inputs_of:
                dtype = infer_inputs(entry.ops, [(s.shape, s.dtype) for s in self.inputs_of[key]])[
                    1
                ]
            elif entry.ops:
                dtype = infer_chain(entry.ops, shape, dtype)[1]
            if dtype == target.dtype:
                continue
            rule = f"cast {dtype} -> {target.dtype}"
            if "cast" not in self.allowed_ops:
                self.reasons.append(f"'{key}' needs {rule}, which the policy does not allow")
                evidence = {"checkpoint_key": src.stored} if src else None
                self.keep(key, stage="dtype", rule=rule, evidence=evidence)
                continue
            entry.ops.append(cast_op(target.dtype))
            entry.action = "transform" if entry.action == "copy" else entry.action
            entry.rule = f"{entry.rule}; {rule}" if entry.rule else rule
            if entry.stage == "exact":
                entry.stage = "dtype"

    # ---------------------------------------------------------------- stage 8: buffers

    def stage_buffers(self) -> None:
        if "fill" not in self.allowed_ops:
            return  # the model's own counter is as good: leave it to stage 9
        for key in [k for k in self.open if _last(k) == "num_batches_tracked"]:
            target = self.target[key]
            if target.numel > MAX_BUFFER_FILL_ELEMENTS:
                # Not a BatchNorm counter: the target alone would choose what the server
                # builds and sends. Left to stage 9 (the model keeps its own), and said so.
                self.warnings.append(
                    f"'{key}' {_shape_text(target.shape)} is not filled: a BatchNorm "
                    f"num_batches_tracked is a scalar (at most {MAX_BUFFER_FILL_ELEMENTS} "
                    "element is filled); the model keeps its own"
                )
                continue
            self.take(key)
            self.entries[key] = Entry(
                key,
                None,
                "fill",
                "buffers",
                "num_batches_tracked filled with 0",
                [fill_op(0, target.shape, target.dtype)],
            )

    # ---------------------------------------------------------------- stage 9: missing

    def stage_missing(self) -> None:
        for key in list(self.open):
            self.take(key)
            self.keep(key, stage="missing", rule="not in the checkpoint: the model keeps its own")

    def report_missing(self) -> None:
        missing = [
            e.target
            for e in self.ordered_entries()
            if e.stage == "missing" and e.action == "keep_target"
        ]
        if missing and self.policy.on_missing == "error":
            self.reasons.append(
                f"{len(missing)} model keys are not in the checkpoint "
                f"(policy on_missing='error'): {_names(missing)}"
            )

    # ---------------------------------------------------------------- tie groups

    def apply_tie_groups(self) -> None:
        for group in self.groups:
            loaded = [k for k in group if self.entries[k].action != "keep_target"]
            if not loaded:
                continue
            canonical = self.entries[loaded[0]]
            for key in group:
                if key == canonical.target:
                    continue
                entry = self.entries[key]
                if entry.action != "keep_target" and (
                    (entry.inputs, entry.ops) != (canonical.inputs, canonical.ops)
                ):
                    self.warnings.append(
                        f"tie group: '{key}' matched '{entry.source}' but shares storage with "
                        f"'{canonical.target}', which reads '{canonical.source}'; using the latter"
                    )
                self.entries[key] = Entry(
                    target=key,
                    source=canonical.source,
                    action=canonical.action,
                    stage=canonical.stage,
                    rule=f"tied to {canonical.target}",
                    ops=copy.deepcopy(canonical.ops),
                    tied_to=canonical.target,
                    sources=copy.copy(canonical.sources),
                )

    # ---------------------------------------------------------------- verdict

    def ordered_entries(self) -> list[Entry]:
        return [self.entries[t.key] for t in self.target.tensors]

    def build_plan(self) -> Plan:
        entries = self.ordered_entries()
        used = {key for e in entries for key in e.inputs}
        unused = [t.key for t in self.source.tensors if t.key not in used]
        dropped_set = set(self.dropped)
        unused = [k for k in unused if k not in dropped_set]
        reasons = list(self.reasons)
        if not used:
            reasons.append("nothing matches: no model tensor can be loaded from the checkpoint")
        verdict = self.verdict(entries, unused, reasons)
        if self.policy.strict and verdict not in ("exact", "incompatible"):
            reasons.append(f"strict policy: the plan is '{verdict}', not 'exact'")
            verdict = "incompatible"
        keys, params = self.coverage(entries)
        return Plan(
            verdict=verdict,
            entries=entries,
            unused=unused,
            dropped=list(self.dropped),
            keys=keys,
            params=params,
            warnings=[*self.warnings, *_rename_hints(entries, unused, self.source, self.target)],
            reasons=reasons,
            adapters=[
                dict(meta) for i, (meta, _) in enumerate(self.adapters) if i in self.used_adapters
            ],
            policy=self.policy,
            source_arch_fp=self.source.arch_fp,
            target_arch_fp=self.target.arch_fp,
        )

    def verdict(self, entries: list[Entry], unused: list[str], reasons: list[str]) -> Verdict:
        if reasons:
            return "incompatible"
        as_stored = all(
            e.action == "copy" and e.stage == "exact" and e.source == e.target and e.tied_to is None
            for e in entries
        )
        if as_stored and not unused and not self.dropped:
            return "exact"
        if any(e.action == "keep_target" for e in entries):
            return "partial"
        return "adapted"

    def coverage(self, entries: list[Entry]) -> tuple[Coverage, Coverage]:
        keys, params = Coverage(), Coverage()
        for e in entries:
            numel = self.target[e.target].numel
            if e.action == "keep_target":
                keys.kept += 1
                params.kept += numel
            elif e.action == "copy" and e.stage == "exact":
                keys.exact += 1
                params.exact += numel
            else:
                keys.adapted += 1
                params.adapted += numel
        return keys, params


# ------------------------------------------------------------------------------ pure helpers


def _neighbourhood(key: str, shape: Sequence[int]) -> tuple[str, str, tuple[int, ...]]:
    """Where a tensor sits, for guessing renames: its module's parent (wrappers stripped),
    its own name (``weight``) and its shape. ``attn.q_proj.weight`` and
    ``attn.query.weight`` of one shape share one."""
    parts = key.split(".")
    while len(parts) > 2 and parts[0] in WRAPPERS:
        parts = parts[1:]
    return ".".join(parts[:-2]), parts[-1], tuple(shape)  # "" for a top-level module


def _beside(neighbourhood: tuple[str, str, tuple[int, ...]]) -> bool:
    """Only tensors inside a named module are guessed at: top-level ones (``0.weight``,
    ``bn.bias``) share no parent, so a shape match between them says nothing."""
    return bool(neighbourhood[0])


def _rename_hints(
    entries: Sequence[Entry], unused: Sequence[str], source: ArchSpec, target: ArchSpec
) -> list[str]:
    """A warning pairing target keys kept because the checkpoint lacks them with unused
    checkpoint tensors of the same shape beside them: a strict load of such a plan keeps the
    model's values where the checkpoint most likely has the weights under another name."""
    source_shapes = {t.key: t.shape for t in source.tensors}
    beside: dict[tuple[str, str, tuple[int, ...]], list[str]] = defaultdict(list)
    for key in unused:
        if _beside(place := _neighbourhood(key, source_shapes[key])):
            beside[place].append(key)
    target_shapes = {t.key: t.shape for t in target.tensors}
    pairs = []
    for entry in entries:
        if entry.action == "keep_target" and entry.stage == "missing":
            candidates = beside.get(_neighbourhood(entry.target, target_shapes[entry.target]))
            if candidates:  # each unused tensor named once, in checkpoint order
                pairs.append(f"'{entry.target}' <- '{candidates.pop(0)}'")
    if not pairs:
        return []
    shown = ", ".join(pairs[:MAX_NAMES_IN_MESSAGE])
    more = len(pairs) - MAX_NAMES_IN_MESSAGE
    return [
        f"{len(pairs)} kept key(s) have an unused checkpoint tensor of their shape beside them, "
        f"probably a rename no stage knows (register an adapter that renames it): {shown}"
        + (f" (+{more} more)" if more > 0 else "")
    ]


def _wrapper_chain(keys: Iterable[str]) -> list[str]:
    """Wrapper components (``module``, ``_orig_mod``) that lead every key, in order."""
    keys = list(keys)
    chain: list[str] = []
    prefix = ""
    while keys:
        for wrapper in WRAPPERS:
            candidate = f"{prefix}{wrapper}."
            if all(k.startswith(candidate) and len(k) > len(candidate) for k in keys):
                chain.append(wrapper)
                prefix = candidate
                break
        else:
            break
    return chain


def _vote_prefixes(
    sources: list[tuple[str, Shape]], targets: list[tuple[str, Shape]]
) -> Counter[tuple[str, str]]:
    """Candidate substitutions p_s -> p_t. Target keys are indexed by every dot-boundary
    suffix joined with their shape; each source key looks its suffixes up, longest first, and
    votes at the first one found, if few target keys share it (a suffix such as "weight" [64]
    says nothing). Linear in the number of keys times their depth."""
    index: dict[tuple[str, Shape], list[str]] = {}
    for key, shape in targets:
        for cut in _dot_cuts(key):
            bucket = index.setdefault((key[cut:], shape), [])
            if len(bucket) <= MAX_BUCKET:
                bucket.append(key[:cut])
    votes: Counter[tuple[str, str]] = Counter()
    for name, shape in sources:
        for cut in _dot_cuts(name):
            found = index.get((name[cut:], shape))
            if found is None:
                continue
            if len(found) <= MAX_BUCKET:
                p_s = name[:cut]
                for p_t in found:
                    if p_t != p_s:
                        votes[(p_s, p_t)] += 1
            break  # shorter suffixes only add the same targets, and more ambiguity
    return votes


def _candidate_order(candidate: tuple[str, str]) -> tuple[int, str]:
    """Ties between substitutions: the shortest (most general) first, then alphabetical."""
    p_s, p_t = candidate
    return (len(p_s) + len(p_t), f"{p_s}\0{p_t}")


def _normalized_rule(name: str, key: str) -> str:
    if "parametrizations." in name.lower() or "parametrizations." in key.lower():
        return f"weight norm: {name} -> {key}"
    s_head, _, s_last = name.rpartition(".")
    t_head, _, t_last = key.rpartition(".")
    legacy = LEGACY_NAMES.get(s_last.lower()) == t_last.lower() and s_last.lower() != t_last.lower()
    parts = []
    if s_head != t_head or (not legacy and s_last != t_last):
        parts.append("lower-case match")
    if legacy:
        parts.append(f"{s_last} -> {t_last}")
    return "; ".join(parts) or "lower-case match"


def _signature_pairs(
    sources: list[tuple[str, _Source]], targets: list[tuple[str, TensorSpec]]
) -> list[tuple[str, str]]:
    """Pairs (source name, target key) of the signatures (last component, shape) that occur
    equally often on both sides, paired in order; sorted by source order."""
    by_sig_s: dict[tuple[str, Shape], list[str]] = defaultdict(list)
    for name, src in sources:
        by_sig_s[(_last(name), src.shape)].append(name)
    by_sig_t: dict[tuple[str, Shape], list[str]] = defaultdict(list)
    for key, t in targets:
        by_sig_t[(_last(key), t.shape)].append(key)
    pairs: list[tuple[str, str]] = []
    for sig, names in by_sig_s.items():
        keys = by_sig_t.get(sig)
        if keys is not None and len(keys) == len(names):
            pairs.extend(zip(names, keys, strict=True))
    order = {name: i for i, (name, _) in enumerate(sources)}
    return sorted(pairs, key=lambda p: order[p[0]])


def _structural_refusal(
    pairs: list[tuple[str, str]], source_names: list[str], target_keys: list[str]
) -> str | None:
    """Why an order-and-shape pairing is ambiguous, or None when it can be trusted: it must
    keep both orders, map modules one-to-one, and pair every tensor of each mapped module."""
    target_order = {key: i for i, key in enumerate(target_keys)}
    for (n1, k1), (n2, k2) in itertools.pairwise(pairs):
        if target_order[k2] < target_order[k1]:
            return f"the order differs ('{n1}' -> '{k1}' but '{n2}' -> '{k2}')"
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for name, key in pairs:
        ms, mt = _module(name), _module(key)
        if forward.setdefault(ms, mt) != mt:
            return f"module '{ms}' would map to both '{forward[ms]}' and '{mt}'"
        if backward.setdefault(mt, ms) != ms:
            return f"modules '{backward[mt]}' and '{ms}' would both map to '{mt}'"
    paired = Counter(_module(name) for name, _ in pairs)
    source_sizes = Counter(_module(n) for n in source_names)
    target_sizes = Counter(_module(k) for k in target_keys)
    for ms, mt in forward.items():
        if source_sizes[ms] != paired[ms] or target_sizes[mt] != paired[ms]:
            return (
                f"module '{ms}' -> '{mt}' is only partly aligned ({paired[ms]} of "
                f"{source_sizes[ms]} checkpoint and {target_sizes[mt]} model tensors)"
            )
    return None
