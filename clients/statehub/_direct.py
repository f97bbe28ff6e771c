"""Direct pushes: a blob uploaded straight to the registry's S3 store, not through it.

The server offers a multipart upload with a presigned URL per part (``POST .../uploads``);
the parts are PUT there, several at once, from the stream of the blob (memory: the parts in
flight), hashed on the way, and the server checks what arrived against that sha256 before
storing it (``POST .../uploads/complete``). A local store, an older server or a small blob
get no offer, and a store this machine cannot reach falls back: the caller then uploads
through the server as before.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from statehub._errors import (
    ConnectionFailed,
    IntegrityError,
    NotFound,
    StatehubWarning,
    StorageError,
)

if TYPE_CHECKING:
    from statehub._client import Client, Progress

# Parts uploading at once: S3 serves each connection at a fraction of a client's bandwidth.
IN_FLIGHT = 4
PART_ATTEMPTS = 3


def upload(
    client: Client,
    model: str,
    size: int,
    body: Callable[[], Iterable[bytes | memoryview]],
    progress: Progress | None = None,
    *,
    sha256: str | None = None,
) -> str | None:
    """Store the blob of ``size`` bytes that ``body()`` streams straight in the store,
    hashing it on the way (a caller that knows its sha256 has it checked against that);
    its sha256, or None when the server wants it through itself (nothing was sent)."""
    try:
        offer = client._json("POST", f"/v1/models/{model}/uploads", json={"size": size})
    except NotFound:
        return None  # a server without direct pushes
    if not offer["offered"]:
        return None
    hasher = hashlib.sha256()
    parts = _parts(body(), offer["part_bytes"], hasher)
    try:
        etags = _put_parts(offer["part_urls"], parts, size, progress)
    except ConnectionFailed as exc:  # a store the server reaches, but not this machine
        warnings.warn(
            f"the registry's blob store cannot be reached from here ({exc}): uploading "
            "through the server instead (the server's STATEHUB_S3_PUBLIC_ENDPOINT names "
            "the address clients reach the store at)",
            StatehubWarning,
            stacklevel=3,
        )
        return None
    digest = hasher.hexdigest()
    if sha256 is not None and digest != sha256:
        raise IntegrityError(f"the blob hashed to {digest} while uploading, not {sha256}")
    client._json(
        "POST",
        f"/v1/models/{model}/uploads/complete",
        json={"upload": offer["upload"], "etags": etags, "sha256": digest},
        timeout=httpx.Timeout(None, connect=10.0),  # the server reads the blob back
        retry=False,  # a completed upload cannot complete again: a retry would be refused
    )
    return digest


def _parts(stream: Iterable[bytes | memoryview], part_bytes: int, hasher: Any) -> Iterator[bytes]:
    """The stream cut into parts of ``part_bytes`` (the last one shorter), hashed."""
    buffer = bytearray()
    for chunk in stream:
        hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            take = min(part_bytes - len(buffer), len(view))
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == part_bytes:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def _put_parts(
    urls: list[str], parts: Iterator[bytes], size: int, progress: Progress | None
) -> list[str]:
    """PUT each part to its URL, ``IN_FLIGHT`` at a time; each part's ETag, in order."""
    slots = threading.BoundedSemaphore(IN_FLIGHT)
    done = 0
    lock = threading.Lock()
    if progress is not None:
        progress(0, size)

    def put(url: str, data: bytes, store: httpx.Client) -> str:
        nonlocal done
        try:
            etag = _put(store, url, data)
        finally:
            slots.release()
        with lock:
            done += len(data)
            if progress is not None:
                progress(done, size)
        return etag

    futures: list[Future[str]] = []
    with (
        httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as store,
        ThreadPoolExecutor(IN_FLIGHT) as pool,
    ):
        for number, data in enumerate(parts):
            if number >= len(urls):
                raise IntegrityError(f"the blob grew past the {size} bytes announced")
            slots.acquire()  # at most IN_FLIGHT parts in memory
            failed = next((f for f in futures if f.done() and f.exception()), None)
            if failed is not None:
                slots.release()
                failed.result()  # raises: no point sending the rest
            futures.append(pool.submit(put, urls[number], data, store))
        if len(futures) != len(urls):
            raise IntegrityError(f"the blob is shorter than the {size} bytes announced")
        return [future.result() for future in futures]


def _put(store: httpx.Client, url: str, data: bytes) -> str:
    """One part, retried on connection errors and 5xx (a part PUT again is the same part)."""
    for attempt in range(PART_ATTEMPTS):
        if attempt:
            time.sleep(0.25 * 2**attempt)
        try:
            response = store.put(url, content=data)
        except httpx.TransportError as exc:
            if attempt + 1 == PART_ATTEMPTS:
                raise ConnectionFailed(f"cannot reach the blob store: {exc}") from exc
            continue
        if response.status_code < 500 or attempt + 1 == PART_ATTEMPTS:
            break
    if response.status_code != 200 or "ETag" not in response.headers:
        raise StorageError(
            f"the blob store refused a part ({response.status_code}): {response.text[:300]}"
        )
    return str(response.headers["ETag"])


def file_stream(path: Path, chunk: int) -> Iterator[bytes]:
    """A file's bytes in blocks of ``chunk``."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            yield block
