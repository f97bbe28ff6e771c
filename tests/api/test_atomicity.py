"""Atomicity on both backends: a server killed (SIGKILL) mid-upload and mid-fetch leaves
no half-version and no corrupted blob, and the retries succeed after a restart; parallel
pushes to one model get distinct numbers; gc collects what nothing references and never a
blob an upload is about to reference (the race, forced both ways); deletes are soft and
restorable unless hard, and a soft-deleted object is invisible to every read."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from sqlalchemy import event

from service import gc, registry
from service.core.names import ModelName
from service.storage.blobs import BlobStore
from service.storage.db import Database
from service.storage.spool import Spooled, SpoolFile
from statehub import Client
from tests._server import ServerProcess
from tests.api.conftest import Deployment, checkpoint_bytes, spec_of_checkpoint
from tests.api.test_integrity import unique_checkpoint

MiB = 1024 * 1024


@pytest.fixture
def running(deployment: Deployment) -> ServerProcess:
    """A live server on this module's data: the one the kill test restarted, else a new one."""
    live = [s for s in deployment.servers if s.process.poll() is None]
    return live[-1] if live else deployment.start()


def stored_blobs_are_whole(store: BlobStore) -> list[str]:
    digests = []
    for blob in store.iter_stored():
        data = store.read_range(blob.digest, 0, blob.size)
        assert hashlib.sha256(data).hexdigest() == blob.digest, f"blob {blob.digest} is damaged"
        digests.append(blob.digest)
    return digests


def spool_files(deployment: Deployment) -> list[Path]:
    return sorted(deployment.settings.effective_spool_dir.glob("*.incomplete"))


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- SIGKILL ------------------------------------------------------------------------------


