"""The fetch layout (service.core.layout): slices, coalesced reads, ranges, validators."""

from __future__ import annotations

import math

import pytest

from service.core.layout import (
    HeaderBytes,
    Read,
    StoredRange,
    Transformed,
    UnsatisfiableRange,
    append_stored,
    etag_matches,
    parse_range,
    range_applies,
    read_plan,
    resolve_range,
    stored_pieces,
)
from service.core.plan import Entry
from service.core.spec import TensorSpec

MiB = 1024 * 1024


def cast(key: str, start: int, numel: int) -> Transformed:
    entry = Entry(target=key, source=key, action="ops", stage="dtype", ops=[{"op": "cast"}])
    source = TensorSpec(key, (numel,), "F16")
    return Transformed(entry, source, start, TensorSpec(key, (numel,), "F32"))


def transpose_cast(key: str, start: int, rows: int, cols: int) -> Transformed:
    """A transform whose every target element may need any source element."""
    ops = [{"op": "transpose", "dims": [1, 0]}, {"op": "cast"}]
    entry = Entry(target=key, source=key, action="ops", stage="dtype", ops=ops)
    source = TensorSpec(key, (rows, cols), "F16")
    return Transformed(entry, source, start, TensorSpec(key, (cols, rows), "F32"))


def body(segments, plan, stored: bytes, header: bytes = b"") -> bytes:
    """The body the plan's slices describe, fed only from the plan's reads (a cast is
    modelled as doubling each byte): proves every slice's bytes lie in its reads."""
    parts = [stored[r.start : r.end] for r in plan.reads]
    out = bytearray()
    for piece in plan.slices:
        seg = piece.segment
        if isinstance(seg, HeaderBytes):
            out += seg.data[piece.lo : piece.hi]
            continue
        lo, hi = piece.span
        got = b"".join(parts[piece.first_read : piece.last_read + 1])
        base = plan.reads[piece.first_read].start
        raw = got[lo - base : hi - base]
        assert raw == stored[lo:hi]
        if isinstance(seg, StoredRange):
            out += raw
        else:  # the doubled bytes of the elements read, cut to the slice
            offset = 2 * (lo - seg.source_start)
            out += bytes(b for b in raw for _ in (0, 1))[piece.lo - offset : piece.hi - offset]
    return bytes(out)


def test_adjacent_tensors_are_one_read_cut_to_the_part_size() -> None:
    stored = bytes(range(256)) * 40  # 10240 bytes
    segments: list = [HeaderBytes(b"HDR")]
    for start in range(0, 10240, 10):  # a thousand tiny tensors, in order
        append_stored(segments, start, start + 10)
    assert segments[1:] == [StoredRange(0, 10240)]
    plan = read_plan(segments, 0, 3 + 10240, gap=0, part=4096)
    assert plan.reads == (Read(0, 4096), Read(4096, 8192), Read(8192, 10240))
    assert body(segments, plan, stored) == b"HDR" + stored


def test_nearly_adjacent_tensors_merge_within_the_gap_and_not_beyond() -> None:
    stored = bytes(1000)
    segments = [StoredRange(0, 100), StoredRange(150, 200), StoredRange(400, 500)]
    plan = read_plan(segments, 0, 250, gap=50, part=1000)
    assert plan.reads == (Read(0, 200), Read(400, 500))  # 50-byte gap read, 200 not
    assert body(segments, plan, stored) == stored[0:100] + stored[150:200] + stored[400:500]
    assert read_plan(segments, 0, 250, gap=49, part=1000).reads == (
        Read(0, 100),
        Read(150, 200),
        Read(400, 500),
    )


def test_mixed_checkpoint_request_count_is_bounded_by_bytes_not_tensors() -> None:
    """ResNet-50-like: big convs with tiny BatchNorm vectors between them, every tensor
    cast (transformed): requests stay near ceil(bytes / part)."""
    segments: list = [HeaderBytes(b"x" * 500)]
    offset = 0
    for i in range(320):
        numel = 4096 * (1 + i % 7) if i % 5 == 0 else 64
        segments.append(cast(f"t{i}", offset, numel))
        offset += numel * 2
    stored = bytes(i % 251 for i in range(offset))
    part = 64 * 1024
    total = sum(s.length for s in segments)
    plan = read_plan(segments, 0, total, gap=4096, part=part)
    assert len(plan.reads) <= math.ceil(offset / part) + 2
    assert plan.read_bytes == offset
    assert len(body(segments, plan, stored)) == total


