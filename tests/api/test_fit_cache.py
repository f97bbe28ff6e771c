"""The fit cache, on both backends: a fitted fetch body is kept as a blob after the first
fetch and serves the same fetch again; gc evicts it, a corrupted one is never served."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch

from statehub import Client, IntegrityError
from tests._metrics import delta, scrape, value
from tests._server import ServerProcess
from tests.api.conftest import Deployment
from tests.api.test_integrity import cut_short, flip_stored_byte

STORED = "statehub_fit_cache_total"


@pytest.fixture(scope="module")
def cache_server(deployment: Deployment) -> ServerProcess:
    """Entries unused for 0 s are evicted by the next gc (the tests run it explicitly)."""
    return deployment.start(STATEHUB_FIT_CACHE_TTL_S="0")


@pytest.fixture
def hub(cache_server: ServerProcess) -> Iterator[Client]:
    # The server's cache is under test: the client's own would answer repeats with a 304.
    with Client(cache_server.url, retries=1, cache=False) as client:
        yield client


def state_dict(seed: int, rows: int = 64, cols: int = 32, n: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(rows, cols, generator=generator) for i in range(n)}


def spec(sd: dict[str, torch.Tensor], dtype: str) -> dict[str, Any]:
    return {"tensors": [{"key": k, "shape": list(v.shape), "dtype": dtype} for k, v in sd.items()]}


def fetch_raw(server: ServerProcess, ref: str, target: dict[str, Any], **headers: str) -> Any:
    model, _, number = ref.partition(":")
    return httpx.post(
        f"{server.url}/v1/models/{model}/versions/{number or 'latest'}/fetch",
        json={"target": target},
        headers=headers,
        timeout=60,
    )


def wait_for(server: ServerProcess, before: dict[Any, float], event: str, n: int = 1) -> None:
    """The background store runs after the response: wait until it is counted."""
    deadline = time.monotonic() + 30
    while delta(before, scrape(server.url), STORED, event=event) < n:
        assert time.monotonic() < deadline, f"no fit cache {event!r} event"
        time.sleep(0.05)


def fetch_and_cache(server: ServerProcess, ref: str, target: dict[str, Any]) -> Any:
    """A fetch, once its body is stored in the fit cache (after the response)."""
    before = scrape(server.url)
    response = fetch_raw(server, ref, target)
    wait_for(server, before, "stored")
    return response


def entries(deployment: Deployment, etag: str | None = None) -> list[Any]:
    engine = deployment.engine()
    query = "SELECT etag, version_id, digest, size, hits, created_at, last_used_at FROM fit_cache"
    with engine.connect() as connection:
        rows = list(connection.execute(sa.text(query)))
    engine.dispose()
    return [r for r in rows if etag is None or r.etag == etag]


def assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def test_the_same_transform_fetch_again_is_served_from_the_cache(
    deployment: Deployment, cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(1)
    hub.push(f"{ns}/m", source)
    target = spec(source, "F16")
    expected = {k: v.half() for k, v in source.items()}

    before = scrape(cache_server.url)
    first = fetch_raw(cache_server, f"{ns}/m", target)
    assert first.status_code == 200 and first.headers["x-statehub-fetch-mode"] == "transform"
    wait_for(cache_server, before, "stored")
    etag = first.headers["etag"].strip('"')
    [entry] = entries(deployment, etag)
    assert entry.digest == hashlib.sha256(first.content).hexdigest()
    assert entry.size == len(first.content) and entry.hits == 0

    decoded = value(scrape(cache_server.url), "statehub_fetch_tensors_decoded_total")
    second = fetch_raw(cache_server, f"{ns}/m", target)
    assert second.status_code == 200
    assert second.headers["x-statehub-fetch-mode"] == "cached"
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers["x-statehub-body-digest"] == entry.digest
    assert second.content == first.content
    assert_equal(hub.fetch(f"{ns}/m", target=target), expected)
    after = scrape(cache_server.url)
    assert value(after, "statehub_fetch_tensors_decoded_total") == decoded, "nothing decoded"
    assert delta(before, after, STORED, event="hit") == 2
    assert delta(before, after, "statehub_fetches_total", mode="cached") == 2

    [entry] = entries(deployment, etag)
    assert entry.hits == 2 and entry.last_used_at > entry.created_at


def test_a_rename_only_fetch_is_cached_too(
    cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(2)
    hub.push(f"{ns}/wrapped", {f"module.{k}": v for k, v in source.items()})
    target = spec(source, "F32")
    first = fetch_and_cache(cache_server, f"{ns}/wrapped", target)
    assert first.headers["x-statehub-fetch-mode"] == "rewrite"
    assert fetch_raw(cache_server, f"{ns}/wrapped", target).headers["x-statehub-fetch-mode"] == (
        "cached"
    )
    assert_equal(hub.fetch(f"{ns}/wrapped", target=target), source)


def test_another_target_or_version_is_a_miss(
    cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(3)
    hub.push(f"{ns}/m", source)
    fetch_and_cache(cache_server, f"{ns}/m", spec(source, "F16"))

    other_target = fetch_raw(cache_server, f"{ns}/m", spec(source, "BF16"))
    assert other_target.headers["x-statehub-fetch-mode"] == "transform"
    assert_equal(
        hub.fetch(f"{ns}/m", target=spec(source, "BF16")),
        {k: v.bfloat16() for k, v in source.items()},
    )
    # The same bytes under another name: same digest and plan (so same ETag), but its own
    # body (``statehub.source`` names the version): never the other version's entry.
    hub.push(f"{ns}/copy", source)
    other_version = fetch_raw(cache_server, f"{ns}/copy", spec(source, "F16"))
    assert other_version.headers["x-statehub-fetch-mode"] == "transform"
    header = other_version.content[8 : 8 + int.from_bytes(other_version.content[:8], "little")]
    assert f"{ns}/copy:1".encode() in header


def test_ranges_of_a_cached_body(cache_server: ServerProcess, hub: Client, ns: str) -> None:
    source = state_dict(4)
    hub.push(f"{ns}/m", source)
    target = spec(source, "F16")
    full = fetch_and_cache(cache_server, f"{ns}/m", target)
    etag = full.headers["etag"]

    resume = {"Range": "bytes=100-4099", "If-Range": etag}
    ranged = fetch_raw(cache_server, f"{ns}/m", target, **resume)
    assert ranged.status_code == 206
    assert ranged.headers["x-statehub-fetch-mode"] == "cached"
    assert ranged.headers["etag"] == etag
    assert ranged.headers["content-range"] == f"bytes 100-4099/{len(full.content)}"
    assert ranged.content == full.content[100:4100]
    suffix = fetch_raw(cache_server, f"{ns}/m", target, Range="bytes=-10")
    assert suffix.status_code == 206 and suffix.content == full.content[-10:]
    stale = fetch_raw(cache_server, f"{ns}/m", target, Range="bytes=5-", **{"If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == full.content
    outside = fetch_raw(cache_server, f"{ns}/m", target, Range=f"bytes={len(full.content)}-")
    assert outside.status_code == 416
    assert outside.json()["error"]["code"] == "range_not_satisfiable"


def test_a_fetch_cut_short_leaves_no_entry(
    deployment: Deployment, cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(5, rows=2048, cols=1024, n=4)  # 32 MiB: more than sockets buffer
    hub.push(f"{ns}/big", source)
    target = spec(source, "F16")
    before = scrape(cache_server.url)
    url = f"{cache_server.url}/v1/models/{ns}/big/versions/latest/fetch"
    with httpx.stream("POST", url, json={"target": target}, timeout=60) as response:
        assert response.headers["x-statehub-fetch-mode"] == "transform"
        etag = response.headers["etag"].strip('"')
        next(response.iter_raw())  # then hang up
    # The tee counts the copy of a body cut short when it drops it (the stream closing or the
    # background store, whichever runs first); from then on nothing of it can be stored.
    deadline = time.monotonic() + 30
    while delta(before, scrape(cache_server.url), STORED, event="abandoned") < 1:
        assert time.monotonic() < deadline, "the copy of a cut fetch was never discarded"
        time.sleep(0.05)
    assert not list(deployment.settings.effective_spool_dir.glob("*.incomplete"))
    assert entries(deployment, etag) == []
    assert delta(before, scrape(cache_server.url), STORED, event="stored") == 0
    again = fetch_raw(cache_server, f"{ns}/big", target)
    assert again.headers["x-statehub-fetch-mode"] == "transform"


def test_a_spool_disk_short_of_space_skips_the_cache(
    deployment: Deployment, hub: Client, ns: str
) -> None:
    short = deployment.start(STATEHUB_SPOOL_MIN_FREE_BYTES=str(2**60))
    source = state_dict(6)
    hub.push(f"{ns}/m", source)
    target = spec(source, "F16")
    before = scrape(short.url)
    with Client(short.url, retries=1, cache=False) as client:  # each fetch reaches the server
        for _ in range(2):
            expected = {k: v.half() for k, v in source.items()}
            assert_equal(client.fetch(f"{ns}/m", target=target), expected)
    after = scrape(short.url)
    assert delta(before, after, STORED, event="skipped") == 2
    assert delta(before, after, "statehub_fetches_total", mode="transform") == 2
    etag = fetch_raw(short, f"{ns}/m", target).headers["etag"].strip('"')
    assert entries(deployment, etag) == []


def test_gc_evicts_unused_entries_then_collects_their_blobs(
    deployment: Deployment, cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(7)
    hub.push(f"{ns}/m", source)
    target = spec(source, "F16")
    etag = fetch_and_cache(cache_server, f"{ns}/m", target).headers["etag"].strip('"')
    [entry] = entries(deployment, etag)
    store = deployment.store()

    dry = hub.gc(dry_run=True, grace_s=0)
    assert dry["fit_cache_evicted"] >= 1
    assert entries(deployment, etag) != [] and store.exists(entry.digest)

    report = hub.gc(grace_s=0)
    assert report["fit_cache_evicted"] >= 1
    assert entry.digest in report["blobs_deleted"]
    assert entries(deployment, etag) == []
    assert not store.exists(entry.digest)
    assert_equal(hub.fetch(f"{ns}/m", target=target), {k: v.half() for k, v in source.items()})


def test_a_hard_deleted_version_takes_its_entries_along(
    deployment: Deployment, cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    source = state_dict(8)
    hub.push(f"{ns}/m", source)
    etag = fetch_and_cache(cache_server, f"{ns}/m", spec(source, "F16")).headers["etag"]
    etag = etag.strip('"')
    assert len(entries(deployment, etag)) == 1
    hub.delete_version(f"{ns}/m:1", hard=True)
    assert entries(deployment, etag) == []


def test_a_corrupted_cached_body_is_never_served(
    deployment: Deployment, cache_server: ServerProcess, hub: Client, ns: str
) -> None:
    """Checked before the response (small): the entry is dropped and the fit computed."""
    source = state_dict(9)
    hub.push(f"{ns}/m", source)
    target = spec(source, "F16")
    before = scrape(cache_server.url)
    etag = fetch_raw(cache_server, f"{ns}/m", target).headers["etag"].strip('"')
    wait_for(cache_server, before, "stored")
    [entry] = entries(deployment, etag)
    flip_stored_byte(cache_server, entry.digest, entry.size - 5)

    again = fetch_raw(cache_server, f"{ns}/m", target)
    assert again.status_code == 200
    assert again.headers["x-statehub-fetch-mode"] == "transform"
    assert hashlib.sha256(again.content).hexdigest() == entry.digest
    assert delta(before, scrape(cache_server.url), STORED, event="dropped") == 1
    assert_equal(hub.fetch(f"{ns}/m", target=target), {k: v.half() for k, v in source.items()})
    # Stored again, the blob of that name is checked first: still corrupted, no entry.
    wait_for(cache_server, before, "failed")
    assert entries(deployment, etag) == []


def test_a_large_corrupted_cached_body_is_cut_short_and_refused(
    deployment: Deployment, hub: Client, ns: str
) -> None:
    """Checked while streaming (above verify_buffer_bytes): cut short and dropped; the
    bytes that did arrive fail the client's check of the whole body's digest."""
    streaming = deployment.start(STATEHUB_VERIFY_BUFFER_BYTES="0")
    url = f"{streaming.url}/v1/models/{ns}/%s/versions/latest/fetch"
    for name, seed in (("raw", 10), ("client", 11)):
        source = state_dict(seed)
        hub.push(f"{ns}/{name}", source)
        target = spec(source, "F16")
        etag = fetch_and_cache(streaming, f"{ns}/{name}", target).headers["etag"].strip('"')
        [entry] = entries(deployment, etag)
        flip_stored_byte(streaming, entry.digest, 100)
        with Client(streaming.url, retries=1) as client:
            if name == "raw":
                send = lambda: httpx.stream("POST", url % name, json={"target": target})  # noqa: E731, B023
                cut_short(send)
            else:  # cut short, resumed (computed afresh): the whole body is not the announced
                with pytest.raises(IntegrityError):
                    client.fetch(f"{ns}/{name}", target=target)
            assert entries(deployment, etag) == []
            expected = {k: v.half() for k, v in source.items()}
            assert_equal(client.fetch(f"{ns}/{name}", target=target), expected)
