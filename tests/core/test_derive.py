"""Rules that derive tensors from several, or several from one (issue 15 item 1): split,
concat, stack and the unflatten/transpose/flatten chain, planned on specs and applied on
tensors; bad input is a reason in the plan or an invalid adapter, never a wrong copy."""

from __future__ import annotations

import pytest
import torch

from service.core import ops
from service.core.adapters import parse_adapter
from service.core.planner import plan
from service.core.recipes import params_from_config, parse_recipe
from service.core.spec import ArchSpec
from service.errors import InvalidAdapter, RecipeParamsMissing
from service.recipes import builtin_recipes

QKV = r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)"
PIECES = [rf"l.\1.{n}.\2" for n in "qkv"]


def spec(tensors: dict[str, tuple[tuple[int, ...], str]]) -> ArchSpec:
    return ArchSpec.of((k, list(shape), dtype) for k, (shape, dtype) in tensors.items())


def adapter(*rules: dict[str, object]) -> list[tuple[dict[str, object], object]]:
    return [({"name": "a", "version": 1}, parse_adapter({"name": "a", "rules": list(rules)}))]


FUSED = spec({"blocks.0.attn.qkv.weight": ((12, 4), "F32")})
SPLIT = spec({f"l.0.{n}.weight": ((4, 4), "F32") for n in "qkv"})


def test_a_split_cuts_the_rows_by_the_targets_shapes_and_a_concat_joins_them() -> None:
    cut = plan(FUSED, SPLIT, adapters=adapter({"type": "split", "source": QKV, "targets": PIECES}))
    assert cut.verdict == "adapted" and cut.unused == []
    assert [e.ops for e in cut.entries] == [[ops.slice_op(0, i, i + 4)] for i in (0, 4, 8)]
    rule = {"type": "concat", "target": QKV, "sources": PIECES}
    joined = plan(SPLIT, FUSED, adapters=adapter(rule))
    (entry,) = joined.entries
    assert joined.verdict == "adapted" and entry.sources == [f"l.0.{n}.weight" for n in "qkv"]
    assert entry.ops == [ops.combine_op("concat", 0)]


def test_a_split_whose_pieces_do_not_cover_the_source_is_incompatible() -> None:
    rule = {"type": "split", "source": QKV, "targets": PIECES, "sizes": [4, 4, 3]}
    result = plan(FUSED, SPLIT, adapters=adapter(rule))
    assert result.verdict == "incompatible"
    assert "must cover it exactly" in result.reasons[0] and result.keep_target == SPLIT.keys


def test_a_concat_of_pieces_that_disagree_in_shape_or_dtype_is_incompatible() -> None:
    rule = {"type": "concat", "target": QKV, "sources": PIECES}
    for bad in ({"l.0.v.weight": ((4, 5), "F32")}, {"l.0.v.weight": ((4, 4), "F16")}):
        pieces = spec({**{f"l.0.{n}.weight": ((4, 4), "F32") for n in "qk"}, **bad})
        result = plan(pieces, FUSED, adapters=adapter(rule))
        assert result.verdict == "incompatible" and result.keep_target == FUSED.keys
        assert "input 2" in result.reasons[0]


def test_a_concat_missing_a_piece_names_it() -> None:
    rule = {"type": "concat", "target": QKV, "sources": PIECES}
    two = spec({f"l.0.{n}.weight": ((4, 4), "F32") for n in "qk"})
    result = plan(two, FUSED, adapters=adapter(rule))
    assert result.verdict == "incompatible" and "lacks 'l.0.v.weight'" in result.reasons[0]


