"""Direct pushes: checkpoints and folder files uploaded straight to the S3 store.

Against PostgreSQL + moto's S3 server over HTTP: the client PUTs presigned multipart parts
under the staging prefix, the server checks the bytes against the sha256 announced and moves
them into place, and the version made from them is the one a push through the server makes.
Bytes that are not the ones announced, a forged or foreign capability, parts that do not
add up and a push cut off halfway each end in a 4xx or in nothing, with nothing visible and
gc cleaning the staging prefix. A local store offers no direct upload: the client pushes
through the server, as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import torch
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from statehub import Client, StatehubWarning
from tests._metrics import delta, scrape
from tests._server import ServerProcess, start_server
from tests._services import S3_TEST_KEYS, MotoServer
from tests.api.test_folders import tree
from tests.conftest import backend_env, postgres_s3_server

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part, so a 12 MiB checkpoint is three parts


@pytest.fixture(scope="module")
def s3_server(
    moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    data_dir = str(tmp_path_factory.mktemp("direct-s3"))
    env = {"STATEHUB_DIRECT_PUSH": "true", "STATEHUB_DIRECT_PUSH_PART_BYTES": str(PART)}
    with postgres_s3_server(moto_server, data_dir, env) as server:
        yield server


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env, _ = backend_env("sqlite", str(tmp_path_factory.mktemp("direct-local")), None)
    server = start_server(env)
    try:
        yield server
    finally:
        server.stop()


def bucket(server: ServerProcess) -> tuple[Any, str]:
    env = server.env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["STATEHUB_S3_ENDPOINT"],
        region_name="us-east-1",
        aws_access_key_id=S3_TEST_KEYS["s3_access_key_id"],
        aws_secret_access_key=S3_TEST_KEYS["s3_secret_access_key"],
    )
    return s3, env["STATEHUB_S3_BUCKET"]


def staged(server: ServerProcess) -> tuple[list[str], list[str]]:
    """What the staging prefix holds: object keys, and multipart uploads in progress."""
    s3, name = bucket(server)
    objects = s3.list_objects_v2(Bucket=name, Prefix="staging/").get("Contents", [])
    uploads = s3.list_multipart_uploads(Bucket=name, Prefix="staging/").get("Uploads", [])
    return [o["Key"] for o in objects], [u["Key"] for u in uploads]


def left_behind(server: ServerProcess, *offers: dict[str, Any]) -> list[str]:
    """Which of these offers' staged keys the bucket still holds, as objects or uploads."""
    objects, uploads = staged(server)
    keys = [f"staging/{fields(o)['staged']}" for o in offers]
    return [key for key in keys if key in objects or key in uploads]


def fields(offered: dict[str, Any]) -> dict[str, Any]:
    """What the capability carries (a client never needs to look)."""
    payload = offered["upload"].partition(".")[0]
    return dict(json.loads(base64.urlsafe_b64decode(payload)))


