"""The compatibility planner, on specs alone: every stage, the verdicts, and determinism."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest

from service.core import ops
from service.core.adapters import AdapterSpec, parse_adapter
from service.core.plan import STAGES, Entry, Plan, Policy
from service.core.planner import plan
from service.core.spec import ArchSpec
from service.errors import InvalidSpec

Tensor = tuple[str, list[int], str]

# --------------------------------------------------------------------------------- spec builders


def bn(name: str, channels: int, dtype: str = "F32") -> list[Tensor]:
    return [
        (f"{name}.weight", [channels], dtype),
        (f"{name}.bias", [channels], dtype),
        (f"{name}.running_mean", [channels], dtype),
        (f"{name}.running_var", [channels], dtype),
        (f"{name}.num_batches_tracked", [], "I64"),
    ]


def resnet_tensors(
    *,
    in_chans: int = 3,
    classes: int = 1000,
    blocks: Sequence[int] = (2, 2),
    width: int = 16,
    dtype: str = "F32",
    se: bool = False,
    batches_tracked: bool = True,
) -> list[Tensor]:
    """A small ResNet-like state_dict: stem, stages of basic blocks (optionally with SE),
    classifier ``fc``."""
    tensors = [("conv1.weight", [width, in_chans, 7, 7], dtype), *bn("bn1", width, dtype)]
    channels = width
    for stage, count in enumerate(blocks, start=1):
        out = width * 2 ** (stage - 1)
        for block in range(count):
            name = f"layer{stage}.{block}"
            tensors += [(f"{name}.conv1.weight", [out, channels, 3, 3], dtype)]
            tensors += bn(f"{name}.bn1", out, dtype)
            tensors += [(f"{name}.conv2.weight", [out, out, 3, 3], dtype)]
            tensors += bn(f"{name}.bn2", out, dtype)
            if se:
                tensors += [
                    (f"{name}.se.fc1.weight", [out // 4, out, 1, 1], dtype),
                    (f"{name}.se.fc1.bias", [out // 4], dtype),
                    (f"{name}.se.fc2.weight", [out, out // 4, 1, 1], dtype),
                    (f"{name}.se.fc2.bias", [out], dtype),
                ]
            channels = out
    if classes:
        tensors += [("fc.weight", [classes, channels], dtype), ("fc.bias", [classes], dtype)]
    if not batches_tracked:
        tensors = [t for t in tensors if not t[0].endswith("num_batches_tracked")]
    return tensors


def prefixed(prefix: str, tensors: list[Tensor]) -> list[Tensor]:
    return [(prefix + key, shape, dtype) for key, shape, dtype in tensors]


def resnet(prefix: str = "", **kwargs: Any) -> ArchSpec:
    return ArchSpec.of(prefixed(prefix, resnet_tensors(**kwargs)))


def vit(*, img: int = 224, patch: int = 16, dim: int = 32, depth: int = 2, classes: int = 1000):
    """A small ViT-like state_dict (timm names): cls token, absolute pos embed, blocks, head."""
    grid = img // patch
    tensors: list[Tensor] = [
        ("cls_token", [1, 1, dim], "F32"),
        ("pos_embed", [1, 1 + grid * grid, dim], "F32"),
        ("patch_embed.proj.weight", [dim, 3, patch, patch], "F32"),
        ("patch_embed.proj.bias", [dim], "F32"),
    ]
    for i in range(depth):
        b = f"blocks.{i}"
        tensors += [
            (f"{b}.norm1.weight", [dim], "F32"),
            (f"{b}.norm1.bias", [dim], "F32"),
            (f"{b}.attn.qkv.weight", [3 * dim, dim], "F32"),
            (f"{b}.attn.qkv.bias", [3 * dim], "F32"),
            (f"{b}.attn.proj.weight", [dim, dim], "F32"),
            (f"{b}.attn.proj.bias", [dim], "F32"),
            (f"{b}.norm2.weight", [dim], "F32"),
            (f"{b}.norm2.bias", [dim], "F32"),
            (f"{b}.mlp.fc1.weight", [4 * dim, dim], "F32"),
            (f"{b}.mlp.fc1.bias", [4 * dim], "F32"),
            (f"{b}.mlp.fc2.weight", [dim, 4 * dim], "F32"),
            (f"{b}.mlp.fc2.bias", [dim], "F32"),
        ]
    tensors += [("norm.weight", [dim], "F32"), ("norm.bias", [dim], "F32")]
    tensors += [("head.weight", [classes, dim], "F32"), ("head.bias", [classes], "F32")]
    return ArchSpec.of(tensors)


def entry(p: Plan, key: str) -> Entry:
    return next(e for e in p.entries if e.target == key)


def adapter(data: dict[str, Any], version: int = 1) -> tuple[dict[str, Any], AdapterSpec]:
    spec = parse_adapter(data)
    return {"name": spec.name, "version": version}, spec


ACTIONS = {
    # action: (has a source, has ops)
    "copy": (True, False),
    "transform": (True, True),
    "fill": (False, True),
    "keep_target": (False, False),
}


def assert_consistent(p: Plan, source: ArchSpec, target: ArchSpec) -> None:
    """Invariants every plan keeps, whatever it decided."""
    assert [e.target for e in p.entries] == target.keys
    for e in p.entries:
        assert e.stage in STAGES
        assert ACTIONS[e.action] == (e.source is not None, bool(e.ops)), e
        if e.action == "keep_target":
            continue
        # The ops turn what is read into exactly what the model holds.
        read = source[e.source] if e.source is not None else target[e.target]
        shape, dtype = ops.infer_chain(e.ops, read.shape, read.dtype)
        assert (shape, dtype) == (target[e.target].shape, target[e.target].dtype), e
    assert p.keys.total == len(target)
    json.loads(p.canonical_json())


def checked(source: ArchSpec, target: ArchSpec, **kwargs: Any) -> Plan:
    p = plan(source, target, **kwargs)
    assert_consistent(p, source, target)
    assert p.canonical_json() == plan(source, target, **kwargs).canonical_json()
    return p


# ----------------------------------------------------------------------------------------- exact


def test_identical_spec_is_exact() -> None:
    spec = resnet()
    p = checked(spec, spec)
    assert p.verdict == "exact"
    assert {(e.stage, e.action, e.rule) for e in p.entries} == {
        ("exact", "copy", "same key and shape")
    }
    assert all(e.source == e.target and e.ops == [] for e in p.entries)
    assert p.unused == [] and p.dropped == [] and p.reasons == [] and p.warnings == []
    assert p.keys.to_json()["fraction"] == 1.0
    assert p.params.exact == spec.param_count and p.params.adapted == p.params.kept == 0
    assert p.source_arch_fp == p.target_arch_fp == spec.arch_fp


def test_extra_checkpoint_keys_are_unused_and_not_exact() -> None:
    source = ArchSpec.of([*resnet_tensors(), ("aux.weight", [3], "F32"), ("ema.step", [], "I64")])
    p = checked(source, resnet())
    assert p.verdict == "adapted"
    assert p.unused == ["aux.weight", "ema.step"]
    assert p.keys.exact == len(resnet())


# ------------------------------------------------------------------------- wrappers and prefixes


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_stripped_from_the_checkpoint(wrapper: str) -> None:
    p = checked(resnet(wrapper), resnet())
    assert p.verdict == "adapted"
    e = entry(p, "layer1.0.conv1.weight")
    assert (e.source, e.stage, e.action) == (f"{wrapper}layer1.0.conv1.weight", "prefix", "copy")
    assert e.rule == f"strip wrapper '{wrapper}'"
    assert {e.rule for e in p.entries} == {f"strip wrapper '{wrapper}'"}
    assert p.keys.adapted == len(p.entries) and p.unused == []


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod."])
def test_wrapper_added_for_a_wrapped_model(wrapper: str) -> None:
    p = checked(resnet(), resnet(wrapper))
    assert p.verdict == "adapted"
    e = entry(p, f"{wrapper}fc.weight")
    assert (e.source, e.stage, e.rule) == ("fc.weight", "prefix", f"add wrapper '{wrapper}'")


def test_one_wrapper_swapped_for_another() -> None:
    p = checked(resnet("module._orig_mod."), resnet("module."))
    e = entry(p, "module.conv1.weight")
    assert e.source == "module._orig_mod.conv1.weight"
    assert e.rule == "wrapper 'module._orig_mod.' -> 'module.'"


def test_backbone_renamed_to_encoder() -> None:
    p = checked(resnet("backbone."), resnet("encoder."))
    assert p.verdict == "adapted"
    e = entry(p, "encoder.layer2.1.bn2.running_var")
    assert (e.source, e.stage, e.rule) == (
        "backbone.layer2.1.bn2.running_var",
        "prefix",
        "'backbone.' -> 'encoder.'",
    )
    assert e.evidence == {"substitution": ["backbone.", "encoder."], "matches": len(resnet())}


def test_wrapper_and_prefix_together() -> None:
    p = checked(resnet("module.backbone."), resnet("encoder."))
    e = entry(p, "encoder.conv1.weight")
    assert e.source == "module.backbone.conv1.weight"
    assert e.rule == "strip wrapper 'module.'; 'backbone.' -> 'encoder.'"
    assert p.verdict == "adapted"


def with_head(classes: int = 30) -> ArchSpec:
    """A base model (no classifier) under ``backbone.``, plus a new ``head``."""
    return ArchSpec.of(
        [
            *prefixed("backbone.", resnet_tensors(classes=0)),
            ("head.weight", [classes, 32], "F32"),
            ("head.bias", [classes], "F32"),
        ]
    )


def test_base_model_into_a_model_with_a_head() -> None:
    p = checked(resnet(classes=0), with_head())
    assert p.verdict == "partial"
    e = entry(p, "backbone.conv1.weight")
    assert (e.source, e.stage, e.rule) == ("conv1.weight", "prefix", "'' -> 'backbone.'")
    assert p.keep_target == ["head.weight", "head.bias"]
    assert {entry(p, k).stage for k in p.keep_target} == {"missing"}
    assert p.keys.kept == 2 and p.unused == []


def test_model_with_a_head_into_the_base_model() -> None:
    p = checked(with_head(), resnet(classes=0))
    assert p.verdict == "adapted"
    e = entry(p, "conv1.weight")
    assert (e.source, e.stage, e.rule) == ("backbone.conv1.weight", "prefix", "'backbone.' -> ''")
    assert p.unused == ["head.weight", "head.bias"]


def test_keys_that_already_match_keep_their_names() -> None:
    # Only the backbone moved; the classifier is named alike on both sides.
    source = ArchSpec.of([*prefixed("backbone.", resnet_tensors(classes=0)), *fc(10)])
    target = ArchSpec.of([*prefixed("encoder.", resnet_tensors(classes=0)), *fc(10)])
    p = checked(source, target)
    assert entry(p, "fc.weight").stage == "exact"
    assert entry(p, "encoder.conv1.weight").stage == "prefix"
    assert p.verdict == "adapted"


def fc(classes: int, width: int = 32, name: str = "fc") -> list[Tensor]:
    return [(f"{name}.weight", [classes, width], "F32"), (f"{name}.bias", [classes], "F32")]


# -------------------------------------------------------------------------- heads and first conv


def test_head_with_other_classes_is_kept_by_default() -> None:
    p = checked(resnet(classes=1000), resnet(classes=30))
    assert p.verdict == "partial"
    assert p.keep_target == ["fc.weight", "fc.bias"]
    e = entry(p, "fc.weight")
    assert (e.stage, e.action, e.source) == ("shape_ops", "keep_target", None)
    assert e.rule == "classifier head rows 1000 -> 30: the model keeps its own (policy head='keep')"
    assert e.evidence == {"head_rows": [1000, 30], "checkpoint_key": "fc.weight"}
    assert any("classifier head 'fc.weight'" in w for w in p.warnings)
    assert p.unused == ["fc.weight", "fc.bias"]


def test_head_sliced_under_policy() -> None:
    p = checked(resnet(classes=1000), resnet(classes=30), policy=Policy(head="slice"))
    assert p.verdict == "adapted"
    for key in ("fc.weight", "fc.bias"):
        e = entry(p, key)
        assert (e.stage, e.action, e.source) == ("shape_ops", "transform", key)
        assert e.ops == [{"op": "slice", "dim": 0, "start": 0, "stop": 30}]
        assert e.rule == "classifier head rows 1000 -> 30: first 30 rows"


def test_head_with_more_rows_than_the_checkpoint_cannot_be_sliced() -> None:
    p = checked(resnet(classes=10), resnet(classes=30), policy=Policy(head="slice"))
    assert p.verdict == "partial"
    assert p.keep_target == ["fc.weight", "fc.bias"]
    assert "more rows than the checkpoint has" in entry(p, "fc.weight").rule


@pytest.mark.parametrize("in_chans", [1, 4])
def test_first_conv_input_channels(in_chans: int) -> None:
    p = checked(resnet(), resnet(in_chans=in_chans))
    assert p.verdict == "adapted"
    e = entry(p, "conv1.weight")
    assert (e.stage, e.action, e.source) == ("shape_ops", "transform", "conv1.weight")
    assert e.ops == [{"op": "adapt_in_channels", "in_chans": in_chans, "dim": 1}]
    assert e.rule == f"first conv input channels 3 -> {in_chans}"
    assert e.evidence == {"in_chans": [3, in_chans]}


def test_other_mismatches_are_kept_with_a_warning() -> None:
    source = ArchSpec.of([*resnet_tensors(), ("layer9.conv.weight", [8, 8, 3, 3], "F32")])
    target = ArchSpec.of([*resnet_tensors(), ("layer9.conv.weight", [8, 4, 3, 3], "F32")])
    p = checked(source, target)
    e = entry(p, "layer9.conv.weight")
    assert (e.stage, e.action) == ("shape_ops", "keep_target")
    assert e.rule == "shape mismatch: checkpoint [8, 8, 3, 3], model [8, 4, 3, 3]"
    assert p.warnings == [
        "shape mismatch for 'layer9.conv.weight': checkpoint 'layer9.conv.weight' "
        "[8, 8, 3, 3], model [8, 4, 3, 3]; keeping the model's value"
    ]
    assert p.verdict == "partial"


# ----------------------------------------------------------------------------- dtype and buffers


def test_fp16_checkpoint_into_fp32_model_is_cast() -> None:
    p = checked(resnet(dtype="F16"), resnet())
    assert p.verdict == "adapted"
    e = entry(p, "layer1.0.conv1.weight")
    assert (e.stage, e.action, e.source) == ("dtype", "transform", "layer1.0.conv1.weight")
    assert e.ops == [{"op": "cast", "dtype": "F32"}]
    assert e.rule == "same key and shape; cast F16 -> F32"
    # Integer buffers were I64 on both sides: untouched.
    assert entry(p, "bn1.num_batches_tracked").stage == "exact"
    assert p.keys.exact == sum(1 for k in p.entries if k.target.endswith("num_batches_tracked"))


def test_cast_appends_after_shape_ops() -> None:
    p = checked(resnet(dtype="BF16"), resnet(in_chans=1))
    e = entry(p, "conv1.weight")
    assert e.ops == [ops.adapt_in_channels_op(1), ops.cast_op("F32")]
    assert e.rule == "first conv input channels 3 -> 1; cast BF16 -> F32"


def test_missing_num_batches_tracked_is_filled() -> None:
    p = checked(resnet(batches_tracked=False), resnet())
    assert p.verdict == "adapted"
    e = entry(p, "layer1.1.bn2.num_batches_tracked")
    assert (e.stage, e.action, e.source) == ("buffers", "fill", None)
    assert e.ops == [{"op": "fill", "value": 0, "shape": [], "dtype": "I64"}]
    assert p.keep_target == []


# ------------------------------------------------------------------------------ normalized names


def test_case_insensitive_names() -> None:
    source = ArchSpec.of([("Conv1.Weight", [8, 3, 3, 3], "F32"), ("BN.bias", [8], "F32")])
    target = ArchSpec.of([("conv1.weight", [8, 3, 3, 3], "F32"), ("bn.bias", [8], "F32")])
    p = checked(source, target)
    e = entry(p, "conv1.weight")
    assert (e.source, e.stage, e.rule) == ("Conv1.Weight", "normalized", "lower-case match")
    assert p.verdict == "adapted"


def test_legacy_layernorm_gamma_beta() -> None:
    source = ArchSpec.of(
        [
            ("encoder.dense.weight", [16, 16], "F32"),
            ("encoder.LayerNorm.gamma", [16], "F32"),
            ("encoder.LayerNorm.beta", [16], "F32"),
        ]
    )
    target = ArchSpec.of(
        [
            ("encoder.dense.weight", [16, 16], "F32"),
            ("encoder.LayerNorm.weight", [16], "F32"),
            ("encoder.LayerNorm.bias", [16], "F32"),
        ]
    )
    p = checked(source, target)
    assert entry(p, "encoder.LayerNorm.weight").rule == "gamma -> weight"
    assert entry(p, "encoder.LayerNorm.bias").rule == "beta -> bias"
    assert entry(p, "encoder.LayerNorm.bias").source == "encoder.LayerNorm.beta"
    assert {entry(p, k).stage for k in ("encoder.LayerNorm.weight", "encoder.LayerNorm.bias")} == {
        "normalized"
    }
    assert p.verdict == "adapted"


def test_ambiguous_normalized_names_are_not_matched() -> None:
    source = ArchSpec.of([("a.Weight", [4], "F32"), ("a.WEIGHT", [4], "F32")])
    target = ArchSpec.of([("a.weight", [4], "F32")])
    p = checked(source, target, policy=Policy(allow_structural=False))
    assert p.keep_target == ["a.weight"]
    assert p.verdict == "incompatible"
    assert p.reasons == ["nothing matches: no model tensor can be loaded from the checkpoint"]


# ---------------------------------------------------------------------------- partial: SE blocks


def test_se_blocks_inserted_in_the_model() -> None:
    p = checked(resnet(), resnet(se=True))
    assert p.verdict == "partial"
    se_keys = [k for k in resnet(se=True).keys if ".se." in k]
    assert p.keep_target == se_keys
    assert {entry(p, k).stage for k in se_keys} == {"missing"}
    assert all(e.stage == "exact" for e in p.entries if ".se." not in e.target)
    assert p.keys.kept == len(se_keys) and p.unused == []
    se_params = sum(resnet(se=True)[k].numel for k in se_keys)
    assert p.params.kept == se_params


def test_on_missing_error() -> None:
    p = checked(resnet(), resnet(se=True), policy=Policy(on_missing="error"))
    assert p.verdict == "incompatible"
    assert len(p.reasons) == 1
    assert p.reasons[0].startswith("16 model keys are not in the checkpoint")
    assert "'layer1.0.se.fc1.weight'" in p.reasons[0] and "(+6 more)" in p.reasons[0]


# ------------------------------------------------------------------------------------ structural


def named_net(order: Sequence[str] = ("stem", "block", "head")) -> ArchSpec:
    parts = {
        "stem": [("stem.conv.weight", [16, 3, 3, 3], "F32"), *bn("stem.bn", 16)],
        "block": [("block.conv.weight", [32, 16, 3, 3], "F32"), *bn("block.bn", 32)],
        "head": fc(10, name="head.fc"),
    }
    return ArchSpec.of([t for name in order for t in parts[name]])


def sequential_net() -> ArchSpec:
    """The same network as nn.Sequential(conv, bn, conv, bn, flatten, linear)."""
    return ArchSpec.of(
        [
            ("0.weight", [16, 3, 3, 3], "F32"),
            *bn("1", 16),
            ("2.weight", [32, 16, 3, 3], "F32"),
            *bn("3", 32),
            *fc(10, name="5"),
        ]
    )


def test_sequential_copy_is_aligned_structurally() -> None:
    p = checked(sequential_net(), named_net())
    assert p.verdict == "adapted"
    e = entry(p, "block.bn.running_var")
    assert (e.source, e.stage, e.action) == ("3.running_var", "structural", "copy")
    assert e.rule == "aligned by order and shape: '3.running_var' -> 'block.bn.running_var'"
    assert e.evidence == {
        "module_map": ["3", "block.bn"],
        "aligned_tensors": 14,
        "aligned_modules": 5,
    }
    assert entry(p, "stem.bn.num_batches_tracked").source == "1.num_batches_tracked"
    assert entry(p, "block.bn.num_batches_tracked").source == "3.num_batches_tracked"
    assert p.warnings == [
        "structural alignment: 14 tensors in 5 modules paired by order and shape (names differ)"
    ]


def test_structural_alignment_refused_when_the_order_differs() -> None:
    # The model registers its head before the block: pairing by order would cross.
    p = checked(sequential_net(), named_net(order=("stem", "head", "block")))
    assert all(e.stage != "structural" for e in p.entries)
    kept = [k for k in named_net().keys if not k.endswith("num_batches_tracked")]
    assert sorted(p.keep_target) == sorted(kept)
    assert p.verdict == "incompatible"
    assert len(p.warnings) == 1
    assert p.warnings[0].startswith("structural alignment refused: the order differs")


def test_structural_alignment_refused_when_modules_do_not_correspond() -> None:
    # Orders agree, but one checkpoint module's tensors would land in two model modules.
    source = ArchSpec.of(
        [("0.weight", [8, 3, 3, 3], "F32"), ("0.bias", [8], "F32"), ("1.weight", [8], "F32")]
    )
    target = ArchSpec.of(
        [("conv.weight", [8, 3, 3, 3], "F32"), ("bn.bias", [8], "F32"), ("bn.weight", [8], "F32")]
    )
    p = checked(source, target)
    assert p.verdict == "incompatible"
    assert p.warnings == [
        "structural alignment refused: module '0' would map to both 'conv' and 'bn'; "
        "3 candidate pairs left unmatched"
    ]


def test_structural_alignment_can_be_switched_off() -> None:
    p = checked(sequential_net(), named_net(), policy=Policy(allow_structural=False))
    assert p.verdict == "incompatible"
    assert p.warnings == []


# ------------------------------------------------------------ position embeddings and embeddings


def test_pos_embed_resampled_with_the_cls_token_kept() -> None:
    p = checked(vit(img=224), vit(img=384))
    assert p.verdict == "adapted"
    e = entry(p, "pos_embed")
    assert (e.stage, e.action, e.source) == ("shape_ops", "transform", "pos_embed")
    assert e.ops == [
        {
            "op": "resample_pos_embed",
            "num_prefix_tokens": 1,
            "old_grid": [14, 14],
            "new_grid": [24, 24],
            "mode": "bicubic",
        }
    ]
    assert e.rule == "resample position embedding 14x14 -> 24x24, prefix tokens: 1"
    assert e.evidence == {
        "num_prefix_tokens": 1,
        "prefix_tokens_from": "prefix tokens in the model",
    }
    assert ops.infer_chain(e.ops, (1, 197, 32), "F32") == ((1, 577, 32), "F32")


def test_pos_embed_without_prefix_tokens_is_guessed_from_square_grids() -> None:
    source = ArchSpec.of([("enc.pos_embed", [1, 196, 8], "F32"), ("enc.w", [8], "F32")])
    target = ArchSpec.of([("enc.pos_embed", [1, 576, 8], "F32"), ("enc.w", [8], "F32")])
    e = entry(checked(source, target), "enc.pos_embed")
    assert e.ops[0]["num_prefix_tokens"] == 0
    assert e.evidence == {"num_prefix_tokens": 0, "prefix_tokens_from": "square grids"}


def test_embedding_rows_resized_only_under_policy() -> None:
    source = ArchSpec.of([("tok_embed.weight", [1000, 8], "F32"), ("out.weight", [4, 8], "F32")])
    target = ArchSpec.of([("tok_embed.weight", [1200, 8], "F32"), ("out.weight", [4, 8], "F32")])
    kept = checked(source, target)
    assert kept.keep_target == ["tok_embed.weight"] and kept.verdict == "partial"
    resized = checked(source, target, policy=Policy(embedding="resize"))
    e = entry(resized, "tok_embed.weight")
    assert e.ops == [{"op": "pad", "dim": 0, "size": 1200, "value": 0.0}]
    assert e.rule == "embedding rows 1000 -> 1200: zero-padded"
    smaller = checked(target, source, policy=Policy(embedding="resize"))
    assert entry(smaller, "tok_embed.weight").ops == [ops.slice_op(0, 0, 1000)]


# -------------------------------------------------------------------------------------- adapters


TIMM_TO_TV = {
    "name": "timm-to-tv",
    "description": "stem/stages/head.fc names to conv1/layerN/fc; drop the aux head",
    "rules": [
        {"type": "drop", "pattern": r"aux\..*"},
        {"type": "rename", "pattern": r"stem\.conv\.(.*)", "replacement": r"conv1.\1"},
        {"type": "rename", "pattern": r"stem\.bn\.(.*)", "replacement": r"bn1.\1"},
        {
            "type": "rename",
            "pattern": r"stages\.0\.(?P<rest>.*)",
            "replacement": r"layer1.\g<rest>",
        },
        {"type": "rename", "pattern": r"stages\.1\.(.*)", "replacement": r"layer2.\1"},
        {"type": "rename", "pattern": r"head\.fc\.(weight|bias)", "replacement": r"fc.\1"},
        {
            "type": "op",
            "key": r"fc\.(weight|bias)",
            "op": {"op": "slice", "dim": 0, "start": 0, "stop": 10},
        },
    ],
}


def timm_named() -> ArchSpec:
    renames = {
        "conv1.": "stem.conv.",
        "bn1.": "stem.bn.",
        "layer1.": "stages.0.",
        "fc.": "head.fc.",
    }
    renames["layer2."] = "stages.1."
    tensors = []
    for key, shape, dtype in resnet_tensors(classes=1000):
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        tensors.append((key, shape, dtype))
    return ArchSpec.of([*tensors, ("aux.weight", [5, 32], "F32"), ("aux.bias", [5], "F32")])


def test_adapter_bridges_two_naming_schemes() -> None:
    meta, spec = adapter(TIMM_TO_TV, version=3)
    p = checked(timm_named(), resnet(classes=10), adapters=[(meta, spec)])
    assert p.verdict == "adapted"
    assert p.adapters == [{"name": "timm-to-tv", "version": 3}]
    assert p.dropped == ["aux.weight", "aux.bias"]
    assert p.unused == []
    e = entry(p, "layer1.0.conv1.weight")
    assert (e.source, e.stage, e.action) == ("stages.0.0.conv1.weight", "adapter", "copy")
    assert e.rule == (
        r"adapter timm-to-tv:3 rule 3: rename 'stages\.0\.(?P<rest>.*)' -> 'layer1.\g<rest>'"
    )
    head = entry(p, "fc.weight")
    assert (head.source, head.stage, head.action) == ("head.fc.weight", "adapter", "transform")
    assert head.ops == [{"op": "slice", "dim": 0, "start": 0, "stop": 10}]
    assert "rule 5: rename" in head.rule and "rule 6: slice(dim=0, start=0, stop=10)" in head.rule
    assert all(e.stage == "adapter" for e in p.entries)


def test_adapter_ops_that_do_not_fit_are_reported() -> None:
    meta, spec = adapter(TIMM_TO_TV)
    p = checked(timm_named(), resnet(classes=20), adapters=[(meta, spec)])
    assert p.verdict == "incompatible"
    assert entry(p, "fc.weight").action == "keep_target"
    assert p.reasons[0].startswith("'fc.weight': adapter ops give [10, 32] from [1000, 32]")


def test_adapter_rename_with_a_shape_difference_goes_through_shape_ops() -> None:
    meta, spec = adapter(
        {"name": "stem", "rules": [{"type": "prefix", "strip": "stem.conv.", "add": "conv1."}]}
    )
    source = ArchSpec.of([("stem.conv.weight", [16, 3, 7, 7], "F32"), ("x", [1], "F32")])
    target = ArchSpec.of([("conv1.weight", [16, 1, 7, 7], "F32"), ("x", [1], "F32")])
    p = checked(source, target, adapters=[(meta, spec)])
    e = entry(p, "conv1.weight")
    assert e.stage == "shape_ops"
    assert e.rule == (
        "adapter stem:1 rule 0: prefix strip 'stem.conv.' add 'conv1.'; "
        "first conv input channels 3 -> 1"
    )
    assert p.adapters == [meta]


def test_adapter_collisions_are_reasons() -> None:
    meta, spec = adapter(
        {
            "name": "ema",
            "rules": [{"type": "rename", "pattern": r"ema\.(.*)", "replacement": r"\1"}],
        }
    )
    source = ArchSpec.of([("w", [2], "F32"), ("ema.w", [2], "F32")])
    p = checked(source, ArchSpec.of([("w", [2], "F32")]), adapters=[(meta, spec)])
    assert p.verdict == "incompatible"
    assert p.reasons == ["adapter rules map both 'w' and 'ema.w' to 'w'"]
    assert p.unused == ["ema.w"]


def test_adapter_fill_and_unapplied_op_rules() -> None:
    meta, spec = adapter(
        {
            "name": "fills",
            "rules": [
                {
                    "type": "op",
                    "key": "scale",
                    "op": {"op": "fill", "value": 1, "shape": [1], "dtype": "F32"},
                },
                {"type": "op", "key": "nothing", "op": {"op": "cast", "dtype": "F16"}},
            ],
        }
    )
    source = ArchSpec.of([("w", [2], "F32")])
    target = ArchSpec.of([("w", [2], "F32"), ("scale", [1], "F32")])
    p = checked(source, target, adapters=[(meta, spec)])
    e = entry(p, "scale")
    assert (e.action, e.stage, e.source) == ("fill", "adapter", None)
    assert p.warnings == ["adapter fills:1 rule 1: op rule applied to no key"]
    assert p.verdict == "adapted"


def test_unused_adapters_are_not_recorded() -> None:
    meta, spec = adapter(
        {"name": "noop", "rules": [{"type": "rename", "pattern": "nothing", "replacement": "x"}]}
    )
    p = checked(resnet(), resnet(), adapters=[(meta, spec)])
    assert p.adapters == [] and p.verdict == "exact"


# ------------------------------------------------------------------------------------ tie groups


def lm(tie: bool = True, stored_both: bool = False) -> tuple[ArchSpec, ArchSpec]:
    body = [("embed.weight", [100, 8], "F32"), ("norm.weight", [8], "F32")]
    target = ArchSpec.of(
        [*body, ("lm_head.weight", [100, 8], "F32")], [["embed.weight", "lm_head.weight"]]
    )
    if stored_both:
        source = ArchSpec.of([*body, ("lm_head.weight", [100, 8], "F32")])
    elif tie:
        source = ArchSpec.of(body, [["embed.weight", "lm_head.weight"]])
    else:
        source = ArchSpec.of(body)
    return source, target


def test_target_tie_group_member_follows_the_loaded_one() -> None:
    source, target = lm(tie=False)
    p = checked(source, target)
    e = entry(p, "lm_head.weight")
    assert (e.source, e.action, e.tied_to, e.rule) == (
        "embed.weight",
        "copy",
        "embed.weight",
        "tied to embed.weight",
    )
    assert p.tied == {"lm_head.weight": "embed.weight"}
    assert p.keep_target == []
    assert p.verdict == "adapted"  # the stored file lacks lm_head.weight: not exact
    assert [e.target for e in p.loaded] == ["embed.weight", "norm.weight"]


def test_checkpoint_tie_aliases_are_readable_from_the_stored_key() -> None:
    source, target = lm(tie=True)
    p = checked(source, ArchSpec.of([(t.key, t.shape, t.dtype) for t in target.tensors]))
    e = entry(p, "lm_head.weight")
    assert (e.source, e.stage, e.action) == ("embed.weight", "exact", "copy")
    assert "'lm_head.weight' is stored as 'embed.weight'" in e.rule
    assert p.verdict == "adapted" and p.unused == []


def test_tie_group_members_matched_to_different_sources() -> None:
    source, target = lm(stored_both=True)
    p = checked(source, target)
    assert entry(p, "lm_head.weight").source == "embed.weight"
    assert p.unused == ["lm_head.weight"]
    assert p.warnings == [
        "tie group: 'lm_head.weight' matched 'lm_head.weight' but shares storage with "
        "'embed.weight', which reads 'embed.weight'; using the latter"
    ]


def test_tie_group_canonical_is_the_first_loaded_member() -> None:
    # The first member in group order is missing from the checkpoint; the second is loaded.
    source = ArchSpec.of([("b.weight", [4], "F32")])
    target = ArchSpec.of(
        [("a.weight", [4], "F32"), ("b.weight", [4], "F32")], [["a.weight", "b.weight"]]
    )
    p = checked(source, target)
    assert entry(p, "a.weight").tied_to == "b.weight"
    assert entry(p, "a.weight").source == "b.weight"
    assert p.keep_target == []


# ---------------------------------------------------------------------------------------- policy


def test_strict_policy_accepts_only_exact() -> None:
    assert checked(resnet(), resnet(), policy=Policy(strict=True)).verdict == "exact"
    p = checked(resnet("module."), resnet(), policy=Policy(strict=True))
    assert p.verdict == "incompatible"
    assert p.reasons == ["strict policy: the plan is 'adapted', not 'exact'"]


def test_allow_ops_can_forbid_adapt_in_channels() -> None:
    allowed = tuple(op for op in Policy().allow_ops if op != "adapt_in_channels")
    p = checked(resnet(), resnet(in_chans=1), policy=Policy(allow_ops=allowed))
    assert p.verdict == "incompatible"
    e = entry(p, "conv1.weight")
    assert (e.action, e.stage) == ("keep_target", "shape_ops")
    assert p.reasons == [
        "'conv1.weight' needs adapt_in_channels (first conv input channels 3 -> 1), "
        "which the policy does not allow"
    ]


def test_allow_ops_can_forbid_casts() -> None:
    p = checked(resnet(dtype="F16"), resnet(), policy=Policy(allow_ops=("slice",)))
    assert p.verdict == "incompatible"
    assert entry(p, "conv1.weight").action == "keep_target"
    assert p.reasons[0] == "'conv1.weight' needs cast F16 -> F32, which the policy does not allow"


def test_nothing_matches_is_incompatible() -> None:
    source = ArchSpec.of([("a", [3], "F32")])
    target = ArchSpec.of([("b", [4], "F32")])
    p = checked(source, target)
    assert p.verdict == "incompatible"
    assert p.reasons == ["nothing matches: no model tensor can be loaded from the checkpoint"]
    assert p.unused == ["a"] and p.keep_target == ["b"]


# --------------------------------------------------------------------------------- invalid specs


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (ArchSpec.of([("a", [1], "F32"), ("a", [1], "F32")]), resnet(), "names 1 key(s) twice"),
        (resnet(), ArchSpec.of([("a", [1], "F33")]), "unknown dtype"),
        (resnet(), ArchSpec.of([("a", [1], "F32")], [["a", "b"]]), "unknown keys ['b']"),
        (
            resnet(),
            ArchSpec.of([("a", [1], "F32"), ("b", [2], "F32")], [["a", "b"]]),
            "cannot share storage",
        ),
        (
            resnet(),
            ArchSpec.of([("a", [1], "F32"), ("b", [1], "F32")], [["a", "b"], ["b", "a"]]),
            "more than one group",
        ),
        (ArchSpec.of([("a", [1], "F32")], [["z", "a"]]), resnet(), "first member 'z'"),
    ],
)
def test_invalid_specs(source: ArchSpec, target: ArchSpec, message: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        plan(source, target)
    assert message in info.value.message


# -------------------------------------------------------------------------- determinism and size


def test_adapter_and_tie_group_order_do_not_change_the_plan() -> None:
    first = adapter({"name": "a-strip", "rules": [{"type": "prefix", "strip": "net."}]}, version=1)
    second = adapter(
        {
            "name": "b-gamma",
            "rules": [{"type": "rename", "pattern": r"(.*)\.g", "replacement": r"\1.weight"}],
        },
        version=2,
    )
    source = ArchSpec.of(
        [("net.a.g", [4], "F32"), ("net.b.weight", [4], "F32"), ("net.c.weight", [4], "F32")]
    )
    target = ArchSpec.of(
        [(f"{name}.weight", [4], "F32") for name in "abcd"],
        [["b.weight", "d.weight"], ["a.weight", "c.weight"]],
    )
    target_shuffled = ArchSpec.of(
        [(t.key, t.shape, t.dtype) for t in target.tensors],
        [["a.weight", "c.weight"], ["b.weight", "d.weight"]],
    )
    one = plan(source, target, adapters=[first, second])
    two = plan(source, target_shuffled, adapters=[second, first])
    assert one.canonical_json() == two.canonical_json()
    assert one.plan_id == two.plan_id
    assert one.adapters == [{"name": "a-strip", "version": 1}, {"name": "b-gamma", "version": 2}]
    assert entry(one, "d.weight").tied_to == "b.weight"


def test_plans_are_byte_identical_across_runs() -> None:
    for source, target in [(timm_named(), resnet()), (sequential_net(), named_net())]:
        runs = {
            plan(source, target, adapters=[adapter(TIMM_TO_TV)]).canonical_json() for _ in range(3)
        }
        assert len(runs) == 1


def test_a_ten_thousand_tensor_spec_plans() -> None:
    blocks = (210, 210, 210, 210)
    target = resnet(blocks=blocks)
    assert len(target) >= 10_000
    source = resnet("module.", blocks=blocks, dtype="F16")
    p = plan(source, target)
    assert p.verdict == "adapted" and {e.stage for e in p.entries} == {"prefix"}
    shuffled = ArchSpec.of(
        random.Random(0).sample([(t.key, t.shape, t.dtype) for t in target.tensors], len(target))
    )
    assert plan(target, shuffled).verdict == "exact"


def test_kept_entries_say_how_the_checkpoint_key_was_renamed() -> None:
    p = checked(resnet("module.", classes=1000), resnet(classes=30))
    e = entry(p, "fc.weight")
    assert e.action == "keep_target"
    assert e.rule.startswith("strip wrapper 'module.'; classifier head rows 1000 -> 30")
    assert e.evidence is not None and e.evidence["checkpoint_key"] == "module.fc.weight"


def test_allow_ops_applies_to_adapter_ops() -> None:
    meta, spec = adapter(TIMM_TO_TV)
    policy = Policy(allow_ops=("cast", "fill"))
    p = checked(timm_named(), resnet(classes=10), adapters=[(meta, spec)], policy=policy)
    assert p.verdict == "incompatible"
    assert entry(p, "fc.weight").action == "keep_target"
    assert p.reasons[0].startswith("'fc.weight' needs slice (adapter timm-to-tv:1 rule 6")


def test_a_thousand_tensor_spec_plans_quickly() -> None:
    target = resnet(blocks=(21, 21, 21, 21))
    assert len(target) >= 1000
    source = resnet("module.backbone.", blocks=(21, 21, 21, 21), dtype="BF16")
    p = plan(source, resnet(blocks=(21, 21, 21, 21), se=True))
    assert p.verdict == "partial"
    assert entry(p, "layer4.20.conv2.weight").rule == (
        "strip wrapper 'module.'; 'backbone.' -> ''; cast BF16 -> F32"
    )


def test_a_same_named_key_is_not_renamed_away_from_its_shape_op() -> None:
    # Everything moved under backbone. except the classifier, whose rows differ.
    source = resnet(classes=1000)
    target = ArchSpec.of([*prefixed("backbone.", resnet_tensors(classes=0)), *fc(30)])
    p = checked(source, target)
    assert entry(p, "backbone.conv1.weight").rule == "'' -> 'backbone.'"
    e = entry(p, "fc.weight")
    assert (e.stage, e.action) == ("shape_ops", "keep_target")
    assert e.rule.startswith("classifier head rows 1000 -> 30")


def test_weight_norm_forms_are_one_normalised_name_and_nothing_else_is() -> None:
    legacy = ArchSpec.of(
        [("dec.proj.weight_g", [8, 1, 1], "F32"), ("dec.proj.weight_v", [8, 4, 3], "F32")]
    )
    param = ArchSpec.of(
        [
            ("dec.proj.parametrizations.weight.original0", [8, 1, 1], "F32"),
            ("dec.proj.parametrizations.weight.original1", [8, 4, 3], "F32"),
        ]
    )
    for source, target in ((legacy, param), (param, legacy)):
        p = plan(source, target)
        assert p.verdict == "adapted" and not p.unused
        assert [(e.source, e.stage) for e in p.entries] == [(k, "normalized") for k in source.keys]
    # A parametrization with one ``original`` (orthogonal, spectral norm) is not weight norm.
    other = ArchSpec.of([("dec.proj.parametrizations.weight.original", [8, 4, 3], "F32")])
    assert [e.stage for e in plan(legacy, other).entries] != ["normalized"]


# ------------------------------------------------------------------------- rename hints


def attention(prefix: str, names: Sequence[str], dim: int = 16) -> list[Tensor]:
    return [(f"{prefix}.{n}.{leaf}", [dim, dim] if leaf == "weight" else [dim], "F32")
            for n in names for leaf in ("weight", "bias")]  # fmt: skip


def test_kept_keys_beside_unused_tensors_of_their_shape_are_named_as_likely_renames() -> None:
    source = ArchSpec.of(attention("module.blocks.0.attn", ["q_proj", "k_proj", "out"]))
    target = ArchSpec.of(attention("blocks.0.attn", ["query", "key", "out"]))
    assert checked(source, target).verdict == "adapted"  # paired by order and shape...
    p = checked(source, target, policy=Policy(allow_structural=False))  # ...unless refused
    assert p.verdict == "partial" and p.keep_target == [
        "blocks.0.attn.query.weight", "blocks.0.attn.query.bias",
        "blocks.0.attn.key.weight", "blocks.0.attn.key.bias",
    ]  # fmt: skip
    [hint] = [w for w in p.warnings if "probably a rename" in w]
    assert hint.startswith("4 kept key(s)")
    # Paired by module, name and shape, each unused tensor once, in order (wrapper stripped).
    assert hint.endswith(
        "'blocks.0.attn.query.weight' <- 'module.blocks.0.attn.q_proj.weight', "
        "'blocks.0.attn.query.bias' <- 'module.blocks.0.attn.q_proj.bias', "
        "'blocks.0.attn.key.weight' <- 'module.blocks.0.attn.k_proj.weight', "
        "'blocks.0.attn.key.bias' <- 'module.blocks.0.attn.k_proj.bias'"
    )


def test_no_rename_hint_across_modules_shapes_or_for_a_reset_head() -> None:
    elsewhere = ArchSpec.of(attention("decoder.attn", ["q_proj"]))
    other_shape = ArchSpec.of(attention("blocks.0.attn", ["q_proj"], dim=8))
    target = ArchSpec.of(attention("blocks.0.attn", ["query"]))
    for source in (elsewhere, other_shape):
        p = checked(source, target, policy=Policy(allow_structural=False))
        assert p.keep_target and not [w for w in p.warnings if "probably a rename" in w]
    # A head kept for its class count is the policy's doing, not a missing key.
    p = checked(resnet(classes=1000), resnet(classes=30))
    assert not [w for w in p.warnings if "probably a rename" in w]
