"""The ports in ``models.py`` and the conversions in ``conversions.py`` are faithful: a real
transformers model's weights, converted, load strictly into the port and give the same
logits, and the other way round."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from tests.recipes import conversions as cv
from tests.recipes.models import (
    MetaLlama,
    MetaLlamaArgs,
    NanoGPT,
    NanoGPTConfig,
    TimmViT,
    TimmViTConfig,
)

GPT = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 101, "block_size": 32}
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
LLAMA = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97}


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter (LayerNorm weights and biases too) moved off its default init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- GPT-2


def hf_gpt2(activation: str) -> GPT2LMHeadModel:
    config = GPT2Config(
        n_embd=GPT["n_embd"],
        n_layer=GPT["n_layer"],
        n_head=GPT["n_head"],
        vocab_size=GPT["vocab_size"],
        n_positions=GPT["block_size"],
        activation_function=activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


# nanoGPT's exact nn.GELU() matches HF's "gelu"; the tanh approximation matches "gelu_new",
# GPT-2's own activation.
GELUS = [("none", "gelu"), ("tanh", "gelu_new")]


@pytest.mark.parametrize(("approximate", "activation"), GELUS)
def test_hf_gpt2_to_nanogpt(approximate: str, activation: str) -> None:
    hf = perturbed(hf_gpt2(activation), 0)
    port = NanoGPT(NanoGPTConfig(**GPT, gelu_approximate=approximate)).eval()  # type: ignore[arg-type]
    port.load_state_dict(cv.hf_gpt2_to_nanogpt(hf.state_dict()), strict=True)
    assert port.lm_head.weight is port.transformer.wte.weight
    idx = tokens(GPT["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(port(idx), hf(idx).logits)


@pytest.mark.parametrize(("approximate", "activation"), GELUS)
def test_nanogpt_to_hf_gpt2(approximate: str, activation: str) -> None:
    port = perturbed(NanoGPT(NanoGPTConfig(**GPT, gelu_approximate=approximate)), 1)  # type: ignore[arg-type]
    hf = hf_gpt2(activation).eval()
    hf.load_state_dict(cv.nanogpt_to_hf_gpt2(port.state_dict()), strict=True)
    idx = tokens(GPT["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, port(idx))


def test_gpt2_checkpoint_file_without_lm_head(tmp_path: Path) -> None:
    """``save_pretrained`` leaves the tied ``lm_head.weight`` out; the conversion fills it."""
    hf = perturbed(hf_gpt2("gelu_new"), 2)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in sd
    port = NanoGPT(NanoGPTConfig(**GPT, gelu_approximate="tanh")).eval()  # type: ignore[arg-type]
    port.load_state_dict(cv.hf_gpt2_to_nanogpt(sd), strict=True)
    idx = tokens(GPT["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(port(idx), hf(idx).logits)


def test_nanogpt_default_gelu_differs_from_gpt2_gelu_new() -> None:
    """Why the option exists: exact GELU against gelu_new is close but not allclose."""
    hf = perturbed(hf_gpt2("gelu_new"), 0)
    port = NanoGPT(NanoGPTConfig(**GPT)).eval()
    port.load_state_dict(cv.hf_gpt2_to_nanogpt(hf.state_dict()), strict=True)
    idx = tokens(GPT["vocab_size"])
    with torch.no_grad():
        diff = (port(idx) - hf(idx).logits).abs().max().item()
    assert 0 < diff < 1e-2


# --------------------------------------------------------------------------- ViT


def hf_vit_config() -> ViTConfig:
    return ViTConfig(
        image_size=VIT["img_size"],
        patch_size=VIT["patch_size"],
        hidden_size=VIT["embed_dim"],
        num_hidden_layers=VIT["depth"],
        num_attention_heads=VIT["num_heads"],
        intermediate_size=4 * VIT["embed_dim"],
        num_labels=10,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        qkv_bias=True,
        attn_implementation="eager",
    )


def timm_vit() -> TimmViT:
    return TimmViT(TimmViTConfig(**VIT, num_classes=10))


def test_hf_vit_to_timm() -> None:
    hf = perturbed(ViTForImageClassification(hf_vit_config()), 3)
    port = timm_vit().eval()
    port.load_state_dict(cv.hf_vit_to_timm_vit(hf.state_dict()), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(port(x), hf(x).logits)


def test_timm_to_hf_vit() -> None:
    port = perturbed(timm_vit(), 4)
    hf = ViTForImageClassification(hf_vit_config()).eval()
    hf.load_state_dict(cv.timm_vit_to_hf_vit(port.state_dict()), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, port(x))


def test_timm_to_hf_vit_checkpoint_names(tmp_path: Path) -> None:
    """The checkpoint names load through ``from_pretrained`` (which renames them) and are
    the names ``save_pretrained`` writes; both directions accept them."""
    port = perturbed(timm_vit(), 5)
    sd = cv.timm_vit_to_hf_vit(port.state_dict(), checkpoint_names=True)
    hf_vit_config().save_pretrained(tmp_path)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf = ViTForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, port(x))
    saved = tmp_path / "saved"
    hf.save_pretrained(saved)
    written = load_file(saved / "model.safetensors")
    assert set(written) == set(sd)
    back = timm_vit().eval()
    back.load_state_dict(cv.hf_vit_to_timm_vit(written), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), port(x))


# --------------------------------------------------------------------------- Llama


def hf_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=LLAMA["dim"],
        num_hidden_layers=LLAMA["n_layers"],
        num_attention_heads=LLAMA["n_heads"],
        num_key_value_heads=LLAMA["n_kv_heads"],
        vocab_size=LLAMA["vocab_size"],
        intermediate_size=160,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def meta_llama() -> MetaLlama:
    args = MetaLlamaArgs(**LLAMA, ffn_hidden_dim=160, norm_eps=1e-5, rope_theta=10000.0)
    return MetaLlama(args)


HEADS = {"n_heads": LLAMA["n_heads"], "n_kv_heads": LLAMA["n_kv_heads"]}


def test_hf_llama_to_meta() -> None:
    hf = perturbed(hf_llama(), 6)
    port = meta_llama().eval()
    port.load_state_dict(cv.hf_llama_to_meta(hf.state_dict(), **HEADS), strict=True)
    idx = tokens(LLAMA["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(port(idx), hf(idx).logits)


def test_meta_to_hf_llama() -> None:
    port = perturbed(meta_llama(), 7)
    hf = hf_llama().eval()
    hf.load_state_dict(cv.meta_to_hf_llama(port.state_dict(), **HEADS), strict=True)
    idx = tokens(LLAMA["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, port(idx))


def test_llama_rotary_permutation_matters() -> None:
    """Renaming alone loads (the shapes agree) but gives other logits: the permutation is
    what makes the rotary embeddings agree."""
    hf = perturbed(hf_llama(), 6)
    port = meta_llama().eval()
    rename_only = cv._llama(hf.state_dict(), cv._renamer(cv._LLAMA), lambda w, h: w, {})
    port.load_state_dict(rename_only, strict=True)
    idx = tokens(LLAMA["vocab_size"])
    with torch.no_grad():
        assert not torch.allclose(port(idx), hf(idx).logits, atol=1e-4)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_rotary_permutations_are_inverse(n_heads: int) -> None:
    w = torch.arange(n_heads * 16 * 3, dtype=torch.float32).reshape(n_heads * 16, 3)
    meta = cv.hf_to_meta_rotary(w, n_heads)
    torch.testing.assert_close(cv.meta_to_hf_rotary(meta, n_heads), w)
    # HF row h*hd + p*hd/2 + i is Meta row h*hd + 2i + p (hd = 16).
    torch.testing.assert_close(meta[1], w[8])
    torch.testing.assert_close(meta[2], w[1])
