"""Bounds on what a plan may cost or make (issue 17 items 3 and 8), on specs alone.

A target (a read token's choice) must not choose what the server fills, and an adapter
named in a policy must not choose how long planning takes: keys are held to
max_key_length at every rename, rule evaluations to a number per key.
"""

from __future__ import annotations

import time

import pytest

from service.core.adapters import AdapterLimits, RenameRule, apply_key_rules, parse_adapter
from service.core.plan import Policy
from service.core.planner import MAX_BUFFER_FILL_ELEMENTS, plan
from service.core.spec import ArchSpec, TensorSpec
from service.errors import InvalidAdapter
from service.fitting import _repeat, _synthesized_bytes

BN = [
    ("conv.weight", [4, 3, 3, 3], "F32"),
    ("bn1.weight", [4], "F32"),
    ("bn1.bias", [4], "F32"),
    ("bn1.running_mean", [4], "F32"),
    ("bn1.running_var", [4], "F32"),
]


def test_a_scalar_num_batches_tracked_is_still_filled() -> None:
    p = plan(ArchSpec.of(BN), ArchSpec.of([*BN, ("bn1.num_batches_tracked", [], "I64")]))
    entry = p.entries[-1]
    assert (entry.action, entry.stage) == ("fill", "buffers")
    assert entry.ops == [{"op": "fill", "value": 0, "shape": [], "dtype": "I64"}]
    assert p.verdict == "adapted"


def test_a_huge_num_batches_tracked_is_left_to_the_model() -> None:
    # The issue's target: a 1 GiB counter the planner used to zero-fill.
    target = ArchSpec.of([*BN, ("bn1.num_batches_tracked", [2**27], "I64")])
    p = plan(ArchSpec.of(BN), target)
    entry = p.entries[-1]
    assert (entry.action, entry.stage) == ("keep_target", "missing")
    assert p.verdict == "partial"
    assert any("bn1.num_batches_tracked" in w and "scalar" in w for w in p.warnings)
    assert MAX_BUFFER_FILL_ELEMENTS == 1
    two = plan(ArchSpec.of(BN), ArchSpec.of([*BN, ("bn1.num_batches_tracked", [2], "I64")]))
    assert two.entries[-1].action == "keep_target"


def test_two_thousand_huge_counters_fill_nothing() -> None:
    keys = [(f"b{i}.num_batches_tracked", [2**27], "I64") for i in range(2000)]
    p = plan(ArchSpec.of(BN), ArchSpec.of([*BN, *keys]))
    assert [e for e in p.entries if e.action == "fill"] == []
    assert p.keys.kept == 2000


def adapter(*rules: dict, name: str = "a") -> tuple[dict, object]:
    return {"name": name, "version": 1}, parse_adapter({"name": name, "rules": list(rules)})


def rename(pattern: str, replacement: str) -> dict:
    return {"type": "rename", "pattern": pattern, "replacement": replacement}


