"""Built-in recipes (issue 15 item 2), proven by outputs on both backends: a model in one
library's layout is pushed, fetched into the other library's model with no adapter named,
loaded strictly, and both give the same outputs on a fixed input. transformers' models are
the real classes; nanoGPT's, timm's and Meta's layouts are the faithful ports in
tests/recipes/models.py, checked against the libraries' own conversions in
tests/recipes/test_reference_models.py (timm does not import beside this torch)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from statehub import Client, Incompatible, RecipeParamsMissing
from statehub.cli import main
from tests._models import seeded
from tests._server import ServerProcess
from tests.recipes.models import (
    MetaLlama,
    MetaLlamaArgs,
    NanoGPT,
    NanoGPTConfig,
    TimmViT,
    TimmViTConfig,
)

VOCAB, POSITIONS, EMBD, LAYERS, HEADS = 50, 16, 32, 2, 4


def hf_gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=POSITIONS, n_embd=EMBD, n_layer=LAYERS, n_head=HEADS,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def nano_gpt() -> nn.Module:
    config = NanoGPTConfig(
        vocab_size=VOCAB, block_size=POSITIONS, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD,
        gelu_approximate="tanh",  # GPT-2's gelu_new (nanoGPT's own is the exact GELU)
    )  # fmt: skip
    return NanoGPT(config)


def hf_vit() -> nn.Module:
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=5, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(config)


def timm_vit() -> nn.Module:
    config = TimmViTConfig(
        img_size=16, patch_size=8, num_classes=5, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0
    )  # fmt: skip
    return TimmViT(config)


# GQA (4 query heads, 2 key/value heads) and head_dim 8: the rotary permutation works per
# head, so a wrong head_dim would load and give other outputs.
LLAMA_DIM, LLAMA_HEADS, LLAMA_KV_HEADS, LLAMA_FFN, HEAD_DIM = 32, 4, 2, 48, 8


def hf_llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=LLAMA_DIM, num_hidden_layers=LAYERS,
        num_attention_heads=LLAMA_HEADS, num_key_value_heads=LLAMA_KV_HEADS,
        intermediate_size=LLAMA_FFN, max_position_embeddings=POSITIONS, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config)


META_PARAMS = {
    "dim": LLAMA_DIM, "n_layers": LAYERS, "n_heads": LLAMA_HEADS, "n_kv_heads": LLAMA_KV_HEADS,
    "vocab_size": VOCAB, "norm_eps": 1e-5, "rope_theta": 10000.0,
}  # fmt: skip


def meta_llama() -> nn.Module:
    return MetaLlama(MetaLlamaArgs(**META_PARAMS, ffn_hidden_dim=LLAMA_FFN, max_seq_len=POSITIONS))


def torchtune_llama() -> nn.Module:
    """torchtune's own Llama 3 builder (interleaved rotary pairs, as Meta's)."""
    from torchtune.models.llama3 import llama3

    return llama3(
        vocab_size=VOCAB, num_layers=LAYERS, num_heads=LLAMA_HEADS, num_kv_heads=LLAMA_KV_HEADS,
        embed_dim=LLAMA_DIM, max_seq_len=POSITIONS, intermediate_dim=LLAMA_FFN,
        rope_base=10000, norm_eps=1e-5,
    )  # fmt: skip


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
    # head_dim from the target: a transformers model's config says it.
    "llama-meta-to-transformers": (
        meta_llama,
        hf_llama,
        TOKENS,
        "builtin-llama-meta-to-transformers",
    ),
    "llama-torchtune-to-transformers": (
        torchtune_llama,
        hf_llama,
        TOKENS,
        "builtin-llama-torchtune-to-transformers",
    ),
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
    # The result carries the plan it was fitted by: the one hub.plan answered.
    assert state.plan is not None and state.plan.plan_id == plan.plan_id
    assert state.plan.adapters == plan.adapters and state.source == f"{ns}/m:1"
    saved = io.BytesIO()  # saved, it is a plain state_dict: torch's safe load reads it
    torch.save(state, saved)
    saved.seek(0)
    assert list(torch.load(saved, weights_only=True)) == list(state)
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


# -- Llama: the rotary permutation needs head_dim ----------------------------------------


def assert_same_outputs(
    target: nn.Module, state: dict[str, torch.Tensor], source: nn.Module
) -> None:
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(run(target, TOKENS), run(source, TOKENS), rtol=1e-5, atol=1e-5)


# Layouts that rotate interleaved pairs, as Meta's code does: (model, recipe, q key, v key).
INTERLEAVED = {
    "meta": (meta_llama, "builtin-llama-transformers-to-meta", "attention.wq", "attention.wv"),
    "torchtune": (
        torchtune_llama, "builtin-llama-transformers-to-torchtune", "attn.q_proj", "attn.v_proj"
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(INTERLEAVED))
def test_a_transformers_llama_folder_loads_into_an_interleaved_layout(
    hub: Client, ns: str, tmp_path: Path, layout: str
) -> None:
    """save_pretrained's config.json is in the version: it gives head_dim; the Meta and
    torchtune models say nothing about themselves."""
    build, recipe, q, v = INTERLEAVED[layout]
    hf = trained(hf_llama, 1)
    hf.save_pretrained(tmp_path / "hf")
    hub.push(f"{ns}/llama", tmp_path / "hf")
    target = trained(build, 2)
    plan = hub.plan(f"{ns}/llama", target=target)
    assert plan.verdict == "adapted", plan.reasons
    assert plan.adapters == [
        {"name": recipe, "version": 1, "builtin": True, "params": {"head_dim": HEAD_DIM}}
    ]
    wq = plan.entry(f"layers.0.{q}.weight")
    assert wq.source == "model.layers.0.self_attn.q_proj.weight"
    assert [op["op"] for op in wq.ops] == ["unflatten", "transpose", "flatten"]
    assert wq.ops[0]["sizes"] == [-1, 2, HEAD_DIM // 2]
    assert plan.entry(f"layers.0.{v}.weight").ops == []
    assert_same_outputs(target, hub.fetch(f"{ns}/llama", target=target), hf)


def test_a_meta_llama_folder_gives_head_dim_in_its_params_json(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    """Meta's download (consolidated.00.pth + params.json, Llama 2's rope.freqs too) into a
    target that is only a state_dict: params.json gives head_dim."""
    meta = trained(meta_llama, 3)
    folder = tmp_path / "meta"
    folder.mkdir()
    weights = dict(meta.state_dict())
    weights["rope.freqs"] = torch.randn(HEAD_DIM // 2)
    torch.save(weights, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(META_PARAMS))
    hub.push(f"{ns}/meta", folder)
    hf = trained(hf_llama, 4)
    plan = hub.plan(f"{ns}/meta", target=hf.state_dict())
    assert plan.verdict == "adapted", plan.reasons
    assert plan.adapters[0]["params"] == {"head_dim": HEAD_DIM}
    assert "rope.freqs" in plan.dropped
    assert_same_outputs(hf, hub.fetch(f"{ns}/meta", target=hf.state_dict()), meta)


def test_without_head_dim_the_recipe_refuses_and_says_how_to_give_it(hub: Client, ns: str) -> None:
    """A transformers model pushed as a module carries no config.json, and a Meta model
    has no config: nothing says head_dim, so nothing is guessed (a guess loads strictly
    and gives other outputs). The policy's params give it."""
    hf = trained(hf_llama, 5)
    hub.push(f"{ns}/llama", hf)
    target = trained(meta_llama, 6)
    with pytest.raises(RecipeParamsMissing) as info:
        hub.plan(f"{ns}/llama", target=target)
    assert info.value.detail == {
        "recipe": "builtin-llama-transformers-to-meta",
        "missing": ["head_dim"],
    }
    assert "params" in info.value.message and "config.json" in info.value.message
    with pytest.raises(RecipeParamsMissing):
        hub.fetch(f"{ns}/llama", target=target)
    # Turning the recipes off is an answer too: then nothing converts the layout.
    assert hub.plan(f"{ns}/llama", target=target, builtin=False).adapters == []
    state = hub.fetch(f"{ns}/llama", target=target, params={"head_dim": HEAD_DIM})
    assert_same_outputs(target, state, hf)


