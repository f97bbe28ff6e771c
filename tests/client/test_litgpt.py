"""The Llama recipes between transformers and litgpt, proven by outputs on both backends
with litgpt's own ``GPT`` (run in litgpt's venv by tests/recipes/litgpt_side.py, since
litgpt and transformers 5 need different huggingface_hub releases): push a model of one
library, fetch into the other's with no adapter named, strict load, equal logits."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from statehub import Client
from tests.client.test_recipes import TOKENS, hf_llama, run, trained

SIDE = Path(__file__).resolve().parents[1] / "recipes" / "litgpt_side.py"
LITGPT_PYTHON = os.environ.get("STATEHUB_TEST_LITGPT_PYTHON", ".venv-litgpt/bin/python")
# The same model as tests/client/test_recipes.py's hf_llama, in litgpt's terms.
CONFIG = {
    "name": "tiny-llama", "block_size": 16, "vocab_size": 50, "padded_vocab_size": 50,
    "n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 32, "rotary_percentage": 1.0,
    "parallel_residual": False, "bias": False, "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP", "intermediate_size": 48, "norm_eps": 1e-5,
    "rope_base": 10000,
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    not Path(LITGPT_PYTHON).exists() and not os.environ.get("CI"),
    reason=f"litgpt's venv is not at {LITGPT_PYTHON} (make litgpt-env; make test builds it)",
)


def litgpt(*args: str | Path) -> None:
    subprocess.run(
        [LITGPT_PYTHON, str(SIDE), args[0], json.dumps(CONFIG), *map(str, args[1:])],
        check=True,
        timeout=300,
    )


def test_the_tokens_are_the_same_on_both_sides() -> None:
    """Outputs are compared on one input: the side script's tokens are these."""
    side = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(side, TOKENS)


def test_a_litgpt_checkpoint_loads_into_transformers_llama(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    weights, logits = tmp_path / "lit.safetensors", tmp_path / "logits.safetensors"
    litgpt("make", 1, weights, logits)
    hub.push(f"{ns}/lit", weights)
    target = trained(hf_llama, 2)
    plan = hub.plan(f"{ns}/lit", target=target)
    assert plan.verdict == "adapted", plan.reasons
    assert [a["name"] for a in plan.adapters] == ["builtin-llama-litgpt-to-transformers"]
    assert plan.keep_target == [] and plan.unused == []
    # The fused qkv [q 4x8; k 2x8; v 2x8 rows] is cut by the model's shapes (GQA).
    k = plan.entry("model.layers.0.self_attn.k_proj.weight")
    assert k.source == "transformer.h.0.attn.qkv.weight"
    assert (k.ops[0]["start"], k.ops[0]["stop"]) == (32, 48)
    target.load_state_dict(hub.fetch(f"{ns}/lit", target=target), strict=True)
    torch.testing.assert_close(run(target, TOKENS), load_file(logits)["logits"])


def test_a_transformers_llama_loads_into_litgpt(hub: Client, ns: str, tmp_path: Path) -> None:
    model_file, logits = tmp_path / "fresh.safetensors", tmp_path / "unused.safetensors"
    litgpt("make", 3, model_file, logits)  # the target: a litgpt model's own state_dict
    hf = trained(hf_llama, 4)
    hub.push(f"{ns}/hf", hf)
    target = load_file(model_file)
    plan = hub.plan(f"{ns}/hf", target=target)
    assert [a["name"] for a in plan.adapters] == ["builtin-llama-transformers-to-litgpt"]
    assert plan.keep_target == [] and plan.unused == []
    qkv = plan.entry("transformer.h.1.attn.qkv.weight")
    assert qkv.sources == [f"model.layers.1.self_attn.{n}_proj.weight" for n in "qkv"]
    fetched = tmp_path / "fetched.safetensors"
    save_file(hub.fetch(f"{ns}/hf", target=target), fetched)
    out = tmp_path / "out.safetensors"
    litgpt("run", fetched, out)
    torch.testing.assert_close(load_file(out)["logits"], run(hf, TOKENS))
