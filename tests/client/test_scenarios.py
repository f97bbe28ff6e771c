"""The fitting scenarios end to end, on both backends: push a checkpoint, fetch it into a
differently shaped model through a real server, load it strictly, and check every tensor
against what the plan says it must equal."""

from __future__ import annotations

import math

import httpx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from statehub import Client, Incompatible, spec_of
from tests._models import (
    Backbone,
    TiedNet,
    TinyEncoder,
    TinyResNet,
    TinyViT,
    WithHead,
    randomize_buffers,
    seeded,
    sequential_resnet,
)
from tests._server import ServerProcess


def push(hub: Client, name: str, state_dict: dict[str, torch.Tensor]) -> None:
    hub.push(name, state_dict)


def assert_loads_with(
    model: nn.Module, sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Strict load succeeds and every tensor of the model equals the expectation."""
    model.load_state_dict(sd, strict=True)
    actual = model.state_dict()
    assert list(sd) == list(actual)
    for key, value in expected.items():
        # load_state_dict casts silently, so the fetched tensor itself must carry the
        # model's dtype: that is the server's cast being checked.
        assert sd[key].dtype == actual[key].dtype, key
        assert torch.equal(sd[key], value.to(actual[key].dtype)), key
        assert torch.equal(actual[key], sd[key]), key


def fetch_headers(
    server: ServerProcess, ref: str, target: object, **policy: object
) -> httpx.Response:
    model, _, version = ref.partition("@")
    body = {"target": spec_of(target), "policy": policy}
    return httpx.post(
        f"{server.url}/v1/models/{model}/versions/{version}/fetch", json=body, timeout=60
    )


def decoded_tensors(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    name = "statehub_fetch_tensors_decoded_total"
    line = next(x for x in text.splitlines() if x.startswith(name))
    return float(line.split()[-1])


# 1 ----------------------------------------------------------------------------------------
def test_identical_architecture_is_exact_and_passes_bytes_through(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    seeded(1)
    source = randomize_buffers(TinyResNet())
    push(hub, f"{ns}/resnet", source.state_dict())
    target = TinyResNet()
    plan = hub.plan(f"{ns}/resnet", target=target)
    assert plan.verdict == "exact"
    assert plan.coverage["keys"]["exact"] == len(source.state_dict())

    before = decoded_tensors(server)
    response = fetch_headers(server, f"{ns}/resnet@latest", target)
    assert response.headers["x-statehub-fetch-mode"] == "passthrough"
    blob = httpx.get(f"{server.url}/v1/models/{ns}/resnet/versions/latest/blob").content
    assert response.content == blob
    assert decoded_tensors(server) == before

    sd = hub.fetch(f"{ns}/resnet", target=target)
    assert_loads_with(target, sd, source.state_dict())


# 2 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("wrapper", ["dataparallel", "compile"])
def test_wrapped_checkpoint_into_plain_model(
    hub: Client, server: ServerProcess, ns: str, wrapper: str
) -> None:
    seeded(2)
    model = randomize_buffers(TinyResNet())
    wrapped = nn.DataParallel(model) if wrapper == "dataparallel" else torch.compile(model)
    prefix = "module." if wrapper == "dataparallel" else "_orig_mod."
    assert all(k.startswith(prefix) for k in wrapped.state_dict())
    push(hub, f"{ns}/wrapped", wrapped.state_dict())

    target = TinyResNet()
    plan = hub.plan(f"{ns}/wrapped", target=target)
    assert plan.verdict == "adapted"
    assert {e.stage for e in plan.entries} == {"prefix"}
    assert prefix in plan.entries[0].rule

    before = decoded_tensors(server)
    response = fetch_headers(server, f"{ns}/wrapped@latest", target)
    assert response.headers["x-statehub-fetch-mode"] == "rewrite"
    assert decoded_tensors(server) == before, "a rename-only fetch decodes no tensor"

    sd = hub.fetch(f"{ns}/wrapped", target=target)
    assert_loads_with(target, sd, model.state_dict())


def test_plain_checkpoint_into_wrapped_model(hub: Client, ns: str) -> None:
    seeded(3)
    source = randomize_buffers(TinyResNet())
    push(hub, f"{ns}/plain", source.state_dict())
    target = nn.DataParallel(TinyResNet())
    sd = hub.fetch(f"{ns}/plain", target=target)
    expected = {f"module.{k}": v for k, v in source.state_dict().items()}
    assert_loads_with(target, sd, expected)


# 3 ----------------------------------------------------------------------------------------
def test_backbone_prefix_renamed_to_encoder(hub: Client, ns: str) -> None:
    seeded(4)
    source = randomize_buffers(WithHead("backbone"))
    push(hub, f"{ns}/bb", source.state_dict())
    target = WithHead("encoder")
    plan = hub.plan(f"{ns}/bb", target=target)
    assert plan.verdict == "adapted"
    assert plan.entry("encoder.conv1.weight").source == "backbone.conv1.weight"
    sd = hub.fetch(f"{ns}/bb", target=target)
    expected = {k.replace("backbone.", "encoder.", 1): v for k, v in source.state_dict().items()}
    assert_loads_with(target, sd, expected)


def test_base_model_into_model_with_head_and_back(hub: Client, ns: str) -> None:
    seeded(5)
    base = randomize_buffers(Backbone())
    push(hub, f"{ns}/base", base.state_dict())
    target = WithHead("encoder", num_classes=5)
    own_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    plan = hub.plan(f"{ns}/base", target=target)
    assert plan.verdict == "partial"
    assert sorted(plan.keep_target) == ["head.bias", "head.weight"]
    sd = hub.fetch(f"{ns}/base", target=target)
    expected = {f"encoder.{k}": v for k, v in base.state_dict().items()} | own_head
    assert_loads_with(target, sd, expected)

    seeded(6)
    full = randomize_buffers(WithHead("encoder"))
    push(hub, f"{ns}/full", full.state_dict())
    backbone = Backbone()
    plan = hub.plan(f"{ns}/full", target=backbone)
    assert plan.verdict == "adapted"
    assert sorted(plan.unused) == ["head.bias", "head.weight"]
    sd = hub.fetch(f"{ns}/full", target=backbone)
    expected = {
        k.removeprefix("encoder."): v
        for k, v in full.state_dict().items()
        if k.startswith("encoder.")
    }
    assert_loads_with(backbone, sd, expected)


# 4 ----------------------------------------------------------------------------------------
def test_classifier_head_1000_to_30(hub: Client, ns: str) -> None:
    seeded(7)
    source = randomize_buffers(TinyResNet(num_classes=1000))
    push(hub, f"{ns}/imagenet", source.state_dict())
    src = source.state_dict()

    target = TinyResNet(num_classes=30)
    own_fc = target.fc.weight.detach().clone()
    plan = hub.plan(f"{ns}/imagenet", target=target)
    assert plan.verdict == "partial"
    assert sorted(plan.keep_target) == ["fc.bias", "fc.weight"]
    sd = hub.fetch(f"{ns}/imagenet", target=target)
    body = {k: v for k, v in src.items() if not k.startswith("fc.")}
    assert_loads_with(target, sd, body | {"fc.weight": own_fc})

    sliced = TinyResNet(num_classes=30)
    plan = hub.plan(f"{ns}/imagenet", target=sliced, head="slice")
    assert plan.verdict == "adapted"
    assert plan.entry("fc.weight").ops[0]["op"] == "slice"
    sd = hub.fetch(f"{ns}/imagenet", target=sliced, head="slice")
    expected = body | {"fc.weight": src["fc.weight"][:30], "fc.bias": src["fc.bias"][:30]}
    assert_loads_with(sliced, sd, expected)


# 5 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_chans", [1, 4])
def test_first_conv_input_channels(hub: Client, ns: str, in_chans: int) -> None:
    seeded(8)
    source = randomize_buffers(TinyResNet(in_chans=3))
    push(hub, f"{ns}/rgb", source.state_dict())
    w = source.conv1.weight.detach()
    target = TinyResNet(in_chans=in_chans)
    plan = hub.plan(f"{ns}/rgb", target=target)
    assert plan.verdict == "adapted"
    assert plan.entry("conv1.weight").ops[0]["op"] == "adapt_in_channels"
    if in_chans == 1:
        expected_w = w.sum(dim=1, keepdim=True)
    else:
        expected_w = torch.cat([w, w[:, :1]], dim=1) * (3 / 4)
    sd = hub.fetch(f"{ns}/rgb", target=target)
    target.load_state_dict(sd, strict=True)
    torch.testing.assert_close(target.conv1.weight.detach(), expected_w, rtol=0, atol=1e-6)
    rest = {k: v for k, v in source.state_dict().items() if k != "conv1.weight"}
    assert_loads_with(target, sd, rest)


# 6 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoint_into_fp32_model(
    hub: Client, ns: str, dtype: torch.dtype
) -> None:
    seeded(9)
    source = randomize_buffers(TinyResNet()).to(dtype)
    push(hub, f"{ns}/half", source.state_dict())
    target = TinyResNet()
    plan = hub.plan(f"{ns}/half", target=target)
    assert plan.verdict == "adapted"
    assert plan.entry("conv1.weight").ops == [{"op": "cast", "dtype": "F32"}]
    sd = hub.fetch(f"{ns}/half", target=target)
    assert sd["conv1.weight"].dtype == torch.float32
    expected = {
        k: v.float() if v.is_floating_point() else v for k, v in source.state_dict().items()
    }
    assert_loads_with(target, sd, expected)


# 7 ----------------------------------------------------------------------------------------
def test_batchnorm_without_num_batches_tracked(hub: Client, ns: str) -> None:
    seeded(10)
    source = randomize_buffers(TinyResNet())
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    push(hub, f"{ns}/old", old)
    target = randomize_buffers(TinyResNet(), seed=5)  # its own counters are 11
    plan = hub.plan(f"{ns}/old", target=target)
    assert plan.verdict == "adapted"
    filled = [e for e in plan.entries if e.action == "fill"]
    assert {e.target for e in filled} == {
        k for k in target.state_dict() if k.endswith("num_batches_tracked")
    }
    sd = hub.fetch(f"{ns}/old", target=target)
    zeros = {k: torch.tensor(0) for k in target.state_dict() if k.endswith("num_batches_tracked")}
    assert_loads_with(target, sd, old | zeros)


# 8 ----------------------------------------------------------------------------------------
def test_case_and_legacy_layernorm_names(hub: Client, ns: str) -> None:
    seeded(11)
    source = TinyEncoder()
    legacy = {}
    for key, value in source.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        key = key.replace("embeddings.weight", "Embeddings.Weight")
        legacy[key] = value
    push(hub, f"{ns}/legacy", legacy)
    target = TinyEncoder()
    plan = hub.plan(f"{ns}/legacy", target=target)
    assert plan.verdict == "adapted"
    assert plan.entry("LayerNorm.weight").source == "LayerNorm.gamma"
    assert plan.entry("embeddings.weight").source == "Embeddings.Weight"
    assert plan.entry("embeddings.weight").stage == "normalized"
    sd = hub.fetch(f"{ns}/legacy", target=target)
    assert_loads_with(target, sd, source.state_dict())


# 9 ----------------------------------------------------------------------------------------
def test_extra_se_blocks_in_target_are_kept(hub: Client, ns: str) -> None:
    seeded(12)
    source = randomize_buffers(TinyResNet())
    push(hub, f"{ns}/plain", source.state_dict())
    target = TinyResNet(se=True)
    own = {k: v.clone() for k, v in target.state_dict().items()}
    plan = hub.plan(f"{ns}/plain", target=target)
    assert plan.verdict == "partial"
    se_keys = sorted(k for k in own if ".se." in k)
    assert sorted(plan.keep_target) == se_keys
    sd = hub.fetch(f"{ns}/plain", target=target)
    assert_loads_with(target, sd, source.state_dict() | {k: own[k] for k in se_keys})


# 10 ---------------------------------------------------------------------------------------
def test_structurally_identical_renamed_modules(hub: Client, ns: str) -> None:
    seeded(13)
    source = randomize_buffers(TinyResNet())
    push(hub, f"{ns}/named", source.state_dict())
    target = sequential_resnet()
    plan = hub.plan(f"{ns}/named", target=target)
    assert plan.verdict == "adapted", plan.reasons + plan.warnings
    structural = [e for e in plan.entries if e.stage == "structural"]
    # The downsample branch is found first by the prefix search ('layer2.0.downsample.' ->
    # 'stage2.0.4.'); everything else only by structure.
    assert {e.stage for e in plan.entries} == {"structural", "prefix"}
    assert len(structural) == len(source.state_dict()) - 6
    assert all(e.evidence and e.evidence["module_map"] for e in structural)
    sd = hub.fetch(f"{ns}/named", target=target)
    expected = dict(zip(target.state_dict(), source.state_dict().values(), strict=True))
    assert_loads_with(target, sd, expected)

    refused = hub.plan(f"{ns}/named", target=target, allow_structural=False)
    assert not any(e.stage == "structural" for e in refused.entries)


def test_ambiguous_structure_is_refused(hub: Client, ns: str) -> None:
    """Two identical blocks in the source, three in the target: which two? Not guessed."""
    seeded(14)
    source = TinyResNet()
    push(hub, f"{ns}/two", source.state_dict())
    target = sequential_resnet()
    target.stage1.append(
        target.stage1[0].__class__(*[type(m)(*_ctor(m)) for m in target.stage1[0]])
    )
    plan = hub.plan(f"{ns}/two", target=target)
    stage1 = [e for e in plan.entries if e.target.startswith("stage1.")]
    assert stage1 and all(e.stage != "structural" for e in stage1)
    assert any("structural" in w for w in plan.warnings)


def _ctor(module: nn.Module) -> tuple[object, ...]:
    if isinstance(module, nn.Conv2d):
        return (
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
        )
    assert isinstance(module, nn.BatchNorm2d)
    return (module.num_features,)


# 11 ---------------------------------------------------------------------------------------
def test_position_embedding_resampled_from_14_to_24(hub: Client, ns: str) -> None:
    seeded(15)
    source = TinyViT(grid=14)
    push(hub, f"{ns}/vit", source.state_dict())
    target = TinyViT(grid=24)
    plan = hub.plan(f"{ns}/vit", target=target)
    entry = plan.entry("pos_embed")
    assert entry.ops[0]["op"] == "resample_pos_embed"
    assert entry.ops[0]["num_prefix_tokens"] == 1
    sd = hub.fetch(f"{ns}/vit", target=target)
    target.load_state_dict(sd, strict=True)
    pos = source.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid, size=(24, 24), mode="bicubic", antialias=True, align_corners=False
    )
    expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 576, -1)], dim=1)
    actual = target.pos_embed.detach()
    assert torch.equal(actual[:, :1], pos[:, :1]), "the cls token is kept as it is"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    rest = {k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    assert_loads_with(target, sd, rest)


# 12 ---------------------------------------------------------------------------------------
FOREIGN_NAMES = [
    (r"blocks\.(\d+)\.attn\.qkv\.", r"transformer.layers.\1.self_attention.in_proj."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"transformer.layers.\1.self_attention.out_proj."),
    (r"blocks\.(\d+)\.mlp\.fc1\.", r"transformer.layers.\1.ffn.up."),
    (r"blocks\.(\d+)\.mlp\.fc2\.", r"transformer.layers.\1.ffn.down."),
    (r"blocks\.(\d+)\.norm1\.", r"transformer.layers.\1.ln_attn."),
    (r"blocks\.(\d+)\.norm2\.", r"transformer.layers.\1.ln_ffn."),
    (r"^norm\.", r"final_ln."),
    (r"^head\.", r"classifier."),
]


def test_user_adapter_bridges_a_foreign_naming_scheme(hub: Client, ns: str) -> None:
    import re

    seeded(16)
    source = TinyViT(grid=14, num_classes=1000)
    foreign = {}
    for key, value in source.state_dict().items():
        for ours, theirs in FOREIGN_NAMES:
            key = re.sub(ours, theirs, key)
        foreign[key] = value
    foreign["aux_head.weight"] = torch.randn(3, 16)
    push(hub, f"{ns}/foreign", foreign)
    target = TinyViT(grid=14, num_classes=10)
    before = hub.plan(f"{ns}/foreign", target=target, allow_structural=False)
    assert before.verdict in ("partial", "incompatible")

    adapter = {
        "name": f"{ns}-foreign-to-timm",
        "scope": {"model": f"{ns}/foreign"},
        "rules": [
            {"type": "drop", "pattern": r"aux_head\..*"},
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.self_attention\.in_proj\.(\w+)",
                "replacement": r"blocks.\1.attn.qkv.\2",
            },
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.self_attention\.out_proj\.(\w+)",
                "replacement": r"blocks.\1.attn.proj.\2",
            },
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.ffn\.up\.(\w+)",
                "replacement": r"blocks.\1.mlp.fc1.\2",
            },
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.ffn\.down\.(\w+)",
                "replacement": r"blocks.\1.mlp.fc2.\2",
            },
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.ln_attn\.(\w+)",
                "replacement": r"blocks.\1.norm1.\2",
            },
            {
                "type": "rename",
                "pattern": r"transformer\.layers\.(\d+)\.ln_ffn\.(\w+)",
                "replacement": r"blocks.\1.norm2.\2",
            },
            {"type": "rename", "pattern": r"final_ln\.(\w+)", "replacement": r"norm.\1"},
            {"type": "rename", "pattern": r"classifier\.(\w+)", "replacement": r"head.\1"},
            {
                "type": "op",
                "key": r"head\.weight",
                "op": {"op": "slice", "dim": 0, "start": 0, "stop": 10},
            },
            {
                "type": "op",
                "key": r"head\.bias",
                "op": {"op": "slice", "dim": 0, "start": 0, "stop": 10},
            },
        ],
    }
    registered = hub.register_adapter(adapter)
    assert registered["version"] == 1
    plan = hub.plan(f"{ns}/foreign", target=target)
    assert plan.verdict == "adapted", plan.reasons + plan.warnings
    assert plan.adapters == [{"name": adapter["name"], "version": 1}]
    assert plan.dropped == ["aux_head.weight"]
    assert plan.entry("blocks.1.attn.qkv.weight").stage == "adapter"
    sd = hub.fetch(f"{ns}/foreign", target=target)
    src = source.state_dict()
    expected = src | {"head.weight": src["head.weight"][:10], "head.bias": src["head.bias"][:10]}
    assert_loads_with(target, sd, expected)


# 13 ---------------------------------------------------------------------------------------
def test_tied_module_registered_under_two_names(hub: Client, ns: str) -> None:
    seeded(17)
    source = TiedNet()
    push(hub, f"{ns}/tied", source.state_dict())
    target = TiedNet()
    spec = spec_of(target)
    assert sorted(map(sorted, spec["tie_groups"])) == [
        ["decoder.bias", "embed.bias"],
        ["decoder.weight", "embed.weight"],
    ]
    plan = hub.plan(f"{ns}/tied", target=target)
    assert plan.verdict in ("exact", "adapted")
    assert all(e.action != "keep_target" for e in plan.entries)
    sd = hub.fetch(f"{ns}/tied", target=target, load=True)
    src = source.state_dict()
    assert torch.equal(sd["decoder.weight"], src["embed.weight"])
    assert torch.equal(target.decoder.weight, src["embed.weight"])
    assert torch.equal(target.embed.weight, src["embed.weight"])
    assert target.decoder.weight.data_ptr() == target.embed.weight.data_ptr()


# policies ---------------------------------------------------------------------------------
def test_policy_that_forbids_what_is_needed_is_incompatible(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    seeded(18)
    source = TinyResNet(in_chans=3)
    push(hub, f"{ns}/rgb", source.state_dict())
    target = TinyResNet(in_chans=1)
    plan = hub.plan(f"{ns}/rgb", target=target, allow_ops=["cast", "fill"])
    assert plan.verdict == "incompatible"
    assert any("adapt_in_channels" in r for r in plan.reasons)
    with pytest.raises(Incompatible) as caught:
        hub.fetch(f"{ns}/rgb", target=target, allow_ops=["cast", "fill"])
    assert caught.value.status_code == 409
    assert caught.value.plan and caught.value.plan["verdict"] == "incompatible"
    strict = hub.plan(f"{ns}/rgb", target=TinyResNet(in_chans=3, num_classes=3), strict=True)
    assert strict.verdict == "incompatible"


def test_fetch_resumes_with_range_and_etag(hub: Client, server: ServerProcess, ns: str) -> None:
    seeded(19)
    source = TinyResNet().half()
    push(hub, f"{ns}/half", source.state_dict())
    target = TinyResNet()
    full = fetch_headers(server, f"{ns}/half@latest", target)
    assert full.status_code == 200
    etag = full.headers["etag"]
    assert full.headers["x-statehub-fetch-mode"] == "transform"
    again = fetch_headers(server, f"{ns}/half@latest", target)
    assert again.headers["etag"] == etag and again.content == full.content
    body = {"target": spec_of(target), "policy": {}}
    url = f"{server.url}/v1/models/{ns}/half/versions/latest/fetch"
    for start in (0, 7, len(full.content) // 3, len(full.content) - 5):
        part = httpx.post(url, json=body, headers={"Range": f"bytes={start}-", "If-Range": etag})
        assert part.status_code == 206
        assert part.content == full.content[start:]
        assert (
            part.headers["content-range"]
            == f"bytes {start}-{len(full.content) - 1}/{len(full.content)}"
        )
    changed = httpx.post(url, json=body, headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert changed.status_code == 200 and changed.content == full.content
    assert int(full.headers["content-length"]) == len(full.content)
    assert math.isclose(len(full.content), len(full.content))
