"""Ingesting real-world checkpoints over HTTP, on both backends (issue 5).

Every case is a real file written by ``torch.save`` (or by hand, for hostile and damaged
ones), uploaded to a real server; the stored tensors are downloaded and compared bit for
bit, and the version's ingest report is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import pickle
import random
import struct
import subprocess
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from tests._server import ServerProcess
from tests._zips import rebuild_zip

STABLE_CODES = {"invalid_checkpoint", "unsafe_pickle", "too_large"}

# -- helpers -----------------------------------------------------------------------------------


def push(
    server: ServerProcess,
    ns: str,
    name: str,
    body: bytes,
    *,
    content_type: str = "application/octet-stream",
    **params: str,
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/models/{ns}/{name}/versions",
        content=body,
        params=params,
        headers={"Content-Type": content_type},
        timeout=120,
    )


def pushed(server: ServerProcess, ns: str, name: str, body: bytes, **kwargs: Any) -> dict[str, Any]:
    """Push, expect a new version, and return its full description (with ``ingest``)."""
    response = push(server, ns, name, body, **kwargs)
    assert response.status_code == 201, response.text
    detail = httpx.get(f"{server.url}/v1/models/{ns}/{name}/versions/latest")
    assert detail.status_code == 200, detail.text
    return detail.json()


def stored(server: ServerProcess, ns: str, name: str, ref: str = "latest") -> dict[str, Any]:
    blob = httpx.get(f"{server.url}/v1/models/{ns}/{name}/versions/{ref}/blob", timeout=120)
    assert blob.status_code == 200, blob.text
    return st_load(blob.content)


def saved(obj: Any, *, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, key: str = "") -> None:
    assert actual.dtype == expected.dtype, key
    assert actual.shape == expected.shape, key
    assert bits(actual) == bits(expected), key


def assert_stored_state_dict(
    version: dict[str, Any], tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    """Every expected key is stored (or tied to a stored key) with identical bits."""
    owner = {alias: group[0] for group in version["spec"]["tie_groups"] for alias in group}
    for key, tensor in expected.items():
        assert_identical(tensors[owner.get(key, key)], tensor, key)
    assert set(tensors) | set(owner) == set(expected)


def error(response: httpx.Response) -> dict[str, Any]:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()["error"]
    assert response.headers["x-error-code"] == body["code"]
    assert body["message"]
    return body


def assert_refused(
    server: ServerProcess, ns: str, name: str, response: httpx.Response, code: str
) -> dict[str, Any]:
    body = error(response)
    assert body["code"] == code, body
    assert httpx.get(f"{server.url}/v1/models/{ns}/{name}").status_code == 404
    assert list(server.settings.effective_spool_dir.glob("*")) == []
    return body


def sample_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "bn.running_mean": torch.randn(8, generator=g),
        "bn.num_batches_tracked": torch.tensor(11),
        "fc.weight": torch.randn(4, 8, generator=g),
    }


class TrainConfig:
    """A config object of the training script: a placeholder on the server."""

    def __init__(self) -> None:
        self.arch = "resnet18"
        self.widths = [64, 128]
        self.label_smoothing = np.float32(0.1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)
        self.aux = self.head  # one module under two names: a tie group
        self.register_buffer("cache", torch.zeros(3), persistent=False)


# -- what must be read -------------------------------------------------------------------------

FORMATS = {"zip": False, "legacy": True}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_plain_state_dict(server: ServerProcess, ns: str, fmt: str) -> None:
    sd = sample_state_dict(1)
    version = pushed(server, ns, "net", saved(sd, legacy=FORMATS[fmt]))
    assert version["source_format"] == f"torch-{fmt}"
    assert [t["key"] for t in version["spec"]["tensors"]] == list(sd)
    assert_stored_state_dict(version, stored(server, ns, "net"), sd)
    report = version["ingest"]
    assert report["reader"] == "restricted-unpickler"
    assert report["state_dict_key"] is None
    assert report["placeholders"] == [] and report["dropped"] == []
    assert report["dtypes"] == {"F32": 4, "I64": 1}
    assert report["storage_locations"] == ["cpu"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pickled_module(server: ServerProcess, ns: str, fmt: str) -> None:
    """torch.save(model): the state_dict is read from the module's pickled dictionaries."""
    net = Net()
    version = pushed(server, ns, "whole", saved(net, legacy=FORMATS[fmt]))
    expected = net.state_dict()
    assert_stored_state_dict(version, stored(server, ns, "whole"), expected)
    assert [t["key"] for t in version["spec"]["tensors"]] == [
        k for k in expected if not k.startswith("aux.")
    ]
    assert version["spec"]["tie_groups"] == [
        ["head.weight", "aux.weight"],
        ["head.bias", "aux.bias"],
    ]
    report = version["ingest"]
    assert report["module_class"] == f"{__name__}.Net"
    assert f"{__name__}.Net" in report["placeholders"]
    assert "torch.nn.modules.conv.Conv2d" in report["placeholders"]
    assert report["tie_groups"] == version["spec"]["tie_groups"]


