"""The blob stores against real back ends: a directory on tmp_path and moto's S3 server."""

from __future__ import annotations

import gc
import hashlib
import os
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from service.errors import InvalidRef, StorageError, StorageUnavailable
from service.settings import MiB, Settings
from service.storage.blobs import (
    BlobNotFound,
    BlobStore,
    LocalBlobStore,
    S3BlobStore,
    blob_key,
    open_blob_store,
)

SPOOL = "spool"


def spool_file(tmp_path: Path, data: bytes) -> tuple[str, Path]:
    """Write ``data`` to a fresh file in the spool (same file system as the local store)."""
    spool = tmp_path / SPOOL
    spool.mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest(), Path(name)


def put(store: BlobStore, tmp_path: Path, data: bytes) -> tuple[str, bool]:
    digest, path = spool_file(tmp_path, data)
    try:
        return digest, store.put_file(digest, path)
    finally:
        path.unlink(missing_ok=True)  # the caller's side of the hand-over


def raw_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def raw_s3(moto_server: Any) -> Iterator[Any]:
    client = raw_client(moto_server.endpoint)
    yield client
    client.close()


def stored_keys(store: BlobStore, raw_s3: Any = None) -> list[str]:
    """Every object/file the store holds, relative to its root or prefix."""
    if isinstance(store, LocalBlobStore):
        if not store.root.exists():
            return []
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    client = raw_s3 or raw_client(store.endpoint or "")
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=store.prefix
    )
    keys = [item["Key"][len(store.prefix) :] for page in pages for item in page.get("Contents", ())]
    if raw_s3 is None:
        client.close()
    return sorted(keys)


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating bytes (so a wrong offset never matches by accident)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------
# Both stores
# --------------------------------------------------------------------------------------------


def test_check_passes(store: BlobStore) -> None:
    store.check()


def test_round_trip_small(store: BlobStore, tmp_path: Path) -> None:
    data = payload(1000, seed=1)
    digest, created = put(store, tmp_path, data)

    assert created is True
    assert store.exists(digest)
    assert store.size(digest) == 1000
    assert store.read_range(digest, 0, 1000) == data
    assert b"".join(store.iter_range(digest, 0, 1000, 64)) == data
    assert stored_keys(store) == [blob_key(digest)]
    assert blob_key(digest) == f"blobs/sha256/{digest[:2]}/{digest}"


def test_round_trip_large_multipart(store: BlobStore, tmp_path: Path) -> None:
    size = 12 * MiB + 12345
    data = payload(size, seed=2)
    digest, created = put(store, tmp_path, data)

    assert created is True
    assert store.size(digest) == size
    assert store.read_range(digest, 0, size) == data
    chunks = list(store.iter_range(digest, 0, size, MiB))
    assert [len(c) for c in chunks] == [MiB] * 12 + [12345]
    assert b"".join(chunks) == data


