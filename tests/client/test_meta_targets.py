"""Models built on the meta device as fetch targets, and loading as the stream arrives (issue
13 item 3), on both backends: real transformers classes checked by their logits, kept keys
without values refused before a weight moves, the client's peak memory measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from statehub import Client, NotFound, StatehubError, _dedup, _tensors, spec_of
from tests import _metrics
from tests._models import seeded
from tests._server import ServerProcess
from tests.client import _fetch_peak
from tests.client.test_client import CuttingProxy

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
ROTARY = "model.rotary_emb.inv_freq"


def llama_config(*, tie: bool, vocab: int = 256) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def gpt2_config() -> GPT2Config:
    return GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))


def fetched_bytes(server: ServerProcess) -> tuple[float, float]:
    """Bytes of fetch bodies sent, and fetch bodies started (every mode), once no body is
    streaming: a body's last bytes are counted as its stream closes, which can be after
    the client has read them all."""
    deadline = time.monotonic() + 30
    while True:
        samples = _metrics.scrape(server.url)
        if _metrics.value(samples, "statehub_fetches_in_flight") == 0:
            break
        assert time.monotonic() < deadline, "a fetch body is still streaming after 30 s"
        time.sleep(0.05)  # waiting for a signal, not standing in for one
    started = sum(v for (name, _), v in samples.items() if name == "statehub_fetches_total")
    return _metrics.value(samples, "statehub_fetch_bytes_total"), started


def on_meta(model: nn.Module) -> list[str]:
    named = [*model.named_parameters(remove_duplicate=False)]
    named += model.named_buffers(remove_duplicate=False)
    return [name for name, t in named if t.is_meta]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_meta_built_llama_loads_with_assign_and_gives_the_source_logits(
    hub: Client, ns: str, tie: bool
) -> None:
    seeded(0)
    cfg = llama_config(tie=tie)
    source = LlamaForCausalLM(cfg).eval()
    hub.push(f"{ns}/llama", source)
    with torch.device("meta"):
        target = LlamaForCausalLM(cfg)
    target.model.norm.weight.requires_grad_(False)  # a frozen parameter stays frozen

    spec = spec_of(target)  # shapes and dtypes from the module, ties by identity
    assert spec["tie_groups"] == ([["model.embed_tokens.weight", "lm_head.weight"]] if tie else [])
    plan = hub.plan(f"{ns}/llama", target=target)
    assert plan.verdict in ("exact", "adapted") and plan.keep_target == []

    # The rotary frequencies are buffers with persistent=False: in no state_dict, so no
    # checkpoint has them; the client names them and the module computes them.
    with pytest.warns(UserWarning, match=ROTARY) as warned:
        sd = hub.fetch(f"{ns}/llama", target=target, load=True, assign=True)
    assert "model.rotary_emb (LlamaRotaryEmbedding)" in str(warned[0].message)
    target.model.rotary_emb = type(target.model.rotary_emb)(cfg)

    assert on_meta(target) == []
    assert list(sd) == list(source.state_dict())
    assert (target.lm_head.weight is target.model.embed_tokens.weight) is tie
    assert target.model.norm.weight.requires_grad is False
    assert (
        target.lm_head.weight.requires_grad
        and target.model.layers[0].mlp.up_proj.weight.requires_grad
    )
    for key, value in source.state_dict().items():
        assert torch.equal(sd[key], value), key
    with torch.no_grad():
        assert torch.equal(target.eval()(tokens(256)).logits, source(tokens(256)).logits)


def test_meta_built_gpt2_loads_with_assign_and_gives_the_source_logits(
    hub: Client, ns: str
) -> None:
    seeded(1)
    source = GPT2LMHeadModel(gpt2_config()).eval()
    hub.push(f"{ns}/gpt2", source)
    with torch.device("meta"):
        target = GPT2LMHeadModel(gpt2_config())

    # Each tensor placed on the device as it arrives (the code path device="cuda" takes; no
    # GPU here). GPT-2 has no buffer outside its state_dict: no warning.
    hub.fetch(f"{ns}/gpt2", target=target, load=True, assign=True, device="cpu")

    assert on_meta(target) == []
    assert {p.device.type for p in target.parameters()} == {"cpu"}
    assert target.lm_head.weight is target.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(target.eval()(tokens(256)).logits, source(tokens(256)).logits)


def test_meta_target_without_load_gets_a_dict_that_loads_with_assign(hub: Client, ns: str) -> None:
    seeded(2)
    cfg = llama_config(tie=True)
    source = LlamaForCausalLM(cfg).eval()
    hub.push(f"{ns}/llama", source)
    with torch.device("meta"):
        target = LlamaForCausalLM(cfg)

    sd = hub.fetch(f"{ns}/llama", target=target)  # the target is only a spec here

    assert {t.device.type for t in sd.values()} == {"cpu"}
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]  # written once, tied
    target.load_state_dict(sd, strict=True, assign=True)
    assert [n for n, p in target.named_parameters() if p.is_meta] == []


def test_kept_keys_of_a_meta_target_are_refused_before_any_weight_moves(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    seeded(3)
    hub.push(f"{ns}/llama", LlamaForCausalLM(llama_config(tie=False)))
    bigger = llama_config(tie=False, vocab=320)  # a head and embedding the checkpoint cannot fill
    with torch.device("meta"):
        target = LlamaForCausalLM(bigger)
    kept = hub.plan(f"{ns}/llama", target=target).keep_target
    assert "lm_head.weight" in kept

    before = fetched_bytes(server)
    for call in (
        lambda: hub.fetch(f"{ns}/llama", target=target, load=True, assign=True),
        lambda: hub.fetch(f"{ns}/llama", target=target),
        lambda: hub.fetch(f"{ns}/llama", target=spec_of(target)),
    ):
        with pytest.raises(StatehubError, match="no values") as raised:
            call()
        assert raised.value.detail["keep_target"] == kept
        assert "lm_head.weight" in str(raised.value)
    assert fetched_bytes(server) == before  # not one fetch body started, not one byte sent
    assert on_meta(target) == [n for n, _ in target.named_parameters()] + [
        n for n, _ in target.named_buffers()
    ]

    # The same model built off meta keeps its own head: the fetch runs and bytes move.
    real = LlamaForCausalLM(bigger)
    own_head = real.lm_head.weight.detach().clone()
    hub.fetch(f"{ns}/llama", target=real, load=True)
    assert torch.equal(real.lm_head.weight, own_head)
    after_bytes, after_started = fetched_bytes(server)
    assert after_bytes > before[0] and after_started == before[1] + 1


def test_arguments_that_cannot_load_are_refused_before_any_request(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    hub.push(f"{ns}/lin", nn.Linear(4, 3))
    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    before = fetched_bytes(server)
    with pytest.raises(ValueError, match=r"meta device.*assign=True"):
        hub.fetch(f"{ns}/lin", target=meta, load=True)
    with pytest.raises(ValueError, match=r"not on meta.*assign=True"):
        hub.fetch(f"{ns}/lin", target=nn.Linear(4, 3), load=True, device="meta")
    with pytest.raises(TypeError, match=r"load=True"):
        hub.fetch(f"{ns}/lin", target=meta, assign=True)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        hub.fetch(f"{ns}/lin", target=nn.Linear(4, 3).state_dict(), load=True)
    assert fetched_bytes(server) == before
    assert meta.weight.is_meta


@pytest.mark.parametrize("assign", [True, False], ids=["meta-assign", "in-place"])
def test_a_load_cut_midway_resumes_and_loads_every_tensor(
    hub: Client, server: ServerProcess, ns: str, assign: bool
) -> None:
    seeded(8)
    cfg = llama_config(tie=True)
    source = LlamaForCausalLM(cfg).eval()
    hub.push(f"{ns}/llama", source)
    if assign:
        with torch.device("meta"):
            target = LlamaForCausalLM(cfg)
    else:
        target = LlamaForCausalLM(cfg)
    proxy = CuttingProxy(server.url, cut_after=200_000)  # inside the tensors (a 362 KB body)
    try:
        with Client(proxy.url, retries=1) as client, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*still on the meta device")
            client.fetch(f"{ns}/llama", target=target, load=True, assign=assign)
    finally:
        proxy.close()
    resumed = [proxy.headers(i).get("range") for i in range(len(proxy.requests))]
    assert any(r and r.startswith("bytes=") for r in resumed), resumed
    target.model.rotary_emb = type(target.model.rotary_emb)(cfg)
    with torch.no_grad():
        assert torch.equal(target.eval()(tokens(256)).logits, source(tokens(256)).logits)


def test_a_meta_module_cannot_be_pushed(hub: Client, ns: str) -> None:
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(tie=True))
    with pytest.raises(ValueError, match="meta device and have no values"):
        hub.push(f"{ns}/llama", model)
    with pytest.raises(NotFound):
        hub.get_model(f"{ns}/llama")


def test_load_writes_into_the_module_s_own_storage(hub: Client, ns: str) -> None:
    seeded(4)
    source = LlamaForCausalLM(llama_config(tie=True)).eval()
    hub.push(f"{ns}/llama", source)
    target = LlamaForCausalLM(llama_config(tie=True))
    params = {n: (p, p.data_ptr()) for n, p in target.named_parameters()}

    hub.fetch(f"{ns}/llama", target=target, load=True, device="cpu")  # where the model is

    for name, (param, pointer) in params.items():  # the same objects, the same storage
        now = target.get_parameter(name)
        assert now is param and now.data_ptr() == pointer, name
    with torch.no_grad():
        assert torch.equal(target.eval()(tokens(256)).logits, source(tokens(256)).logits)


def test_assign_into_a_built_model_places_the_fetched_tensors(hub: Client, ns: str) -> None:
    seeded(5)
    source = LlamaForCausalLM(llama_config(tie=True)).eval()
    hub.push(f"{ns}/llama", source)
    target = LlamaForCausalLM(llama_config(tie=True)).to(torch.float64)  # cast by the plan
    old = {n: p for n, p in target.named_parameters()}

    hub.fetch(f"{ns}/llama", target=target, load=True, assign=True, device="cpu")

    for name, param in target.named_parameters():
        assert param is not old[name] and param.dtype == torch.float64, name
        assert torch.equal(param, source.get_parameter(name).double()), name
    assert target.lm_head.weight is target.model.embed_tokens.weight


@pytest.mark.parametrize("mode", ["in_place", "assign", "dict"])
def test_peak_client_memory_of_a_fetch_is_the_model_plus_about_one_tensor(
    hub: Client, server: ServerProcess, ns: str, mode: str, request: pytest.FixtureRequest
) -> None:
    ref = f"{ns}/big"
    seeded(6)
    source = _fetch_peak.model()
    model_bytes = sum(p.numel() * p.element_size() for p in source.parameters())
    largest = max(p.numel() * p.element_size() for p in source.parameters())
    assert model_bytes >= 200 * MiB and largest <= 26 * MiB
    hub.push(ref, source)
    checksum = float(sum(t.double().sum() for t in source.state_dict().values()))
    del source

    run = subprocess.run(
        [sys.executable, "-m", "tests.client._fetch_peak", server.url, ref, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    growth = report["growth"]
    assert report["checksum"] == checksum and report["on_meta"] == []
    # Transient: one tensor's buffer where the bytes cannot land in place, the sha256
    # thread's queued batches (16 MiB), the HTTP client's buffers.
    transient = largest + 48 * MiB
    print(
        f"{mode}: client peak growth {growth / MiB:.0f} MiB for a {model_bytes / MiB:.0f} MiB model"
    )
    if mode == "in_place":  # the model already holds its memory: the fetch adds no dict
        assert growth < transient, f"grew {growth / MiB:.0f} MiB"
    elif mode == "assign":  # the fetched tensors are the model
        assert 0.9 * model_bytes < growth < model_bytes + transient, f"grew {growth / MiB:.0f} MiB"
    else:  # the measure sees a whole state_dict where one is held
        assert growth > 0.9 * model_bytes, f"grew {growth / MiB:.0f} MiB"


def test_push_from_an_accelerator_copies_each_tensor_to_the_host_once(
    hub: Client, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: a non-contiguous CPU tensor takes the path a GPU tensor takes
    # (`_contiguous_cpu` makes new storage); a copy is counted when the storage is new.
    copies: list[str] = []
    original = _tensors._contiguous_cpu

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        out = original(tensor)
        if out.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr():
            copies.append(str(tuple(tensor.shape)))
        return out

    monkeypatch.setattr(_tensors, "_contiguous_cpu", counting)
    monkeypatch.setattr(_dedup, "_contiguous_cpu", counting)
    seeded(7)
    state_dict = {f"layers.{i}.weight": torch.randn(96, 64 + i).T for i in range(4)}

    version = hub.push(f"{ns}/gpu", state_dict)  # all new: the plain upload after the dedup pass

    assert version.created and version.tensor_count == 4
    assert len(copies) == len(state_dict), copies
    fetched = hub.fetch(f"{ns}/gpu", target=state_dict)
    for key, value in state_dict.items():
        assert torch.equal(fetched[key], value), key