def training_snapshot(key: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
    return {
        key: sd,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": 100,
        "max_accuracy": np.float64(0.92),
        "best_loss": torch.tensor(0.125),
        "config": TrainConfig(),
        "args": argparse.Namespace(lr=0.1, epochs=100, amp=True, data=None),
    }


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict", "net"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_snapshot(server: ServerProcess, ns: str, key: str, fmt: str) -> None:
    sd = sample_state_dict(2)
    body = saved(training_snapshot(key, sd), legacy=FORMATS[fmt])
    version = pushed(server, ns, "snap", body)
    assert_stored_state_dict(version, stored(server, ns, "snap"), sd)
    report = version["ingest"]
    assert report["state_dict_key"] == key
    assert report["ema"] is False
    assert sorted(report["dropped"]) == ["lr_scheduler", "optimizer"]
    assert {"argparse.Namespace", f"{__name__}.TrainConfig"} <= set(report["placeholders"])
    assert any(p.endswith("multiarray.scalar") for p in report["placeholders"])
    assert report["snapshot"] == {
        "epoch": 100,
        "max_accuracy": 0.92,
        "best_loss": 0.125,
        "config": {
            "__global__": f"{__name__}.TrainConfig",
            "state": {
                "arch": "resnet18",
                "widths": [64, 128],
                "label_smoothing": pytest.approx(0.1),
            },
        },
        "args": {
            "__global__": "argparse.Namespace",
            "state": {"lr": 0.1, "epochs": 100, "amp": True, "data": None},
        },
    }


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema"])
def test_ema_weights_are_the_uploaders_choice(server: ServerProcess, ns: str, ema_key: str) -> None:
    sd, ema_sd = sample_state_dict(3), sample_state_dict(4)
    body = saved({"state_dict": sd, ema_key: ema_sd, "epoch": 5})

    default = pushed(server, ns, "plain", body)
    assert_stored_state_dict(default, stored(server, ns, "plain"), sd)
    assert (default["ingest"]["state_dict_key"], default["ingest"]["ema"]) == ("state_dict", False)
    assert default["ingest"]["dropped"] == [ema_key]

    ema = pushed(server, ns, "ema", body, ema="true")
    assert_stored_state_dict(ema, stored(server, ns, "ema"), ema_sd)
    assert (ema["ingest"]["state_dict_key"], ema["ingest"]["ema"]) == (ema_key, True)
    assert ema["ingest"]["dropped"] == ["state_dict"]
    assert ema["ingest"]["snapshot"] == {"epoch": 5}


def test_asking_for_ema_weights_that_are_not_there(server: ServerProcess, ns: str) -> None:
    response = push(
        server, ns, "no-ema", saved({"model": sample_state_dict(), "epoch": 1}), ema="true"
    )
    body = assert_refused(server, ns, "no-ema", response, "invalid_checkpoint")
    assert "EMA" in body["message"]


def test_weights_nested_one_level(server: ServerProcess, ns: str) -> None:
    sd = sample_state_dict(5)
    version = pushed(
        server, ns, "nested", saved({"model": {"state_dict": sd, "arch": "r18"}, "epoch": 7})
    )
    assert_stored_state_dict(version, stored(server, ns, "nested"), sd)
    assert version["ingest"]["state_dict_key"] == "model.state_dict"
    assert version["ingest"]["snapshot"] == {"model": {"arch": "r18"}, "epoch": 7}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_tensors_saved_from_cuda_devices(
    server: ServerProcess, ns: str, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU machine writes (storage locations cuda:0 / cuda:1), read on this CPU one."""
    sd = sample_state_dict(6)
    devices = itertools.cycle(["cuda:0", "cuda:1"])
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: next(devices))
    body = saved({"model": sd, "epoch": 1}, legacy=FORMATS[fmt])
    monkeypatch.undo()
    # The crafted file is what torch itself reads as CUDA-saved (and maps to the CPU):
    assert torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")["epoch"] == 1
    version = pushed(server, ns, "gpu", body)
    assert_stored_state_dict(version, stored(server, ns, "gpu"), sd)
    assert version["ingest"]["storage_locations"] == ["cuda:0", "cuda:1"]


def test_pre_1_0_cuda_storage_types(server: ServerProcess, ns: str) -> None:
    """Old legacy files name GPU storages torch.cuda.FloatStorage."""
    sd = {"w": torch.arange(6, dtype=torch.float32)}
    body = saved(sd, legacy=True).replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n")
    assert b"torch.cuda" in body
    version = pushed(server, ns, "old-gpu", body)
    assert_stored_state_dict(version, stored(server, ns, "old-gpu"), sd)


def awkward_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=g)
    base[0, 0], base[0, 1] = float("nan"), -0.0  # bit-for-bit, not just numerically equal
    embed = torch.randn(10, 4, generator=g)
    return {
        "embed": embed,
        "head": embed,  # tied
        "fp16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "int8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=g),
        "uint8": torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
        "mask": base > 0,
        "steps": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
        "empty": torch.empty(0, 4),
        "transposed": base.t(),
        "every_other": base[:, ::2],
        "row": base[3],  # a view at an offset into base's storage
        "expanded": torch.ones(1, 3).expand(4, 3),  # stride 0
    }


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dtypes_views_and_tied_weights(server: ServerProcess, ns: str, fmt: str) -> None:
    tensors = awkward_tensors()
    version = pushed(server, ns, "awkward", saved(tensors, legacy=FORMATS[fmt]))
    assert_stored_state_dict(version, stored(server, ns, "awkward"), tensors)
    assert version["spec"]["tie_groups"] == [["embed", "head"]]
    report = version["ingest"]
    assert report["strided_tensors"] == 3
    assert report["dtypes"] == {
        "BF16": 1,
        "BOOL": 1,
        "F16": 1,
        "F32": 6,
        "F64": 1,
        "I64": 1,
        "I8": 1,
        "U8": 1,
    }


def test_big_endian_archives(server: ServerProcess, ns: str) -> None:
    """A zip written on a big-endian machine says so in its byteorder record."""
    sd = {"w": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.float32)}
    body = saved(sd)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        records = {n: archive.read(n) for n in archive.namelist() if "/data/" in n}
    swapped = {
        name[name.index("/data/") :]: np.frombuffer(data, dtype="<f4").byteswap().tobytes()
        for name, data in records.items()
    }
    version = pushed(server, ns, "be", rebuild_zip(body, {"/byteorder": b"big", **swapped}))
    assert version["ingest"]["byteorder"] == "big"
    assert_stored_state_dict(version, stored(server, ns, "be"), sd)


def test_wrapper_prefixes_are_reported(server: ServerProcess, ns: str) -> None:
    sd = {f"module._orig_mod.{k}": v for k, v in sample_state_dict(8).items()}
    version = pushed(server, ns, "ddp", saved(sd))
    assert version["ingest"]["wrapper_prefixes"] == ["module.", "_orig_mod."]


def test_safetensors_is_stored_byte_for_byte(server: ServerProcess, ns: str) -> None:
    body = st_save(sample_state_dict(9), metadata={"format": "pt"})
    version = pushed(server, ns, "st", body)
    assert version["digest"] == hashlib.sha256(body).hexdigest()
    assert version["ingest"]["source_format"] == "safetensors"


MiB = 1024 * 1024


def anonymous_memory(pid: int) -> int:
    """RssAnon: what the process holds itself, not the page cache of a file it maps."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_converting_a_large_checkpoint_keeps_server_memory_flat(
    server: ServerProcess, ns: str, tmp_path: Path, fmt: str
) -> None:
    """Records are read from the mapped upload one by one: no second copy of the file."""
    tensors = {f"layers.{i}.weight": torch.full((1024, 4096), float(i)) for i in range(16)}
    path = tmp_path / "big.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=not FORMATS[fmt])
    assert path.stat().st_size > 256 * MiB
    baseline = anonymous_memory(server.pid)
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anonymous_memory(server.pid))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with open(path, "rb") as body:
            response = httpx.post(
                f"{server.url}/v1/models/{ns}/big/versions", content=body, timeout=300
            )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 201, response.text
    assert peak - baseline < 96 * MiB, f"server grew by {(peak - baseline) / MiB:.0f} MiB"
    assert response.json()["size"] > 256 * MiB


