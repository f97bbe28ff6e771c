"""The byte layout of a fetch body and the store reads it needs, as frozen data.

A body is a list of segments: literal header bytes, ranges of the stored bytes passed
through untouched, and tensors decoded and transformed. ``read_plan`` turns the part of
the body a request wants into *slices* of those segments (in body order) and the *reads*
that serve them: the source spans merged where they are adjacent or nearly adjacent (the
gap is read and dropped), then cut into parts of at most ``part`` bytes. A store is then
asked for about ``ceil(bytes / part)`` ranges, whatever the tensor count, and the storage
layer only executes the list (torch.distributed.checkpoint's ``ReadItem`` idea).

Offsets of stored bytes are logical offsets in the version's bytes (a composed or sharded
version's extents are the reader's business, not the layout's). Pure: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.core.ops import infer
from service.core.plan import Entry
from service.core.spec import DTYPE_SIZES, TensorSpec

# Ops that map element i of their input to element i of their output (in memory order):
# a chain of them is computed a piece at a time, so a cast of a 1 GiB tensor holds a part,
# not the tensor and its cast copy.
ELEMENTWISE_OPS = frozenset({"cast", "reshape", "unflatten", "flatten"})


@dataclass(frozen=True)
class HeaderBytes:
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class StoredRange:
    start: int  # offsets in the stored bytes
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Transformed:
    entry: Entry
    source: TensorSpec | None  # None: made from nothing (a fill)
    source_start: int  # offset of the source tensor in the stored bytes
    target: TensorSpec
    # The further inputs of an entry made from several tensors (a concat), with offsets.
    more: tuple[tuple[TensorSpec, int], ...] = ()

    @property
    def length(self) -> int:
        return self.target.nbytes

    @property
    def inputs(self) -> tuple[tuple[TensorSpec, int], ...]:
        """Every source tensor with its offset in the stored bytes, in the entry's order."""
        if self.source is None:
            return ()
        return ((self.source, self.source_start), *self.more)

    @property
    def input_span(self) -> tuple[int, int]:
        """The stored bytes from the first input's start to the last one's end: one span,
        read as the parts that hold it (inputs of one layer lie close together)."""
        return (
            min(start for _, start in self.inputs),
            max(start + spec.nbytes for spec, start in self.inputs),
        )

    @property
    def elementwise(self) -> bool:
        """Element i of the target is made from element i of the source alone."""
        return (
            self.source is not None
            and not self.more
            and self.source.numel == self.target.numel
            and all(op.get("op") in ELEMENTWISE_OPS for op in self.entry.ops)
        )

    def elements(self, lo: int, hi: int) -> tuple[int, int]:
        """The elements holding target bytes ``[lo, hi)`` (an elementwise segment)."""
        size = DTYPE_SIZES[self.target.dtype]
        return lo // size, -(-hi // size)


Segment = HeaderBytes | StoredRange | Transformed


# The elementwise ops that leave a contiguous tensor's bytes as they are (all but a cast):
# only the shape changes.
_BYTE_PRESERVING_OPS = ELEMENTWISE_OPS - {"cast"}


def stored_pieces(
    ops: Sequence[dict[str, Any]], inputs: Sequence[tuple[TensorSpec, int]]
) -> list[tuple[int, int]] | None:
    """The stored byte ranges whose concatenation *is* the derived tensor, or None when it
    must be computed. A split along dim 0 (a slice of rows, also after a flatten), a concat
    or stack along dim 0 (per-expert weights into one fused tensor) and any reshape around
    them move no byte: such a tensor streams from the store like a rename, in bounded memory
    however large it is. ``inputs`` are the tensors the entry reads, each with the offset it
    is stored at."""
    if not inputs:
        return None
    if ops and ops[0]["op"] in ("concat", "stack"):
        if ops[0]["dim"] != 0 or len({spec.dtype for spec, _ in inputs}) != 1:
            return None
        if any(op["op"] not in _BYTE_PRESERVING_OPS for op in ops[1:]):
            return None
        return [(start, start + spec.nbytes) for spec, start in inputs]
    if len(inputs) != 1:
        return None
    spec, start = inputs[0]
    # The tensor so far is the contiguous bytes [lo, hi) with this shape.
    lo, hi, shape = start, start + spec.nbytes, tuple(spec.shape)
    for op in ops:
        if op["op"] in _BYTE_PRESERVING_OPS:
            shape, _ = infer(op, shape, spec.dtype)
        elif op["op"] == "slice" and op["dim"] == 0 and shape and shape[0]:
            row = (hi - lo) // shape[0]
            lo, hi = lo + op["start"] * row, lo + op["stop"] * row
            shape = (op["stop"] - op["start"], *shape[1:])
        else:
            return None
    return [(lo, hi)]


def append_stored(segments: list[Segment], start: int, end: int) -> None:
    """Add a stored range, joined to the previous one when it continues it."""
    last = segments[-1] if segments else None
    if isinstance(last, StoredRange) and last.end == start:
        segments[-1] = StoredRange(last.start, end)
    else:
        segments.append(StoredRange(start, end))


