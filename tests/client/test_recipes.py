"""Built-in recipes (issue 15 item 2), proven by outputs on both backends: a model in one
library's layout is pushed, fetched into the other library's model with no adapter named,
loaded strictly, and both give the same outputs on a fixed input. transformers' models are
the real classes; nanoGPT's and timm's layouts are the faithful ports in tests/_layouts.py
(timm does not import beside this torch)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from statehub import Client, Incompatible
from tests._layouts import NanoGPT, TimmViT
from tests._models import seeded

VOCAB, POSITIONS, EMBD, LAYERS, HEADS = 50, 16, 32, 2, 4


def hf_gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def nano_gpt() -> nn.Module:
    return NanoGPT(
        vocab_size=VOCAB, block_size=POSITIONS, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD
    )


def hf_vit() -> nn.Module:
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=5, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(config)


def timm_vit() -> nn.Module:
    return TimmViT(
        img_size=16, patch_size=8, num_classes=5, embed_dim=24, depth=2, num_heads=2, mlp_dim=48
    )


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def trained(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    seeded(seed)
    model = build()
    with torch.no_grad():  # perturbed: no fresh init (LayerNorm ones, zero biases) matches
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
CASES = {
    "gpt2-transformers-to-nanogpt": (hf_gpt2, nano_gpt, TOKENS, "builtin-gpt2-conv1d-linear"),
    "gpt2-nanogpt-to-transformers": (nano_gpt, hf_gpt2, TOKENS, "builtin-gpt2-conv1d-linear"),
    "vit-timm-to-transformers": (timm_vit, hf_vit, IMAGES, "builtin-vit-timm-to-transformers"),
    "vit-transformers-to-timm": (hf_vit, timm_vit, IMAGES, "builtin-vit-transformers-to-timm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_recipe_applies_by_itself_and_the_model_gives_the_source_outputs(
    hub: Client, ns: str, case: str
) -> None:
    build_source, build_target, x, recipe = CASES[case]
    source = trained(build_source, 1)
    hub.push(f"{ns}/m", source)
    target = trained(build_target, 2)
    assert not torch.allclose(run(target, x), run(source, x), atol=1e-3)

    plan = hub.plan(f"{ns}/m", target=target)
    assert plan.verdict == "adapted", plan.reasons
    assert [a["name"] for a in plan.adapters] == [recipe]
    assert plan.keep_target == [] and plan.unused == []
    assert any(recipe in e.rule for e in plan.entries)

    state = hub.fetch(f"{ns}/m", target=target)
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(run(target, x), run(source, x), rtol=1e-5, atol=1e-5)


def test_a_split_reads_the_fused_tensor_and_a_concat_writes_it_back(hub: Client, ns: str) -> None:
    """The entries say what they read: q, k, v each slice the fused qkv; the fused qkv of
    the way back lists its three sources, and holds their values, in order."""
    timm = trained(timm_vit, 1)
    hub.push(f"{ns}/timm", timm)
    plan = hub.plan(f"{ns}/timm", target=hf_vit())
    q, k, v = (plan.entry(f"vit.layers.0.attention.{n}_proj.weight") for n in "qkv")
    assert {q.source, k.source, v.source} == {"blocks.0.attn.qkv.weight"}
    assert [e.ops[0]["start"] for e in (q, k, v)] == [0, 24, 48]

    hf = trained(hf_vit, 3)
    hub.push(f"{ns}/hf", hf)
    state = hub.fetch(f"{ns}/hf", target=timm_vit())
    entry = hub.plan(f"{ns}/hf", target=timm_vit()).entry("blocks.1.attn.qkv.bias")
    assert entry.sources == [f"vit.layers.1.attention.{n}_proj.bias" for n in "qkv"]
    hf_state = hf.state_dict()
    expected = torch.cat([hf_state[f"vit.layers.1.attention.{n}_proj.bias"] for n in "qkv"])
    assert torch.equal(state["blocks.1.attn.qkv.bias"], expected)


def test_policy_builtin_false_turns_the_recipes_off_and_naming_one_applies_it(
    hub: Client, ns: str
) -> None:
    hub.push(f"{ns}/gpt2", trained(hf_gpt2, 1))
    target = nano_gpt()
    plan = hub.plan(f"{ns}/gpt2", target=target, builtin=False)
    assert plan.adapters == []
    # Without the recipe, the transposed projections are not loaded: the model keeps its own.
    assert "transformer.h.0.attn.c_attn.weight" in plan.keep_target
    named = hub.plan(
        f"{ns}/gpt2", target=target, builtin=False, adapters=["builtin-gpt2-conv1d-linear"]
    )
    assert named.verdict == "adapted"
    with pytest.raises(Incompatible):
        hub.fetch(f"{ns}/gpt2", target=target, builtin=False, strict=True)


def test_a_recipe_does_not_apply_where_its_signature_does_not_hold(hub: Client, ns: str) -> None:
    """The same library on both sides: GPT-2 into GPT-2 copies every tensor as stored, no
    recipe named (the projections have the same shapes, so 'transposed' does not hold); a
    ViT in timm's layout into a GPT-2 matches nothing of either recipe."""
    hub.push(f"{ns}/gpt2", trained(hf_gpt2, 1))
    plan = hub.plan(f"{ns}/gpt2", target=hf_gpt2())
    assert plan.adapters == [] and plan.keep_target == []
    assert all(e.ops == [] and e.source == e.target for e in plan.entries if e.tied_to is None)
    hub.push(f"{ns}/vit", trained(timm_vit, 1))
    assert hub.plan(f"{ns}/vit", target=hf_gpt2()).adapters == []


def test_the_builtin_recipes_are_listed(hub: Client) -> None:
    recipes = hub.builtin_recipes()
    names = [r["name"] for r in recipes]
    assert {"builtin-gpt2-conv1d-linear", "builtin-vit-timm-to-transformers"} <= set(names)
    assert all(r["signature"]["source"]["present"] and r["rules"] for r in recipes)