def checkpoint(seed: int, mib: int = 12) -> tuple[dict[str, torch.Tensor], bytes]:
    generator = torch.Generator().manual_seed(seed)
    state = {
        "encoder.weight": torch.randn(mib * MiB // 4 - 1024, generator=generator),
        "head.weight": torch.randn(16, 64, generator=generator),
    }
    return state, st_save(state)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offer(server: ServerProcess, ns: str, data: bytes, name: str = "m") -> dict[str, Any]:
    answer = httpx.post(f"{server.url}/v1/models/{ns}/{name}/uploads", json={"size": len(data)})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def stored(server: ServerProcess, ns: str, data: bytes) -> bool:
    answer = httpx.post(
        f"{server.url}/v1/models/{ns}/m/files/missing", json={"sha256": [sha(data)]}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["missing"] == []


def put_parts(offered: dict[str, Any], data: bytes, parts: int | None = None) -> list[str]:
    """PUT each part to its presigned URL (no statehub token), as a client does."""
    size = offered["part_bytes"]
    etags = []
    for number, url in enumerate(offered["part_urls"][:parts], start=0):
        response = httpx.put(url, content=data[number * size : (number + 1) * size])
        assert response.status_code == 200, response.text
        etags.append(response.headers["ETag"])
    return etags


def complete(
    server: ServerProcess, ns: str, upload: str, etags: list[str], data: bytes
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/m/uploads/complete",
        json={"upload": upload, "etags": etags, "sha256": sha(data)},
        timeout=60,
    )


def push_stored(server: ServerProcess, ns: str, digest: str, name: str = "m") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/{name}/versions/stored", json={"sha256": digest}, timeout=60
    )


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


def test_a_checkpoint_goes_straight_to_the_store(s3_server: ServerProcess, ns: str) -> None:
    state, data = checkpoint(1)
    before = scrape(s3_server.url)
    offered = offer(s3_server, ns, data)
    assert offered["offered"] and not stored(s3_server, ns, data)
    assert offered["part_bytes"] == PART and len(offered["part_urls"]) == 3
    etags = put_parts(offered, data)
    done = complete(s3_server, ns, offered["upload"], etags, data)
    assert done.status_code == 200, done.text
    assert done.json() == {"path": "", "size": len(data), "sha256": sha(data)}
    assert left_behind(s3_server, offered) == []  # moved into place
    assert stored(s3_server, ns, data)

    made = push_stored(s3_server, ns, sha(data))
    assert made.status_code == 201, made.text
    assert made.json()["digest"] == sha(data)
    after = scrape(s3_server.url)
    assert delta(before, after, "statehub_push_bytes_total") == 0  # none through the server
    assert delta(before, after, "statehub_direct_upload_bytes_total") == len(data)
    assert delta(before, after, "statehub_direct_uploads_total", outcome="stored") == 1
    with Client(s3_server.url, retries=1) as hub:
        fetched = hub.fetch(f"{ns}/m", target=state)
    assert all(torch.equal(fetched[k], state[k]) for k in state)

    again = push_stored(s3_server, ns, sha(data))
    assert again.status_code == 200 and again.json()["version"] == made.json()["version"]
    # The version a push through the server makes of the same bytes.
    plain = httpx.post(f"{s3_server.url}/v1/models/{ns}/plain/versions", content=data, timeout=60)
    assert plain.status_code == 201, plain.text
    for field in ("digest", "arch_fp", "shape_fp", "size", "param_count", "source_format"):
        assert plain.json()[field] == made.json()[field], field


def test_a_torch_file_pushed_straight_is_converted(
    s3_server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    state, _ = checkpoint(2, mib=6)
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    data = (tmp_path / "ckpt.pth").read_bytes()
    offered = offer(s3_server, ns, data)
    assert complete(s3_server, ns, offered["upload"], put_parts(offered, data), data).is_success
    made = push_stored(s3_server, ns, sha(data))
    assert made.status_code == 201, made.text
    plain = httpx.post(f"{s3_server.url}/v1/models/{ns}/plain/versions", content=data, timeout=60)
    assert made.json()["source_format"] == "torch-zip"
    assert made.json()["digest"] == plain.json()["digest"] != sha(data)  # converted alike
    assert made.json()["ingest"]["snapshot"] == {"epoch": 3}


def test_bytes_that_are_not_the_ones_announced_are_refused(
    s3_server: ServerProcess, ns: str
) -> None:
    _, data = checkpoint(3)
    _, other = checkpoint(4)
    assert len(other) == len(data)
    before = scrape(s3_server.url)
    offered = offer(s3_server, ns, data)
    refused = complete(s3_server, ns, offered["upload"], put_parts(offered, other), data)
    assert refused.status_code == 422 and error_code(refused) == "invalid_checkpoint"
    assert sha(other) in refused.json()["error"]["message"]
    assert left_behind(s3_server, offered) == []  # deleted, never moved into place
    assert not stored(s3_server, ns, data) and not stored(s3_server, ns, other)
    missing = push_stored(s3_server, ns, sha(data))
    assert missing.status_code == 409 and error_code(missing) == "files_missing"
    assert httpx.get(f"{s3_server.url}/v1/models/{ns}/m").status_code == 404
    after = scrape(s3_server.url)
    assert delta(before, after, "statehub_direct_uploads_total", outcome="refused") == 1


def test_a_capability_is_checked(s3_server: ServerProcess, ns: str) -> None:
    _, data = checkpoint(5)
    offered = offer(s3_server, ns, data)
    etags = put_parts(offered, data)
    signature = offered["upload"].partition(".")[2]
    forged_fields = fields(offered) | {"size": len(data) + 1}
    forged = base64.urlsafe_b64encode(json.dumps(forged_fields, sort_keys=True).encode())
    for upload in (f"{forged.decode()}.{signature}", "nonsense", offered["upload"] + "0"):
        answer = complete(s3_server, ns, upload, etags, data)
        assert answer.status_code == 403 and error_code(answer) == "forbidden", upload
    foreign = httpx.post(
        f"{s3_server.url}/v1/models/{ns}/other/uploads/complete",
        json={"upload": offered["upload"], "etags": etags, "sha256": sha(data)},
    )
    assert foreign.status_code == 403  # handed out for another model
    wrong = complete(s3_server, ns, offered["upload"], [etags[0], etags[0], etags[2]], data)
    assert wrong.status_code == 422 and error_code(wrong) == "invalid_request"
    not_a_digest = httpx.post(
        f"{s3_server.url}/v1/models/{ns}/m/uploads/complete",
        json={"upload": offered["upload"], "etags": etags, "sha256": "nope"},
    )
    assert not_a_digest.status_code == 422 and error_code(not_a_digest) == "invalid_ref"
    done = complete(s3_server, ns, offered["upload"], etags, data)  # the real one works
    assert done.status_code == 200, done.text
    # S3 completes an upload from fewer parts than were sent: not the bytes announced.
    _, other = checkpoint(8)
    again = offer(s3_server, ns, other)
    short = complete(s3_server, ns, again["upload"], put_parts(again, other)[:2], other)
    assert short.status_code == 422 and error_code(short) == "invalid_checkpoint"
    assert f"not the {len(other)} announced" in short.json()["error"]["message"]
    assert left_behind(s3_server, offered, again) == []
    bad = httpx.post(f"{s3_server.url}/v1/models/{ns}/m/uploads", json={"size": -1})
    assert bad.status_code == 422
    huge = httpx.post(f"{s3_server.url}/v1/models/{ns}/m/uploads", json={"size": 2**50})
    assert huge.status_code == 413 and error_code(huge) == "too_large"


def test_a_push_cut_off_halfway_leaves_nothing(s3_server: ServerProcess, ns: str) -> None:
    _, data = checkpoint(6)
    offered = offer(s3_server, ns, data)
    put_parts(offered, data, parts=1)  # then the client dies
    assert left_behind(s3_server, offered) == [f"staging/{fields(offered)['staged']}"]
    # A crash after the upload completed but before the server moved it: a staged object.
    s3, name = bucket(s3_server)
    s3.put_object(Bucket=name, Key="staging/" + "0" * 32, Body=b"left behind")
    assert httpx.get(f"{s3_server.url}/v1/models/{ns}/m").status_code == 404
    assert not stored(s3_server, ns, data)
    with Client(s3_server.url, retries=1) as hub:
        report = hub.gc(grace_s=0)
    removed = set(report["temp_files_deleted"])
    assert f"multipart:staging/{fields(offered)['staged']}" in removed
    assert "staged:staging/" + "0" * 32 in removed
    assert staged(s3_server) == ([], [])  # every upload gc was older than: all of them


def test_a_small_blob_goes_through_the_server(s3_server: ServerProcess, ns: str) -> None:
    small = b"{}" * 1000
    assert offer(s3_server, ns, small)["offered"] is False


def test_a_local_store_offers_no_direct_upload(local_server: ServerProcess, ns: str) -> None:
    _, data = checkpoint(7)
    offered = offer(local_server, ns, data)
    assert offered == {
        "offered": False,
        "upload": None,
        "part_bytes": 0,
        "part_urls": [],
        "expires_in": 0,
    }
    put = httpx.put(f"{local_server.url}/v1/models/{ns}/m/files/{sha(data)}", content=data)
    assert put.status_code == 200, put.text
    made = push_stored(local_server, ns, sha(data))  # a stored blob, however it came
    assert made.status_code == 201 and made.json()["digest"] == sha(data)


def test_the_client_pushes_straight_to_the_store(
    s3_server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    generator = torch.Generator().manual_seed(9)
    state = {  # 40 MiB: over the 32 MiB JSON body limit that once broke fine-tune pushes
        "backbone.weight": torch.randn(10 * MiB, generator=generator),
        "head.weight": torch.randn(10, 64, generator=generator),
    }
    file_state = {"w": torch.randn(2 * MiB, generator=generator)}
    save_file(file_state, tmp_path / "m.safetensors")
    pth_state = {"w": torch.randn(2 * MiB, generator=generator)}
    torch.save({"model": pth_state, "epoch": 1}, tmp_path / "m.pth")
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file({"w": torch.randn(2 * MiB, generator=generator)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden_size": 8}')

    before = scrape(s3_server.url)
    with Client(s3_server.url, retries=1) as hub:
        pushed = hub.push(f"{ns}/sd", state)
        from_file = hub.push(f"{ns}/file", tmp_path / "m.safetensors")
        from_pth = hub.push(f"{ns}/pth", tmp_path / "m.pth")
        from_folder = hub.push(f"{ns}/folder", folder)
        checks = [(f"{ns}/sd", state), (f"{ns}/file", file_state), (f"{ns}/pth", pth_state)]
        for ref, expected in checks:
            fetched = hub.fetch(ref, target=expected)
            assert all(torch.equal(fetched[k], expected[k]) for k in expected), ref
        assert tree(hub.snapshot(f"{ns}/folder", tmp_path / "back")) == tree(folder)
    after = scrape(s3_server.url)
    assert pushed.created and from_pth.source_format == "torch-zip"
    assert from_file.digest == sha((tmp_path / "m.safetensors").read_bytes())
    direct = (
        pushed.size
        + from_file.size
        + (tmp_path / "m.pth").stat().st_size
        + (folder / "model.safetensors").stat().st_size
    )
    assert delta(before, after, "statehub_direct_upload_bytes_total") == direct
    # Through the server: only the folder's config, too small for a direct upload.
    assert delta(before, after, "statehub_push_bytes_total") == len('{"hidden_size": 8}')
    assert from_folder.files is not None and len(from_folder.files) == 2


def test_the_client_pushes_through_a_local_store(local_server: ServerProcess, ns: str) -> None:
    state, _ = checkpoint(10)
    before = scrape(local_server.url)
    with Client(local_server.url, retries=1) as hub:
        version = hub.push(f"{ns}/m", state)
        fetched = hub.fetch(f"{ns}/m", target=state)
    assert all(torch.equal(fetched[k], state[k]) for k in state)
    after = scrape(local_server.url)
    assert delta(before, after, "statehub_push_bytes_total") == version.size
    assert delta(before, after, "statehub_direct_upload_bytes_total") == 0


def test_a_store_clients_cannot_reach_falls_back_to_the_server(
    moto_server: MotoServer, ns: str, tmp_path: Path
) -> None:
    # The server reaches the bucket; presigned URLs name the address clients would use,
    # and nothing listens there (STATEHUB_S3_PUBLIC_ENDPOINT, e.g. a MinIO behind compose).
    env = {
        "STATEHUB_DIRECT_PUSH": "true",
        "STATEHUB_S3_PUBLIC_ENDPOINT": "http://127.0.0.1:9",
        "STATEHUB_PRESIGN_FETCH": "1",
    }
    with postgres_s3_server(moto_server, str(tmp_path / "data"), env) as server:
        _, data = checkpoint(11)
        (tmp_path / "m.safetensors").write_bytes(data)
        before = scrape(server.url)
        unreachable = pytest.warns(StatehubWarning, match="cannot be reached from here")
        with Client(server.url, retries=1) as hub, unreachable:
            version = hub.push(f"{ns}/m", tmp_path / "m.safetensors")
        assert version.digest == sha(data)
        after = scrape(server.url)
        assert delta(before, after, "statehub_push_bytes_total") == len(data)
        redirect = httpx.get(f"{server.url}/v1/models/{ns}/m/versions/1/blob")
        assert redirect.status_code == 303
        assert redirect.headers["Location"].startswith("http://127.0.0.1:9/")