# -- sharded safetensors -----------------------------------------------------------------------


def sharded_tar(
    weight_map: dict[str, str],
    tensors: dict[str, torch.Tensor],
    *,
    prefix: str = "",
    fmt: int = tarfile.PAX_FORMAT,
    extra: dict[str, bytes] | None = None,
    index_name: str = "model.safetensors.index.json",
) -> bytes:
    files: dict[str, bytes] = {}
    for shard in dict.fromkeys(weight_map.values()):
        files[shard] = st_save(
            {k: tensors[k] for k, s in weight_map.items() if s == shard}, metadata={"format": "pt"}
        )
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    files = {index_name: json.dumps(index).encode(), **files, **(extra or {})}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SHARDED_MAP = {
    "model.embed.weight": "model-00001-of-00003.safetensors",
    "model.layers.0.weight": "model-00001-of-00003.safetensors",
    "model.layers.1.weight": "model-00002-of-00003.safetensors",
    "model.norm.weight": "model-00003-of-00003.safetensors",
    "lm_head.weight": "model-00002-of-00003.safetensors",
}


def sharded_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=g).bfloat16(),
        "model.layers.0.weight": torch.randn(8, 8, generator=g),
        "model.layers.1.weight": torch.randn(8, 8, generator=g).half(),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": torch.randn(16, 8, generator=g),
    }