def test_put_existing_digest_returns_false_and_stores_once(
    store: BlobStore, tmp_path: Path
) -> None:
    data = payload(5000, seed=3)
    digest, first = put(store, tmp_path, data)
    _, second = put(store, tmp_path, data)

    assert (first, second) == (True, False)
    assert stored_keys(store) == [blob_key(digest)]
    assert list(store.iter_digests()) == [digest]
    assert store.read_range(digest, 0, 5000) == data


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 1), (5, 17), (4095, 4096), (4096, 4097), (0, 10000), (9999, 10000), (1234, 8765)],
    ids=lambda v: str(v),
)
def test_ranges_return_exact_slices(store: BlobStore, tmp_path: Path, start: int, end: int) -> None:
    data = payload(10000, seed=4)
    digest, _ = put(store, tmp_path, data)

    assert store.read_range(digest, start, end) == data[start:end]
    for chunk_size in (1000, 4096, 10**6):
        if (end - start) // chunk_size > 2000:
            continue
        chunks = list(store.iter_range(digest, start, end, chunk_size))
        assert b"".join(chunks) == data[start:end]
        assert all(0 < len(c) <= chunk_size for c in chunks)
        assert len(chunks) == -(-(end - start) // chunk_size)


@pytest.mark.parametrize("at", [0, 7, 10000])
def test_empty_range(store: BlobStore, tmp_path: Path, at: int) -> None:
    digest, _ = put(store, tmp_path, payload(10000, seed=5))

    assert store.read_range(digest, at, at) == b""
    assert list(store.iter_range(digest, at, at, 100)) == []


def test_last_byte(store: BlobStore, tmp_path: Path) -> None:
    data = payload(777, seed=6)
    digest, _ = put(store, tmp_path, data)

    assert store.read_range(digest, 776, 777) == data[-1:]
    assert list(store.iter_range(digest, 776, 777, 1)) == [data[-1:]]


def test_range_past_the_end_is_a_storage_error(store: BlobStore, tmp_path: Path) -> None:
    data = payload(100, seed=7)
    digest, _ = put(store, tmp_path, data)

    for start, end in [(0, 101), (50, 200), (100, 101), (150, 160), (101, 101)]:
        with pytest.raises(StorageError) as info:
            store.read_range(digest, start, end)
        assert not isinstance(info.value, (BlobNotFound, StorageUnavailable))
        with pytest.raises(StorageError):
            b"".join(store.iter_range(digest, start, end, 16))


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, -1)])
def test_invalid_range_arguments(store: BlobStore, tmp_path: Path, start: int, end: int) -> None:
    digest, _ = put(store, tmp_path, b"abcdef")

    with pytest.raises(ValueError, match="invalid byte range"):
        store.read_range(digest, start, end)
    with pytest.raises(ValueError, match="invalid byte range"):
        store.iter_range(digest, start, end, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        store.iter_range(digest, 0, 3, 0)


def test_missing_blob(store: BlobStore) -> None:
    digest = hashlib.sha256(b"never stored").hexdigest()

    assert store.exists(digest) is False
    with pytest.raises(BlobNotFound, match=digest) as info:
        store.size(digest)
    assert info.value.code == "storage_error"
    assert info.value.detail == {"digest": digest}
    with pytest.raises(BlobNotFound):
        store.read_range(digest, 0, 10)
    with pytest.raises(BlobNotFound):
        store.read_range(digest, 0, 0)
    with pytest.raises(BlobNotFound):
        store.iter_range(digest, 0, 10, 4)  # raised on the call, before streaming starts


def test_delete_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    digest, _ = put(store, tmp_path, payload(300, seed=8))
    other, _ = put(store, tmp_path, payload(300, seed=9))

    store.delete(digest)
    store.delete(digest)
    store.delete(hashlib.sha256(b"never stored").hexdigest())

    assert store.exists(digest) is False
    with pytest.raises(BlobNotFound):
        store.size(digest)
    assert stored_keys(store) == [blob_key(other)]
    _, created = put(store, tmp_path, payload(300, seed=8))
    assert created is True


def test_iter_digests_lists_what_was_stored(store: BlobStore, tmp_path: Path) -> None:
    assert list(store.iter_digests()) == []
    digests = {put(store, tmp_path, payload(100 + i, seed=10 + i))[0] for i in range(7)}

    assert sorted(store.iter_digests()) == sorted(digests)
    assert len(stored_keys(store)) == 7


def test_iter_range_closed_early_or_never_iterated_leaks_nothing(
    store: BlobStore, tmp_path: Path
) -> None:
    # filterwarnings=error turns a leaked file or HTTP body (ResourceWarning) into a failure.
    data = payload(100_000, seed=20)
    digest, _ = put(store, tmp_path, data)

    stream = store.iter_range(digest, 10, 90_000, 1000)
    assert next(stream) == data[10:1010]
    stream.close()  # type: ignore[attr-defined]
    assert list(stream) == []

    never = store.iter_range(digest, 0, 50_000, 1000)
    del never
    abandoned = store.iter_range(digest, 0, 50_000, 1000)
    next(abandoned)
    del abandoned
    gc.collect()

    with store.iter_range(digest, 0, 100_000, 4096) as whole:  # type: ignore[attr-defined]
        assert b"".join(whole) == data


BAD_DIGESTS = [
    "../etc/passwd",
    "../" + "a" * 61,
    "ab/" + "c" * 61,
    "A" * 64,
    "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
    "a" * 63,
    "a" * 65,
    "",
    "g" * 64,
    "a" * 64 + "\n",
    " " + "a" * 63,
    "sha256:" + "a" * 57,
]


@pytest.fixture(params=["local", "s3"])
def offline_store(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    closed_port_endpoint: str,
    make_s3_settings: Callable[..., Settings],
) -> Any:
    """A store where any I/O fails loudly: S3 on a closed port, local under a missing root."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "missing-root")
    settings = make_s3_settings(closed_port_endpoint, "no-such-bucket")
    return S3BlobStore(settings, connect_timeout=0.5, read_timeout=0.5, max_attempts=1)


@pytest.mark.parametrize("digest", BAD_DIGESTS, ids=repr)
def test_invalid_digests_are_refused_before_any_io(
    offline_store: BlobStore, tmp_path: Path, digest: str
) -> None:
    source = tmp_path / "does-not-exist"
    calls = [
        lambda: offline_store.put_file(digest, source),
        lambda: offline_store.exists(digest),
        lambda: offline_store.size(digest),
        lambda: offline_store.read_range(digest, 0, 1),
        lambda: offline_store.read_range(digest, 0, 0),
        lambda: offline_store.iter_range(digest, 0, 1, 1),
        lambda: offline_store.delete(digest),
        lambda: offline_store.presigned_url(digest, 60),
    ]
    for call in calls:
        # Any I/O would fail differently: StorageUnavailable (S3) or FileNotFoundError (put).
        with pytest.raises(InvalidRef, match="invalid blob digest"):
            call()
    assert not (tmp_path / "missing-root").exists()


def test_invalid_digest_error_is_a_value_error() -> None:
    with pytest.raises(ValueError) as info:
        blob_key("../etc/passwd")
    assert isinstance(info.value, InvalidRef)
    assert info.value.code == "invalid_ref"


# --------------------------------------------------------------------------------------------
# Local store
# --------------------------------------------------------------------------------------------


def test_local_put_moves_the_source_and_leaves_no_temp_files(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    data = payload(4096, seed=30)
    digest, source = spool_file(tmp_path, data)
    inode = source.stat().st_ino

    assert local_store.put_file(digest, source) is True

    blob = local_store.root / blob_key(digest)
    assert not source.exists()  # renamed, not copied
    assert blob.stat().st_ino == inode
    assert blob.read_bytes() == data
    assert list(local_store.root.rglob("*.incomplete")) == []
    assert stored_keys(local_store) == [blob_key(digest)]


def test_local_put_of_existing_blob_keeps_it_and_leaves_the_source(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    data = payload(4096, seed=31)
    digest, first = spool_file(tmp_path, data)
    local_store.put_file(digest, first)
    inode = (local_store.root / blob_key(digest)).stat().st_ino
    _, second = spool_file(tmp_path, data)

    assert local_store.put_file(digest, second) is False

    assert (local_store.root / blob_key(digest)).stat().st_ino == inode
    assert second.read_bytes() == data  # untouched: the caller removes it
    assert list(local_store.root.rglob("*.incomplete")) == []


def test_local_put_of_vanished_source_raises_and_leaves_nothing(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    digest, source = spool_file(tmp_path, b"gone before the put")
    source.unlink()

    with pytest.raises(FileNotFoundError):
        local_store.put_file(digest, source)

    assert local_store.exists(digest) is False
    assert stored_keys(local_store) == []
    assert list(local_store.root.rglob("*.incomplete")) == []


def _other_filesystem_dir(tmp_path: Path) -> Path | None:
    for candidate in (Path("/dev/shm"), Path("/run/user") / str(os.getuid())):
        try:
            if (
                candidate.is_dir()
                and os.access(candidate, os.W_OK)
                and candidate.stat().st_dev != tmp_path.stat().st_dev
            ):
                return candidate
        except OSError:
            continue
    return None


def test_local_put_copies_across_file_systems(local_store: LocalBlobStore, tmp_path: Path) -> None:
    other = _other_filesystem_dir(tmp_path)
    if other is None:
        pytest.skip("no second writable file system (e.g. /dev/shm) to copy from")
    data = payload(3 * MiB + 17, seed=32)
    digest = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(dir=other) as far:
        source = Path(far) / "upload"
        source.write_bytes(data)

        assert local_store.put_file(digest, source) is True

        assert source.read_bytes() == data  # copied, left for the caller
    assert (local_store.root / blob_key(digest)).read_bytes() == data
    assert list(local_store.root.rglob("*.incomplete")) == []


def test_local_iter_digests_skips_foreign_files(
    local_store: LocalBlobStore, tmp_path: Path
) -> None:
    digest, _ = put(local_store, tmp_path, b"kept")
    shard = local_store.root / "blobs" / "sha256" / digest[:2]
    (shard / f"{digest}.0123abcd.incomplete").write_bytes(b"partial")
    (shard / "README").write_text("not a blob")
    misplaced = "ff" + digest[2:] if digest[:2] != "ff" else "00" + digest[2:]
    (shard / misplaced).write_bytes(b"wrong shard")

    assert list(local_store.iter_digests()) == [digest]


def test_local_check_fails_when_root_is_not_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "a-file"
    root.write_text("")

    with pytest.raises(StorageUnavailable, match="not usable"):
        LocalBlobStore(root).check()


def test_local_presigned_url_is_none(local_store: LocalBlobStore, tmp_path: Path) -> None:
    digest, _ = put(local_store, tmp_path, b"x")
    assert local_store.presigned_url(digest, 60) is None


# --------------------------------------------------------------------------------------------
# S3 store
# --------------------------------------------------------------------------------------------


def test_s3_keys_live_under_the_prefix(s3_store: S3BlobStore, raw_s3: Any, tmp_path: Path) -> None:
    digest, _ = put(s3_store, tmp_path, b"prefixed")

    keys = [
        item["Key"]
        for item in raw_s3.list_objects_v2(Bucket=s3_store.bucket, Prefix=s3_store.prefix)[
            "Contents"
        ]
    ]
    assert keys == [f"{s3_store.prefix}blobs/sha256/{digest[:2]}/{digest}"]
    assert s3_store.prefix.startswith("t-") and s3_store.prefix.endswith("/")


def test_s3_large_blob_is_uploaded_in_parts(
    s3_store: S3BlobStore, raw_s3: Any, tmp_path: Path
) -> None:
    digest, _ = put(s3_store, tmp_path, payload(12 * MiB + 1, seed=40))

    head = raw_s3.head_object(Bucket=s3_store.bucket, Key=s3_store.prefix + blob_key(digest))
    # A multipart object's ETag is "<md5 of part md5s>-<parts>": 5 MiB + 5 MiB + 2 MiB.
    assert head["ETag"].strip('"').endswith("-3")
    assert head["ContentLength"] == 12 * MiB + 1


def test_s3_small_blob_is_a_single_put(s3_store: S3BlobStore, raw_s3: Any, tmp_path: Path) -> None:
    data = payload(1000, seed=41)
    digest, _ = put(s3_store, tmp_path, data)

    head = raw_s3.head_object(Bucket=s3_store.bucket, Key=s3_store.prefix + blob_key(digest))
    assert head["ETag"].strip('"') == hashlib.md5(data).hexdigest()


def test_s3_put_skips_upload_when_same_size_object_exists(
    s3_store: S3BlobStore, raw_s3: Any, tmp_path: Path
) -> None:
    data = payload(2000, seed=42)
    digest, _ = put(s3_store, tmp_path, data)
    key = s3_store.prefix + blob_key(digest)
    # Overwrite behind the store's back with same-size bytes: a skipped upload keeps them.
    raw_s3.put_object(Bucket=s3_store.bucket, Key=key, Body=b"z" * 2000)

    _, created = put(s3_store, tmp_path, data)

    assert created is False
    assert s3_store.read_range(digest, 0, 2000) == b"z" * 2000


def test_s3_put_replaces_object_of_wrong_size(
    s3_store: S3BlobStore, raw_s3: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(2000, seed=43)
    digest, _ = put(s3_store, tmp_path, data)
    raw_s3.put_object(Bucket=s3_store.bucket, Key=s3_store.prefix + blob_key(digest), Body=b"zz")

    _, created = put(s3_store, tmp_path, data)

    assert created is True
    assert s3_store.read_range(digest, 0, 2000) == data
    assert "uploading it again" in caplog.text


def test_s3_presigned_url_serves_the_blob(s3_store: S3BlobStore, tmp_path: Path) -> None:
    data = payload(3000, seed=44)
    digest, _ = put(s3_store, tmp_path, data)

    url = s3_store.presigned_url(digest, 300)

    assert url is not None and "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data


def test_s3_missing_bucket_is_unavailable_and_named(
    moto_server: Any, make_s3_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    store = S3BlobStore(make_s3_settings(moto_server.endpoint, "statehub-no-such-bucket"))
    digest, source = spool_file(tmp_path, b"orphan")

    with pytest.raises(StorageUnavailable, match="'statehub-no-such-bucket' does not exist"):
        store.check()
    with pytest.raises(StorageUnavailable, match="statehub-no-such-bucket"):
        store.put_file(digest, source)
    with pytest.raises(StorageUnavailable, match="statehub-no-such-bucket"):
        store.read_range(digest, 0, 3)
    with pytest.raises(StorageUnavailable, match="statehub-no-such-bucket"):
        list(store.iter_digests())


def test_s3_ensure_bucket_is_idempotent(
    moto_server: Any, make_s3_settings: Callable[..., Settings]
) -> None:
    store = S3BlobStore(make_s3_settings(moto_server.endpoint, "statehub-ensure-twice"))
    store.ensure_bucket()
    store.ensure_bucket()
    store.check()


def test_s3_endpoint_down_is_unavailable(
    closed_port_endpoint: str, make_s3_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    store = S3BlobStore(
        make_s3_settings(closed_port_endpoint, "statehub-down"),
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
    )
    digest, source = spool_file(tmp_path, b"nowhere to go")
    began = time.monotonic()

    with pytest.raises(StorageUnavailable, match="cannot be reached") as info:
        store.check()
    assert info.value.code == "storage_unavailable" and info.value.status == 503
    assert info.value.__cause__ is not None  # chained from the botocore error
    for call in [
        lambda: store.read_range(digest, 0, 5),
        lambda: store.iter_range(digest, 0, 5, 2),
        lambda: store.size(digest),
        lambda: store.exists(digest),
        lambda: store.put_file(digest, source),
        lambda: store.delete(digest),
        lambda: list(store.iter_digests()),
    ]:
        with pytest.raises(StorageUnavailable, match=closed_port_endpoint):
            call()
    assert time.monotonic() - began < 20


def test_s3_connection_dropped_mid_stream_is_unavailable(
    start_moto: Callable[[], Any], make_s3_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    server = start_moto()
    settings = make_s3_settings(server.endpoint, "statehub-drop")
    store = S3BlobStore(settings, connect_timeout=1, read_timeout=2, max_attempts=1)
    store.ensure_bucket()
    size = 24 * MiB  # far more than the socket buffers hold
    data = payload(size, seed=50)
    digest, _ = put(store, tmp_path, data)

    stream = store.iter_range(digest, 0, size, 64 * 1024)
    assert next(stream) == data[: 64 * 1024]
    server.kill()

    received = 64 * 1024
    with pytest.raises(StorageUnavailable) as info:
        for chunk in stream:
            received += len(chunk)
    assert received < size
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------------------------
# open_blob_store
# --------------------------------------------------------------------------------------------


def test_open_blob_store_local_uses_data_dir(tmp_path: Path) -> None:
    store = open_blob_store(Settings(data_dir=tmp_path / "data"))

    assert isinstance(store, LocalBlobStore)
    digest, _ = put(store, tmp_path, b"embedded")
    assert (
        tmp_path / "data" / "blobs" / "sha256" / digest[:2] / digest
    ).read_bytes() == b"embedded"


def test_open_blob_store_s3_when_bucket_is_set(s3_store_settings: Settings) -> None:
    store = open_blob_store(s3_store_settings)

    assert isinstance(store, S3BlobStore)
    assert isinstance(store, BlobStore)
    assert store.bucket == s3_store_settings.s3_bucket
    store.check()
