"""What the pages show, computed from use-case results: no I/O, no SQL, no HTML.

The routes hand these functions specs, versions and plans; the templates only lay out what
comes back. Kept apart so the grouping, paging and plan colouring are testable on data alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.core.plan import Entry, Plan
from service.core.spec import DTYPE_SIZES, ArchSpec, TensorSpec

TOP_LEVEL = "(top level)"

# -- formatting (Jinja filters) ---------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    """11689512 -> '11.7M': parameter counts at a glance."""
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def thousands(n: int) -> str:
    return f"{n:,}"


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:  # SQLite hands back naive UTC datetimes, PostgreSQL aware ones
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def percent(part: int, total: int) -> float:
    return round(100.0 * part / total, 2) if total else 0.0


# -- paging -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, clamped into range
    size: int
    total: int  # items over all pages

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.total / self.size))

    @property
    def start(self) -> int:
        return (self.number - 1) * self.size

    @property
    def end(self) -> int:
        return min(self.start + self.size, self.total)

    @property
    def previous(self) -> int | None:
        return self.number - 1 if self.number > 1 else None

    @property
    def next(self) -> int | None:
        return self.number + 1 if self.number < self.count else None


def paginate(total: int, number: int, size: int) -> Page:
    """A page past the end shows the last one rather than an empty table."""
    pages = max(1, math.ceil(total / size))
    return Page(number=min(max(number, 1), pages), size=size, total=total)


# -- tensor tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRow:
    index: int  # position in state_dict order, 1-based
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def params(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.params * DTYPE_SIZES.get(self.dtype, 0)


@dataclass(frozen=True)
class Group:
    prefix: str
    rows: list[TensorRow]
    continued: bool  # the group began on an earlier page

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)


def module_group(key: str) -> str:
    """The module a tensor belongs to, cut at the first block index.

    ``layer1.0.conv1.weight`` -> ``layer1.0``, ``model.layers.12.mlp.up.weight`` ->
    ``model.layers.12``, ``fc.weight`` -> ``fc``, ``cls_token`` -> the top level: one group
    per block keeps a 10,000-tensor transformer readable.
    """
    parts = key.split(".")[:-1]
    if not parts:
        return TOP_LEVEL
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def tensor_rows(tensors: Iterable[Mapping[str, Any]]) -> list[TensorRow]:
    return [TensorRow(i, t["key"], tuple(t["shape"]), t["dtype"]) for i, t in enumerate(tensors, 1)]


def group_rows(rows: Sequence[TensorRow], *, before: TensorRow | None = None) -> list[Group]:
    """Consecutive rows of one module, in state_dict order; ``before`` is the row just
    before this page, to tell a group continued from the previous page."""
    groups: list[Group] = []
    previous = module_group(before.key) if before is not None else None
    for row in rows:
        prefix = module_group(row.key)
        if groups and groups[-1].prefix == prefix:
            groups[-1].rows.append(row)
        else:
            groups.append(Group(prefix, [row], continued=not groups and prefix == previous))
    return groups


def filter_rows(rows: Sequence[TensorRow], query: str) -> list[TensorRow]:
    needle = query.strip().lower()
    return [r for r in rows if needle in r.key.lower()] if needle else list(rows)


# -- plans ------------------------------------------------------------------------------

# What happened to a target key, as a reader names it; each is a CSS class (row-<kind>).
KINDS = ("exact", "renamed", "adapted", "filled", "kept", "mismatch")
KIND_LABELS = {
    "exact": "exact",
    "renamed": "renamed",
    "adapted": "adapted",
    "filled": "filled",
    "kept": "kept from target",
    "mismatch": "mismatch",
}


def entry_kind(entry: Entry) -> str:
    if entry.action == "copy":
        return "exact" if entry.stage == "exact" and entry.source == entry.target else "renamed"
    if entry.action == "transform":
        return "adapted"
    if entry.action == "fill":
        return "filled"
    # keep_target: missing from the checkpoint, or a head the policy keeps, is by design;
    # anything else is a tensor the checkpoint has but that could not be used.
    if entry.stage == "missing" or "the model keeps its own" in entry.rule:
        return "kept"
    return "mismatch"


@dataclass(frozen=True)
class PlanRow:
    index: int
    entry: Entry
    kind: str
    target_shape: tuple[int, ...] | None
    target_dtype: str
    source_shape: tuple[int, ...] | None
    source_dtype: str
    warned: bool

    @property
    def label(self) -> str:
        return KIND_LABELS[self.kind]

    @property
    def op_names(self) -> list[str]:
        return [str(op.get("op", "?")) for op in self.entry.ops]


def plan_rows(plan: Plan, source: ArchSpec, target: ArchSpec) -> list[PlanRow]:
    warned = _keys_named(plan.warnings + plan.reasons)
    rows = []
    for i, entry in enumerate(plan.entries, 1):
        t = target.get(entry.target)
        s = source.get(entry.source or "") or _checkpoint_tensor(entry, source)
        rows.append(
            PlanRow(
                index=i,
                entry=entry,
                kind=entry_kind(entry),
                target_shape=t.shape if t else None,
                target_dtype=t.dtype if t else "",
                source_shape=s.shape if s else None,
                source_dtype=s.dtype if s else "",
                warned=entry.target in warned,
            )
        )
    return rows


def _checkpoint_tensor(entry: Entry, source: ArchSpec) -> TensorSpec | None:
    """A kept entry's checkpoint tensor (a mismatch names it in its evidence)."""
    key = (entry.evidence or {}).get("checkpoint_key")
    return source.get(key) if isinstance(key, str) else None