def test_sigkill_mid_upload_and_mid_fetch_then_restart(deployment: Deployment) -> None:
    server = deployment.start()
    big = unique_checkpoint(10, mib=24)
    path = deployment.settings.data_dir.parent / f"big-{deployment.backend}.safetensors"
    path.write_bytes(big)
    with Client(server.url, retries=1) as hub:
        hub.push("kill/fetched", path)
        spec = {"target": {"tensors": hub.version("kill/fetched").spec["tensors"]}}  # type: ignore[index]
    upload = checkpoint_bytes(11, rows=512, cols=512)  # 1 MiB
    resume = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield upload[: len(upload) // 2]
        resume.wait(60)
        yield upload[len(upload) // 2 :]

    def send_upload() -> BaseException | httpx.Response:
        try:
            return httpx.post(
                f"{server.url}/v1/models/kill/uploaded/versions",
                content=slow_body(),
                headers={"Content-Length": str(len(upload))},
                timeout=60,
            )
        except httpx.TransportError as exc:
            return exc

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(send_upload)
        half = len(upload) // 2
        wait_for(lambda: any(p.stat().st_size >= half for p in spool_files(deployment)), "spool")
        fetch_url = f"{server.url}/v1/models/kill/fetched/versions/1/fetch"
        with httpx.stream("POST", fetch_url, json=spec, timeout=60) as fetch:
            total = int(fetch.headers["content-length"])
            received = 0
            chunks = fetch.iter_raw()
            while received < MiB:
                received += len(next(chunks))
            server.process.kill()  # SIGKILL: an upload mid-body, a fetch mid-stream
            server.process.wait(10)
            with pytest.raises(httpx.TransportError):
                for chunk in chunks:
                    received += len(chunk)
            assert received < total
        resume.set()
        assert isinstance(pending.result(), BaseException)

    restarted = deployment.start()
    with Client(restarted.url, retries=1) as hub:
        check_after_restart(deployment, restarted, hub, upload, big, spec["target"], path)


def check_after_restart(
    deployment: Deployment,
    restarted: ServerProcess,
    hub: Client,
    upload: bytes,
    big: bytes,
    target: dict[str, Any],
    path: Path,
) -> None:
    response = httpx.get(f"{restarted.url}/v1/models/kill/uploaded")
    assert response.status_code == 404, "a half-uploaded version is visible"
    store = deployment.store()
    whole = stored_blobs_are_whole(store)
    assert hashlib.sha256(upload).hexdigest() not in whole
    assert spool_files(deployment), "the killed upload's spool file should be left for gc"
    report = hub.gc(grace_s=0)
    assert spool_files(deployment) == []
    assert any(name.startswith("spool/") for name in report["temp_files_deleted"])

    path.write_bytes(upload)
    retried = hub.push("kill/uploaded", path)
    assert retried.version == 1 and retried.created
    assert hub.pull("kill/uploaded", path).read_bytes() == upload
    fitted = hub.fetch("kill/fetched", target=target)
    assert torch.equal(fitted["layer.weight"], st_load(big)["layer.weight"])
    assert set(stored_blobs_are_whole(store)) >= {retried.digest}


# -- concurrent pushes --------------------------------------------------------------------


def test_parallel_pushes_to_one_model_get_distinct_numbers(running: ServerProcess) -> None:
    def push(seed: int) -> int:
        response = httpx.post(
            f"{running.url}/v1/models/race/parallel/versions",
            content=checkpoint_bytes(100 + seed),
            timeout=120,
        )
        assert response.status_code == 201, response.text
        return int(response.json()["version"])

    with ThreadPoolExecutor(16) as pool:
        numbers = list(pool.map(push, range(16)))
    assert sorted(numbers) == list(range(1, 17))
    model = httpx.get(f"{running.url}/v1/models/race/parallel").json()
    assert [v["version"] for v in model["versions"]] == list(range(1, 17))
    assert model["latest_version"] == 16


# -- gc -----------------------------------------------------------------------------------


def test_gc_collects_unreferenced_blobs_and_stale_temp_files(
    running: ServerProcess, deployment: Deployment
) -> None:
    with Client(running.url, retries=1) as hub:
        check_gc(running, deployment, hub)


def check_gc(running: ServerProcess, deployment: Deployment, hub: Client) -> None:
    base = f"{running.url}/v1/models/gc/m"
    kept, dropped, soft = (checkpoint_bytes(200 + i) for i in range(3))
    for body in (kept, dropped, soft):
        assert httpx.post(f"{base}/versions", content=body).status_code == 201
    assert httpx.delete(f"{base}/versions/2", params={"hard": "true"}).status_code == 204
    assert httpx.delete(f"{base}/versions/3").status_code == 204  # soft: still referenced
    spool = deployment.settings.effective_spool_dir
    stale, fresh = spool / "stale.incomplete", spool / "fresh.incomplete"
    for file in (stale, fresh):
        file.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    digest = hashlib.sha256(dropped).hexdigest()

    graced = hub.gc()  # the default grace, an hour: only the stale temp file goes
    assert digest not in graced["blobs_deleted"]
    assert "spool/stale.incomplete" in graced["temp_files_deleted"]
    assert not stale.exists() and fresh.exists()
    fresh.unlink()
    dry = hub.gc(dry_run=True, grace_s=0)
    assert digest in dry["blobs_deleted"] and deployment.store().exists(digest)
    report = hub.gc(grace_s=0)
    assert digest in report["blobs_deleted"]
    assert not deployment.store().exists(digest)
    for body in (kept, soft):
        assert deployment.store().exists(hashlib.sha256(body).hexdigest())
    assert httpx.post(f"{base}/versions/3/restore").status_code == 200
    assert hub.pull("gc/m:3", spool.parent / "restored.safetensors").read_bytes() == soft


class PausingStore:
    """A real store whose put_file / delete stop halfway until released: the race, forced."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self.digest = ""  # the blob whose put / delete pauses
        self.in_put = threading.Event()
        self.in_delete = threading.Event()
        self.release = threading.Event()
        self.pause_put = self.pause_delete = False
        self.events: list[str] = []  # "put" and "deleted" of that blob, in order

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def put_file(self, digest: str, path: Path) -> bool:
        stored = self._store.put_file(digest, path)  # "already there" decided here
        if digest == self.digest:
            self.events.append("put")
            self.in_put.set()
            if self.pause_put:
                assert self.release.wait(60)
        return stored

    def delete(self, digest: str) -> None:
        if digest == self.digest:
            self.in_delete.set()
            if self.pause_delete:
                assert self.release.wait(60)
        self._store.delete(digest)
        if digest == self.digest:
            self.events.append("deleted")


class LockWatch:
    """Sees the upload thread's blob-lock statement go out and come back (SQLAlchemy's cursor
    events on the real database): proof of waiting on gc's lock without a sleep."""

    # repositories.lock_blob: an advisory lock (PostgreSQL), the write lock (SQLite).
    STATEMENTS = ("pg_advisory_xact_lock", "DELETE FROM blob_leases WHERE blob_leases.id <")

    def __init__(self, db: Database) -> None:
        self.requested = threading.Event()
        self.events: list[str] = []
        self._upload_thread: int | None = None
        event.listen(db.engine, "before_cursor_execute", self._before)
        event.listen(db.engine, "after_cursor_execute", self._after)

    def as_upload(self, function: Any, *args: Any) -> Any:
        self._upload_thread = threading.get_ident()
        return function(*args)

    def _mine(self, statement: str) -> bool:
        return threading.get_ident() == self._upload_thread and any(
            s in statement for s in self.STATEMENTS
        )

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self._mine(statement) and not self.requested.is_set():
            self.events.append("requested")
            self.requested.set()

    def _after(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self._mine(statement) and "granted" not in self.events:
            self.events.append("granted")


def spooled(deployment: Deployment, body: bytes) -> Spooled:
    settings = deployment.settings
    spool = SpoolFile(
        settings.effective_spool_dir,
        max_bytes=len(body) + 1,
        min_free_bytes=settings.spool_min_free_bytes,
    )
    spool.write(body)
    return spool.finish()


def push_in_process(
    deployment: Deployment, db: Database, store: Any, name: str, body: bytes
) -> registry.PushResult:
    return registry.push_version(
        db=db,
        blobs=store,
        settings=deployment.settings,
        name=ModelName.parse(name),
        spooled=spooled(deployment, body),
        metadata={},
        alias=None,
        ema=False,
        actor="test",
    )


def orphan(deployment: Deployment, store: BlobStore, body: bytes) -> str:
    """A stored blob no version references (an old upload whose version was removed)."""
    digest = hashlib.sha256(body).hexdigest()
    path = deployment.settings.effective_spool_dir / f"{digest}.orphan"
    path.write_bytes(body)
    store.put_file(digest, path)
    path.unlink(missing_ok=True)
    return digest


def collect(deployment: Deployment, db: Database, store: Any) -> gc.GcReport:
    return gc.collect(
        db=db, blobs=store, settings=deployment.settings, grace_s=0, dry_run=False, actor="test"
    )


@pytest.fixture
def in_process(running: ServerProcess, deployment: Deployment) -> Iterator[tuple[Database, Any]]:
    """The server's database and store, used from this process (the server migrated it)."""
    db = Database(deployment.settings.effective_database_url)
    try:
        yield db, PausingStore(deployment.store())
    finally:
        db.dispose()


def test_gc_never_deletes_a_blob_an_upload_already_found_stored(
    deployment: Deployment, in_process: tuple[Database, PausingStore]
) -> None:
    db, store = in_process
    body = checkpoint_bytes(300)
    digest = store.digest = orphan(deployment, store, body)
    store.pause_put = True
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(push_in_process, deployment, db, store, "gcrace/a", body)
        assert store.in_put.wait(30)  # the upload saw the blob stored; no version yet
        report = collect(deployment, db, store)  # a gc right now must leave it alone
        assert digest not in report.blobs_deleted and store.exists(digest)
        store.release.set()
        result = upload.result(60)
    assert result.created and result.version.digest == digest
    assert digest not in collect(deployment, db, store).blobs_deleted
    assert hashlib.sha256(store.read_range(digest, 0, len(body))).hexdigest() == digest


def test_an_upload_waits_for_a_gc_deleting_its_blob_then_stores_it_again(
    deployment: Deployment, in_process: tuple[Database, PausingStore]
) -> None:
    db, store = in_process
    body = checkpoint_bytes(301)
    digest = store.digest = orphan(deployment, store, body)
    store.pause_delete = True
    lock = LockWatch(db)
    with ThreadPoolExecutor(2) as pool:
        collecting = pool.submit(collect, deployment, db, store)
        assert store.in_delete.wait(30)  # gc holds the blob's lock, about to delete it
        upload = pool.submit(
            lock.as_upload, push_in_process, deployment, db, store, "gcrace/b", body
        )
        assert lock.requested.wait(30)  # the upload sent its lock statement
        store.release.set()
        assert digest in collecting.result(60).blobs_deleted
        result = upload.result(60)
    # The upload's lock statement returned only after gc had deleted the blob (and committed).
    assert store.events.index("deleted") < lock.events.index("granted")
    assert store.events.index("deleted") < store.events.index("put")
    assert result.created and store.exists(digest)  # stored again after gc deleted it
    assert hashlib.sha256(store.read_range(digest, 0, len(body))).hexdigest() == digest


# -- soft and hard delete -----------------------------------------------------------------


def test_soft_deleted_versions_are_invisible_until_restored(
    server: ServerProcess, hub: Client, ns: str
) -> None:
    base = f"{server.url}/v1/models/{ns}/m"
    first, second = checkpoint_bytes(400), checkpoint_bytes(401)
    for body in (first, second):
        assert httpx.post(f"{base}/versions", content=body).status_code == 201
    fit = {"target": spec_of_checkpoint()}
    assert httpx.put(f"{base}/aliases/prod", json={"version": 2}).status_code == 200

    assert httpx.delete(f"{base}/versions/2").status_code == 204
    for method, path, body in (
        ("GET", "/versions/2", None),
        ("GET", "/versions/prod", None),
        ("GET", f"/versions/sha256:{hashlib.sha256(second).hexdigest()}", None),
        ("GET", "/versions/2/blob", None),
        ("POST", "/versions/2/plan", fit),
        ("POST", "/versions/2/fetch", fit),
    ):
        response = httpx.request(method, base + path, json=body)
        assert response.status_code == 404, (path, response.text)
    assert [v["version"] for v in httpx.get(f"{base}/versions").json()] == [1]
    model = httpx.get(base).json()
    assert model["latest_version"] == 1 and model["aliases"] == {"latest": 1}
    hits = hub.find_compatible(fit["target"], limit=100)
    assert f"{ns}/m:2" not in {h["ref"] for h in hits} and f"{ns}/m:1" in {h["ref"] for h in hits}

    restored = httpx.post(f"{base}/versions/2/restore")
    assert restored.status_code == 200 and restored.json()["version"] == 2
    assert httpx.get(base).json()["aliases"] == {"latest": 2, "prod": 2}

    assert httpx.delete(f"{base}/versions/2", params={"hard": "true"}).status_code == 204
    assert httpx.post(f"{base}/versions/2/restore").status_code == 404
    third = httpx.post(f"{base}/versions", content=checkpoint_bytes(402))
    assert third.json()["version"] == 3  # numbers are never reused
    assert httpx.get(base).json()["aliases"] == {"latest": 3}


def test_soft_deleted_models_are_invisible_until_restored(
    server: ServerProcess, hub: Client, ns: str
) -> None:
    base = f"{server.url}/v1/models/{ns}/gone"
    body = checkpoint_bytes(500)
    assert httpx.post(f"{base}/versions", content=body).status_code == 201
    assert httpx.delete(base).status_code == 204
    assert httpx.get(base).status_code == 404
    assert httpx.get(f"{base}/versions/1/blob").status_code == 404
    assert hub.list_models(namespace=ns)["items"] == []
    assert f"{ns}/gone" not in {h["model"] for h in hub.find_compatible(spec_of_checkpoint())}
    refused = httpx.post(f"{base}/versions", content=checkpoint_bytes(501))
    assert refused.status_code == 409 and "restore" in refused.json()["error"]["message"]
    created = httpx.post(f"{server.url}/v1/models", json={"namespace": ns, "name": "gone"})
    assert created.status_code == 409

    assert httpx.post(f"{base}/restore").status_code == 200
    assert httpx.get(f"{base}/versions/1/blob").content == body
    assert [m["name"] for m in hub.list_models(namespace=ns)["items"]] == ["gone"]

    assert httpx.delete(base).status_code == 204
    assert httpx.delete(base, params={"hard": "true"}).status_code == 204  # soft, then hard
    assert httpx.post(f"{base}/restore").status_code == 404
    again = httpx.post(f"{base}/versions", content=body)
    assert again.status_code == 201 and again.json()["version"] == 1
