"""Adapters are data: validation, RE2 patterns, replacements, and applying key rules."""

from __future__ import annotations

from typing import Any

import pytest

from service.core.adapters import (
    MAX_RULES,
    AdapterScope,
    AdapterSpec,
    OpRule,
    apply_key_rules,
    match_op_rules,
    parse_adapter,
    parse_template,
)
from service.errors import InvalidAdapter, InvalidRequest

FP_A = "a" * 64
FP_B = "b" * 64


def adapter(*rules: dict[str, Any], name: str = "bridge", **extra: Any) -> AdapterSpec:
    return parse_adapter({"name": name, "rules": list(rules), **extra})


def rename(pattern: str, replacement: str) -> dict[str, Any]:
    return {"type": "rename", "pattern": pattern, "replacement": replacement}


def invalid(data: Any) -> InvalidAdapter:
    with pytest.raises(InvalidAdapter) as info:
        parse_adapter(data)
    return info.value


# ------------------------------------------------------------------------------ parsing


def test_parse_a_full_adapter() -> None:
    spec = parse_adapter(
        {
            "name": "timm-to-tv",
            "description": "timm ResNet names to torchvision",
            "scope": {"model": "vision/resnet50", "source_arch_fp": FP_A},
            "rules": [
                rename(r"backbone\.(.*)", r"encoder.\1"),
                {"type": "drop", "pattern": r".*\.num_batches_tracked"},
                {"type": "prefix", "strip": "module."},
                {
                    "type": "op",
                    "key": r"fc\.weight",
                    "op": {"op": "slice", "dim": 0, "start": 0, "stop": 3},
                },
            ],
        }
    )
    assert [r.type for r in spec.rules] == ["rename", "drop", "prefix", "op"]
    assert spec.scope.source_arch_fp == FP_A
    op_rule = spec.rules[3]
    assert isinstance(op_rule, OpRule)
    assert op_rule.op == {"op": "slice", "dim": 0, "start": 0, "stop": 3}
    assert spec.to_json()["rules"][0] == rename(r"backbone\.(.*)", r"encoder.\1")
    assert parse_adapter(spec.to_json()) == spec


def test_invalid_regex_names_the_rule_and_the_pattern() -> None:
    error = invalid({"name": "x", "rules": [rename("ok", "ok"), rename("layer(\\d+", "x")]})
    assert error.code == "invalid_adapter"
    assert isinstance(error, InvalidRequest)  # a 422, never a 500
    assert "rules[1]" in error.message and "layer(\\d+" in error.message
    assert error.detail["errors"][0]["loc"] == "rules[1].rename.pattern"


def test_pcre_only_syntax_is_refused_cleanly() -> None:
    # RE2 has no backreferences or look-around: they are refused, not half-supported.
    error = invalid({"name": "x", "rules": [{"type": "drop", "pattern": r"(a)\1"}]})
    assert "invalid regex" in error.message
    error = invalid({"name": "x", "rules": [{"type": "drop", "pattern": r"(?<=a)b"}]})
    assert "invalid regex" in error.message


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    # (a+)+$ backtracks exponentially in Python's re on "aaaa...b"; RE2 does not.
    spec = adapter({"type": "drop", "pattern": "(a+)+$"}, rename("(a+)+b", "x"))
    key = "a" * 50_000 + "!"
    result = apply_key_rules([({"name": "x"}, spec)], [key])
    assert result.keys == {key: key}
    assert result.dropped == {}


@pytest.mark.parametrize(
    ("rules", "loc", "message"),
    [
        ([rename("(a)", r"\2")], "rules[0].rename", "group 2"),
        ([rename("(?P<x>a)", r"\g<y>")], "rules[0].rename", "unknown group 'y'"),
        ([rename("a", r"\n")], "rules[0].rename.replacement", "unsupported escape"),
        ([{"type": "prefix"}], "rules[0].prefix", "non-empty 'strip' or 'add'"),
        ([{"type": "teleport"}], "rules[0]", "does not match any of the expected tags"),
        ([{"type": "drop"}], "rules[0].drop.pattern", "Field required"),
        ([{"type": "drop", "pattern": "a", "extra": 1}], "rules[0].drop.extra", "not permitted"),
        ([{"type": "drop", "pattern": "a" * 1001}], "rules[0].drop.pattern", "at most 1000"),
        ([{"type": "drop", "pattern": ""}], "rules[0].drop.pattern", "at least 1"),
        ([], "rules", "at least 1"),
    ],
)
def test_rule_errors(rules: list[dict[str, Any]], loc: str, message: str) -> None:
    error = invalid({"name": "x", "rules": rules})
    assert error.detail["errors"][0]["loc"] == loc
    assert message in error.detail["errors"][0]["message"]