def test_overlapping_rules_are_incompatible_not_a_silent_choice() -> None:
    split = {"type": "split", "source": QKV, "targets": PIECES}
    twice = plan(FUSED, SPLIT, adapters=adapter(split, split))
    assert twice.verdict == "incompatible" and "rules overlap" in twice.reasons[0]
    both = spec({**dict((t.key, (t.shape, t.dtype)) for t in SPLIT.tensors)})
    rule = {"type": "stack", "target": r"all\.weight", "sources": ["l.0.q.weight", "l.0.k.weight"]}
    target = spec({"all.weight": ((2, 4, 4), "F32"), "l.0.q.weight": ((4, 4), "F32")})
    again = {
        "type": "concat",
        "target": r"l\.0\.q\.weight",
        "sources": ["l.0.q.weight", "l.0.v.weight"],
    }
    result = plan(both, target, adapters=adapter(rule, again))
    assert (
        result.verdict == "incompatible" and "rules overlap on 'l.0.q.weight'" in result.reasons[0]
    )


def test_stack_builds_a_new_dimension_and_the_policy_can_forbid_it() -> None:
    experts = spec({f"e.{i}.w": ((3, 2), "BF16") for i in range(4)})
    fused = spec({"experts.w": ((4, 3, 2), "F32")})
    rule = {"type": "stack", "target": r"experts\.w", "sources": [f"e.{i}.w" for i in range(4)]}
    result = plan(experts, fused, adapters=adapter(rule))
    (entry,) = result.entries
    assert result.verdict == "adapted" and entry.ops[-1] == ops.cast_op("F32")
    from service.core.plan import ALL_OPS, Policy

    narrow = Policy(allow_ops=tuple(o for o in ALL_OPS if o != "stack"))
    refused = plan(experts, fused, adapters=adapter(rule), policy=narrow)
    assert refused.verdict == "incompatible" and "stack" in refused.reasons[0]


