"""Versions pushed as folders (``save_pretrained`` output), on both backends.

Every file is kept byte for byte and comes back so; the weights among them (one file or an
index and its shards) are the version's tensors, planned and fetched like any push, and a
real transformers model loads them with equal outputs. Bad folders are refused with a
stable code and leave nothing behind.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from statehub import Client, FilesMissing, InvalidCheckpoint, InvalidRequest
from tests._server import ServerProcess
from tests.client.test_cli import cli

CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TOKENS = torch.tensor([[1, 5, 9, 2, 77, 3]])


def llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG).eval()
    with torch.no_grad():  # no fresh init matches these values
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def saved(model: LlamaForCausalLM, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(folder, **kwargs)
    (folder / "README.md").write_text("# tiny llama\n\nFor tests.\n")
    return folder


def logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.mark.parametrize("shards", [1, 3], ids=["one-file", "sharded"])
def test_a_save_pretrained_folder_round_trips_and_loads_with_equal_outputs(
    hub: Client, ns: str, tmp_path: Path, shards: int
) -> None:
    source = llama(1)
    max_shard = "40KB" if shards > 1 else "10GB"
    folder = saved(source, tmp_path / "src", max_shard_size=max_shard)
    weight_files = sorted(folder.glob("*.safetensors"))
    assert len(weight_files) == shards

    version = hub.push(f"{ns}/llama", folder, alias="prod")  # a folder: push_folder
    assert version.created and version.aliases == ["latest", "prod"]
    pushed = {f["path"]: f for f in version.files or []}
    assert pushed.keys() == tree(folder).keys()
    assert all(pushed[p]["sha256"] == sha256(folder / p) for p in pushed)
    if shards == 1:  # the version's bytes are the file itself
        assert version.digest == sha256(weight_files[0])
    else:
        assert version.source_format == "safetensors-sharded"
    assert version.tensor_count == len(source.state_dict())

    # Byte for byte back, pinned to the version.
    copy = hub.snapshot(f"{ns}/llama@prod", tmp_path / "copy")
    assert tree(copy) == tree(folder)
    config = hub.download(f"{ns}/llama:1", "config.json", tmp_path / "config.json")
    assert json.loads(config.read_text())["hidden_size"] == 32

    # The weights are the version's tensors: a strict fetch into another Llama, equal logits.
    target = llama(2)
    assert not torch.equal(logits(target), logits(source))
    hub.fetch(f"{ns}/llama", target=target, load=True)
    assert torch.equal(logits(target), logits(source))
    # And transformers loads the snapshot itself.
    again = LlamaForCausalLM.from_pretrained(copy).eval()
    assert torch.equal(logits(again), logits(source))


def test_the_same_folder_again_is_the_same_version_and_other_files_a_new_one(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    folder = saved(llama(3), tmp_path / "m")
    first = hub.push_folder(f"{ns}/m", folder)
    again = hub.push_folder(f"{ns}/m", folder)
    assert (again.version, again.created) == (first.version, False)
    (folder / "README.md").write_text("# tiny llama\n\nA better README.\n")
    edited = hub.push_folder(f"{ns}/m", folder)
    assert edited.created and edited.version == first.version + 1
    assert edited.digest == first.digest and edited.files_digest != first.files_digest
    readme = hub.download(f"{ns}/m:1", "README.md", tmp_path / "old.md")
    assert readme.read_text() == "# tiny llama\n\nFor tests.\n"


def test_a_fine_tune_re_pushes_only_its_changed_shard(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    base = llama(4)
    folder = saved(base, tmp_path / "base", max_shard_size="40KB")
    hub.push_folder(f"{ns}/ft", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    head_shard = folder / index["weight_map"]["lm_head.weight"]
    tensors = load_file(head_shard)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, head_shard, metadata={"format": "pt"})
    manifest = [
        {"path": p, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for p, data in tree(folder).items()
    ]
    missing = httpx.post(
        f"{server.url}/v1/models/{ns}/ft/files/missing",
        json={"sha256": [m["sha256"] for m in manifest]},
    ).json()["missing"]
    assert missing == [sha256(head_shard)]  # the other shards and files are stored already
    tuned = hub.push_folder(f"{ns}/ft", folder)
    fetched = hub.fetch(f"{ns}/ft:2", target=llama(5))
    assert torch.equal(fetched["lm_head.weight"], tensors["lm_head.weight"])
    assert torch.equal(fetched["model.norm.weight"], base.state_dict()["model.norm.weight"])
    assert tuned.version == 2


def test_a_torch_bin_folder_is_converted_and_kept(hub: Client, ns: str, tmp_path: Path) -> None:
    source = llama(6)
    folder = tmp_path / "bin"
    folder.mkdir()
    source.config.save_pretrained(folder)
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    version = hub.push_folder(f"{ns}/bin", folder)
    assert version.source_format == "torch-zip"
    assert {f["path"] for f in version.files or []} == {"config.json", "pytorch_model.bin"}
    target = llama(7)
    hub.fetch(f"{ns}/bin", target=target, load=True)
    assert torch.equal(logits(target), logits(source))
    kept = hub.download(f"{ns}/bin", "pytorch_model.bin", tmp_path / "kept.bin")
    assert kept.read_bytes() == (folder / "pytorch_model.bin").read_bytes()


def test_gc_keeps_the_files_of_a_version(hub: Client, ns: str, tmp_path: Path) -> None:
    folder = saved(llama(8), tmp_path / "gc", max_shard_size="40KB")
    hub.push_folder(f"{ns}/gc", folder)
    report = hub.gc(grace_s=0)
    kept = {hashlib.sha256(data).hexdigest() for data in tree(folder).values()}
    assert not kept & set(report["blobs_deleted"])
    assert tree(hub.snapshot(f"{ns}/gc", tmp_path / "after")) == tree(folder)


# -- bad folders -------------------------------------------------------------------------------


def commit(server: ServerProcess, ns: str, files: list[dict[str, Any]]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{ns}/bad/versions/files", json={"files": files})


def entry(path: str, data: bytes = b"x") -> dict[str, Any]:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("paths", "fragment"),
    [
        (["../escape.json", "model.safetensors"], "'..'"),
        (["/etc/passwd", "model.safetensors"], "absolute"),
        (["C:/x.json", "model.safetensors"], "absolute"),
        (["a\\b.json", "model.safetensors"], "backslash"),
        (["dir//x.json", "model.safetensors"], "empty"),
        (["README.md", "readme.md", "model.safetensors"], "case-insensitive"),
        (["config.json", "config.json/x", "model.safetensors"], "also the folder"),
        (["config.json"], "no weights"),
        (["a.safetensors", "b.safetensors"], "no index"),
    ],
)
def test_a_bad_manifest_is_refused_before_anything_is_read(
    server: ServerProcess, ns: str, paths: list[str], fragment: str
) -> None:
    response = commit(server, ns, [entry(p) for p in paths])
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_request"
    assert fragment in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models/{ns}/bad").status_code == 404


def test_too_many_files_is_too_large(server: ServerProcess, ns: str) -> None:
    files = [entry(f"f{i:05d}.txt", str(i).encode()) for i in range(1001)]
    response = commit(server, ns, [*files, entry("model.safetensors")])
    assert response.status_code == 413 and error_code(response) == "too_large"
    assert "STATEHUB_MAX_VERSION_FILES" in response.json()["error"]["message"]


def test_a_file_over_the_upload_limit_is_too_large(server: ServerProcess, ns: str) -> None:
    huge = {"path": "model.safetensors", "size": 65 * 1024**3, "sha256": "0" * 64}
    response = commit(server, ns, [huge])
    assert response.status_code == 413 and error_code(response) == "too_large"
    assert "STATEHUB_MAX_UPLOAD_BYTES" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models/{ns}/bad").status_code == 404


def test_files_not_uploaded_are_named_and_nothing_is_committed(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    folder = saved(llama(9), tmp_path / "m")
    manifest = [
        {"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for p, d in tree(folder).items()
    ]
    lacking = httpx.post(
        f"{server.url}/v1/models/{ns}/bad/files/missing",
        json={"sha256": [m["sha256"] for m in manifest]},
    ).json()["missing"]
    assert sha256(folder / "model.safetensors") in lacking  # its weights are new
    response = commit(server, ns, manifest)
    assert response.status_code == 409 and error_code(response) == "files_missing"
    assert response.json()["error"]["detail"]["missing"] == lacking
    assert httpx.get(f"{server.url}/v1/models/{ns}/bad").status_code == 404
    with pytest.raises(FilesMissing):
        hub._json("POST", f"/v1/models/{ns}/bad/versions/files", json={"files": manifest})


def upload(server: ServerProcess, ns: str, data: bytes) -> None:
    sha = hashlib.sha256(data).hexdigest()
    answer = httpx.put(f"{server.url}/v1/models/{ns}/bad/files/{sha}", content=data)
    assert answer.status_code == 200, answer.text


def shard_bytes(tensors: dict[str, torch.Tensor], tmp_path: Path, name: str) -> bytes:
    path = tmp_path / name
    save_file(tensors, path, metadata={"format": "pt"})
    return path.read_bytes()


@pytest.mark.parametrize("case", ["missing-shard", "unlisted-tensor", "tensor-in-two-shards"])
def test_an_index_that_disagrees_with_its_shards_is_refused(
    server: ServerProcess, ns: str, tmp_path: Path, case: str
) -> None:
    one = shard_bytes({"a": torch.ones(4), "b": torch.zeros(2)}, tmp_path, "1.safetensors")
    other = {"c": torch.ones(3)}
    if case == "tensor-in-two-shards":
        other["a"] = torch.ones(4, dtype=torch.float16)  # same key, another dtype
    two = shard_bytes(other, tmp_path, "2.safetensors")
    weight_map = {"a": "m-1.safetensors", "b": "m-1.safetensors", "c": "m-2.safetensors"}
    if case == "unlisted-tensor":
        del weight_map["b"]
    index = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files = {"m.safetensors.index.json": index, "m-1.safetensors": one, "m-2.safetensors": two}
    if case == "missing-shard":
        del files["m-2.safetensors"]
    for data in files.values():
        upload(server, ns, data)
    response = commit(server, ns, [entry(p, d) for p, d in files.items()])
    assert response.status_code == 422, response.text
    assert error_code(response) == "invalid_checkpoint"
    expected = {
        "missing-shard": "m-2.safetensors",
        "unlisted-tensor": "does not put there",
        "tensor-in-two-shards": "does not put there",
    }[case]
    assert expected in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models/{ns}/bad/versions").status_code == 404


def test_a_file_whose_bytes_do_not_match_its_hash_is_refused(
    server: ServerProcess, ns: str
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    answer = httpx.put(f"{server.url}/v1/models/{ns}/bad/files/{wrong}", content=b"data")
    assert answer.status_code == 422 and error_code(answer) == "invalid_checkpoint"
    missing = httpx.post(
        f"{server.url}/v1/models/{ns}/bad/files/missing", json={"sha256": [wrong]}
    ).json()["missing"]
    assert missing == [wrong]


def test_the_client_refuses_links_and_empty_folders(hub: Client, ns: str, tmp_path: Path) -> None:
    folder = saved(llama(10), tmp_path / "linked")
    os.symlink(folder / "config.json", folder / "alias.json")
    with pytest.raises(ValueError, match="symbolic link"):
        hub.push_folder(f"{ns}/m", folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        hub.push_folder(f"{ns}/m", tmp_path / "empty")


def test_errors_the_client_raises(hub: Client, ns: str, tmp_path: Path) -> None:
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="no weights"):
        hub.push_folder(f"{ns}/m", folder)
    bad = tmp_path / "badshard"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(InvalidCheckpoint, match=r"model\.safetensors"):
        hub.push_folder(f"{ns}/m", bad)


def test_the_cli_pushes_a_folder_and_pulls_its_files(
    server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    folder = saved(llama(11), tmp_path / "cli", max_shard_size="40KB")
    pushed = cli(server, "push", f"{ns}/cli", str(folder))
    assert pushed.exit_code == 0, pushed.output
    assert f"pushed {ns}/cli:1" in pushed.output and f"{len(tree(folder))} files" in pushed.output
    pulled = cli(server, "pull", f"{ns}/cli", "--files", str(tmp_path / "out"))
    assert pulled.exit_code == 0, pulled.output
    assert f"wrote {len(tree(folder))} files" in pulled.output
    assert tree(tmp_path / "out") == tree(folder)


def test_the_version_page_lists_the_files_and_shows_readme_and_config(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    folder = saved(llama(12), tmp_path / "ui")
    (folder / "README.md").write_text("# tiny\n<script>alert('x')</script>\n")
    hub.push_folder(f"{ns}/ui", folder)
    page = httpx.get(f"{server.url}/ui/models/{ns}/ui/versions/1", timeout=30)
    assert page.status_code == 200
    for path in tree(folder):
        assert f'<td class="key">{path}</td>' in page.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text  # shown, escaped
    assert "<script>alert('x')" not in page.text
    assert '"hidden_size": 32' in html.unescape(page.text)  # config.json, as text
    assert page.text.count('class="preview"') == 2  # README.md and config.json


def test_a_folder_file_over_the_json_body_limit_uploads(
    hub: Client, ns: str, tmp_path: Path
) -> None:
    # PUT files/{sha256} carries raw bytes: bounded by STATEHUB_MAX_UPLOAD_BYTES, not by the
    # 32 MiB JSON body limit that once broke every LLM fine-tune push.
    folder = tmp_path / "big"
    folder.mkdir()
    big = torch.randn(10 * 1024 * 1024, generator=torch.Generator().manual_seed(13))  # 40 MiB
    save_file({"w": big}, folder / "model.safetensors")
    (folder / "config.json").write_text("{}")
    version = hub.push(f"{ns}/big", folder)
    assert version.size > 32 * 1024 * 1024
    fetched = hub.fetch(f"{ns}/big", target={"w": torch.empty_like(big)})
    assert torch.equal(fetched["w"], big)