def test_a_tensor_spanning_parts_names_all_of_them() -> None:
    segments = [cast("w", 0, 5000)]  # 10000 stored bytes
    plan = read_plan(segments, 0, 20000, gap=0, part=4096)
    assert [(s.first_read, s.last_read) for s in plan.slices] == [(0, 2)]
    assert len(plan.reads) == 3


def test_empty_tensors_need_no_read_and_no_slice() -> None:
    entry = Entry(target="e", source="e", action="ops", stage="dtype")
    empty = Transformed(entry, TensorSpec("e", (0,), "F16"), 10, TensorSpec("e", (0,), "F32"))
    segments = [HeaderBytes(b"H"), StoredRange(10, 10), empty, StoredRange(0, 10)]
    plan = read_plan(segments, 0, 11, gap=0, part=100)
    assert [type(s.segment) for s in plan.slices] == [HeaderBytes, StoredRange]
    assert plan.reads == (Read(0, 10),)


def test_a_fill_reads_nothing() -> None:
    entry = Entry(target="f", source=None, action="ops", stage="fill")
    fill = Transformed(entry, None, 0, TensorSpec("f", (4,), "F32"))
    plan = read_plan([fill], 0, 16, gap=0, part=100)
    assert plan.reads == () and plan.slices[0].first_read == -1


def test_a_range_starting_inside_a_tensor_reads_only_what_it_sends() -> None:
    stored = bytes(range(200))
    segments = [HeaderBytes(b"0123456789"), StoredRange(0, 100), StoredRange(100, 200)]
    plan = read_plan(segments, 60, 210, gap=0, part=1000)
    assert plan.reads == (Read(50, 200),)
    assert body(segments, plan, stored) == stored[50:200]


def test_a_range_starting_inside_a_cast_tensor_reads_only_the_elements_it_sends() -> None:
    segments = [HeaderBytes(b"H" * 8), cast("a", 0, 8), cast("b", 16, 8)]
    assert segments[1].elementwise
    stored = bytes(range(32))
    plan = read_plan(segments, 8 + 20, 8 + 64, gap=0, part=1000)
    assert plan.reads == (Read(10, 32),)  # a's elements 5-7 (bytes 10-16), then b
    assert plan.slices[0].lo == 20 and plan.length == 44
    assert body(segments, plan, stored)[:12] == bytes(b for b in stored[10:16] for _ in (0, 1))
    # A range ending inside an element needs that whole element.
    inside = read_plan(segments, 8 + 21, 8 + 23, gap=0, part=1000)
    assert inside.reads == (Read(10, 12),)


def test_a_range_starting_inside_a_transposed_tensor_reads_its_whole_source() -> None:
    segments = [HeaderBytes(b"H" * 8), transpose_cast("a", 0, 2, 4), cast("b", 16, 8)]
    assert not segments[1].elementwise
    plan = read_plan(segments, 8 + 20, 8 + 64, gap=0, part=1000)
    assert plan.reads == (Read(0, 32),)  # a's source whole, though only its tail is sent
    assert plan.slices[0].span == (0, 16)


def test_a_resumed_range_and_a_tensor_at_the_very_end() -> None:
    stored = bytes(range(100))
    segments = [HeaderBytes(b"HH"), StoredRange(0, 90), StoredRange(95, 100)]
    total = 2 + 90 + 5
    plan = read_plan(segments, total - 1, total, gap=0, part=1000)  # the last byte only
    assert plan.reads == (Read(99, 100),)
    assert body(segments, plan, stored) == stored[99:100]
    resumed = read_plan(segments, 50, total, gap=10, part=1000)
    assert resumed.reads == (Read(48, 100),)
    assert body(segments, resumed, stored) == stored[48:90] + stored[95:100]


