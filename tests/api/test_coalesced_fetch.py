"""Rename-only and transforming fetches of a checkpoint shaped like a real one (ResNet-50's
320 tensors, tiny BatchNorm vectors between the convolutions) on a real server: the right
tensors on both backends, and on PostgreSQL + S3 a number of S3 requests bounded by the
bytes read, not by the tensor count (counted by a loopback proxy in front of moto)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from statehub import Client, spec_of
from tests._counting import CountingProxy
from tests._server import ServerProcess
from tests._services import MotoServer
from tests._shapes import resnet50_like
from tests.conftest import postgres_s3_server

# Starts servers of its own (a statehub process behind a proxy): not in the fast lane.
pytestmark = pytest.mark.server

KiB = 1024
PART = 256 * KiB
WIDTH = 16  # ResNet-50 at a quarter of its width: 320 tensors, 8 MB in fp32


def push_file(hub: Client, ref: str, sd: dict[str, torch.Tensor], where: Path) -> str:
    """``sd`` pushed as a safetensors file (tensors stored in safetensors' own order, not
    the model's); returns the stored digest."""
    path = where / "ckpt.safetensors"
    path.write_bytes(st_save(sd))
    version = hub.push(ref, path)
    path.unlink()
    return version.digest


def rename_case(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A DataParallel checkpoint (``module.`` keys) and what the bare model gets."""
    model = resnet50_like(width=WIDTH, seed=seed)
    return {f"module.{k}": v for k, v in model.items()}, model


def cast_case(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """An fp16 checkpoint with 1000 classes, an fp32 target with 30, and what it gets."""
    source = resnet50_like(width=WIDTH, dtype=torch.float16, seed=seed)
    target = resnet50_like(width=WIDTH, classes=30, seed=seed + 1)
    expected = {k: v.float() if v.is_floating_point() else v for k, v in source.items()}
    expected["fc.weight"], expected["fc.bias"] = target["fc.weight"], target["fc.bias"]
    return source, target, expected


def assert_state_dict(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_rename_only_and_cast_fetches_of_320_tensors(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    source, model = rename_case(seed=10)
    push_file(hub, f"{ns}/ddp", source, tmp_path)
    assert_state_dict(hub.fetch(f"{ns}/ddp", target=model), model)

    source, target, expected = cast_case(seed=20)
    push_file(hub, f"{ns}/half", source, tmp_path)
    assert_state_dict(hub.fetch(f"{ns}/half", target=target), expected)


# -- S3 requests, counted -------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(moto_server: MotoServer) -> Iterator[CountingProxy]:
    host, port = moto_server.endpoint.removeprefix("http://").split(":")
    proxy = CountingProxy((host, int(port)))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def s3_server(
    moto_server: MotoServer, proxy: CountingProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "STATEHUB_S3_ENDPOINT": f"http://{proxy.address}",
        "STATEHUB_FETCH_READ_PART": str(PART),
        # Blobs verified before the response are read whole once: read them as parts here.
        "STATEHUB_VERIFY_BUFFER_BYTES": "0",
    }
    data_dir = str(tmp_path_factory.mktemp("coalesced"))
    with postgres_s3_server(moto_server, data_dir, env) as server:
        yield server


@pytest.mark.parametrize("case", ["rename", "cast"])
def test_s3_requests_per_fetch_are_bounded_by_bytes_not_tensors(
    s3_server: ServerProcess, proxy: CountingProxy, ns: str, tmp_path: Path, case: str
) -> None:
    with Client(s3_server.url, retries=1) as hub:
        if case == "rename":
            source, target = rename_case(seed=30)
            expected = target
        else:
            source, target, expected = cast_case(seed=40)
        digest = push_file(hub, f"{ns}/net", source, tmp_path)
        stored = len(st_save(source))
        before = len(proxy.requests(digest))
        fitted = hub.fetch(f"{ns}/net", target=target)

    assert_state_dict(fitted, expected)
    bound = math.ceil(stored / PART) + 2
    assert stored > 10 * PART  # many parts: the bound is not met by a checkpoint of one
    # Every request line passed the proxy before its answer came back, so all are recorded.
    made = proxy.requests(digest)[before:]
    assert len(source) == 320 and made.count(b"GET") > 0
    assert len(made) <= bound, (len(made), bound, made)


def write_sharded_folder(folder: Path, layers: int, per_shard: int) -> dict[str, torch.Tensor]:
    """A ``save_pretrained``-shaped folder: config, index and shards of ``per_shard`` layers
    each. The index lists keys sorted as strings (``layers.10`` before ``layers.2``), the
    order transformers writes, which interleaves the shards."""
    generator = torch.Generator().manual_seed(7)
    hidden, ffn = 256, 1024
    weights: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shards = math.ceil(layers / per_shard)
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(shard * per_shard, min(layers, (shard + 1) * per_shard)):
            shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden)}
            shapes |= {"o": (hidden, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}
            shapes |= {"norm1": (hidden,), "norm2": (hidden,)}
            for part, shape in shapes.items():
                tensors[f"layers.{layer}.{part}.weight"] = torch.randn(shape, generator=generator)
        (folder / name).write_bytes(st_save(tensors))
        weights |= tensors
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return weights


def test_an_exact_fetch_of_a_sharded_folder_reads_each_shard_in_its_own_parts(
    s3_server: ServerProcess, proxy: CountingProxy, ns: str, tmp_path: Path
) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    weights = write_sharded_folder(folder, layers=12, per_shard=4)  # 3 shards of 12 MiB
    shards = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        shards[hashlib.sha256(shard.read_bytes()).hexdigest()] = shard.stat().st_size
    with Client(s3_server.url, retries=1, cache=False) as hub:
        hub.push(f"{ns}/repo", folder)
        before = {digest: len(proxy.requests(digest)) for digest in shards}
        fitted = hub.fetch(f"{ns}/repo", target=weights)
        in_parts = {digest: proxy.requests(digest)[before[digest] :] for digest in shards}
        # A client that does not verify gets the passthrough as one stream, hashed in order.
        before = {digest: len(proxy.requests(digest)) for digest in shards}
        body = {"target": spec_of(weights), "policy": {}}
        url = f"{s3_server.url}/v1/models/{ns}/repo/versions/latest/fetch"
        plain = httpx.post(url, json=body, timeout=120)
        streamed = {digest: proxy.requests(digest)[before[digest] :] for digest in shards}

    assert_state_dict(fitted, weights)
    assert plain.status_code == 200 and st_load(plain.content).keys() == weights.keys()
    # The statehub client verifies the body, so the passthrough is read as parts in
    # flight, each from the shard it lies in (two at a boundary).
    for digest, size in shards.items():
        assert set(in_parts[digest]) == {b"GET"}
        assert len(in_parts[digest]) <= math.ceil(size / PART) + 1, (in_parts[digest], size)
    # One stream per shard. Composed in the index's order (as before), the shards
    # interleave, and each 8 MiB window of the body read from every shard it touched: 7
    # GETs here, 76 for the 2 GiB repository of benchmarks/results/scale.md.
    assert all(requests == [b"GET"] for requests in streamed.values()), streamed


def test_a_folder_pushed_again_does_not_read_its_unchanged_shards(
    s3_server: ServerProcess, proxy: CountingProxy, ns: str, tmp_path: Path
) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    weights = write_sharded_folder(folder, layers=12, per_shard=4)  # 3 shards of 12 MiB
    shards = sorted(folder.glob("model-*.safetensors"))
    digests = [hashlib.sha256(shard.read_bytes()).hexdigest() for shard in shards]
    with Client(s3_server.url, retries=1, cache=False) as hub:
        hub.push(f"{ns}/repo", folder)
        changed = st_load(shards[-1].read_bytes())  # a fine-tune of one tensor, last shard
        changed["layers.11.o.weight"] = changed["layers.11.o.weight"] + 1
        shards[-1].write_bytes(st_save(changed))
        before = [len(proxy.requests(digest)) for digest in digests[:-1]]
        tuned = hub.push(f"{ns}/repo", folder)
        during = [proxy.requests(d)[n:] for d, n in zip(digests[:-1], before, strict=True)]
        fetched = hub.fetch(f"{ns}/repo:{tuned.version}", target=weights)
    # Per unchanged shard: its header (its length, then the JSON) and one stream, for the
    # version's digest (the sha256 of the merged file). Each tensor's hash was recorded when
    # the shard was first stored, so the commit no longer reads the shard a second time to
    # hash its tensors (4 GETs a shard before).
    assert [r.count(b"GET") for r in during] == [3, 3], during
    assert torch.equal(fetched["layers.11.o.weight"], changed["layers.11.o.weight"])
    assert torch.equal(fetched["layers.0.q.weight"], weights["layers.0.q.weight"])