def count_rewrites(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a rename rule rewrites a key during the test (a one-item list)."""
    calls = [0]
    rewrite = RenameRule.rewrite

    def counted(self: RenameRule, key: str) -> str | None:
        calls[0] += 1
        return rewrite(self, key)

    monkeypatch.setattr(RenameRule, "rewrite", counted)
    return calls


def test_the_issues_three_rule_amplifier_is_refused_at_its_first_rename(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (.*) -> \1 x 100, three times: keys would grow 100x per rule (10 MB per key).
    meta, spec = adapter(*[rename("(.*)", "\\1" * 100)] * 3)
    source = ArchSpec.of([(f"layer{i}.weight", [2], "F32") for i in range(2000)])
    rewrites = count_rewrites(monkeypatch)
    with pytest.raises(InvalidAdapter) as caught:
        plan(source, source, policy=Policy(adapters=("a",)), adapters=[(meta, spec)])
    assert rewrites == [1]  # refused at the first key's first rename, not after 2,000 keys
    assert caught.value.code == "invalid_adapter"
    assert caught.value.detail == {"limit": "max_key_length", "max_key_length": 1024}
    assert "STATEHUB_MAX_KEY_LENGTH" in caught.value.message
    assert "adapter a:1: rule 0" in caught.value.message


def test_the_key_length_bound_is_the_configured_one() -> None:
    meta, spec = adapter(rename("(.*)", "\\1\\1"))
    keys = ["k" * 40]
    assert apply_key_rules([(meta, spec)], keys).keys == {"k" * 80: "k" * 40}
    limits = AdapterLimits(max_key_length=79)
    with pytest.raises(InvalidAdapter) as caught:
        apply_key_rules([(meta, spec)], keys, limits.budget(1))
    assert caught.value.detail["max_key_length"] == 79


def test_many_rules_that_match_every_key_cost_a_bounded_number_of_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 1,000 identity renames: every rule matches every key; 2,000 keys would take 2M rule
    # evaluations (about 12 s), the budget allows 32 per key.
    meta, spec = adapter(*[rename("(.*)", "\\1")] * 1000)
    source = ArchSpec.of([(f"layers.{i}.weight", [2], "F32") for i in range(2000)])
    rewrites = count_rewrites(monkeypatch)
    with pytest.raises(InvalidAdapter) as caught:
        plan(source, source, policy=Policy(adapters=("a",)), adapters=[(meta, spec)])
    assert caught.value.detail["limit"] == "adapter_steps_per_key"
    assert caught.value.detail["max_steps"] == 10_000 + 32 * 4000
    # The work is counted, not timed: every rewrite costs a step, so the refusal comes
    # within the budget, not after the 2M evaluations the rules would take.
    assert 0 < rewrites[0] <= caught.value.detail["max_steps"]


def test_identity_rules_are_matched_once_per_key_not_once_per_rule() -> None:
    # Rules that leave a key as it is do not make the patterns run again: 1,000 of them
    # over 20 keys take one set match and 1,000 rewrites per key, inside the budget.
    meta, spec = adapter(*[rename("(.*)", "\\1")] * 1000)
    source = ArchSpec.of([(f"k{i}", [2], "F32") for i in range(20)])
    limits = AdapterLimits(steps_per_key=2000)
    p = plan(source, source, policy=Policy(adapters=("a",)), adapters=[(meta, spec)], limits=limits)
    assert p.verdict == "exact"


def test_a_real_adapter_over_many_keys_stays_inside_the_budget() -> None:
    meta, spec = adapter(
        {"type": "prefix", "strip": "module."},
        rename(r"backbone\.(.*)", r"encoder.\1"),
        {"type": "drop", "pattern": r".*\.num_batches_tracked"},
        {
            "type": "op",
            "key": r"encoder\.layers\.\d+\.weight",
            "op": {"op": "cast", "dtype": "F16"},
        },
    )
    n = 20_000
    source = ArchSpec.of([(f"module.backbone.layers.{i}.weight", [2], "F32") for i in range(n)])
    target = ArchSpec.of([(f"encoder.layers.{i}.weight", [2], "F16") for i in range(n)])
    p = plan(source, target, policy=Policy(adapters=("a",)), adapters=[(meta, spec)])
    assert p.verdict == "adapted"
    assert all(e.stage == "adapter" for e in p.entries)


def test_deep_keys_plan_in_linear_time() -> None:
    # Keys of 500 one-letter parts: hashing every dot-boundary suffix was quadratic in the
    # depth (30,000 such keys: 100 s); suffixes are cut at 32 parts.
    deep = ".".join(["a"] * 500)
    n = 5000
    source = ArchSpec.of([(f"x{deep}.w{i}", [1], "F32") for i in range(n)])
    target = ArchSpec.of([(f"y{deep}.w{i}", [1], "F32") for i in range(n)])
    started = time.monotonic()
    p = plan(source, target)
    assert time.monotonic() - started < 3
    assert p.keys.adapted == n


@pytest.mark.parametrize("element", [b"\x00" * 8, b"\x01\x02", b"\x00\x00\x80\x3f"])
@pytest.mark.parametrize(("lo", "hi"), [(0, 64), (3, 61), (5, 6), (0, 0), (1, 1000)])
def test_a_fill_streams_the_bytes_it_would_have_built(element: bytes, lo: int, hi: int) -> None:
    whole = element * (1000 // len(element) + 1)
    pieces = list(_repeat(element, lo, hi, chunk=16))
    assert b"".join(pieces) == whole[lo:hi]
    assert all(len(p) <= 16 for p in pieces)
    # The repeated block is sized by the range, so a scalar fill never allocates a chunk.
    assert all(len(p.obj) <= max(16, hi - lo + len(element)) for p in pieces)  # type: ignore[arg-type]


def test_synthesized_bytes_count_fills_and_padded_rows() -> None:
    head = TensorSpec("head", (30, 4), "F32")
    assert _synthesized_bytes([{"op": "fill"}], None, head) == 30 * 4 * 4
    embed = TensorSpec("embed", (10, 4), "F32")
    assert _synthesized_bytes([{"op": "pad"}], embed, TensorSpec("embed", (16, 4), "F32")) == 96
    assert _synthesized_bytes([{"op": "cast"}], embed, TensorSpec("embed", (10, 4), "F64")) == 0
