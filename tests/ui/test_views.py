"""The UI's view helpers on data alone: grouping, paging, plan row kinds, spec diffs."""

from __future__ import annotations

import pytest

from service.core.plan import Entry, Policy
from service.core.planner import plan as make_plan
from service.core.spec import ArchSpec
from service.ui import views


@pytest.mark.parametrize(
    ("key", "group"),
    [
        ("layer1.0.conv1.weight", "layer1.0"),
        ("model.layers.12.mlp.up_proj.weight", "model.layers.12"),
        ("encoder.conv1.weight", "encoder"),
        ("fc.weight", "fc"),
        ("cls_token", views.TOP_LEVEL),
        ("<script>alert(1)</script>", views.TOP_LEVEL),
    ],
)
def test_module_group_cuts_at_the_first_block_index(key: str, group: str) -> None:
    assert views.module_group(key) == group


def test_groups_follow_state_dict_order_and_mark_continuations() -> None:
    rows = views.tensor_rows(
        {"key": f"blocks.{i // 3}.w{i % 3}", "shape": [2, 2], "dtype": "F16"} for i in range(9)
    )
    page = views.paginate(len(rows), 2, 4)
    groups = views.group_rows(rows[page.start : page.end], before=rows[page.start - 1])
    assert [(g.prefix, len(g.rows), g.continued) for g in groups] == [
        ("blocks.1", 2, True),
        ("blocks.2", 2, False),
    ]
    assert groups[0].params == 8 and groups[0].nbytes == 16


def test_paging_clamps_into_range() -> None:
    assert views.paginate(10_000, 99, 500).number == 20
    page = views.paginate(0, 3, 500)
    assert (page.number, page.count, page.start, page.end) == (1, 1, 0, 0)
    assert (page.previous, page.next) == (None, None)


def test_plan_rows_name_what_happened_to_each_key() -> None:
    source = ArchSpec.of(
        [
            ("module.conv1.weight", [8, 3, 7, 7], "F32"),
            ("module.body.weight", [8, 8], "F32"),
            ("module.fc.weight", [10, 8], "F32"),
        ]
    )
    target = ArchSpec.of(
        [
            ("conv1.weight", [8, 1, 7, 7], "F32"),
            ("body.weight", [8, 8], "F32"),
            ("fc.weight", [5, 8], "F32"),
            ("new.weight", [3], "F32"),
        ]
    )
    plan = make_plan(source, target, policy=Policy(), adapters=[])
    rows = views.plan_rows(plan, source, target)
    assert [(r.entry.target, r.kind) for r in rows] == [
        ("conv1.weight", "adapted"),
        ("body.weight", "renamed"),
        ("fc.weight", "kept"),
        ("new.weight", "kept"),
    ]
    assert rows[0].op_names == ["adapt_in_channels"] and rows[0].source_shape == (8, 3, 7, 7)
    assert rows[2].source_shape == (10, 8) and rows[2].warned
    bars = views.coverage_bars(plan)
    assert bars["keys"].loaded_pct == 50.0 and bars["keys"].kept_pct == 50.0


def test_a_kept_tensor_the_checkpoint_has_in_another_shape_is_a_mismatch() -> None:
    entry = Entry("a.weight", None, "keep_target", "shape_ops", "shape mismatch: ...")
    assert views.entry_kind(entry) == "mismatch"
    assert views.entry_kind(Entry("a", "a", "copy", "exact")) == "exact"
    assert views.entry_kind(Entry("a", None, "fill", "buffers")) == "filled"


def test_spec_diff() -> None:
    a = ArchSpec.of([("x", [2], "F32"), ("y", [3], "F32"), ("z", [4], "F32")])
    b = ArchSpec.of([("x", [2], "F16"), ("y", [5], "F32"), ("w", [1], "F32")])
    diff = views.spec_diff(a, b)
    assert [t.key for t in diff.only_a] == ["z"] and [t.key for t in diff.only_b] == ["w"]
    assert [x.key for x, _ in diff.reshaped] == ["y"] and [x.key for x, _ in diff.retyped] == ["x"]
    assert diff.same == 0 and not diff.same_arch


def test_formatting() -> None:
    assert views.human_bytes(763_360) == "745.5 KiB" and views.human_bytes(12) == "12 B"
    assert views.human_count(11_689_512) == "11.7M" and views.human_count(999) == "999"
    assert views.shape_text([]) == "[]"
    assert views.ingest_summary(
        {"state_dict_key": "state_dict_ema", "ema": True, "wrapper_prefixes": ["module."]}
    ) == ["weights from 'state_dict_ema' (EMA)", "prefixes module."]