def test_the_rotary_permutation_is_an_unflatten_transpose_flatten_chain() -> None:
    """transformers' convert_llama_weights_to_hf permutes Meta's q/k rows with
    view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(dim, dim); the same chain as
    data, and its inverse, round-trips."""
    heads, head_dim, dim = 4, 8, 32
    meta = torch.randn(heads * head_dim, dim)
    expected = meta.view(heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(dim, dim)
    to_hf = [
        ops.validate_op({"op": "unflatten", "dim": 0, "sizes": [-1, head_dim // 2, 2]}),
        ops.validate_op({"op": "transpose", "dims": [0, 2, 1, 3]}),
        ops.validate_op({"op": "flatten", "start": 0, "end": 2}),
    ]
    assert ops.infer_chain(to_hf, (dim, dim), "F32") == ((dim, dim), "F32")
    hf = ops.apply_chain(to_hf, meta)
    assert torch.equal(hf, expected)
    to_meta = [{**to_hf[0], "sizes": [-1, 2, head_dim // 2]}, to_hf[1], to_hf[2]]
    assert torch.equal(ops.apply_chain(to_meta, hf), meta)


def test_an_unflatten_that_does_not_divide_the_shape_is_an_op_error() -> None:
    op = ops.validate_op({"op": "unflatten", "dim": 0, "sizes": [-1, 5]})
    with pytest.raises(ops.OpError, match="not divisible"):
        ops.infer(op, (12, 4), "F32")
    with pytest.raises(InvalidAdapter, match="one dimension"):
        ops.validate_op({"op": "unflatten", "dim": 0, "sizes": [-1, -1]})


def test_concat_is_a_rule_not_an_op_and_templates_must_name_real_groups() -> None:
    with pytest.raises(InvalidAdapter, match="write a 'concat' rule"):
        parse_adapter(
            {"name": "a", "rules": [{"type": "op", "key": "x", "op": {"op": "concat", "dim": 0}}]}
        )
    with pytest.raises(InvalidAdapter, match="group 3"):
        parse_adapter(
            {"name": "a", "rules": [{"type": "split", "source": QKV, "targets": [r"a.\3", "b"]}]}
        )


def test_a_recipe_signature_must_name_a_layout() -> None:
    broad = {
        "name": "builtin-everything", "version": 1, "description": "matches any model",
        "signature": {"source": {"present": [r".*\.weight"]}, "target": {"present": [".*"]}},
        "rules": [{"type": "rename", "pattern": "(.*)", "replacement": r"x.\1"}],
    }  # fmt: skip
    with pytest.raises(ValueError, match="too broad"):
        parse_recipe(broad)


def test_recipes_match_only_their_layouts() -> None:
    by_name = {r.name: r for r in builtin_recipes()}
    gpt2 = by_name["builtin-gpt2-conv1d-linear"].signature
    conv1d = spec(
        {
            "transformer.h.0.attn.c_attn.weight": ((8, 24), "F32"),
            "transformer.h.0.mlp.c_fc.weight": ((8, 32), "F32"),
        }
    )
    linear = spec(
        {
            "transformer.h.0.attn.c_attn.weight": ((24, 8), "F32"),
            "transformer.h.0.mlp.c_fc.weight": ((32, 8), "F32"),
        }
    )
    assert gpt2.matches(conv1d, linear) and gpt2.matches(linear, conv1d)
    assert not gpt2.matches(conv1d, conv1d) and not gpt2.matches(linear, linear)
    assert not gpt2.matches(conv1d, FUSED)


def _recipe_with(params: list[str], sizes: list[object]) -> dict[str, object]:
    return {
        "name": "builtin-rotary", "version": 1, "description": "a permutation per head",
        "signature": {
            "source": {"present": [r"layers\.0\.attention\.wq\.weight"]},
            "target": {"present": [r"model\.layers\.0\.q_proj\.weight"]},
        },
        "params": params,
        "rules": [{"type": "op", "key": r"model\.layers\.\d+\.q_proj\.weight",
                   "op": {"op": "unflatten", "dim": 0, "sizes": sizes}}],
    }  # fmt: skip


def test_a_recipe_fills_the_model_facts_its_ops_name_and_refuses_without_them() -> None:
    recipe = parse_recipe(_recipe_with(["head_dim"], [-1, "{head_dim/2}", 2]))
    filled = recipe.adapter_for({"head_dim": 128})
    assert filled.op_rules[0][1].op["sizes"] == [-1, 64, 2]
    with pytest.raises(RecipeParamsMissing, match="needs head_dim") as info:
        recipe.adapter_for({})
    assert info.value.detail == {"recipe": "builtin-rotary", "missing": ["head_dim"]}
    with pytest.raises(RecipeParamsMissing, match="divisible by 2"):
        recipe.adapter_for({"head_dim": 7})


def test_a_recipe_may_name_only_known_facts_and_must_list_those_it_uses() -> None:
    with pytest.raises(ValueError, match="params"):
        parse_recipe(_recipe_with(["heads"], [-1, "{heads}", 2]))
    # A placeholder the recipe does not list is no fact: the op refuses it as data.
    with pytest.raises(InvalidAdapter, match="sizes"):
        parse_recipe(_recipe_with([], [-1, "{head_dim/2}", 2]))


def test_config_files_give_head_dim() -> None:
    assert params_from_config({"hidden_size": 4096, "num_attention_heads": 32}) == {"head_dim": 128}
    assert (
        params_from_config({"hidden_size": 2560, "num_attention_heads": 32, "head_dim": 128})[
            "head_dim"
        ]
        == 128
    )
    assert params_from_config({"dim": 4096, "n_heads": 32}) == {"head_dim": 128}
    assert params_from_config({"hidden_size": 10, "num_attention_heads": 3}) == {}


def test_the_readme_adapter_example_is_a_valid_adapter() -> None:
    import json
    import pathlib

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    block = next(b for b in readme.split("```json")[1:] if '"fused-qkv"' in b)
    spec = parse_adapter(json.loads(block.split("```")[0]))
    split, concat = spec.derive_rules
    assert split[1].expand("blocks.3.attn.qkv.bias") == [f"layers.3.{n}.bias" for n in "qkv"]
    assert concat[1].expand("layers.2.kv.weight") == ["enc.2.k.weight", "enc.2.v.weight"]


EXPERTS = r"moe\.fused"
PER_EXPERT = ["moe.experts.{n}.w1", "moe.experts.{n}.w3"]


def test_a_repeat_rule_takes_every_expert_the_checkpoint_holds_in_order() -> None:
    source = spec({f"moe.experts.{i}.w{j}": ((2, 4), "F32") for i in range(3) for j in (1, 3)})
    rule = {"type": "stack", "target": EXPERTS, "sources": PER_EXPERT, "repeat": True,
            "ops": [{"op": "unflatten", "dim": 0, "sizes": [-1, 2]},
                    {"op": "flatten", "start": 1, "end": 2}]}  # fmt: skip
    fused = plan(source, spec({"moe.fused": ((3, 4, 4), "F32")}), adapters=adapter(rule))
    assert fused.verdict == "adapted" and fused.unused == []
    assert fused.entries[0].sources == [f"moe.experts.{i}.w{j}" for i in range(3) for j in (1, 3)]
    # The model's shape checks the count: two experts' worth of rows is not three.
    fewer = plan(source, spec({"moe.fused": ((2, 4, 4), "F32")}), adapters=adapter(rule))
    assert fewer.verdict == "incompatible" and "give [3, 4, 4]" in " ".join(fewer.reasons)
    # An expert missing one of its pieces is named, not skipped.
    holed = spec(
        {
            f"moe.experts.{i}.w{j}": ((2, 4), "F32")
            for i in range(3)
            for j in (1, 3)
            if (i, j) != (1, 3)
        }
    )
    missing = plan(holed, spec({"moe.fused": ((3, 4, 4), "F32")}), adapters=adapter(rule))
    assert "the checkpoint lacks 'moe.experts.1.w3'" in " ".join(missing.reasons)


def test_a_repeat_rule_names_its_index_and_a_plain_combine_needs_two_sources() -> None:
    unindexed = {"type": "stack", "target": EXPERTS, "sources": ["moe.w1"], "repeat": True}
    with pytest.raises(InvalidAdapter, match=r"index \{n\}"):
        parse_adapter({"name": "a", "rules": [unindexed]})
    with pytest.raises(InvalidAdapter, match="two sources or more"):
        parse_adapter({"name": "a", "rules": [unindexed | {"repeat": False}]})


def test_a_repeat_split_cuts_fused_experts_for_every_expert_the_model_holds() -> None:
    fused = spec({"moe.gate_up": ((3, 4, 4), "F32")})  # 3 experts, 2 pieces of 2 rows each
    rule = {"type": "split", "source": r"moe\.gate_up", "repeat": True,
            "targets": ["moe.experts.{n}.w1", "moe.experts.{n}.w3"],
            "before": [{"op": "flatten", "start": 0, "end": 1}]}  # fmt: skip
    model = spec({f"moe.experts.{i}.w{j}": ((2, 4), "F32") for i in range(3) for j in (1, 3)})
    cut = plan(fused, model, adapters=adapter(rule))
    assert cut.verdict == "adapted" and cut.unused == []
    w3 = {e.target: e for e in cut.entries}["moe.experts.1.w3"]
    assert w3.ops == [ops.flatten_op(0, 1), ops.slice_op(0, 6, 8)]
    # A model with two experts cannot take three experts' rows: said, not cut short.
    two = spec({f"moe.experts.{i}.w{j}": ((2, 4), "F32") for i in range(2) for j in (1, 3)})
    short = plan(fused, two, adapters=adapter(rule))
    assert short.verdict == "incompatible"
    assert "the pieces must cover it exactly" in " ".join(short.reasons)
    # A before-op that does not fit the source is the rule's reason, and nothing is cut.
    bad = plan(
        fused, model, adapters=adapter(rule | {"before": [{"op": "flatten", "start": 2, "end": 3}]})
    )
    assert bad.verdict == "incompatible" and bad.keys.adapted == 0
