"""Tensor-level deduplication, on both backends, through a real server.

A fine-tune that changed only its head is stored as its header and new tensors plus ranges
of the backbone's blob; it reads back byte for byte (download, ranges, exact and adapted
fetches), a client pushing a state_dict uploads only the tensors the registry lacks, and
gc keeps what a composed version reads and nothing more.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save as st_save

from statehub import Client, InvalidCheckpoint, StorageError, TensorsMissing, Version
from statehub._errors import raise_for_status
from tests._metrics import scrape
from tests.api.conftest import Deployment

MiB = 1024 * 1024


def backbone(seed: int = 0) -> dict[str, torch.Tensor]:
    """About 1.5 MiB of backbone weights."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"encoder.layers.{i}.weight": torch.randn(256, 256, generator=generator) for i in range(6)
    } | {"encoder.norm.weight": torch.ones(256)}


def fine_tune(
    base: dict[str, torch.Tensor], seed: int, classes: int = 10
) -> dict[str, torch.Tensor]:
    # A head of this backbone's own: tests share the registry, and so its tensors.
    origin = int(base["encoder.layers.0.weight"][0, 0].item() * 1e6)
    generator = torch.Generator().manual_seed(1000 * seed + origin % 1000)
    return dict(base) | {
        "head.weight": torch.randn(classes, 256, generator=generator),
        "head.bias": torch.randn(classes, generator=generator),
    }


def stored_bytes(deployment: Deployment) -> int:
    return sum(blob.size for blob in deployment.store().iter_stored())


def upload(hub: Client, ref: str, state: dict[str, torch.Tensor]) -> tuple[Version, bytes]:
    """A plain upload of the whole safetensors file (the server deduplicates on its side)."""
    namespace, name = ref.split("/")
    body = st_save(state)
    response = httpx.post(f"{hub.url}/v1/models/{namespace}/{name}/versions", content=body)
    assert response.status_code == 201, response.text
    version = Version.from_json(response.json())
    assert version.digest == hashlib.sha256(body).hexdigest()
    return version, body


def pushed_bytes(url: str) -> float:
    return scrape(url).get(("statehub_push_bytes_total", frozenset()), 0.0)


@pytest.fixture(scope="module")
def server(deployment: Deployment) -> Any:
    return deployment.start(STATEHUB_GC_GRACE_S="0")


@pytest.fixture
def hub(server: Any) -> Any:
    with Client(server.url, retries=1) as client:
        yield client


def test_a_fine_tune_is_stored_as_its_new_tensors(
    deployment: Deployment, hub: Client, ns: str, tmp_path: Path
) -> None:
    base = backbone(seed=1)
    first, _ = upload(hub, f"{ns}/clf", fine_tune(base, 0))
    assert first.ingest["storage"]["composed"] is False
    before = stored_bytes(deployment)

    tuned = fine_tune(base, 1)
    second, body = upload(hub, f"{ns}/clf", tuned)
    storage = second.ingest["storage"]
    assert storage["composed"] is True
    head_bytes = tuned["head.weight"].nbytes + tuned["head.bias"].nbytes
    header_bytes = len(body) - sum(t.nbytes for t in tuned.values())
    assert storage["new_bytes"] == header_bytes + head_bytes
    assert storage["shared_bytes"] == sum(t.nbytes for t in base.values())
    assert stored_bytes(deployment) - before == header_bytes + head_bytes

    # The stored file, whole and in ranges, is the pushed file byte for byte.
    pulled = hub.pull(f"{ns}/clf:2", tmp_path / "pulled.safetensors")
    assert pulled.read_bytes() == body
    url = f"{hub.url}/v1/models/{ns}/clf/versions/2/blob"
    for lo, hi in ((0, 100), (len(body) - head_bytes - 10, len(body) - 1), (5000, 400_000)):
        ranged = httpx.get(url, headers={"Range": f"bytes={lo}-{hi}"})
        assert ranged.status_code == 206
        assert ranged.content == body[lo : hi + 1]

    # Exact fetch, and a fetch that renames and resets the head, read the shared bytes.
    fetched = hub.fetch(f"{ns}/clf:2", target=tuned)
    assert all(torch.equal(fetched[k], tuned[k]) for k in tuned)
    target = {k.replace("encoder.", "backbone."): v for k, v in fine_tune(base, 9, 3).items()}
    adapted = hub.fetch(f"{ns}/clf:2", target=target, head="keep")
    for key, value in base.items():
        assert torch.equal(adapted[key.replace("encoder.", "backbone.")], value)
    assert torch.equal(adapted["head.weight"], target["head.weight"])  # the target's own