@pytest.mark.parametrize(
    ("op", "message"),
    [
        ({"op": "slice", "dim": -1, "start": 0, "stop": 2}, "dim must be in"),
        ({"op": "slice", "dim": 0, "start": 3, "stop": 2}, "must be >= start"),
        ({"op": "adapt_in_channels", "in_chans": 0}, "in_chans must be in"),
        (
            {
                "op": "resample_pos_embed",
                "num_prefix_tokens": 1,
                "old_grid": [-1, 2],
                "new_grid": [2, 2],
            },
            "old_grid[0] must be in",
        ),
        ({"op": "reshape", "shape": [2**50]}, "shape[0] must be in"),
        ({"op": "cast", "dtype": "float32"}, "dtype must be one of"),
        ({"op": "rm -rf"}, "unknown op"),
    ],
)
def test_op_rules_validate_their_op(op: dict[str, Any], message: str) -> None:
    error = invalid({"name": "x", "rules": [{"type": "op", "key": "fc\\.weight", "op": op}]})
    assert error.detail["errors"][0]["loc"] == "rules[0].op.op"
    assert message in error.message


def test_bounds_on_size_and_names() -> None:
    too_many = [{"type": "drop", "pattern": f"k{i}"} for i in range(MAX_RULES + 1)]
    assert "at most 1000" in invalid({"name": "x", "rules": too_many}).message
    assert invalid({"name": "../etc", "rules": [rename("a", "b")]}).detail["errors"][0]["loc"] == (
        "name"
    )
    assert (
        "scope.target_arch_fp"
        in invalid(
            {"name": "x", "scope": {"target_arch_fp": "XYZ"}, "rules": [rename("a", "b")]}
        ).message
    )


def test_non_objects_are_invalid_adapters() -> None:
    assert invalid([1, 2]).code == "invalid_adapter"
    assert invalid({"name": "x", "rules": "rename everything"}).code == "invalid_adapter"
    assert invalid({"name": "x", "rules": [{"type": "op", "key": "a", "op": "slice"}]}).code == (
        "invalid_adapter"
    )


# ------------------------------------------------------------------------------ replacements


def test_template_parsing() -> None:
    assert parse_template(r"enc.\1.\g<2>.\g<rest>\\x") == [
        ("text", "enc."),
        ("group", 1),
        ("text", "."),
        ("group", 2),
        ("text", "."),
        ("group", "rest"),
        ("text", "\\x"),
    ]


def test_backreferences_in_every_spelling() -> None:
    spec = adapter(rename(r"backbone\.layer(\d+)\.(?P<rest>.*)", r"encoder.stage\g<1>.\g<rest>"))
    numbered = adapter(rename(r"backbone\.layer(\d+)\.(.*)", r"encoder.stage\1.\2"))
    keys = ["backbone.layer3.conv.weight", "head.weight"]
    for each in (spec, numbered):
        result = apply_key_rules([({"name": "x"}, each)], keys)
        assert list(result.keys) == ["encoder.stage3.conv.weight", "head.weight"]
        assert result.keys["encoder.stage3.conv.weight"] == "backbone.layer3.conv.weight"


def test_replacement_keeps_non_ascii_and_optional_groups() -> None:
    spec = adapter(rename(r"(a)(b)?\.w", r"é.\1\2.w"))
    result = apply_key_rules([({"name": "x"}, spec)], ["a.w", "ab.w"])
    assert list(result.keys) == ["é.a.w", "é.ab.w"]


# ------------------------------------------------------------------------------ applying rules


def test_rules_apply_in_order_and_are_reported() -> None:
    spec = adapter(
        {"type": "prefix", "strip": "module."},
        {"type": "drop", "pattern": r".*\.num_batches_tracked"},
        rename(r"backbone\.(.*)", r"encoder.\1"),
        {"type": "prefix", "strip": "encoder.fc.", "add": "head."},
    )
    meta = {"name": "bridge", "version": 2}
    result = apply_key_rules(
        [(meta, spec)],
        [
            "module.backbone.conv.weight",
            "module.backbone.bn.num_batches_tracked",
            "module.backbone.fc.weight",
            "other",
        ],
    )
    assert result.keys == {
        "encoder.conv.weight": "module.backbone.conv.weight",
        "head.weight": "module.backbone.fc.weight",
        "other": "other",
    }
    drop = "adapter bridge:2 rule 1: drop '.*\\.num_batches_tracked'"
    assert result.dropped == {"module.backbone.bn.num_batches_tracked": drop}
    assert result.rules["encoder.conv.weight"] == [
        "adapter bridge:2 rule 0: prefix strip 'module.'",
        "adapter bridge:2 rule 2: rename 'backbone\\.(.*)' -> 'encoder.\\1'",
    ]
    assert len(result.rules["head.weight"]) == 3
    assert result.applied == [0]
    assert result.errors == []