def test_a_head_dim_that_does_not_divide_the_rows_is_incompatible(hub: Client, ns: str) -> None:
    hub.push(f"{ns}/llama", trained(hf_llama, 5))
    plan = hub.plan(f"{ns}/llama", target=meta_llama(), params={"head_dim": 6})
    assert plan.verdict == "incompatible"
    assert any("layers.0.attention.wq.weight" in r for r in plan.reasons), plan.reasons


def test_the_cli_gives_model_facts_and_turns_the_recipes_off(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    """``statehub check`` is the CI gate: without head_dim it fails with the code and what
    to do; ``--param head_dim=8`` passes it; ``--no-builtin`` plans without recipes."""
    hub.push(f"{ns}/llama", trained(hf_llama, 5))
    target = tmp_path / "meta.pt"
    torch.save(meta_llama().state_dict(), target)

    def cli(*args: str) -> Result:
        return CliRunner().invoke(main, ["--url", server.url, *args], catch_exceptions=False)

    missing = cli("check", f"{ns}/llama", "--target", str(target))
    assert missing.exit_code == 2 and "[recipe_params_missing]" in missing.stderr
    assert "head_dim" in missing.stderr
    given = cli("check", f"{ns}/llama", "--target", str(target), "--param", "head_dim=8")
    assert given.exit_code == 0, given.output
    assert "verdict adapted" in given.stdout
    off = cli("plan", f"{ns}/llama", "--target", str(target), "--no-builtin", "--json")
    assert off.exit_code == 0 and json.loads(off.stdout)["adapters"] == []
    bad = cli("plan", f"{ns}/llama", "--target", str(target), "--param", "head_dim")
    assert bad.exit_code == 2 and "NAME=N" in bad.output


# -- MoE: per-expert files into transformers 5's fused experts ------------------------------


def hf_mixtral() -> nn.Module:
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=LLAMA_DIM, intermediate_size=LLAMA_FFN,
        num_hidden_layers=LAYERS, num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_KV_HEADS, num_local_experts=3, num_experts_per_tok=2,
        max_position_embeddings=POSITIONS, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    return MixtralForCausalLM(config)


def hf_qwen3_moe() -> nn.Module:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=LLAMA_DIM, intermediate_size=LLAMA_FFN,
        moe_intermediate_size=24, num_hidden_layers=LAYERS, num_attention_heads=LLAMA_HEADS,
        num_key_value_heads=LLAMA_KV_HEADS, head_dim=HEAD_DIM, num_experts=3,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=POSITIONS, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


MOE = {
    "mixtral": (
        hf_mixtral,
        "builtin-mixtral-experts-to-transformers5",
        "model.layers.1.block_sparse_moe.experts.{e}.{w}.weight",
        ("w1", "w3"),
    ),
    "qwen3-moe": (
        hf_qwen3_moe,
        "builtin-moe-experts-to-transformers5",
        "model.layers.1.mlp.experts.{e}.{w}.weight",
        ("gate_proj", "up_proj"),
    ),
}


@pytest.mark.parametrize("case", list(MOE))
def test_a_save_pretrained_moe_folder_loads_back_into_the_fused_experts(
    hub: Client, ns: str, tmp_path: Path, case: str
) -> None:
    """transformers 5 fuses the experts in the module (mlp.experts.gate_up_proj) but writes
    them one by one (Mixtral's block_sparse_moe.experts.E.w1/w2/w3, Qwen's
    mlp.experts.E.gate_proj/up_proj/down_proj), as the Hub holds them; its from_pretrained
    converts, load_state_dict does not. The recipe does, streaming the experts' bytes."""
    build, recipe, expert_key, (gate, up) = MOE[case]
    source = trained(build, 1)
    source.save_pretrained(tmp_path / case)
    hub.push(f"{ns}/{case}", tmp_path / case)
    target = trained(build, 2)
    plan = hub.plan(f"{ns}/{case}", target=target)
    assert plan.verdict == "adapted", plan.reasons
    assert [a["name"] for a in plan.adapters] == [recipe]
    assert plan.keep_target == [] and plan.unused == []
    gate_up = plan.entry("model.layers.1.mlp.experts.gate_up_proj")
    assert gate_up.sources == [expert_key.format(e=e, w=w) for e in range(3) for w in (gate, up)]
    state = hub.fetch(f"{ns}/{case}", target=target)
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(run(target, TOKENS), run(source, TOKENS), rtol=1e-5, atol=1e-5)


# -- ViT: transformers' file names are not its module names ---------------------------------


def from_files(
    state: dict[str, torch.Tensor], folder: Path, like: nn.Module | None = None
) -> nn.Module:
    """``state`` (in file names) read by transformers itself, as from the Hub, into a model
    of ``like``'s class and config (a ViT by default)."""
    like = like if like is not None else hf_vit()
    folder.mkdir()
    like.config.save_pretrained(folder)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return type(like).from_pretrained(folder).eval()


def hf_deit() -> nn.Module:
    config = DeiTConfig(
        image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=5, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return DeiTForImageClassification(config)


def hf_dinov2(swiglu: bool = False) -> nn.Module:
    config = Dinov2Config(
        image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_labels=5, use_swiglu_ffn=swiglu, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return Dinov2ForImageClassification(config)


def hf_swin() -> nn.Module:
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 4],
        window_size=4, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )  # fmt: skip
    return SwinForImageClassification(config)


IMAGES_32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# transformers 5 classes whose modules are named otherwise than their files: (model, input,
# the file name of the first query weight, the recipe files -> modules, and back).
FILE_NAMED = {
    "vit": (hf_vit, IMAGES, "vit.encoder.layer.0.attention.attention.query.weight", "vit"),
    "deit": (hf_deit, IMAGES, "deit.encoder.layer.0.attention.attention.query.weight", "vit"),
    "dinov2": (
        hf_dinov2, IMAGES, "dinov2.encoder.layer.0.attention.attention.query.weight", "dinov2"
    ),
    "dinov2-swiglu": (
        lambda: hf_dinov2(swiglu=True), IMAGES,
        "dinov2.encoder.layer.0.mlp.weights_in.weight", "dinov2",
    ),
    "swin": (
        hf_swin, IMAGES_32,
        "swin.encoder.layers.0.blocks.0.attention.self.query.weight", "swin",
    ),
}  # fmt: skip


@pytest.mark.parametrize("model", list(FILE_NAMED))
def test_a_save_pretrained_folder_loads_back_into_its_modules(
    hub: Client, ns: str, tmp_path: Path, model: str
) -> None:
    """transformers 5 writes vit.encoder.layer.N.attention.attention.query but its module is
    vit.layers.N.attention.q_proj (DeiT, DINOv2, Swin likewise, each its own way): without
    the recipe the plan is partial."""
    build, x, file_key, family = FILE_NAMED[model]
    source = trained(build, 1)
    source.save_pretrained(tmp_path / "m")
    assert file_key in load_file(tmp_path / "m" / "model.safetensors")
    hub.push(f"{ns}/m", tmp_path / "m")
    target = trained(build, 2)
    plan = hub.plan(f"{ns}/m", target=target)
    assert [a["name"] for a in plan.adapters] == [f"builtin-{family}-transformers-files-to-modules"]
    assert plan.verdict == "adapted" and plan.keep_target == [] and plan.unused == []
    assert hub.plan(f"{ns}/m", target=target, builtin=False).verdict == "partial"
    # The model sends its config's facts (head_dim) beside the spec; no recipe here uses
    # them, so the model and its state_dict as targets give one plan.
    assert hub.plan(f"{ns}/m", target=target.state_dict()).plan_id == plan.plan_id
    target.load_state_dict(hub.fetch(f"{ns}/m", target=target), strict=True)
    torch.testing.assert_close(run(target, x), run(source, x))


@pytest.mark.parametrize("model", list(FILE_NAMED))
def test_a_model_pushed_as_a_module_is_fetched_in_file_names(
    hub: Client, ns: str, tmp_path: Path, model: str
) -> None:
    build, x, _, family = FILE_NAMED[model]
    source = trained(build, 3)
    hub.push(f"{ns}/m", source)
    trained(build, 4).save_pretrained(tmp_path / "other")
    files = load_file(tmp_path / "other" / "model.safetensors")  # the names a file holds
    plan = hub.plan(f"{ns}/m", target=files)
    assert [a["name"] for a in plan.adapters] == [f"builtin-{family}-transformers-modules-to-files"]
    assert plan.keep_target == [] and plan.unused == []
    state = hub.fetch(f"{ns}/m", target=files)
    loaded = from_files(dict(state), tmp_path / "fetched", like=source)
    torch.testing.assert_close(run(loaded, x), run(source, x))


def test_vit_files_and_timm_convert_both_ways(hub: Client, ns: str, tmp_path: Path) -> None:
    """A Hub-style ViT file into timm's layout, and timm's back into file names that
    transformers' from_pretrained reads."""
    hf = trained(hf_vit, 5)
    hf.save_pretrained(tmp_path / "vit")
    hub.push(f"{ns}/hf", tmp_path / "vit")
    timm = trained(timm_vit, 6)
    plan = hub.plan(f"{ns}/hf", target=timm)
    assert [a["name"] for a in plan.adapters] == ["builtin-vit-transformers-files-to-timm"]
    timm.load_state_dict(hub.fetch(f"{ns}/hf", target=timm), strict=True)
    torch.testing.assert_close(run(timm, IMAGES), run(hf, IMAGES), rtol=1e-5, atol=1e-5)

    source = trained(timm_vit, 7)
    hub.push(f"{ns}/timm", source)
    files = load_file(tmp_path / "vit" / "model.safetensors")
    plan = hub.plan(f"{ns}/timm", target=files)
    assert [a["name"] for a in plan.adapters] == ["builtin-vit-timm-to-transformers-files"]
    loaded = from_files(dict(hub.fetch(f"{ns}/timm", target=files)), tmp_path / "back")
    torch.testing.assert_close(run(loaded, IMAGES), run(source, IMAGES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(MOE))
def test_a_moe_pushed_as_a_module_is_fetched_one_module_per_expert(
    hub: Client, ns: str, tmp_path: Path, case: str
) -> None:
    """The way back: the fused experts of a module push, cut into each expert's tensors
    (the names its files use), which transformers' own from_pretrained then reads."""
    build, _, expert_key, (_, up) = MOE[case]
    source = trained(build, 3)
    hub.push(f"{ns}/{case}", source)
    trained(build, 4).save_pretrained(tmp_path / "other")
    files = load_file(tmp_path / "other" / "model.safetensors")
    plan = hub.plan(f"{ns}/{case}", target=files)
    assert plan.verdict == "adapted", plan.reasons
    assert plan.keep_target == [] and plan.unused == []
    w_up = plan.entry(expert_key.format(e=2, w=up))
    assert w_up.source == "model.layers.1.mlp.experts.gate_up_proj"
    assert [op["op"] for op in w_up.ops] == ["flatten", "slice"]
    state = hub.fetch(f"{ns}/{case}", target=files)
    folder = tmp_path / "fetched"
    folder.mkdir()
    source.config.save_pretrained(folder)
    save_file(dict(state), folder / "model.safetensors", metadata={"format": "pt"})
    loaded = type(source).from_pretrained(folder).eval()
    torch.testing.assert_close(run(loaded, TOKENS), run(source, TOKENS), rtol=1e-5, atol=1e-5)