def test_a_reordering_plan_starts_a_new_run_and_reads_each_source_once() -> None:
    stored = bytes(range(100))
    segments = [StoredRange(50, 100), StoredRange(0, 50)]
    plan = read_plan(segments, 0, 100, gap=1000, part=1000)
    assert plan.reads == (Read(50, 100), Read(0, 50))
    assert body(segments, plan, stored) == stored[50:] + stored[:50]


def test_one_source_for_two_targets_is_read_once() -> None:
    segments = [cast("a", 0, 8), cast("b", 0, 8)]  # a split: same source twice
    plan = read_plan(segments, 0, 64, gap=0, part=1000)
    assert plan.reads == (Read(0, 16),)
    assert [(s.first_read, s.last_read) for s in plan.slices] == [(0, 0), (0, 0)]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        read_plan([], 0, 0, gap=-1, part=10)
    with pytest.raises(ValueError):
        read_plan([], 0, 0, gap=0, part=0)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, 100)),
        ("bytes=-10", (90, 100)),
        ("bytes=-500", (0, 100)),
        ("bytes=90-500", (90, 100)),
        ("bytes=0-1,5-6", None),
        ("items=0-1", None),
        ("bytes=a-b", None),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=5-4", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, 100)


def test_validators_quoted_or_not() -> None:
    assert etag_matches('"abc"', "abc") and etag_matches("abc", "abc")
    assert etag_matches('"x", W/"abc"', "abc") and etag_matches("*", "abc")
    assert not etag_matches('"abd"', "abc") and not etag_matches(None, "abc")
    assert range_applies(None, "abc") and range_applies('"abc"', "abc")
    assert range_applies("abc", "abc")
    assert not range_applies('W/"abc"', "abc") and not range_applies('"old"', "abc")
    assert not range_applies("Wed, 21 Oct 2015 07:28:00 GMT", "abc")


def test_resolve_range_ignores_a_stale_if_range() -> None:
    partial = resolve_range("bytes=10-", '"abc"', tag="abc", total=100)
    assert (partial.start, partial.end, partial.partial) == (10, 100, True)
    assert partial.content_range == "bytes 10-99/100"
    whole = resolve_range("bytes=10-", '"old"', tag="abc", total=100)
    assert (whole.start, whole.end, whole.partial) == (0, 100, False)


def _t(key: str, shape: list[int], dtype: str = "F32") -> TensorSpec:
    return TensorSpec(key, tuple(shape), dtype)


def test_derived_tensors_that_move_no_byte_are_stored_ranges() -> None:
    qkv = (_t("qkv", [12, 4]), 1000)  # 16 bytes a row
    assert stored_pieces([{"op": "slice", "dim": 0, "start": 4, "stop": 8}], [qkv]) == [
        (1064, 1128)
    ]
    pieces = [(_t(f"e{i}", [2, 4]), 100 * i) for i in range(3)]
    stack = [{"op": "stack", "dim": 0}, {"op": "unflatten", "dim": 0, "sizes": [-1, 1]}]
    assert stored_pieces(stack, pieces) == [(0, 32), (100, 132), (200, 232)]
    assert stored_pieces([], [qkv]) == [(1000, 1192)]
    assert stored_pieces([{"op": "reshape", "shape": [4, 12]}], [qkv]) == [(1000, 1192)]
    # A fused experts tensor [2, 6, 4] flattened, then one expert's second half cut out.
    fused = (_t("gate_up", [2, 6, 4]), 0)
    cut = [
        {"op": "flatten", "start": 0, "end": 1},
        {"op": "slice", "dim": 0, "start": 9, "stop": 12},
    ]
    assert stored_pieces(cut, [fused]) == [(9 * 16, 12 * 16)]


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "slice", "dim": 1, "start": 0, "stop": 2}],  # columns: strided bytes
        [{"op": "transpose", "dims": [1, 0]}],
        [{"op": "slice", "dim": 0, "start": 0, "stop": 4}, {"op": "cast", "dtype": "F16"}],
        [{"op": "concat", "dim": 1}],
    ],
)
def test_what_changes_bytes_is_computed(ops: list[dict[str, object]]) -> None:
    inputs = [(_t("a", [12, 4]), 0), (_t("b", [12, 4]), 192)]
    assert stored_pieces(ops, inputs if ops[0]["op"] == "concat" else inputs[:1]) is None