@pytest.mark.parametrize(
    ("fmt", "prefix"), [(tarfile.PAX_FORMAT, ""), (tarfile.GNU_FORMAT, "./my-model/")]
)
def test_sharded_safetensors_are_merged_shard_after_shard_as_they_lie(
    server: ServerProcess, ns: str, fmt: int, prefix: str
) -> None:
    tensors = sharded_tensors()
    body = sharded_tar(SHARDED_MAP, tensors, prefix=prefix, fmt=fmt, extra={"config.json": b"{}"})
    version = pushed(server, ns, "llm", body, content_type="application/x-tar")
    assert version["source_format"] == "safetensors-sharded"
    # Shard by shard in name order, each in its own byte order (safetensors puts wider
    # dtypes first): one run of bytes per shard, not the index's (sorted) order.
    laid_out = []
    for shard in sorted(set(SHARDED_MAP.values())):
        data = st_save({k: tensors[k] for k, s in SHARDED_MAP.items() if s == shard})
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        header.pop("__metadata__", None)
        laid_out += sorted(header, key=lambda key: header[key]["data_offsets"][0])
    assert sorted(laid_out) == sorted(SHARDED_MAP) and laid_out != list(SHARDED_MAP)
    assert [t["key"] for t in version["spec"]["tensors"]] == laid_out
    assert_stored_state_dict(version, stored(server, ns, "llm"), tensors)
    report = version["ingest"]
    root = prefix.removeprefix("./")
    assert report["index"] == f"{root}model.safetensors.index.json"
    assert report["shards"] == [f"{root}model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert report["ignored_members"] == [f"{root}config.json"]
    assert report["index_metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}


def symlinked_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        index = json.dumps({"weight_map": {"w": "model.safetensors"}}).encode()
        info = tarfile.TarInfo("model.safetensors.index.json")
        info.size = len(index)
        archive.addfile(info, io.BytesIO(index))
        link = tarfile.TarInfo("model.safetensors")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


BAD_SHARDED = {
    "index climbs out": lambda: sharded_tar({"w": "../model.safetensors"}, {"w": torch.ones(2)}),
    "member climbs out": lambda: sharded_tar(
        {"w": "model.safetensors"}, {"w": torch.ones(2)}, prefix="../", fmt=tarfile.GNU_FORMAT
    ),
    "missing shard": lambda: tar_without("model.safetensors"),
    "index disagrees": lambda: index_lies(),
    "symlink": symlinked_tar,
    "no index": lambda: tar_without("model.safetensors.index.json"),
}


def tar_without(member: str) -> bytes:
    full = sharded_tar({"w": "model.safetensors"}, {"w": torch.ones(2)})
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(full)) as source,
        tarfile.open(fileobj=out, mode="w") as target,
    ):
        for info in source.getmembers():
            if info.name != member:
                target.addfile(info, source.extractfile(info))
    return out.getvalue()


