"""The Python client against a real server process, on both backends: every kind of object
pushed, every kind of target fetched into, pull to a file, progress, errors mapped from real
and hand-built responses, and a fetch that survives a cut connection."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

import statehub
from statehub import (
    Client,
    Conflict,
    ConnectionFailed,
    FilesMissing,
    Forbidden,
    Incompatible,
    InvalidAdapter,
    InvalidCheckpoint,
    InvalidName,
    InvalidRef,
    InvalidRequest,
    InvalidSpec,
    NotFound,
    RangeNotSatisfiable,
    RecipeParamsMissing,
    ShuttingDown,
    StatehubError,
    StorageError,
    StorageUnavailable,
    TensorsMissing,
    TooLarge,
    Unauthorized,
    UnsafePickle,
    spec_of,
)
from statehub._errors import raise_for_status
from tests._models import TinyResNet, randomize_buffers, seeded
from tests._server import ServerProcess


def resnet(seed: int = 0, **kwargs: Any) -> TinyResNet:
    seeded(seed)
    return randomize_buffers(TinyResNet(**kwargs), seed)


def arch_fp_of(state_dict: dict[str, torch.Tensor]) -> str:
    """DESIGN section 4, written out independently of the client."""
    lines = sorted(f"{k}\t{','.join(str(d) for d in t.shape)}\n" for k, t in state_dict.items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


# -- the public surface ----------------------------------------------------------------


def test_public_names_are_exactly_the_intended_ones() -> None:
    assert set(statehub.__all__) == {
        "Client",
        "Conflict",
        "ConnectionFailed",
        "FetchedStateDict",
        "Forbidden",
        "Incompatible",
        "IntegrityError",
        "InvalidAdapter",
        "InvalidCheckpoint",
        "InvalidName",
        "InvalidRef",
        "InvalidRequest",
        "InvalidSpec",
        "NotCached",
        "RecipeParamsMissing",
        "NotFound",
        "Plan",
        "PlanEntry",
        "Progress",
        "RangeNotSatisfiable",
        "ShuttingDown",
        "StatehubError",
        "StatehubWarning",
        "StorageError",
        "StorageUnavailable",
        "TensorsMissing",
        "FilesMissing",
        "TooLarge",
        "Unauthorized",
        "UnsafePickle",
        "Version",
        "spec_of",
        "split_ref",
    }
    assert len(statehub.__all__) == len(set(statehub.__all__))
    for name in statehub.__all__:
        assert getattr(statehub, name).__module__.startswith("statehub"), name


def test_client_package_never_imports_the_server() -> None:
    code = (
        "import sys, statehub, statehub.cli\n"
        "print(any(m.split('.')[0] == 'service' for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- push each kind of object ------------------------------------------------------------


def pushable(kind: str, model: torch.nn.Module, tmp_path: Path) -> Any:
    if kind == "module":
        return model
    if kind == "state_dict":
        return model.state_dict()
    if kind == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(model.state_dict(), str(path))
        return path
    path = tmp_path / "model.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("kind", ["module", "state_dict", "safetensors", "pth"])
def test_push_each_kind_of_object(hub: Client, ns: str, tmp_path: Path, kind: str) -> None:
    model = resnet(1)
    expected = model.state_dict()
    version = hub.push(f"{ns}/resnet", pushable(kind, model, tmp_path), metadata={"kind": kind})

    assert version.created and version.version == 1 and version.ref == f"{ns}/resnet:1"
    assert version.tensor_count == len(expected)
    assert version.param_count == sum(t.numel() for t in expected.values())
    assert version.arch_fp == arch_fp_of(expected)
    assert version.metadata == {"kind": kind}
    assert version.source_format == ("torch-zip" if kind == "pth" else "safetensors")
    assert "latest" in version.aliases

    assert_same_tensors(hub.fetch(f"{ns}/resnet", target=TinyResNet()), expected)


def test_push_is_idempotent_and_keeps_aliases(hub: Client, ns: str) -> None:
    model = resnet(2)
    first = hub.push(f"{ns}/resnet", model, alias="prod")
    again = hub.push(f"{ns}/resnet", model.state_dict())
    assert not again.created and again.version == first.version == 1
    assert again.digest == first.digest

    second = hub.push(f"{ns}/resnet", resnet(3))
    assert second.version == 2
    assert hub.version(f"{ns}/resnet@prod").version == 1
    assert hub.version(f"{ns}/resnet").version == 2
    hub.set_alias(f"{ns}/resnet", "prod", 2)
    assert hub.version(f"{ns}/resnet@prod").digest == second.digest
    assert hub.version(f"{ns}/resnet@sha256:{first.digest}").version == 1

    model_json = hub.get_model(f"{ns}/resnet")
    assert model_json["aliases"] == {"latest": 2, "prod": 2}
    assert [v.version for v in hub.versions(f"{ns}/resnet")] == [1, 2]
    listed = hub.list_models(namespace=ns)
    assert [m["name"] for m in listed["items"]] == ["resnet"] and listed["total"] == 1


def test_push_training_snapshot_takes_ema_on_request(hub: Client, ns: str, tmp_path: Path) -> None:
    raw, ema = resnet(4), resnet(5)
    path = tmp_path / "snapshot.pth"
    torch.save(
        {"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 7}, path
    )
    plain = hub.push(f"{ns}/snap", path)
    averaged = hub.push(f"{ns}/snap", path, ema=True)
    assert plain.ingest["state_dict_key"] == "state_dict"
    assert averaged.ingest["state_dict_key"] == "state_dict_ema"
    assert_same_tensors(hub.fetch(f"{ns}/snap:2", target=TinyResNet()), ema.state_dict())


def test_push_reports_progress_up_to_the_total(hub: Client, ns: str) -> None:
    calls: list[tuple[int, int]] = []
    hub.push(f"{ns}/resnet", resnet(), progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1 and calls[0][0] == 0 and calls[-1][0] == totals.pop()
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


# -- fetch into each kind of target ------------------------------------------------------


def target_of(kind: str, tmp_path: Path) -> Any:
    model = TinyResNet()
    if kind == "module":
        return model
    if kind == "state_dict":
        return model.state_dict()
    if kind == "spec":
        return spec_of(model)
    path = tmp_path / "target.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["module", "state_dict", "spec", "file"])
def test_fetch_into_each_kind_of_target(hub: Client, ns: str, tmp_path: Path, kind: str) -> None:
    source = resnet(6)
    hub.push(f"{ns}/resnet", source)
    sd = hub.fetch(f"{ns}/resnet", target=target_of(kind, tmp_path))
    assert_same_tensors(sd, source.state_dict())
    TinyResNet().load_state_dict(sd, strict=True)


def test_fetch_partial_fills_kept_keys_from_the_module(hub: Client, ns: str) -> None:
    source = resnet(7)
    hub.push(f"{ns}/resnet", source)
    target = TinyResNet(num_classes=5)
    own_head = target.fc.weight.detach().clone()

    plan = hub.plan(f"{ns}/resnet", target=target)
    assert plan.verdict == "partial" and plan.keep_target == ["fc.weight", "fc.bias"]

    progress: list[tuple[int, int]] = []
    sd = hub.fetch(
        f"{ns}/resnet", target=target, load=True, progress=lambda d, t: progress.append((d, t))
    )
    assert torch.equal(target.fc.weight, own_head)
    assert torch.equal(sd["conv1.weight"], source.conv1.weight)
    assert progress[-1][0] == progress[-1][1] > 0

    with pytest.raises(StatehubError, match="keeps 2 tensor"):
        hub.fetch(f"{ns}/resnet", target=spec_of(target))


def test_fetch_places_tensors_on_the_device(hub: Client, ns: str) -> None:
    hub.push(f"{ns}/resnet", resnet())
    device = "cuda" if torch.cuda.is_available() else "meta"
    sd = hub.fetch(f"{ns}/resnet", target=TinyResNet(), device=device)
    assert {t.device.type for t in sd.values()} == {device}


def test_unknown_policy_option_is_refused_before_any_request(hub: Client) -> None:
    with pytest.raises(TypeError, match="unknown policy option"):
        hub.plan("nowhere/none", target=TinyResNet(), heads="keep")


def test_diff_plans_one_version_onto_another(hub: Client, ns: str) -> None:
    model = resnet(8)
    hub.push(f"{ns}/resnet", model)
    hub.push(f"{ns}/resnet", torch.nn.DataParallel(model).state_dict())
    plan = hub.diff(f"{ns}/resnet:1", f"{ns}/resnet:2")
    assert plan.verdict == "adapted"
    assert plan.entry("module.conv1.weight").source == "conv1.weight"
    assert {e.stage for e in plan.entries} == {"prefix"}
    assert hub.diff(f"{ns}/resnet:2", TinyResNet()).verdict == "adapted"


def test_find_compatible_ranks_the_better_fit_first(hub: Client, ns: str) -> None:
    hub.push(f"{ns}/ten", resnet(9))
    hub.push(f"{ns}/five", resnet(9, num_classes=5))
    hits = [h for h in hub.find_compatible(TinyResNet(num_classes=5)) if h["model"].startswith(ns)]
    assert [h["model"] for h in hits] == [f"{ns}/five", f"{ns}/ten"]
    assert [h["verdict"] for h in hits] == ["exact", "partial"]


def test_adapters_register_list_and_apply(hub: Client, ns: str) -> None:
    hub.push(f"{ns}/resnet", resnet(10))
    name = f"{ns}-stem"
    adapter = {
        "name": name,
        "description": "conv1 is called stem here",
        "rules": [{"type": "rename", "pattern": r"conv1\.weight", "replacement": "stem.weight"}],
    }
    assert hub.register_adapter(adapter)["version"] == 1
    assert hub.register_adapter(adapter)["version"] == 2
    assert any(a["name"] == name and a["version"] == 2 for a in hub.adapters())

    spec = spec_of(TinyResNet())
    spec["tensors"][0]["key"] = "stem.weight"
    plan = hub.plan(f"{ns}/resnet", target=spec, adapters=[name])
    assert plan.entry("stem.weight").stage == "adapter"
    assert [a["name"] for a in plan.adapters] == [name]

    with pytest.raises(InvalidAdapter) as info:
        hub.register_adapter({"name": name, "rules": [{"type": "rename", "pattern": "("}]})
    assert info.value.detail["errors"]


# -- pull to a file ---------------------------------------------------------------------


def test_pull_writes_the_fitted_stream_atomically(hub: Client, ns: str, tmp_path: Path) -> None:
    source = resnet(11)
    hub.push(f"{ns}/resnet", source)
    out = tmp_path / "out" / "fitted.safetensors"
    calls: list[tuple[int, int]] = []
    path = hub.pull(
        f"{ns}/resnet",
        out,
        target=TinyResNet(num_classes=5),
        progress=lambda d, t: calls.append((d, t)),
    )
    assert path == out and calls[-1] == (out.stat().st_size, out.stat().st_size)
    assert [p.name for p in out.parent.iterdir()] == ["fitted.safetensors"]
    tensors = load_file(str(out))
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert_same_tensors({k: tensors[k] for k in expected}, expected)
    assert "fc.weight" not in tensors

    from safetensors import safe_open

    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["statehub.keep_target"]) == ["fc.weight", "fc.bias"]
    assert json.loads(metadata["statehub.plan"])["verdict"] == "partial"


def test_pull_without_target_is_the_stored_blob(hub: Client, ns: str, tmp_path: Path) -> None:
    version = hub.push(f"{ns}/resnet", resnet(12))
    path = hub.pull(f"{ns}/resnet@latest", tmp_path / "stored.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == version.digest
    with pytest.raises(TypeError, match="need a target"):
        hub.pull(f"{ns}/resnet", tmp_path / "x.safetensors", head="slice")


def test_failed_pull_leaves_nothing_behind(hub: Client, ns: str, tmp_path: Path) -> None:
    hub.push(f"{ns}/resnet", resnet())
    with pytest.raises(Incompatible):
        hub.pull(
            f"{ns}/resnet", tmp_path / "f.safetensors", target=resnet(num_classes=5), strict=True
        )
    assert list(tmp_path.iterdir()) == []


# -- errors -----------------------------------------------------------------------------

ERROR_CODES = [
    ("invalid_request", 422, InvalidRequest),
    ("invalid_name", 422, InvalidName),
    ("invalid_ref", 422, InvalidRef),
    ("invalid_spec", 422, InvalidSpec),
    ("invalid_adapter", 422, InvalidAdapter),
    ("recipe_params_missing", 422, RecipeParamsMissing),
    ("invalid_checkpoint", 422, InvalidCheckpoint),
    ("unsafe_pickle", 422, UnsafePickle),
    ("not_found", 404, NotFound),
    ("conflict", 409, Conflict),
    ("tensors_missing", 409, TensorsMissing),
    ("files_missing", 409, FilesMissing),
    ("incompatible", 409, Incompatible),
    ("unauthorized", 401, Unauthorized),
    ("forbidden", 403, Forbidden),
    ("too_large", 413, TooLarge),
    ("range_not_satisfiable", 416, RangeNotSatisfiable),
    ("storage_error", 500, StorageError),
    ("storage_unavailable", 503, StorageUnavailable),
    ("shutting_down", 503, ShuttingDown),
]


def error_response(status: int, body: Any, *, request_id: str = "req-1") -> httpx.Response:
    request = httpx.Request("GET", "http://statehub.test/v1/models/a/b")
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(
        status, content=content, headers={"X-Request-ID": request_id}, request=request
    )


@pytest.mark.parametrize(("code", "status", "cls"), ERROR_CODES)
def test_every_server_code_maps_to_its_exception(
    code: str, status: int, cls: type[StatehubError]
) -> None:
    detail = {"plan": {"verdict": "incompatible"}} if code == "incompatible" else {"k": 1}
    response = error_response(
        status, {"error": {"code": code, "message": f"boom {code}", "detail": detail}}
    )
    with pytest.raises(StatehubError) as info:
        raise_for_status(response)
    error = info.value
    assert type(error) is cls and error.code == code
    assert error.message == f"boom {code} (HTTP {status})"
    assert error.detail == detail and error.request_id == "req-1"
    assert error.status_code == status and error.response is response
    if code == "incompatible":
        assert isinstance(error, Incompatible) and error.plan == {"verdict": "incompatible"}


def test_every_server_error_code_has_a_client_class() -> None:
    import service.errors as server_errors

    codes = {
        cls.code
        for cls in vars(server_errors).values()
        if isinstance(cls, type) and issubclass(cls, server_errors.StatehubError)
    } - {"internal"}
    assert codes == {code for code, _, _ in ERROR_CODES}


def test_builtin_bases_help_callers() -> None:
    assert issubclass(NotFound, LookupError)
    assert issubclass(InvalidCheckpoint, ValueError) and issubclass(UnsafePickle, InvalidCheckpoint)
    assert issubclass(ConnectionFailed, ConnectionError)
    assert issubclass(StorageUnavailable, StorageError)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (404, {"error": {"code": "brand_new_code", "message": "m"}}, NotFound),
        (503, b"<html>bad gateway</html>", StorageUnavailable),
        (502, b"upstream down", StatehubError),
        (418, {"unexpected": "shape"}, StatehubError),
    ],
)
def test_unknown_codes_fall_back_on_the_status(status: int, body: Any, cls: type) -> None:
    with pytest.raises(StatehubError) as info:
        raise_for_status(error_response(status, body))
    assert type(info.value) is cls and info.value.status_code == status


def test_success_responses_do_not_raise() -> None:
    raise_for_status(error_response(200, {"ok": True}))
    raise_for_status(error_response(206, b"partial"))


def test_real_server_errors(hub: Client, ns: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as missing:
        hub.version(f"{ns}/missing:1")
    assert missing.value.request_id and missing.value.status_code == 404

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(InvalidCheckpoint):
        hub.push(f"{ns}/bad", garbage)

    hub.push(f"{ns}/resnet", resnet())
    with pytest.raises(Incompatible) as incompatible:
        hub.fetch(f"{ns}/resnet", target=TinyResNet(num_classes=5), strict=True)
    assert incompatible.value.plan is not None
    assert incompatible.value.plan["verdict"] == "incompatible"
    assert any("strict" in r for r in incompatible.value.plan["reasons"])

    with pytest.raises(InvalidName):
        hub.push(f"{ns}/-starts-with-a-dash", resnet())


def test_unreachable_server_is_connection_failed() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with Client(f"http://127.0.0.1:{port}", retries=2) as client, pytest.raises(ConnectionFailed):
        client.list_models()


# -- an interrupted fetch resumes ---------------------------------------------------------


class CuttingProxy:
    """A loopback TCP proxy to the server that cuts its first connection after the client
    has received ``cut_after`` bytes, and records what every connection asked for."""

    def __init__(self, upstream: str, cut_after: int) -> None:
        url = httpx.URL(upstream)
        self.upstream = (url.host, url.port)
        self.cut_after = cut_after
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                index = len(self.requests)
                self.requests.append(b"")
            limit = self.cut_after if index == 0 else None
            self._spawn(self._serve, conn, index, limit)

    def _serve(self, conn: socket.socket, index: int, limit: int | None) -> None:
        upstream = socket.create_connection(self.upstream)
        self._spawn(self._client_to_server, conn, upstream, index)
        sent = 0
        try:
            while data := upstream.recv(4096):
                if limit is not None and sent + len(data) >= limit:
                    conn.sendall(data[: limit - sent])
                    break
                conn.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (conn, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _client_to_server(self, conn: socket.socket, upstream: socket.socket, index: int) -> None:
        try:
            while data := conn.recv(4096):
                with self._lock:
                    self.requests[index] += data
                upstream.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()

    def headers(self, index: int) -> dict[str, str]:
        head = self.requests[index].split(b"\r\n\r\n", 1)[0].decode("latin-1")
        lines = head.split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture
def cutting_proxy(server: ServerProcess) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(server.url, cut_after=6000)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("how", ["fetch-exact", "fetch-adapted", "pull-adapted"])
def test_interrupted_fetch_resumes_with_range(
    hub: Client, ns: str, tmp_path: Path, cutting_proxy: CuttingProxy, how: str
) -> None:
    hub.push(f"{ns}/resnet", resnet(13))
    target = TinyResNet(in_chans=1) if how.endswith("adapted") else TinyResNet()
    expected = hub.fetch(f"{ns}/resnet", target=target)  # straight to the server

    with Client(cutting_proxy.url, retries=1) as client:
        if how.startswith("pull"):
            path = client.pull(f"{ns}/resnet", tmp_path / "resumed.safetensors", target=target)
            got = load_file(str(path))
            assert [p.name for p in tmp_path.iterdir()] == ["resumed.safetensors"]
        else:
            got = client.fetch(f"{ns}/resnet", target=target)
    assert_same_tensors(got, expected)

    assert len(cutting_proxy.requests) == 2, "the cut connection was resumed exactly once"
    first, second = cutting_proxy.headers(0), cutting_proxy.headers(1)
    assert "range" not in first
    start = int(second["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start < 6000
    assert second["if-range"].strip('"')
