"""Composed files, on both backends: a fine-tuned shard stores only its new tensors.

A folder whose changed safetensors file mostly holds tensors the registry stores already
(the shard with a fine-tune's new head) is sent as its missing tensors; the server composes
the file from its header and its tensors' hashes, checks the composition against the file's
sha256 and keeps it as ranges of the blobs holding those bytes. Every reader of a file reads
it byte for byte as pushed (snapshot, Range, the Hub protocol, fetch of the version), gc
keeps what it reads and deletes a composition no version names, and a composition the
server cannot vouch for is refused with nothing kept.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from statehub import Client
from tests.api.conftest import Deployment
from tests.api.test_auth import compose_file_body
from tests.api.test_folders import CONFIG as TINY
from tests.api.test_folders import logits, sha256, tree

# lm_head of 70,000 x 128 fp32: 34 MiB, over the 32 MiB JSON body limit that once broke
# every fine-tune push; the rest of the file (embedding, layers) is a little more than it.
BIG = LlamaConfig(
    vocab_size=70_000,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LAST_SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def server(deployment: Deployment) -> Any:
    return deployment.start()


@pytest.fixture
def hub(server: Any) -> Any:
    with Client(server.url, retries=1) as client:
        yield client


def llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # values of this test's own: tests share the registry
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def two_shards(model: LlamaForCausalLM, folder: Path) -> Path:
    """A save_pretrained-style sharded folder whose last shard holds the last layer, the
    final norm and ``lm_head``: the shard a head-only fine-tune changes, mostly unchanged."""
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    second = {k for k in state if k.startswith((last, "model.norm.", "lm_head."))}
    shards = {
        "model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k not in second},
        LAST_SHARD: {k: v for k, v in state.items() if k in second},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
    total = sum(t.nbytes for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "README.md").write_text("# a llama\n")
    return folder


def new_head(file: Path, seed: int) -> torch.Tensor:
    """Rewrite ``lm_head.weight`` in ``file`` (as a head-only fine-tune's save would)."""
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(seed)
    tensors["lm_head.weight"] = torch.randn(
        tensors["lm_head.weight"].shape, generator=generator
    ).to(tensors["lm_head.weight"].dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    return tensors["lm_head.weight"]


def data_start(file: Path) -> int:
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def stored_bytes(deployment: Deployment) -> int:
    return sum(blob.size for blob in deployment.store().iter_stored())


def missing(url: str, ns: str, hashes: list[str]) -> list[str]:
    answer = httpx.post(f"{url}/v1/models/{ns}/m/files/missing", json={"sha256": hashes})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["missing"])


def test_a_fine_tuned_shard_stores_only_its_new_head(
    deployment: Deployment, hub: Client, ns: str, tmp_path: Path
) -> None:
    base = llama(TINY, 1)
    folder = two_shards(base, tmp_path / "m")
    hub.push_folder(f"{ns}/m", folder)
    shard = folder / LAST_SHARD
    head = new_head(shard, seed=2)
    before = stored_bytes(deployment)
    tuned = hub.push_folder(f"{ns}/m", folder)
    # The new head and the shard's header: not the layer and norm the shard shares.
    assert stored_bytes(deployment) - before == head.nbytes + data_start(shard)
    assert tuned.version == 2 and missing(hub.url, ns, [sha256(shard)]) == []

    # Byte for byte as pushed, whichever way it is read.
    assert tree(hub.snapshot(f"{ns}/m:2", tmp_path / "back")) == tree(folder)
    ranged = httpx.get(
        f"{hub.url}/v1/models/{ns}/m/versions/2/files/{LAST_SHARD}",
        headers={"Range": "bytes=100-4099"},
    )
    assert ranged.status_code == 206 and ranged.content == shard.read_bytes()[100:4100]
    resolved = httpx.get(f"{hub.url}/hf/{ns}/m/resolve/main/{LAST_SHARD}")
    assert resolved.status_code == 200 and resolved.content == shard.read_bytes()
    assert resolved.headers["X-Linked-Etag"] == f'"{sha256(shard)}"'

    model = LlamaForCausalLM(TINY).eval()
    hub.fetch(f"{ns}/m:2", target=model, load=True)
    expected = llama(TINY, 1)
    expected.lm_head.weight.data.copy_(head)
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(logits(model), logits(expected))

    # gc keeps what the composed file reads: the same bytes after it.
    report = hub.gc(grace_s=0)
    assert report["composed_files_deleted"] == 0
    assert tree(hub.snapshot(f"{ns}/m:2", tmp_path / "after-gc")) == tree(folder)


@pytest.mark.slow
def test_a_single_file_fine_tune_with_a_head_over_32_mib(
    deployment: Deployment, hub: Client, ns: str, tmp_path: Path
) -> None:
    base = llama(BIG, 3)
    folder = tmp_path / "big"
    base.save_pretrained(folder)
    weights = folder / "model.safetensors"
    assert new_head(weights, seed=4).nbytes > 32 * 1024 * 1024
    hub.push_folder(f"{ns}/big", folder)  # first as a version of its own: every byte new
    head = new_head(weights, seed=5)
    before = stored_bytes(deployment)
    tuned = hub.push_folder(f"{ns}/big", folder)
    assert stored_bytes(deployment) - before == head.nbytes + data_start(weights)
    assert tuned.digest == sha256(weights)  # a one-file folder: the version is the file
    assert tree(hub.snapshot(f"{ns}/big:2", tmp_path / "back")) == tree(folder)
    fetched = hub.fetch(f"{ns}/big:2", target=base)
    assert torch.equal(fetched["lm_head.weight"], head)
    state = base.state_dict()
    assert all(torch.equal(fetched[k], state[k]) for k in state if k != "lm_head.weight")


def test_a_composition_the_server_cannot_vouch_for_is_refused(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    folder = two_shards(llama(TINY, 6), tmp_path / "m")
    hub.push_folder(f"{ns}/m", folder)
    shard = folder / LAST_SHARD
    new_head(shard, seed=7)
    body = compose_file_body(shard.read_bytes())
    url = f"{hub.url}/v1/models/{ns}/m/files/compose"

    absent = httpx.post(url, json=body)  # the new head was never uploaded
    assert absent.status_code == 409 and absent.json()["error"]["code"] == "tensors_missing"
    assert absent.json()["error"]["detail"]["missing"] == [body["tensors"]["lm_head.weight"]]
    head = load_file(shard)["lm_head.weight"]
    put = httpx.put(
        f"{hub.url}/v1/models/{ns}/m/tensors/{body['tensors']['lm_head.weight']}",
        content=head.numpy().tobytes(),
    )
    assert put.status_code == 200, put.text

    lying = httpx.post(url, json={**body, "sha256": "ab" * 32})
    assert lying.status_code == 422 and lying.json()["error"]["code"] == "invalid_checkpoint"
    assert "ab" * 32 in lying.json()["error"]["message"]
    not_safetensors = httpx.post(url, json={**body, "header": "[1, 2]"})
    assert not_safetensors.status_code == 422
    assert not_safetensors.json()["error"]["code"] == "invalid_checkpoint"
    bad_digest = httpx.post(url, json={**body, "sha256": "nope"})
    assert bad_digest.status_code == 422
    assert missing(hub.url, ns, ["ab" * 32, body["sha256"]]) == sorted(["ab" * 32, body["sha256"]])

    with ThreadPoolExecutor(4) as pool:  # four pushes composing the same file at once
        answers = list(pool.map(lambda _: httpx.post(url, json=body, timeout=60), range(4)))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert {a.json()["sha256"] for a in answers} == {body["sha256"]}
    assert missing(hub.url, ns, [body["sha256"]]) == []
    hub.push_folder(f"{ns}/m", folder)  # committed: gc of later tests leaves it alone
    assert tree(hub.snapshot(f"{ns}/m:2", tmp_path / "back")) == tree(folder)


def test_gc_deletes_a_composition_no_version_names(
    deployment: Deployment, hub: Client, ns: str, tmp_path: Path
) -> None:
    folder = two_shards(llama(TINY, 8), tmp_path / "m")
    hub.push_folder(f"{ns}/m", folder)
    shard = folder / LAST_SHARD
    head = new_head(shard, seed=9)
    body = compose_file_body(shard.read_bytes())
    head_sha = body["tensors"]["lm_head.weight"]
    assert httpx.put(
        f"{hub.url}/v1/models/{ns}/m/tensors/{head_sha}", content=head.numpy().tobytes()
    ).is_success
    assert httpx.post(f"{hub.url}/v1/models/{ns}/m/files/compose", json=body).is_success
    # A push cut off here (composed, never committed): no version, and gc cleans up.
    assert [v.version for v in hub.versions(f"{ns}/m")] == [1]
    dry = hub.gc(grace_s=0, dry_run=True)
    assert dry["composed_files_deleted"] == 1 and head_sha not in dry["blobs_deleted"]
    assert missing(hub.url, ns, [body["sha256"]]) == []
    report = hub.gc(grace_s=0)
    assert report["composed_files_deleted"] == 1
    assert head_sha in report["blobs_deleted"]  # the new head, read by nothing else
    assert missing(hub.url, ns, [body["sha256"]]) == [body["sha256"]]
    # The first version's files are untouched, and the fine-tune pushes again from scratch.
    assert tree(hub.snapshot(f"{ns}/m:1", tmp_path / "v1"))["README.md"] == b"# a llama\n"
    hub.push_folder(f"{ns}/m", folder)
    assert tree(hub.snapshot(f"{ns}/m:2", tmp_path / "v2")) == tree(folder)

    hub.delete_model(f"{ns}/m", hard=True)
    gone = hub.gc(grace_s=0)
    assert gone["composed_files_deleted"] == 1
    assert head_sha in gone["blobs_deleted"]
