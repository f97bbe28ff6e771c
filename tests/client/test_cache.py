"""The client cache (issue 14 item 2), against a real server on both backends: a repeated
fetch or pull is revalidated with ``If-None-Match`` and loaded from the cache on ``304``;
a moved alias, a corrupted entry, offline use, the LRU bound, several processes at once and
``statehub cache`` each checked by the tensors that come back and the server's counters."""

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
from click.testing import CliRunner
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from statehub import Client, NotCached, spec_of
from statehub._cache import Cache
from statehub.cli import main
from tests._metrics import scrape, value
from tests._models import TinyResNet, seeded
from tests._server import ServerProcess
from tests.client.test_cli import dead_url

REPO = Path(__file__).resolve().parents[2]
FETCHES = "statehub_fetches_total"
BODY_MODES = ("passthrough", "rewrite", "transform", "cached", "redirect")


def weights(seed: int, rows: int = 128) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(rows, 64, generator=generator),
        "block.0.weight": torch.randn(64, 64, generator=generator),
        "block.0.bias": torch.randn(64, generator=generator),
        "head.weight": torch.randn(10, 64, generator=generator),
    }


REQUESTS = "statehub_http_requests_total"
BLOB_ROUTE = "/v1/models/{namespace}/{name}/versions/{ref}/blob"
PLAN_ROUTE = "/v1/models/{namespace}/{name}/versions/{ref}/plan"


def answered(server: ServerProcess, method: str, route: str, status: str) -> float:
    """Requests the server answered so far with ``status`` (compare two readings)."""
    return value(scrape(server.url), REQUESTS, method=method, route=route, status=status)


def fetch_modes(server: ServerProcess) -> dict[str, float]:
    samples = scrape(server.url)
    return {mode: value(samples, FETCHES, mode=mode) for mode in (*BODY_MODES, "not_modified")}