def test_a_client_push_uploads_only_missing_tensors(
    deployment: Deployment, server: Any, hub: Client, ns: str
) -> None:
    base = backbone(seed=2)
    sent = pushed_bytes(server.url)
    first = hub.push(f"{ns}/clf", fine_tune(base, 0))  # all new: one plain upload
    assert first.ingest["storage"]["composed"] is False
    assert pushed_bytes(server.url) - sent == first.size

    tuned = fine_tune(base, 1)
    sent = pushed_bytes(server.url)
    second = hub.push(f"{ns}/clf", tuned, alias="prod", metadata={"run": 1})
    uploaded = pushed_bytes(server.url) - sent
    assert uploaded == tuned["head.weight"].nbytes + tuned["head.bias"].nbytes
    assert second.ingest["storage"]["composed"] is True
    assert second.digest == hashlib.sha256(st_save_ordered(tuned)).hexdigest()
    assert second.metadata == {"run": 1} and "prod" in second.aliases

    fetched = hub.fetch(f"{ns}/clf@prod", target=tuned)
    assert all(torch.equal(fetched[k], tuned[k]) for k in tuned)
    # The same state_dict again is the same version, not a new one.
    again = hub.push(f"{ns}/clf", tuned)
    assert (again.version, again.created) == (second.version, False)
    # A module too; a model elsewhere shares the registry's tensors.
    other = hub.push(f"{ns}/other", fine_tune(base, 1))
    assert other.digest == second.digest and other.ingest["storage"]["composed"] is True


def test_a_safetensors_file_push_uploads_only_missing_tensors(
    server: Any, hub: Client, ns: str, tmp_path: Path
) -> None:
    base = backbone(seed=7)
    hub.push(f"{ns}/clf", fine_tune(base, 0))
    tuned = fine_tune(base, 1)
    path = tmp_path / "tuned.safetensors"
    path.write_bytes(st_save(tuned))  # sorted keys: another layout than the client's own
    sent = pushed_bytes(server.url)
    version = hub.push(f"{ns}/clf", path)
    assert (
        pushed_bytes(server.url) - sent == tuned["head.weight"].nbytes + tuned["head.bias"].nbytes
    )
    assert version.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert version.ingest["storage"]["composed"] is True
    assert hub.pull(f"{ns}/clf:2", tmp_path / "back.safetensors").read_bytes() == path.read_bytes()
    # ema asks the server to unpack a snapshot: such a push is a plain upload (refused here).
    with pytest.raises(InvalidCheckpoint):
        hub.push(f"{ns}/clf", path, ema=True)


def st_save_ordered(state: dict[str, torch.Tensor]) -> bytes:
    """The file the client builds: tensors in state_dict order (safetensors sorts them)."""
    from statehub._tensors import iter_safetensors, safetensors_header

    items = list(state.items())
    return b"".join(iter_safetensors(items, safetensors_header(items)))