def index_lies() -> bytes:
    tensors = {"a": torch.ones(2), "b": torch.ones(3)}
    body = sharded_tar({"a": "one.safetensors", "b": "two.safetensors"}, tensors)
    return body.replace(b'"b": "two.safetensors"', b'"b": "one.safetensors"')


@pytest.mark.parametrize("case", sorted(BAD_SHARDED))
def test_bad_sharded_uploads_are_refused(server: ServerProcess, ns: str, case: str) -> None:
    response = push(server, ns, "bad-shards", BAD_SHARDED[case](), content_type="application/x-tar")
    assert_refused(server, ns, "bad-shards", response, "invalid_checkpoint")


# -- what must be refused ----------------------------------------------------------------------


def hostile_classes(marker: Path) -> dict[str, tuple[Any, str]]:
    class RunsSystem:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    class RunsPopen:
        def __reduce__(self) -> Any:
            return (subprocess.Popen, (["touch", str(marker)],))

    class RunsEval:
        def __reduce__(self) -> Any:
            return (eval, (f"open({str(marker)!r}, 'w')",))

    class RunsExec:
        def __reduce__(self) -> Any:
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    return {
        "os.system": (RunsSystem(), f"{os.system.__module__}.system"),
        "subprocess.Popen": (RunsPopen(), "subprocess.Popen"),
        "builtins.eval": (RunsEval(), "builtins.eval"),
        "builtins.exec": (RunsExec(), "builtins.exec"),
    }


CONTAINERS: dict[str, Callable[[Any], bytes]] = {
    "torch-zip": lambda payload: saved({"model": sample_state_dict(), "x": payload}),
    "torch-legacy": lambda payload: saved(
        {"model": sample_state_dict(), "x": payload}, legacy=True
    ),
    "pickle-protocol-2": lambda payload: pickle.dumps({"x": payload}, protocol=2),
    "pickle-protocol-0": lambda payload: pickle.dumps({"x": payload}, protocol=0),
}