def _keys_named(messages: Iterable[str]) -> set[str]:
    """Keys quoted in warnings and reasons ('fc.weight'), to flag their rows."""
    named: set[str] = set()
    for message in messages:
        parts = message.split("'")
        named.update(parts[1::2])
    return named


def kind_counts(rows: Iterable[PlanRow]) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    for row in rows:
        counts[row.kind] += 1
    return counts


@dataclass(frozen=True)
class CoverageBar:
    """One coverage dimension (keys or parameters) as percentages for a stacked bar."""

    exact: int
    adapted: int
    kept: int
    total: int

    @property
    def exact_pct(self) -> float:
        return percent(self.exact, self.total)

    @property
    def adapted_pct(self) -> float:
        return percent(self.adapted, self.total)

    @property
    def kept_pct(self) -> float:
        return percent(self.kept, self.total)

    @property
    def loaded_pct(self) -> float:
        return percent(self.exact + self.adapted, self.total)


def coverage_bars(plan: Plan) -> dict[str, CoverageBar]:
    return {
        name: CoverageBar(c.exact, c.adapted, c.kept, c.total)
        for name, c in (("params", plan.params), ("keys", plan.keys))
    }


# -- architecture diff ------------------------------------------------------------------


@dataclass(frozen=True)
class SpecDiff:
    only_a: list[TensorSpec]
    only_b: list[TensorSpec]
    reshaped: list[tuple[TensorSpec, TensorSpec]]
    retyped: list[tuple[TensorSpec, TensorSpec]]  # same shape, another dtype
    same: int
    same_arch: bool


def spec_diff(a: ArchSpec, b: ArchSpec) -> SpecDiff:
    """Key by key: what one architecture has that the other lacks or holds differently."""
    reshaped, retyped, same = [], [], 0
    for t in a.tensors:
        other = b.get(t.key)
        if other is None:
            continue
        if other.shape != t.shape:
            reshaped.append((t, other))
        elif other.dtype != t.dtype:
            retyped.append((t, other))
        else:
            same += 1
    return SpecDiff(
        only_a=[t for t in a.tensors if t.key not in b],
        only_b=[t for t in b.tensors if t.key not in a],
        reshaped=reshaped,
        retyped=retyped,
        same=same,
        same_arch=a.arch_fp == b.arch_fp,
    )


# -- ingestion report -------------------------------------------------------------------


def ingest_summary(report: Mapping[str, Any]) -> list[str]:
    """The few facts of an ingestion report a reader wants first, as short phrases."""
    facts = []
    origin = report.get("state_dict_key")
    if origin:
        facts.append(f"weights from '{origin}'" + (" (EMA)" if report.get("ema") else ""))
    if report.get("shards"):
        facts.append(f"merged from {len(report['shards'])} shards")
    if report.get("wrapper_prefixes"):
        facts.append("prefixes " + ", ".join(map(str, report["wrapper_prefixes"])))
    if report.get("dropped"):
        facts.append("dropped " + ", ".join(map(str, report["dropped"])))
    if report.get("placeholders"):
        facts.append(f"{len(report['placeholders'])} inert placeholder global(s)")
    if report.get("tie_groups"):
        facts.append(f"{len(report['tie_groups'])} tie group(s)")
    if report.get("snapshot"):
        facts.append("training snapshot: " + ", ".join(map(str, report["snapshot"])))
    return facts


# -- files of a version pushed as a folder ---------------------------------------------------

PREVIEWED = ("readme.md", "config.json")  # shown as text on the version page, in this order
PREVIEW_BYTES = 64 * 1024


@dataclass(frozen=True)
class Preview:
    path: str
    text: str
    truncated: bool


def text_previews(files: Sequence[Any], read: Callable[[str, int, int], bytes]) -> list[Preview]:
    """The README and config of a folder version as text (the template escapes it), at most
    ``PREVIEW_BYTES`` of each; ``read(sha256, start, end)`` reads a stored blob."""
    by_name = {f.path.casefold(): f for f in files if "/" not in f.path}
    previews = []
    for name in PREVIEWED:
        entry = by_name.get(name)
        if entry is None:
            continue
        data = read(entry.sha256, 0, min(entry.size, PREVIEW_BYTES))
        text = data.decode("utf-8", errors="replace")
        previews.append(Preview(entry.path, text, entry.size > PREVIEW_BYTES))
    return previews