def test_compose_refuses_what_it_cannot_vouch_for(
    deployment: Deployment, hub: Client, ns: str
) -> None:
    state = fine_tune(backbone(seed=3), 0)
    body = st_save_ordered(state)
    header_length = int.from_bytes(body[:8], "little")
    header = body[8 : 8 + header_length].decode()
    hashes = {k: hashlib.sha256(t.numpy().tobytes()).hexdigest() for k, t in state.items()}
    compose = f"{hub.url}/v1/models/{ns}/clf/versions/compose"

    missing = httpx.post(compose, json={"header": header, "size": len(body), "tensors": hashes})
    assert missing.status_code == 409
    assert missing.json()["error"]["code"] == "tensors_missing"
    asked = httpx.post(
        f"{hub.url}/v1/models/{ns}/clf/tensors/missing", json={"sha256": list(hashes.values())}
    ).json()["missing"]
    assert {hashes["head.weight"], hashes["head.bias"]} <= set(asked)  # new bytes
    assert hashes["encoder.norm.weight"] not in asked  # ones(256): another test stored it
    assert missing.json()["error"]["detail"]["missing"] == asked

    wrong = httpx.put(
        f"{hub.url}/v1/models/{ns}/clf/tensors/{hashes['head.bias']}", content=b"not the bias"
    )
    assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "invalid_checkpoint"
    answer = httpx.post(
        f"{hub.url}/v1/models/{ns}/clf/tensors/missing", json={"sha256": [hashes["head.bias"]]}
    )
    assert answer.json()["missing"] == [hashes["head.bias"]]  # nothing was stored

    partial = dict(hashes)
    partial.pop("head.bias")
    incomplete = httpx.post(compose, json={"header": header, "size": len(body), "tensors": partial})
    assert incomplete.status_code == 422 and incomplete.json()["error"]["code"] == "invalid_request"
    short = httpx.post(compose, json={"header": header, "size": len(body) - 4, "tensors": hashes})
    assert short.status_code == 422 and short.json()["error"]["code"] == "invalid_checkpoint"
    bad = httpx.post(f"{hub.url}/v1/models/{ns}/clf/tensors/missing", json={"sha256": ["zz" * 32]})
    assert bad.status_code == 422
    with pytest.raises(TensorsMissing):
        raise_for_status(missing)
    assert httpx.get(f"{hub.url}/v1/models/{ns}/clf").status_code == 404  # no model made


def test_gc_keeps_what_composed_versions_read(deployment: Deployment, hub: Client, ns: str) -> None:
    base = backbone(seed=4)
    upload(hub, f"{ns}/clf", fine_tune(base, 0))
    tuned = fine_tune(base, 1)
    upload(hub, f"{ns}/clf", tuned)
    hub.delete_version(f"{ns}/clf:1", hard=True)
    hub.gc(grace_s=0)
    fetched = hub.fetch(f"{ns}/clf:2", target=tuned)  # v1's blob still holds the backbone
    assert all(torch.equal(fetched[k], tuned[k]) for k in tuned)

    hub.delete_model(f"{ns}/clf", hard=True)
    report = hub.gc(grace_s=0)
    assert report["bytes_freed"] >= sum(t.nbytes for t in tuned.values())
    own = [t for k, t in tuned.items() if k != "encoder.norm.weight"]  # ones: shared
    hashes = sorted(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in own)
    engine = deployment.engine()
    try:
        with engine.connect() as connection:
            query = sa.text("SELECT sha256 FROM stored_tensors WHERE sha256 IN :h")
            query = query.bindparams(sa.bindparam("h", expanding=True))
            rows = connection.execute(query, {"h": hashes}).all()
    finally:
        engine.dispose()
    assert rows == []  # forgotten with their blobs: the next push stores them whole
    again, _ = upload(hub, f"{ns}/clf2", tuned)
    assert again.ingest["storage"]["composed"] is False


def test_a_corrupted_shared_blob_is_not_served(
    deployment: Deployment, hub: Client, ns: str
) -> None:
    from tests.api.test_integrity import flip_stored_byte

    base = backbone(seed=5)
    first, _ = upload(hub, f"{ns}/clf", fine_tune(base, 0))
    tuned = fine_tune(base, 1)
    upload(hub, f"{ns}/clf", tuned)
    flip_stored_byte(deployment.servers[-1], first.digest, 4096)  # inside the backbone
    with pytest.raises(StorageError):
        hub.fetch(f"{ns}/clf:2", target=tuned)
    download = httpx.get(f"{hub.url}/v1/models/{ns}/clf/versions/2/blob")
    assert download.status_code == 500  # small: verified before the response starts
    assert download.json()["error"]["code"] == "storage_error"


def test_stored_tensors_are_listed_with_their_hash(hub: Client, ns: str) -> None:
    state = fine_tune(backbone(seed=6), 0)
    hub.push(f"{ns}/clf", state)
    answer = httpx.get(f"{hub.url}/v1/models/{ns}/clf/versions/1").json()
    hashes = answer["tensor_sha256"]
    assert all(set(t) == {"key", "shape", "dtype"} for t in answer["spec"]["tensors"])
    assert hashes == {k: hashlib.sha256(t.numpy().tobytes()).hexdigest() for k, t in state.items()}