@pytest.mark.parametrize("container", list(CONTAINERS))
@pytest.mark.parametrize(
    "hostile", ["os.system", "subprocess.Popen", "builtins.eval", "builtins.exec"]
)
def test_pickles_that_would_run_commands_run_nothing(
    server: ServerProcess, ns: str, tmp_path: Path, hostile: str, container: str
) -> None:
    marker = tmp_path / "MARKER"
    payload, global_name = hostile_classes(marker)[hostile]
    response = push(server, ns, "evil", CONTAINERS[container](payload))
    body = assert_refused(server, ns, "evil", response, "unsafe_pickle")
    assert body["detail"]["globals"] == [global_name]
    assert global_name in body["message"]
    assert not marker.exists()


def lie_about_size(data: bytes, suffix: str, size: int) -> bytes:
    """Patch a member's declared uncompressed size in its local header and the directory."""
    patched = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    struct.pack_into("<I", patched, info.header_offset + 22, size)
    central = data.index(b"PK\x01\x02")  # the directory entries follow the records
    while data[central + 46 : central + 46 + len(info.filename)] != info.filename.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<I", patched, central + 24, size)
    return bytes(patched)


def zip_bomb() -> bytes:
    """A 20M-float record (80 MB of zeros) that deflates to ~80 kB."""
    return rebuild_zip(
        saved({"w": torch.zeros(20_000_000)}), {}, compress_type=zipfile.ZIP_DEFLATED
    )


def lying_bomb() -> bytes:
    """A record that declares 400 bytes (what the pickle expects) but inflates to 80 MB."""
    zeros = b"\x00" * 80_000_000
    bomb = rebuild_zip(
        saved({"w": torch.zeros(100)}), {"/data/0": zeros}, compress_type=zipfile.ZIP_DEFLATED
    )
    return lie_about_size(bomb, "/data/0", 400)


def damaged_record() -> bytes:
    data = bytearray(saved({"w": torch.zeros(1000)}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 123] ^= 0x40
    return bytes(data)


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(256)) * 4

