"""Verified reads: stored bytes reach a response only if they hash to their digest.

A blob's sha256 is its name, so any read of a whole blob can be checked; the question is
only when the answer is known, since a response streams:

- **Up to ``settings.verify_buffer_bytes``**: the blob is read whole and checked *before*
  the response starts, and served from memory. A mismatch is a clean ``500
  storage_error`` with a JSON body.
- **Larger, read whole and in order** (``GET .../blob``, an ``exact`` fetch passed
  through): streamed while hashed, with the last byte held back until the whole blob is
  hashed. On a mismatch the stream raises instead of sending that byte: the connection
  closes short of ``Content-Length``, so no client takes the body for complete (the
  statehub client also compares the digest). A ranged request still hashes the whole
  blob: the bytes outside the range are read and hashed, not sent.
- **Larger, to a client that verifies** (the statehub client sends
  ``X-Statehub-Client-Verifies: sha256`` and checks every body announced with
  ``X-Statehub-Body-Digest``): streamed without a second pass here; the client's check is
  the end-to-end one, and it raises instead of returning tensors.
- **Larger, read in pieces** (a fetch that rewrites or transforms tensors): read as they
  are, unverified; the plan's header and the client's length check are all that guard
  them. SECURITY.md lists this gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator

from service.errors import StorageError
from service.storage.sources import ByteSource

log = logging.getLogger("statehub")


class BlobCorrupted(StorageError):
    """A stored blob does not hash to its digest (``code`` stays ``storage_error``)."""


def _check(digest: str, actual: str) -> None:
    if actual != digest:
        log.error("blob %s is corrupted: its content hashes to %s", digest, actual)
        raise BlobCorrupted(
            f"stored blob {digest} is corrupted (its content hashes to {actual}); it is not served",
            detail={"digest": digest, "actual": actual},
        )


def read_verified(blobs: ByteSource, digest: str, size: int) -> bytes:
    data = blobs.read_range(digest, 0, size)
    _check(digest, hashlib.sha256(data).hexdigest())
    return data


def iter_verified(
    blobs: ByteSource, digest: str, size: int, start: int, end: int, chunk: int
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of the blob; the very last byte only once the whole blob
    checks (one byte is enough to keep a body short, and costs no memory)."""
    hasher = hashlib.sha256()
    held = b""
    position = 0
    with contextlib.closing(blobs.iter_range(digest, 0, size, chunk)) as stream:  # type: ignore[type-var]
        for data in stream:
            begin, position = position, position + len(data)
            hasher.update(data)
            lo, hi = max(start, begin), min(end, position)
            if lo >= hi:
                continue
            piece = memoryview(data)[lo - begin : hi - begin]
            if held:
                yield held
            if len(piece) > 1:
                yield piece[:-1]
            held = bytes(piece[-1:])
    _check(digest, hasher.hexdigest())
    if held:
        yield held


CLIENT_VERIFIES = "x-statehub-client-verifies"


def client_verifies(header: str | None) -> bool:
    """The client checks the sha256 of bodies announced with ``X-Statehub-Body-Digest``
    (the value of its ``X-Statehub-Client-Verifies`` header)."""
    return (header or "").strip().lower() == "sha256"


class VerifiedBlob:
    """One stored blob, read the way this module describes; a drop-in for the two read
    methods of a ``ByteSource`` that the blob download and the fetch body use.

    Args:
        whole_in_order: the caller reads ``[start, end)`` in one ``iter_range`` call (a
            download, a passthrough fetch), so a large blob can be verified while it streams.
        client_verifies: the client checks the body's sha256 itself (it said so with
            ``X-Statehub-Client-Verifies``): a large blob streams without a second pass
            here. Small blobs are still checked before the response, for a clean error.
    """

    def __init__(
        self,
        blobs: ByteSource,
        digest: str,
        size: int,
        *,
        buffer_limit: int,
        whole_in_order: bool,
        client_verifies: bool = False,
    ) -> None:
        self._blobs = blobs
        self._digest = digest
        self._size = size
        self._whole_in_order = whole_in_order
        self._client_verifies = client_verifies
        # Read and checked now, before any response starts, when small enough.
        self._data = read_verified(blobs, digest, size) if size <= buffer_limit else None

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        assert digest == self._digest
        if self._data is not None:
            return self._data[start:end]
        return self._blobs.read_range(digest, start, end)

    def iter_range(
        self, digest: str, start: int, end: int, chunk_size: int
    ) -> Iterator[bytes | memoryview]:
        assert digest == self._digest
        if self._data is not None:
            view = memoryview(self._data)
            steps = range(start, end, chunk_size)
            return (view[i : min(i + chunk_size, end)] for i in steps)
        if self._whole_in_order and not self._client_verifies:
            return iter_verified(self._blobs, digest, self._size, start, end, chunk_size)
        return self._blobs.iter_range(digest, start, end, chunk_size)