def test_adapters_apply_one_after_the_other() -> None:
    first = adapter(rename("a", "b"), name="first")
    second = adapter(rename("b", "c"), name="second")
    result = apply_key_rules([({"name": "first"}, first), ({"name": "second"}, second)], ["a"])
    assert result.keys == {"c": "a"}
    assert result.applied == [0, 1]


def test_two_keys_renamed_to_one_name_is_an_error_not_an_exception() -> None:
    spec = adapter(rename(r"ema\.(.*)", r"\1"))
    result = apply_key_rules([({"name": "x"}, spec)], ["w", "ema.w", "v"])
    assert result.keys == {"w": "w", "v": "v"}
    assert result.errors == ["adapter rules map both 'w' and 'ema.w' to 'w'"]


def test_rename_to_an_empty_key_is_an_error() -> None:
    spec = adapter(rename("junk", ""))
    result = apply_key_rules([({"name": "x"}, spec)], ["junk", "w"])
    assert result.keys == {"w": "w"}
    assert "empty key" in result.errors[0]


def test_unapplied_adapters_are_not_reported() -> None:
    spec = adapter(rename("nothing", "else"))
    assert apply_key_rules([({"name": "x"}, spec)], ["w"]).applied == []


def test_op_rules_for_target_keys() -> None:
    spec = adapter(
        rename("a", "b"),
        {
            "type": "op",
            "key": r"head\.(weight|bias)",
            "op": {"op": "slice", "dim": 0, "start": 0, "stop": 3},
        },
        {"type": "op", "key": r"head\.weight", "op": {"op": "cast", "dtype": "F16"}},
    )
    assert spec.op_rules_for("head.weight") == [
        {"op": "slice", "dim": 0, "start": 0, "stop": 3},
        {"op": "cast", "dtype": "F16"},
    ]
    assert spec.op_rules_for("head.bias") == [{"op": "slice", "dim": 0, "start": 0, "stop": 3}]
    assert spec.op_rules_for("xhead.bias") == []  # full match only
    matches = match_op_rules([({"name": "n", "version": 1}, spec)], "head.weight")
    assert [(m.adapter, m.rule) for m in matches] == [(0, 1), (0, 2)]
    assert matches[1].label == "adapter n:1 rule 2: cast(dtype=F16) on 'head\\.weight'"


# ------------------------------------------------------------------------------ scope


def test_scope_matching() -> None:
    assert not AdapterScope().matches(model="m", source_arch_fp=FP_A, target_arch_fp=FP_B)
    scoped = AdapterScope(model="m", source_arch_fp=FP_A)
    assert scoped.matches(model="m", source_arch_fp=FP_A, target_arch_fp=FP_B)
    assert not scoped.matches(model="other", source_arch_fp=FP_A, target_arch_fp=FP_B)
    assert not scoped.matches(model="m", source_arch_fp=FP_B, target_arch_fp=FP_B)


def test_rules_give_the_same_result_without_the_pattern_set() -> None:
    # Adapters match all their patterns in one RE2 set; when a set cannot be built (too big
    # for RE2's memory budget) each pattern is tried in turn, with the same result.
    data = {
        "name": "x",
        "rules": [
            {"type": "prefix", "strip": "module."},
            rename(r"(.*)\.gamma", r"\1.weight"),
            {"type": "drop", "pattern": r"aux\..*"},
            rename(r"blocks\.(\d+)\.(.*)", r"layers.\1.\2"),
            {"type": "prefix", "add": "net."},
            {
                "type": "op",
                "key": r"net\.layers\.\d+\.norm\.weight",
                "op": {"op": "cast", "dtype": "F16"},
            },
        ],
    }
    keys = ["module.blocks.0.norm.gamma", "module.aux.w", "x.gamma", "blocks.1.fc.weight"]
    fast = adapter(*data["rules"])
    slow = adapter(*data["rules"])
    slow._key_set.set = None
    slow._op_set.set = None
    one = apply_key_rules([({"name": "x"}, fast)], keys)
    two = apply_key_rules([({"name": "x"}, slow)], keys)
    assert one == two
    assert one.keys == {
        "net.layers.0.norm.weight": "module.blocks.0.norm.gamma",
        "net.x.weight": "x.gamma",
        "net.layers.1.fc.weight": "blocks.1.fc.weight",
    }
    assert list(one.dropped) == ["module.aux.w"]
    for key in one.keys:
        assert fast.matching_op_rules(key) == slow.matching_op_rules(key)
    assert [i for i, _ in fast.matching_op_rules("net.layers.0.norm.weight")] == [5]