def served(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(bodies the server sent, 304s it answered) between two scrapes."""
    bodies = sum(after[m] - before[m] for m in BODY_MODES)
    return bodies, after["not_modified"] - before["not_modified"]


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").iterdir() if "." not in p.name)


@pytest.mark.parametrize("plan", ["exact", "rename", "cast"])
def test_a_repeated_fetch_is_a_304_loaded_from_the_cache(
    hub: Client, server: ServerProcess, ns: str, client_cache: Path, plan: str
) -> None:
    source = weights(1)
    hub.push(f"{ns}/m", source)
    if plan == "exact":
        target, expected = source, source
    elif plan == "rename":  # the header rewritten, the body never announced by digest
        expected = {f"module.{k}": v for k, v in source.items()}
        target = expected
    else:  # computed on the server: the client names the body by the digest it computes
        expected = {k: v.half() for k, v in source.items()}
        target = {k: torch.zeros_like(v) for k, v in expected.items()}

    before = fetch_modes(server)
    first = hub.fetch(f"{ns}/m", target=target)
    middle = fetch_modes(server)
    second = hub.fetch(f"{ns}/m", target=target)
    after = fetch_modes(server)

    assert_same(first, expected)
    assert_same(second, expected)
    assert served(before, middle) == (1, 0)
    assert served(middle, after) == (0, 1)  # revalidated, no body sent
    [entry] = Cache(client_cache).entries()
    assert (entry.kind, entry.ref) == ("fetch", f"{ns}/m")
    [blob] = blob_files(client_cache)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.digest == blob.name
    for tensor in second.values():  # the cached tensors map the file: writes stay private
        tensor.add_(1)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == entry.digest
    assert_same(hub.fetch(f"{ns}/m", target=target), expected)


def test_a_cached_fetch_loads_into_a_module_in_place(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    seeded(3)
    model = TinyResNet()
    hub.push(f"{ns}/resnet", model)
    hub.fetch(f"{ns}/resnet", target=TinyResNet())  # into the cache
    target = TinyResNet()
    before = fetch_modes(server)
    hub.fetch(f"{ns}/resnet", target=target, load=True)
    assert served(before, fetch_modes(server)) == (0, 1)
    assert_same(target.state_dict(), model.state_dict())


def test_a_moved_alias_is_fetched_afresh_not_served_stale(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    old, new = weights(1), weights(2)
    hub.push(f"{ns}/m", old, alias="prod")
    assert_same(hub.fetch(f"{ns}/m@prod", target=old), old)
    v2 = hub.push(f"{ns}/m", new)
    hub.set_alias(f"{ns}/m", "prod", v2.version)
    before = fetch_modes(server)
    assert_same(hub.fetch(f"{ns}/m@prod", target=old), new)
    assert served(before, fetch_modes(server)) == (1, 0)


def flip_a_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[-5] ^= 0xFF  # in the last tensor: still a file that parses
    return bytes(damaged)


@pytest.mark.parametrize("damage", [flip_a_byte, lambda data: data[:100]], ids=["flip", "cut"])
def test_a_corrupted_cache_entry_is_detected_and_fetched_again(
    hub: Client, server: ServerProcess, ns: str, client_cache: Path, damage: Any
) -> None:
    source = weights(4)
    hub.push(f"{ns}/m", source)
    hub.fetch(f"{ns}/m", target=source)
    [blob] = blob_files(client_cache)
    blob.write_bytes(damage(blob.read_bytes()))

    before = fetch_modes(server)
    assert_same(hub.fetch(f"{ns}/m", target=source), source)
    assert served(before, fetch_modes(server)) == (1, 0)  # the bad entry was not revalidated
    [blob] = blob_files(client_cache)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_offline_serves_the_cache_without_a_request_or_fails_clearly(
    hub: Client, server: ServerProcess, ns: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    source = weights(6)
    hub.push(f"{ns}/m", source)
    hub.fetch(f"{ns}/m", target=source)
    hub.pull(f"{ns}/m", tmp_path / "online.safetensors")

    monkeypatch.setenv("STATEHUB_OFFLINE", "1")
    before = scrape(server.url)
    with Client(server.url, retries=1) as offline:
        assert offline.offline
        assert_same(offline.fetch(f"{ns}/m", target=source), source)
        path = offline.pull(f"{ns}/m", tmp_path / "offline.safetensors")
        assert path.read_bytes() == (tmp_path / "online.safetensors").read_bytes()
        other = {k: v.half() for k, v in source.items()}
        with pytest.raises(NotCached, match="STATEHUB_OFFLINE"):
            offline.fetch(f"{ns}/m", target=other)
        with pytest.raises(NotCached):
            offline.fetch(f"{ns}/m:1", target=source)  # another request, though the same body
    after = scrape(server.url)
    assert [k for k in after if k[0] == REQUESTS and after[k] != before.get(k, 0.0)] == [
        (REQUESTS, frozenset({("method", "GET"), ("route", "/metrics"), ("status", "200")}))
    ]  # the scrape itself was the only request
    with Client(dead_url(), retries=1) as elsewhere, pytest.raises(NotCached):
        elsewhere.fetch(f"{ns}/m", target=source)  # entries are per server


def test_the_cache_stays_within_its_bound_least_recently_used_first(
    server: ServerProcess, ns: str, client_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(server.url, retries=1) as hub:
        for name in "abc":
            hub.push(f"{ns}/{name}", weights(ord(name)))
        hub.fetch(f"{ns}/a", target=weights(0))
        body = Cache(client_cache).size()
    monkeypatch.setenv("STATEHUB_CACHE_MAX_BYTES", str(int(body * 2.5)))  # two bodies fit
    with Client(server.url, retries=1) as hub:
        hub.fetch(f"{ns}/b", target=weights(0))
        hub.fetch(f"{ns}/a", target=weights(0))  # a used after b: b is the oldest
        hub.fetch(f"{ns}/c", target=weights(0))
    cache = Cache(client_cache)
    assert [e.ref for e in cache.entries()] == [f"{ns}/c", f"{ns}/a"]
    assert cache.size() <= body * 2.5
    assert len(blob_files(client_cache)) == 2
    assert not list((client_cache / "tmp").glob("*.incomplete"))


def test_a_body_larger_than_the_bound_is_fetched_but_not_kept(
    hub: Client, ns: str, client_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = weights(7)
    hub.push(f"{ns}/m", source)
    monkeypatch.setenv("STATEHUB_CACHE_MAX_BYTES", "1000")
    with Client(hub.url, retries=1) as small:
        assert_same(small.fetch(f"{ns}/m", target=source), source)
    assert Cache(client_cache).entries() == []


def test_a_repeated_pull_is_a_304_and_the_file_is_byte_for_byte_the_stored_one(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    source = weights(8)
    version = hub.push(f"{ns}/m", source)
    first = hub.pull(f"{ns}/m", tmp_path / "one.safetensors")
    statuses = ("200", "304")
    before = [answered(server, "GET", BLOB_ROUTE, status) for status in statuses]
    second = hub.pull(f"{ns}/m", tmp_path / "two.safetensors")
    after = [answered(server, "GET", BLOB_ROUTE, status) for status in statuses]
    assert [a - b for a, b in zip(after, before, strict=True)] == [0, 1]  # no body, one 304
    assert first.read_bytes() == second.read_bytes()
    assert hashlib.sha256(second.read_bytes()).hexdigest() == version.digest
    assert_same(load_file(str(second)), source)


CHILD = """
import hashlib, sys
from statehub import Client
with Client(sys.argv[1], retries=1) as hub:
    path = hub.pull(sys.argv[2], sys.argv[3])
print(hashlib.sha256(open(path, "rb").read()).hexdigest())
"""


def test_processes_pulling_at_once_share_one_whole_entry(
    hub: Client, server: ServerProcess, ns: str, client_cache: Path, tmp_path: Path
) -> None:
    version = hub.push(f"{ns}/m", weights(9, rows=4096))  # 1 MiB: the writes overlap
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, server.url, f"{ns}/m", str(tmp_path / f"{i}.st")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(4)
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert out.strip() == version.digest
    [blob] = blob_files(client_cache)
    assert blob.name == version.digest
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == version.digest
    assert not list((client_cache / "tmp").glob("*.incomplete"))
    before = answered(server, "GET", BLOB_ROUTE, "304")
    hub.pull(f"{ns}/m", tmp_path / "after.st")
    assert answered(server, "GET", BLOB_ROUTE, "304") - before == 1


def test_statehub_cache_ls_prune_and_clear(hub: Client, ns: str, client_cache: Path) -> None:
    for name in "ab":
        hub.push(f"{ns}/{name}", weights(ord(name)))
        hub.fetch(f"{ns}/{name}", target=weights(0))
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "ls", "--json"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    refs = [entry["ref"] for entry in json.loads(listed.stdout)]
    assert refs == [f"{ns}/b", f"{ns}/a"]
    table = runner.invoke(main, ["cache", "ls"], catch_exceptions=False)
    assert f"{ns}/a" in table.stdout and "fetch" in table.stdout

    one = Cache(client_cache).size() // 2
    pruned = runner.invoke(main, ["cache", "prune", "--max-bytes", str(one)])
    assert pruned.exit_code == 0, pruned.output
    assert [e.ref for e in Cache(client_cache).entries()] == [f"{ns}/b"]

    Cache(client_cache).remember("listing", {"files": []})
    cleared = runner.invoke(main, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert Cache(client_cache).entries() == [] and blob_files(client_cache) == []
    assert Cache(client_cache).recall("listing") is None


def test_a_receiver_that_is_not_committed_leaves_nothing(client_cache: Path) -> None:
    cache = Cache(client_cache)
    receiver = cache.receive("k", kind="fetch", ref="ns/m")
    list(receiver.wrap(iter([b"abc", memoryview(b"def")])))
    receiver.close()
    assert not list((client_cache / "tmp").iterdir())
    assert cache.lookup("k") is None and cache.entries() == []


def test_a_receiver_commits_only_a_whole_body(client_cache: Path) -> None:
    cache = Cache(client_cache)
    data = b"0123456789"
    digest = hashlib.sha256(data).hexdigest()
    short = cache.receive("short", kind="fetch", ref="ns/m")
    list(short.wrap(iter([data[:4]])))
    short.commit(digest=digest, etag='"e"', size=len(data))
    assert cache.lookup("short") is None
    whole = cache.receive("whole", kind="fetch", ref="ns/m")
    list(whole.wrap(iter([data[:4], data[4:]])))
    whole.commit(digest=digest, etag='"e"', size=len(data))
    cached = cache.lookup("whole")
    assert cached is not None and cached.handle.read() == data and cached.etag == '"e"'
    cached.close()


def test_the_server_answers_a_named_etag_with_304_and_no_body(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    source = weights(10)
    hub.push(f"{ns}/m", source)
    base = f"{server.url}/v1/models/{ns}/m/versions/latest"
    body = {"target": spec_of({k: v.half() for k, v in source.items()}), "policy": {}}
    with httpx.Client(timeout=30) as http:
        first = http.post(f"{base}/fetch", json=body)
        etag = first.headers["etag"]
        again = http.post(f"{base}/fetch", json=body, headers={"If-None-Match": etag})
        other = http.post(f"{base}/fetch", json=body, headers={"If-None-Match": '"other"'})
        blob = http.get(f"{base}/blob")
        blob_again = http.get(f"{base}/blob", headers={"If-None-Match": blob.headers["etag"]})
    assert first.status_code == 200 and len(first.content) > 0
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert again.headers["x-statehub-fetch-mode"] == "transform"
    assert other.status_code == 200 and other.content == first.content
    assert (blob_again.status_code, blob_again.content) == (304, b"")
    assert blob_again.headers["x-statehub-body-digest"] == blob.headers["x-statehub-body-digest"]


def test_a_cached_fetch_into_a_meta_model_is_one_request_and_a_changed_one_is_planned(
    hub: Client, server: ServerProcess, ns: str
) -> None:
    old, new = weights(11), weights(12)
    hub.push(f"{ns}/m", old, alias="prod")
    on_meta = {k: v.to("meta") for k, v in old.items()}

    def plans() -> float:
        return answered(server, "POST", PLAN_ROUTE, "200")

    start = plans()
    assert_same(hub.fetch(f"{ns}/m@prod", target=on_meta), old)  # planned: meta has no values
    first = plans()
    before = fetch_modes(server)
    assert_same(hub.fetch(f"{ns}/m@prod", target=on_meta), old)
    assert (plans() - first, served(before, fetch_modes(server))) == (0, (0, 1))
    assert first - start == 1

    hub.set_alias(f"{ns}/m", "prod", hub.push(f"{ns}/m", new).version)
    changed = plans()
    assert_same(hub.fetch(f"{ns}/m@prod", target=on_meta), new)
    assert plans() - changed == 1  # the 304 did not come: planned before the body


def test_a_folder_snapshot_again_is_304s_and_offline_downloads_come_from_the_cache(
    hub: Client, server: ServerProcess, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden": 8}')
    (folder / "model.safetensors").write_bytes(st_save(weights(13)))
    hub.push(f"{ns}/repo", folder)

    def not_modified() -> float:
        samples = scrape(server.url)
        return sum(
            v for (n, labels), v in samples.items()
            if n == REQUESTS and ("status", "304") in labels
        )  # fmt: skip

    hub.snapshot(f"{ns}/repo", tmp_path / "one")
    before = not_modified()
    hub.snapshot(f"{ns}/repo", tmp_path / "two")
    assert not_modified() - before == 2  # both files revalidated, neither sent
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "two" / name).read_bytes() == (folder / name).read_bytes()

    monkeypatch.setenv("STATEHUB_OFFLINE", "1")
    with Client(server.url) as offline:
        # snapshot pins the version it read: its files are cached under that version
        path = offline.download(f"{ns}/repo:1", "config.json", tmp_path / "offline.json")
        assert path.read_bytes() == (folder / "config.json").read_bytes()
        with pytest.raises(NotCached):
            offline.download(f"{ns}/repo:1", "README.md", tmp_path / "readme.md")
        offline.snapshot(f"{ns}/repo", tmp_path / "three")  # its listing was remembered
        for name in ("config.json", "model.safetensors"):
            assert (tmp_path / "three" / name).read_bytes() == (folder / name).read_bytes()
        with pytest.raises(NotCached, match="never snapshotted"):
            offline.snapshot(f"{ns}/other", tmp_path / "four")
        with pytest.raises(NotCached, match="needs the server"):
            offline.push(f"{ns}/other", weights(14))


def test_statehub_cache_verify_finds_a_change_that_kept_size_and_mtime(
    hub: Client, server: ServerProcess, ns: str, client_cache: Path
) -> None:
    source = weights(15)
    hub.push(f"{ns}/m", source)
    hub.fetch(f"{ns}/m", target=source)
    [blob] = blob_files(client_cache)
    stat = blob.stat()
    blob.write_bytes(flip_a_byte(blob.read_bytes()))
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: nothing else changed

    runner = CliRunner()
    clean = runner.invoke(main, ["cache", "verify"])
    assert clean.exit_code == 1 and blob.name in clean.output
    assert blob_files(client_cache) == []
    assert runner.invoke(main, ["cache", "verify"]).exit_code == 0
    before = fetch_modes(server)
    assert_same(hub.fetch(f"{ns}/m", target=source), source)
    assert served(before, fetch_modes(server)) == (1, 0)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (ENOSPC on write)")
def test_a_cache_disk_that_fills_mid_body_never_fails_the_transfer(client_cache: Path) -> None:
    cache = Cache(client_cache)
    receiver = cache.receive("k", kind="fetch", ref="ns/m")
    receiver._handle.close()
    receiver._handle = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 - a full disk
    data = [b"abc", b"def"]
    with pytest.warns(UserWarning, match="cannot keep ns/m"):
        assert list(receiver.wrap(iter(data))) == data  # every chunk still reaches the caller
    receiver.commit(digest=hashlib.sha256(b"abcdef").hexdigest(), etag='"e"', size=6)
    assert cache.lookup("k") is None and cache.entries() == []
    assert not list((client_cache / "tmp").iterdir())


def test_a_record_that_names_anything_but_a_sha256_is_ignored(client_cache: Path) -> None:
    victim = client_cache / "victim.txt"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("mine")
    requests = client_cache / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    bad = {"etag": '"e"', "digest": "../victim.txt", "size": 4, "kind": "fetch", "ref": "x"}
    (requests / "k.json").write_text(json.dumps(bad))
    cache = Cache(client_cache)
    assert cache.lookup("k") is None and cache.entries() == []
    cache.prune(0)
    assert victim.read_text() == "mine"