@dataclass(frozen=True)
class Read:
    """One request to the store: stored bytes ``[start, end)``."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Slice:
    """Bytes ``[lo, hi)`` of one segment, sent in body order.

    ``first_read``/``last_read`` index the reads holding the stored bytes the slice needs
    (a transformed tensor needs its whole source, an elementwise one only the elements it
    covers); both are -1 when it needs none.
    """

    segment: Segment
    lo: int
    hi: int
    first_read: int = -1
    last_read: int = -1

    @property
    def length(self) -> int:
        return self.hi - self.lo

    @property
    def span(self) -> tuple[int, int] | None:
        """The stored bytes this slice needs, or None."""
        return source_span(self.segment, self.lo, self.hi)


@dataclass(frozen=True)
class ReadPlan:
    slices: tuple[Slice, ...]
    reads: tuple[Read, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.slices)

    @property
    def read_bytes(self) -> int:
        return sum(r.length for r in self.reads)


def source_span(segment: Segment, lo: int, hi: int) -> tuple[int, int] | None:
    """Stored bytes that produce ``[lo, hi)`` of ``segment`` (None: none, or empty)."""
    if isinstance(segment, StoredRange):
        span = segment.start + lo, segment.start + hi
    elif isinstance(segment, Transformed) and segment.source is not None:
        if segment.elementwise:  # only the elements the slice covers
            first, last = segment.elements(lo, hi)
            size = DTYPE_SIZES[segment.source.dtype]
            return _nonempty(
                (segment.source_start + first * size, segment.source_start + last * size)
            )
        span = segment.input_span
    else:
        return None
    return _nonempty(span)


def _nonempty(span: tuple[int, int]) -> tuple[int, int] | None:
    return span if span[1] > span[0] else None


def body_length(segments: Sequence[Segment]) -> int:
    return sum(s.length for s in segments)


def read_plan(
    segments: Sequence[Segment], start: int, end: int, *, gap: int, part: int
) -> ReadPlan:
    """The slices making body bytes ``[start, end)`` and the reads that feed them.

    Spans join the current run when they start no earlier than the previous span and at
    most ``gap`` bytes past the run's end (overlaps, as a source read by two targets, are
    fine); a span that goes backwards (a plan that reorders tensors) starts a new run.
    Each run is cut into parts of at most ``part`` bytes.
    """
    if gap < 0 or part <= 0:
        raise ValueError(f"need gap >= 0 and part > 0, got gap={gap} part={part}")
    slices: list[Slice] = []
    position = 0
    for segment in segments:
        seg_start, seg_end = position, position + segment.length
        position = seg_end
        if seg_end <= start or segment.length == 0:
            continue
        if seg_start >= end:
            break
        lo, hi = max(start, seg_start) - seg_start, min(end, seg_end) - seg_start
        slices.append(Slice(segment, lo, hi))

    runs: list[list[int]] = []  # [start, end] of each run of stored bytes
    run_of: list[int] = []  # for each slice, its run (-1: none)
    last_start = -1
    for piece in slices:
        span = piece.span
        if span is None:
            run_of.append(-1)
            continue
        if runs and span[0] >= last_start and span[0] <= runs[-1][1] + gap:
            runs[-1][1] = max(runs[-1][1], span[1])
        else:
            runs.append([span[0], span[1]])
        last_start = span[0]
        run_of.append(len(runs) - 1)

    reads: list[Read] = []
    first_part: list[int] = []  # index of each run's first read
    for run_start, run_end in runs:
        first_part.append(len(reads))
        reads.extend(Read(s, min(s + part, run_end)) for s in range(run_start, run_end, part))

    placed = []
    for piece, run in zip(slices, run_of, strict=True):
        span = piece.span
        if span is None:
            placed.append(piece)
            continue
        base = first_part[run]
        run_start = runs[run][0]
        first = base + (span[0] - run_start) // part
        last = base + (span[1] - 1 - run_start) // part
        placed.append(Slice(piece.segment, piece.lo, piece.hi, first, last))
    return ReadPlan(tuple(placed), tuple(reads))


# -- HTTP ranges and validators (shared by the fetch and the blob download) ---------------


class UnsatisfiableRange(ValueError):
    """A syntactically valid range entirely outside the body."""


def parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` range as ``[start, end)``.

    None for no header or a form this server ignores (several ranges, another unit, junk):
    the whole body is then served (RFC 9110 lets a server ignore Range).
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if not first:
            start, end = max(total - int(last), 0), total
        else:
            start = int(first)
            end = min(int(last) + 1, total) if last else total
    except ValueError:
        return None
    if start < 0 or start >= total or end <= start:
        raise UnsatisfiableRange(f"range {header!r} is outside the {total} bytes of this body")
    return start, end


def quote_etag(tag: str) -> str:
    """The ``ETag`` header value: a strong validator, quoted (RFC 9110 8.8.3)."""
    return f'"{tag}"'


def _tags(header: str) -> list[str]:
    return [t.strip().removeprefix("W/").strip('"') for t in header.split(",") if t.strip()]


def etag_matches(header: str | None, tag: str) -> bool:
    """``If-None-Match``: ``*`` or a list naming ``tag`` (quoted or not, weak or strong)."""
    if not header:
        return False
    return header.strip() == "*" or tag in _tags(header)


def range_applies(if_range: str | None, tag: str) -> bool:
    """``If-Range``: the range is honoured only while the body is still ``tag`` (strong
    comparison, quoted or not; a date never matches a body named by content)."""
    if not if_range:
        return True
    value = if_range.strip()
    return not value.startswith("W/") and value.strip('"') == tag


@dataclass(frozen=True)
class BodyRange:
    start: int
    end: int
    total: int
    partial: bool

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.total}"


def resolve_range(
    range_header: str | None, if_range: str | None, *, tag: str, total: int
) -> BodyRange:
    """What to send of a body of ``total`` bytes named ``tag``. Raises ``UnsatisfiableRange``."""
    wanted = range_header if range_applies(if_range, tag) else None
    parsed = parse_range(wanted, total)
    if parsed is None:
        return BodyRange(0, total, total, partial=False)
    return BodyRange(parsed[0], parsed[1], total, partial=True)
