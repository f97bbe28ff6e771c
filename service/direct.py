"""Direct pushes: a client uploads a blob straight to the S3 store, the server checks it.

With an S3 store, a client announces a blob by its size (``offer``) and gets a multipart
upload under the store's staging prefix, with a presigned URL per part; it PUTs the parts
there, not through the server, hashing them as it goes, then sends back the capability it
was given with each part's ETag and the blob's sha256 (``finish``). The server completes
the upload, reads it once to check its size and sha256, and moves it into place by a
server-side copy; a blob that does not hash to what the client says is deleted and refused.
The blob is then stored as if uploaded through the server: a folder commit or
``folders.push_stored`` makes the version.

Nothing a client uploads this way is visible before it is checked, and nothing is kept of a
push cut off halfway: gc aborts staged multipart uploads and deletes staged objects older
than its grace period (``S3BlobStore.remove_stale_temp``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from service import dedup, hub, metrics
from service.core.names import ModelName
from service.errors import Forbidden, InvalidCheckpoint, StatehubError, TooLarge
from service.settings import Settings
from service.storage.blobs import BlobStore, S3BlobStore, validate_digest
from service.storage.db import Database

# How long the part URLs and the capability stay valid: a 64 GiB upload at 100 MB/s
# takes 11 minutes.
UPLOAD_URL_S = 3600
# S3 takes at most this many parts per upload: larger uploads get larger parts.
MAX_PARTS = 10_000
# Smaller blobs (configs, tokenizers) go through the server: one request, not three, and
# S3's smallest part.
MIN_DIRECT = 5 * 1024 * 1024


@dataclass(frozen=True)
class Offer:
    """How a client uploads a blob: through the server (not ``offered``: a local store,
    direct pushes turned off, or a small blob), or by PUTting its parts to ``part_urls``."""

    offered: bool
    upload: str | None = None  # the capability ``finish`` takes back
    part_bytes: int = 0
    part_urls: list[str] = field(default_factory=list)
    expires_in: int = 0


def offer(*, blobs: BlobStore, settings: Settings, name: ModelName, size: int) -> Offer:
    """How to upload a blob of ``size`` bytes for a push to ``name``. Its sha256 comes with
    the completion: a client hashes the blob as it sends it, not in a pass before."""
    if size > settings.max_upload_bytes:
        raise TooLarge(
            f"{size} bytes exceed the upload limit of {settings.max_upload_bytes} bytes "
            "(STATEHUB_MAX_UPLOAD_BYTES)",
            detail={"limit": settings.max_upload_bytes},
        )
    if not settings.direct_push or not isinstance(blobs, S3BlobStore) or size < MIN_DIRECT:
        return Offer(offered=False)
    part_bytes = max(settings.direct_push_part_bytes, math.ceil(size / MAX_PARTS))
    parts = max(1, math.ceil(size / part_bytes))
    staged, upload_id, urls = blobs.start_staged(parts, UPLOAD_URL_S)
    metrics.DIRECT_UPLOADS.inc("offered")
    expires = int(time.time()) + UPLOAD_URL_S
    fields = {"staged": staged, "upload_id": upload_id, "size": size, "expires": expires}
    payload = json.dumps(fields, sort_keys=True).encode()
    signature = hub.sign(settings.hub_upload_secret, name, payload.decode())
    capability = f"{base64.urlsafe_b64encode(payload).decode()}.{signature}"
    return Offer(True, capability, part_bytes, urls, UPLOAD_URL_S)


def finish(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    upload: str,
    etags: list[str],
    sha256: str,
) -> int:
    """Complete the upload ``upload`` names, check it holds the bytes of ``sha256`` and
    move it into place as that blob; its size.

    Raises:
        Forbidden: ``upload`` is not a capability this server handed out for ``name``, or
            it has expired.
        InvalidRequest: the ETags do not complete the upload.
        InvalidCheckpoint: the bytes uploaded are not the ones announced (deleted).
        InvalidRef: ``sha256`` is not a sha256.
    """
    validate_digest(sha256)
    fields = _check(settings, name, upload)
    if not isinstance(blobs, S3BlobStore):  # a capability from a server with another store
        raise Forbidden("this server's store takes no direct uploads: push through the server")
    staged, size = fields["staged"], fields["size"]
    got = blobs.finish_staged(staged, fields["upload_id"], etags)
    try:
        if got != size:
            metrics.DIRECT_UPLOADS.inc("refused")
            raise InvalidCheckpoint(
                f"the upload holds {got} bytes, not the {size} announced",
                detail={"expected": size, "actual": got},
            )
        hasher = hashlib.sha256()
        for chunk in blobs.iter_staged(staged, settings.stream_chunk_bytes):
            hasher.update(chunk)
        if hasher.hexdigest() != sha256:
            metrics.DIRECT_UPLOADS.inc("refused")
            raise InvalidCheckpoint(
                f"the uploaded bytes hash to {hasher.hexdigest()}, not {sha256}",
                detail={"expected": sha256, "actual": hasher.hexdigest()},
            )
        leases = dedup.lease(db, settings, [sha256])  # against gc, until the copy is whole
        try:
            blobs.adopt_staged(staged, sha256, size)
        finally:
            dedup.release(db, leases)
    except BaseException:
        with contextlib.suppress(StatehubError):  # else gc deletes it (remove_stale_temp)
            blobs.discard_staged(staged, fields["upload_id"])
        raise
    metrics.DIRECT_UPLOADS.inc("stored")
    metrics.BYTES_DIRECT.inc(amount=size)
    return size


def _check(settings: Settings, name: ModelName, upload: str) -> dict[str, Any]:
    """The fields a capability carries, once its signature and expiry are checked."""
    encoded, _, signature = upload.partition(".")
    try:
        payload = base64.urlsafe_b64decode(encoded.encode())
        expected = hub.sign(settings.hub_upload_secret, name, payload.decode())
        fields: dict[str, Any] = json.loads(payload)
        valid = hmac.compare_digest(expected, signature) and fields["expires"] >= time.time()
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        valid = False
    if not valid:
        raise Forbidden(
            "this upload is not valid here (expired, for another model, or not handed out by "
            "this server): ask for a new one"
        )
    return fields
