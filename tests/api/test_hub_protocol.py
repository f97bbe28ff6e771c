"""The Hugging Face Hub protocol's read side (``HF_ENDPOINT=<statehub>/hf``), through the real
clients: huggingface_hub's snapshot_download and hf_hub_download, transformers'
from_pretrained, each in a fresh process with its own cache, on both backends."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from service.api.deps import get_principal
from service.app import create_app
from service.settings import Settings
from statehub import Client
from tests._metrics import scrape
from tests._server import ServerProcess
from tests._services import MotoServer
from tests.api.conftest import Deployment
from tests.api.test_auth import api_routes
from tests.api.test_folders import llama, logits, saved, tree
from tests.client.test_cli import cli
from tests.conftest import postgres_s3_server

pytestmark = pytest.mark.server  # each case starts a client process of its own
SCRIPT = Path(__file__).with_name("_hf_client.py")
# An open server takes any bearer value; huggingface_hub sends no write without a token.
TOKEN = "shb_" + "x" * 43


def hf(
    server: ServerProcess,
    home: Path,
    action: str,
    repo: str,
    revision: str,
    out: str = "-",
    **env: str,
) -> dict[str, Any]:
    environment = {
        **os.environ,
        "HF_ENDPOINT": f"{server.url}/hf",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        **env,
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), action, repo, revision, out],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def pushed(hub: Client, ns: str, tmp_path: Path) -> tuple[str, Path, Any]:
    source = llama(21)
    folder = saved(source, tmp_path / "src", max_shard_size="40KB")
    hub.push(f"{ns}/llama", folder, alias="prod")
    return f"{ns}/llama", folder, source


def test_snapshot_download_gives_the_files_byte_for_byte_and_works_offline(
    server: ServerProcess, pushed: tuple[str, Path, Any], tmp_path: Path
) -> None:
    repo, folder, _ = pushed
    home = tmp_path / "hf-home"
    got = hf(server, home, "snapshot", repo, "main")
    assert "error" not in got, got
    assert {p: bytes.fromhex(h) for p, h in got["files"].items()} == tree(folder)
    # The second time, from the cache, with no request at all.
    offline = hf(server, home, "snapshot", repo, "main", HF_HUB_OFFLINE="1")
    assert offline.get("files") == got["files"], offline


def test_from_pretrained_loads_with_equal_outputs_at_a_branch(
    server: ServerProcess, hub: Client, pushed: tuple[str, Path, Any], tmp_path: Path
) -> None:
    repo, _, source = pushed
    hub.push(repo, saved(llama(22), tmp_path / "next"))  # main moves on; prod stays at 1
    out = tmp_path / "logits.pt"
    got = hf(server, tmp_path / "home", "logits", repo, "prod", str(out))
    assert "error" not in got, got
    assert torch.equal(torch.load(out, weights_only=True), logits(source))
    tagged = hf(server, tmp_path / "home2", "logits", repo, "v1", str(tmp_path / "v1.pt"))
    assert "error" not in tagged, tagged
    assert torch.equal(torch.load(tmp_path / "v1.pt", weights_only=True), logits(source))


def test_a_version_pushed_as_one_file_is_a_repo_of_one_file(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    version = hub.push(f"{ns}/plain", state)
    got = hf(server, tmp_path / "h", "download", f"{ns}/plain", "main", "model.safetensors")
    assert "error" not in got, got
    assert hashlib.sha256(bytes.fromhex(got["bytes"])).hexdigest() == version.digest


@pytest.mark.parametrize(
    ("repo", "revision", "path", "error"),
    [
        ("{ns}/nothing", "main", "config.json", "RepositoryNotFoundError"),
        ("{ns}/llama", "no-such-branch", "config.json", "RevisionNotFoundError"),
        ("{ns}/llama", "main", "no-such-file.json", "EntryNotFoundError"),
    ],
)
def test_misses_raise_the_clients_own_errors(
    server: ServerProcess,
    pushed: tuple[str, Path, Any],
    tmp_path: Path,
    repo: str,
    revision: str,
    path: str,
    error: str,
) -> None:
    ns = pushed[0].split("/")[0]
    got = hf(server, tmp_path / "h", "download", repo.format(ns=ns), revision, path)
    assert error in got.get("classes", []), got  # e.g. RemoteEntryNotFoundError is one


def test_resolve_headers_ranges_and_tree(
    server: ServerProcess, pushed: tuple[str, Path, Any]
) -> None:
    repo, folder, _ = pushed
    base = f"{server.url}/hf/{repo}/resolve/main/config.json"
    head = httpx.head(base)
    data = (folder / "config.json").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-linked-etag"] == head.headers["etag"] == f'"{sha}"'
    assert head.headers["x-linked-size"] == head.headers["content-length"] == str(len(data))
    commit = head.headers["x-repo-commit"]
    assert len(commit) == 40 and not any(k.lower().startswith("x-xet") for k in head.headers)
    ranged = httpx.get(base, headers={"Range": "bytes=2-9"})
    assert ranged.status_code == 206 and ranged.content == data[2:10]
    assert ranged.headers["content-range"] == f"bytes 2-9/{len(data)}"
    at_commit = httpx.get(f"{server.url}/hf/{repo}/resolve/{commit}/config.json")
    assert at_commit.content == data
    listing = httpx.get(f"{server.url}/hf/api/models/{repo}/tree/main", params={"recursive": 1})
    files = {e["path"]: e for e in listing.json() if e["type"] == "file"}
    assert files.keys() == tree(folder).keys()
    assert files["config.json"]["lfs"] == {"oid": sha, "size": len(data), "pointerSize": 134}
    info = httpx.get(f"{server.url}/hf/api/models/{repo}/revision/prod").json()
    assert info["sha"] == commit and info["id"] == repo
    assert {s["rfilename"] for s in info["siblings"]} == tree(folder).keys()
    assert "prod" in info["tags"]


def test_upload_folder_then_from_pretrained_round_trips(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    source = llama(23)
    folder = saved(source, tmp_path / "up", max_shard_size="40KB")
    repo = f"{ns}/uploaded"
    up = hf(server, tmp_path / "h1", "upload_folder", repo, "main", str(folder), HF_TOKEN=TOKEN)
    assert "error" not in up, up
    version = hub.version(repo)
    assert {f["path"] for f in hub.files(repo)} == tree(folder).keys()
    assert version.arch_fp and version.source_format == "safetensors-sharded"
    shown = cli(server, "show", f"{repo}:1")
    assert shown.exit_code == 0 and f"arch_fp:  {version.arch_fp}" in shown.output
    info = httpx.get(f"{server.url}/hf/api/models/{repo}").json()
    assert info["sha"] == up["commit"]
    out = tmp_path / "logits.pt"
    got = hf(server, tmp_path / "h2", "logits", repo, "main", str(out))
    assert "error" not in got, got
    assert torch.equal(torch.load(out, weights_only=True), logits(source))


def test_push_to_hub_to_a_branch_then_from_pretrained(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    first, second = llama(24), llama(25)
    repo = f"{ns}/pushed"
    for model, revision in ((first, "main"), (second, "staging")):
        folder = saved(model, tmp_path / revision)
        pushed = hf(
            server, tmp_path / "h", "push_to_hub", repo, revision, str(folder), HF_TOKEN=TOKEN
        )
        assert "error" not in pushed, pushed
    assert [v.version for v in hub.versions(repo)] == [1, 2]
    assert hub.version(f"{repo}@staging").version == 2
    out = tmp_path / "staging.pt"
    got = hf(server, tmp_path / "h3", "logits", repo, "staging", str(out))
    assert "error" not in got, got
    assert torch.equal(torch.load(out, weights_only=True), logits(second))


ROOT = "shb_hub-root-" + "z9y8x7w6v5u4t3s2r1q0p9o8n7m6l5k4"


def test_with_tokens_a_read_token_downloads_and_no_token_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    closed = deployment.start(STATEHUB_BOOTSTRAP_TOKEN=ROOT)
    root = {"Authorization": f"Bearer {ROOT}"}
    with Client(closed.url, token=ROOT, retries=1) as admin:
        admin.push("secure/llama", saved(llama(26), tmp_path / "src"))
        reader = admin.create_token("hf-reader", scopes=["read:secure/*"])["token"]
        writer_elsewhere = admin.create_token("other", scopes=["write:other/*"])["token"]
    got = hf(
        closed, tmp_path / "h1", "download", "secure/llama", "main", "config.json", HF_TOKEN=reader
    )
    assert "error" not in got, got
    for name, token in (("none", None), ("another team", writer_elsewhere)):
        env = {"HF_TOKEN": token} if token else {}
        denied = hf(
            closed, tmp_path / name, "download", "secure/llama", "main", "config.json", **env
        )
        assert "RepositoryNotFoundError" in denied.get("classes", []), (name, denied)
    # The Authorization header of these requests never reaches the log.
    assert reader not in closed.output(limit=None)
    assert httpx.get(f"{closed.url}/hf/api/models/secure/llama", headers=root).status_code == 200


def test_every_hub_route_authenticates_but_the_signed_upload() -> None:
    routes = [r for r in api_routes(create_app(Settings()).routes) if r.path.startswith("/hf")]
    assert len(routes) == 13  # read: 5, write: 8
    for route in routes:
        calls = {d.call for d in route.dependant.dependencies}
        signed = route.path == "/hf/lfs/{namespace}/{name}/{oid}"
        assert (get_principal in calls) != signed, route.path


def test_an_upload_url_is_a_capability_for_one_object_for_an_hour(
    server: ServerProcess, ns: str
) -> None:
    data = b"weights of some kind"
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx.post(
        f"{server.url}/hf/{ns}/up.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    (obj,) = batch["objects"]
    href = obj["actions"]["upload"]["href"]
    forged = href.replace(oid, hashlib.sha256(b"other").hexdigest())
    assert httpx.put(forged, content=b"other").status_code == 403
    assert httpx.put(href.replace("expires=", "expires=1"), content=data).status_code == 403
    assert httpx.put(href, content=data + b"!").status_code == 422  # not the size announced
    assert httpx.put(href, content=data).status_code == 200
    again = httpx.post(
        f"{server.url}/hf/{ns}/up.git/info/lfs/objects/batch",
        json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]},
    ).json()
    assert "actions" not in again["objects"][0]  # stored: nothing to upload


def test_a_timm_folder_serves_what_timms_hf_hub_loader_asks_for(
    server: ServerProcess, hub: Client, ns: str, tmp_path: Path
) -> None:
    # timm cannot import beside this torch wheel (torchvision fails), so this makes the
    # requests its hf-hub: loader makes: config.json, then model.safetensors.
    folder = tmp_path / "vit"
    folder.mkdir()
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 10,
        "pretrained_cfg": {"tag": "augreg_in21k", "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    (folder / "config.json").write_text(json.dumps(config))
    weights = {"cls_token": torch.randn(1, 1, 8), "head.weight": torch.randn(10, 8)}
    save_file(weights, folder / "model.safetensors")
    hub.push(f"{ns}/vit", folder)
    home = tmp_path / "h"
    got = hf(server, home, "download", f"{ns}/vit", "main", "config.json")
    assert json.loads(bytes.fromhex(got["bytes"]))["architecture"] == "vit_tiny_patch16_224"
    blob = hf(server, home, "download", f"{ns}/vit", "main", "model.safetensors")
    assert bytes.fromhex(blob["bytes"]) == (folder / "model.safetensors").read_bytes()


RESOLVE = "/hf/{namespace}/{name}/resolve/{revision}/{path:path}"


def test_a_second_from_pretrained_sends_no_file_body(
    server: ServerProcess, pushed: tuple[str, Path, Any], tmp_path: Path
) -> None:
    repo, _, source = pushed
    home = tmp_path / "home"
    first = hf(server, home, "logits", repo, "main", str(tmp_path / "1.pt"))
    assert "error" not in first, first
    before = scrape(server.url)
    second = hf(server, home, "logits", repo, "main", str(tmp_path / "2.pt"))
    assert "error" not in second, second
    after = scrape(server.url)
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    routes = {dict(k[1])["route"] for k in changed if k[0] == "statehub_http_requests_total"} - {
        "/metrics"
    }
    # The revision is resolved once (repo info); every file comes from the cache.
    assert routes == {"/hf/api/models/{namespace}/{name}/revision/{revision}"}, routes
    assert torch.equal(torch.load(tmp_path / "2.pt", weights_only=True), logits(source))


def test_with_presigned_fetches_the_clients_follow_the_redirect_to_the_store(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    env = {"STATEHUB_PRESIGN_FETCH": "true"}
    with postgres_s3_server(moto_server, str(tmp_path / "data"), env) as presigning:
        with Client(presigning.url, retries=1) as admin:
            folder = saved(llama(27), tmp_path / "src")
            admin.push("presign/llama", folder)
        redirect = httpx.get(f"{presigning.url}/hf/presign/llama/resolve/main/model.safetensors")
        assert redirect.status_code == 303 and "X-Amz-Signature" in redirect.headers["location"]
        got = hf(presigning, tmp_path / "h", "snapshot", "presign/llama", "main")
        assert "error" not in got, got
        assert {p: bytes.fromhex(h) for p, h in got["files"].items()} == tree(folder)