REFUSED = {
    "truncated zip": (lambda: saved(sample_state_dict())[:900], "invalid_checkpoint", "zip"),
    "truncated legacy": (
        lambda: saved(sample_state_dict(), legacy=True)[:-50],
        "invalid_checkpoint",
        "truncated",
    ),
    "corrupt pickle": (
        lambda: rebuild_zip(
            saved(sample_state_dict()), {"/data.pkl": b"\x80\x02}q\x00(X\x01\x00\x00\x00a\xff\xfe"}
        ),
        "invalid_checkpoint",
        "corrupt pickle",
    ),
    "record lies about its size": (
        lambda: rebuild_zip(saved({"w": torch.arange(10.0)}), {"/data/0": b"\x00" * 36}),
        "invalid_checkpoint",
        "holds 36 bytes",
    ),
    "damaged record": (damaged_record, "invalid_checkpoint", "checksum"),
    "header claims 200 MB": (
        lambda: struct.pack("<Q", 200 * 1024 * 1024) + b'{"w": {' + b" " * 100,
        "invalid_checkpoint",
        "header would be",
    ),
    "no tensors": (
        lambda: saved({"epoch": 3, "note": "hello"}),
        "invalid_checkpoint",
        "no tensors",
    ),
    "empty state_dict": (lambda: saved({}), "invalid_checkpoint", "no tensors"),
    "image": (lambda: PNG, "invalid_checkpoint", "PNG image"),
    "text": (lambda: b"epoch,loss\n1,0.5\n2,0.25\n" * 20, "invalid_checkpoint", "text file"),
    "zip bomb": (zip_bomb, "too_large", "zip bomb"),
    "zip bomb that lies": (lying_bomb, "invalid_checkpoint", "does not inflate"),
    "plain pickle": (
        lambda: pickle.dumps({"w": [1.0, 2.0]}, protocol=2),
        "invalid_checkpoint",
        "magic number",
    ),
    "single tensor": (lambda: saved(torch.ones(3)), "invalid_checkpoint", "single tensor"),
    "ema of a safetensors file": (
        lambda: st_save({"w": torch.ones(2)}),
        "invalid_checkpoint",
        "EMA",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_checkpoints_are_refused_and_leave_nothing(
    server: ServerProcess, ns: str, case: str
) -> None:
    build, code, says = REFUSED[case]
    params = {"ema": "true"} if case.startswith("ema") else {}
    response = push(server, ns, "bad", build(), **params)
    body = assert_refused(server, ns, "bad", response, code)
    assert says in body["message"], body["message"]


def test_a_real_header_over_the_limit_is_too_large(server: ServerProcess, ns: str) -> None:
    limit = server.settings.max_header_bytes  # 4 MiB on the test server: a 200 MB one scaled down
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (limit + 1 - len(header))
    body = struct.pack("<Q", len(header)) + header + b"\x00" * 4
    assert_refused(server, ns, "huge", push(server, ns, "huge", body), "too_large")


# -- fuzzing -----------------------------------------------------------------------------------


def fuzz_seeds() -> list[bytes]:
    sd = sample_state_dict(11)
    return [
        saved(sd),
        saved(sd, legacy=True),
        saved(training_snapshot("model", sd)),
        saved(training_snapshot("state_dict", sd), legacy=True),
        saved(Net()),
        st_save(sd),
        sharded_tar(SHARDED_MAP, sharded_tensors()),
    ]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    seed = rng.choice(seeds)
    if seed.startswith(b"PK") and rng.random() < 0.3:
        # Damage the pickle itself and re-zip it with a valid CRC, so the unpickler sees it.
        with zipfile.ZipFile(io.BytesIO(seed)) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            pickle_bytes = archive.read(name)
        return rebuild_zip(seed, {"/data.pkl": damage(rng, pickle_bytes, seeds)})
    return damage(rng, seed, seeds)


def damage(rng: random.Random, original: bytes, seeds: list[bytes]) -> bytes:
    data = bytearray(original)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del data[rng.randrange(1, len(data)) :]
    elif kind == 2:  # splice in the tail of another file
        other = rng.choice(seeds)
        data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)) :]
    elif kind == 3:  # insert random bytes
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    else:  # overwrite a run with one byte value
        at = rng.randrange(len(data))
        data[at : at + rng.randint(1, 256)] = bytes([rng.choice((0, 0xFF, 0x80))]) * 256
    return bytes(data)


def test_fuzzed_uploads_never_break_the_server(server: ServerProcess, ns: str) -> None:
    cases = 400 if server.backend == "sqlite" else 200  # type: ignore[attr-defined]
    rng = random.Random(20240501)
    seeds = fuzz_seeds()
    created = 0
    codes: dict[str, int] = {}
    url = f"{server.url}/v1/models/{ns}/fuzz/versions"
    with httpx.Client(timeout=120) as client:
        for _ in range(cases):
            response = client.post(url, content=mutate(rng, seeds))
            assert response.status_code < 500, response.text
            if response.status_code == 201:
                created += 1
            elif response.status_code != 200:
                code = error(response)["code"]
                assert code in STABLE_CODES, response.text
                codes[code] = codes.get(code, 0) + 1
        assert codes.get("invalid_checkpoint", 0) > cases // 2
        listing = client.get(f"{server.url}/v1/models/{ns}/fuzz/versions")
        if created == 0:
            assert listing.status_code == 404
            return
        versions = listing.json()
        assert len(versions) == created
        for version in versions:
            blob = client.get(
                f"{server.url}/v1/models/{ns}/fuzz/versions/{version['version']}/blob"
            )
            assert hashlib.sha256(blob.content).hexdigest() == version["digest"]
            assert len(st_load(blob.content)) == version["tensor_count"]
    assert list(server.settings.effective_spool_dir.glob("*")) == []
