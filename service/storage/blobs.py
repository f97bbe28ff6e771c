"""Content-addressed blob stores: a local directory and any S3-compatible bucket.

A blob is stored once under the sha256 digest of its content, at
``blobs/sha256/<first 2 hex>/<digest>`` (on S3 below ``settings.s3_prefix``). Digests are
validated (exactly 64 lowercase hex characters) before any path or key is built, so nothing
outside the blob prefix can be addressed.

Third-party exceptions (``OSError`` from the file system, boto3 ``ClientError`` and botocore
connection errors) are translated here and nowhere else, chained with ``from exc``:

    BlobNotFound (StorageError)   the blob is not in the store
    StorageError                  the store holds something wrong (e.g. a blob shorter than
                                  the range asked for) or failed in an unexpected way
    StorageUnavailable            the store cannot be reached or used right now: connection
                                  errors, timeouts, 5xx / SlowDown, a missing bucket, denied
                                  access, a full disk

Ranges are half-open ``[start, end)``: the caller validates ranges against the blob's size
(``RangeNotSatisfiable`` belongs to the API); a range past the end of a stored blob means the
blob is not what the metadata says it is, and raises ``StorageError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from service.errors import InvalidRef, InvalidRequest, StorageError, StorageUnavailable
from service.settings import Settings

__all__ = [
    "BlobNotFound",
    "BlobStore",
    "LocalBlobStore",
    "S3BlobStore",
    "StoredBlob",
    "blob_key",
    "open_blob_store",
    "validate_digest",
]

log = logging.getLogger(__name__)

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# Direct pushes upload under this folder of the store, each to a random name, and are moved
# into place once checked (``S3BlobStore.adopt_staged``).
STAGING_DIR = "staging"
_STAGED_RE = re.compile(r"[0-9a-f]{32}")
# The largest object S3 copies in one CopyObject request.
_MAX_COPY_BYTES = 5 * 1024**3
# What S3 answers a completion whose parts do not add up: the client's mistake, not ours.
_STAGED_PART_CODES = frozenset(
    {"InvalidPart", "InvalidPartOrder", "NoSuchUpload", "EntityTooSmall", "MalformedXML"}
)
_INCOMPLETE = ".incomplete"
_COPY_BUFFER = 8 * 1024 * 1024

# S3 error codes that mean "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
    }
)
# S3 error codes that mean "our credentials or policy do not let us in".
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
    }
)


class BlobNotFound(StorageError):
    """The blob is not in the store (``code`` stays ``storage_error``: metadata points at it)."""


@dataclass(frozen=True)
class StoredBlob:
    """A listing entry, for garbage collection."""

    digest: str
    size: int
    modified: datetime  # aware, UTC


def validate_digest(digest: object) -> str:
    """Return ``digest`` if it is exactly 64 lowercase hex characters, else raise ``InvalidRef``."""
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        shown = repr(digest)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidRef(
            f"invalid blob digest {shown}: expected a sha256 hex digest "
            "(exactly 64 lowercase characters 0-9a-f)"
        )
    return digest


def blob_key(digest: str) -> str:
    """The store-relative key of a blob: ``blobs/sha256/<first 2 hex>/<digest>``."""
    digest = validate_digest(digest)
    return f"blobs/sha256/{digest[:2]}/{digest}"


def _check_range(start: int, end: int) -> int:
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end < start:
        raise ValueError(f"invalid byte range [{start!r}, {end!r}): need 0 <= start <= end")
    return end - start


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _short_blob(digest: str, start: int, end: int, got: int) -> StorageError:
    return StorageError(
        f"blob {digest} is shorter than expected: asked for bytes [{start}, {end}), "
        f"the store returned {got} of {end - start}",
        detail={"digest": digest, "start": start, "end": end, "returned": got},
    )


@runtime_checkable
class BlobStore(Protocol):
    """What the server needs from a blob store. All digests are sha256 hex (validated)."""

    def put_file(self, digest: str, path: Path) -> bool:
        """Store the content of ``path`` under ``digest``; ``False`` if it was already stored.

        The caller has hashed the file. The write is atomic: the blob is visible whole or not
        at all. ``path`` is handed over: the store may move it (the local store does when it
        can); afterwards the caller removes it with ``path.unlink(missing_ok=True)``.
        """
        ...

    def exists(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int:
        """Size in bytes. Raises ``BlobNotFound``."""
        ...

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``. Raises ``BlobNotFound``, ``StorageError`` if too short."""
        ...

    def iter_range(self, digest: str, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        """Stream ``[start, end)`` in chunks of at most ``chunk_size`` bytes.

        The blob is opened (or its ranged GET sent) before this returns, so ``BlobNotFound``
        is raised here rather than mid-stream. The returned iterator has ``close()``; it is
        also closed when exhausted or garbage collected.
        """
        ...

    def delete(self, digest: str) -> None:
        """Remove the blob; deleting a missing blob is not an error."""
        ...

    def iter_digests(self) -> Iterator[str]:
        """Every stored digest, in no particular order (for garbage collection)."""
        ...

    def iter_stored(self) -> Iterator[StoredBlob]:
        """Every stored blob with its size and modification time (for garbage collection)."""
        ...

    def remove_stale_temp(self, older_than: datetime, *, dry_run: bool = False) -> list[str]:
        """Remove what interrupted writes left behind before ``older_than`` (temp files,
        unfinished multipart uploads); returns their names."""
        ...

    def check(self) -> None:
        """Readiness probe: raise ``StorageUnavailable`` if the store cannot be used."""
        ...

    def presigned_url(self, digest: str, expires_s: int) -> str | None:
        """A URL that serves the blob directly for ``expires_s`` seconds, or ``None``."""
        ...


class _RangeStream(Iterator[bytes]):
    """An iterator of chunks that owns an open resource (a file, an HTTP body).

    The resource is released when the stream is exhausted, fails, is closed, or is garbage
    collected (even if it was never iterated), so no ``ResourceWarning`` leaks.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> _RangeStream:
        return self

    def __next__(self) -> bytes:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        release, self._release = self._release, None
        if release is None:
            return
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            release()

    def __enter__(self) -> _RangeStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _empty_stream() -> _RangeStream:
    return _RangeStream(iter(()), lambda: None)


# --------------------------------------------------------------------------------------------
# Local directory
# --------------------------------------------------------------------------------------------


def _read_chunks(
    read: Callable[[int], bytes],
    errors: Callable[[], AbstractContextManager[None]],
    digest: str,
    start: int,
    end: int,
    chunk_size: int,
) -> Iterator[bytes]:
    """``[start, end)`` from an open reader in chunks; its errors translated by ``errors``."""
    length = remaining = end - start
    while remaining:
        with errors():
            data = read(min(chunk_size, remaining))
        if not data:
            raise _short_blob(digest, start, end, length - remaining)
        remaining -= len(data)
        yield data


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class LocalBlobStore:
    """Blobs as files under ``root`` (``root/blobs/sha256/<2 hex>/<digest>``).

    Writes are atomic: the content goes to a unique ``<digest>.<random>.incomplete`` file in
    the blob's directory, is fsynced, then linked into place without replacing an existing
    blob, and the directory is fsynced. The temp file is removed in ``finally``, so an
    interrupted put leaves nothing visible.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, digest: str) -> Path:
        digest = validate_digest(digest)
        return self._blobs / digest[:2] / digest

    @contextlib.contextmanager
    def _os_errors(self, digest: str) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise BlobNotFound(
                f"blob {digest} not found in {self.root}", detail={"digest": digest}
            ) from exc
        except OSError as exc:
            if _is_disk_full(exc):
                raise StorageUnavailable(f"disk full under {self.root}: {exc}") from exc
            raise StorageError(f"cannot access blob {digest} under {self.root}: {exc}") from exc

    def put_file(self, digest: str, path: Path) -> bool:
        """Move (same file system) or copy ``path`` into the store under ``digest``.

        Args:
            digest: sha256 hex digest of the file's content, computed by the caller.
            path: the file to store. Handed over: on the same file system it is renamed into
                the store (nothing is copied) and is gone afterwards; otherwise it is copied
                and left in place. The caller unlinks it with ``missing_ok=True`` afterwards.

        Returns:
            ``True`` if the blob was written, ``False`` if it was already stored (the
            existing blob is kept and ``path`` is not touched).

        Raises:
            InvalidRef: ``digest`` is not a sha256 hex digest (before any I/O).
            FileNotFoundError: ``path`` does not exist (the store is left unchanged).
            StorageUnavailable: not enough free space.
            StorageError: any other file-system error.
        """
        dest = self._path(digest)
        source = Path(path)
        if dest.is_file():
            return False
        tmp = dest.with_name(f"{digest}.{secrets.token_hex(8)}{_INCOMPLETE}")
        took_source = False
        try:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._move_or_copy(source, tmp)
                took_source = True
                _fsync_file(tmp)
                try:
                    # A hard link is an atomic rename that never replaces: if a concurrent put
                    # stored the same digest first, its blob is kept.
                    os.link(tmp, dest)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in (
                        errno.EPERM,
                        errno.ENOTSUP,
                        errno.EOPNOTSUPP,
                        errno.EMLINK,
                    ):
                        raise
                    if dest.is_file():
                        return False
                    os.replace(tmp, dest)  # file systems without hard links
                _fsync_dir(dest.parent)
                return True
            except FileNotFoundError as exc:
                if not took_source and not source.exists():
                    raise  # the caller's file vanished: not a storage error
                raise StorageError(f"cannot store blob {digest} under {self.root}: {exc}") from exc
            except StorageError:
                raise
            except OSError as exc:
                if _is_disk_full(exc):
                    raise StorageUnavailable(
                        f"disk full: cannot store blob {digest} under {self.root}: {exc}"
                    ) from exc
                raise StorageError(f"cannot store blob {digest} under {self.root}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _move_or_copy(self, source: Path, tmp: Path) -> None:
        try:
            os.rename(source, tmp)  # same file system: no copy
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        size = source.stat().st_size
        free = shutil.disk_usage(tmp.parent).free
        if free < size:
            raise StorageUnavailable(
                f"disk full: blob of {size} bytes needs more than the {free} bytes free "
                f"under {self.root}",
                detail={"needed": size, "free": free},
            )
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, _COPY_BUFFER)

    def exists(self, digest: str) -> bool:
        path = self._path(digest)
        with self._os_errors(digest):
            return path.is_file()

    def size(self, digest: str) -> int:
        path = self._path(digest)
        with self._os_errors(digest):
            return path.stat().st_size

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        path = self._path(digest)
        length = _check_range(start, end)
        with self._os_errors(digest):
            if length == 0:
                size = path.stat().st_size
                if start > size:
                    raise _short_blob(digest, start, end, 0)
                return b""
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(length)
        if len(data) != length:
            raise _short_blob(digest, start, end, len(data))
        return data

    def iter_range(self, digest: str, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        path = self._path(digest)
        length = _check_range(start, end)
        _check_chunk_size(chunk_size)
        if length == 0:
            self.read_range(digest, start, end)  # existence and bounds
            return _empty_stream()
        with self._os_errors(digest):
            f = open(path, "rb")  # noqa: SIM115 - owned by the returned stream
            try:
                f.seek(start)
            except BaseException:
                f.close()
                raise

        chunks = _read_chunks(
            f.read, lambda: self._os_errors(digest), digest, start, end, chunk_size
        )
        return _RangeStream(chunks, f.close)

    def delete(self, digest: str) -> None:
        path = self._path(digest)
        with self._os_errors(digest):
            path.unlink(missing_ok=True)

    def iter_digests(self) -> Iterator[str]:
        try:
            shards = sorted(os.scandir(self._blobs), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot list blobs under {self.root}: {exc}") from exc
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                with os.scandir(shard.path) as entries:
                    names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot list blobs under {shard.path}: {exc}") from exc
            for name in names:
                if _DIGEST_RE.fullmatch(name) and name[:2] == shard.name:
                    yield name

    def iter_stored(self) -> Iterator[StoredBlob]:
        for digest in self.iter_digests():
            try:
                stat = self._path(digest).stat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            except OSError as exc:
                raise StorageError(f"cannot stat blob {digest} under {self.root}: {exc}") from exc
            yield StoredBlob(digest, stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC))

    def remove_stale_temp(self, older_than: datetime, *, dry_run: bool = False) -> list[str]:
        removed = []
        cutoff = older_than.timestamp()
        for path in sorted(self._blobs.glob(f"??/*{_INCOMPLETE}")):
            try:
                if path.is_symlink() or path.stat().st_mtime >= cutoff:
                    continue
                if not dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StorageError(f"cannot remove {path}: {exc}") from exc
            removed.append(str(path.relative_to(self.root)))
        return removed

    def check(self) -> None:
        try:
            self._blobs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"blob directory {self._blobs} is not usable: {exc}") from exc
        if not os.access(self._blobs, os.W_OK | os.X_OK):
            raise StorageUnavailable(f"blob directory {self._blobs} is not writable")

    def presigned_url(self, digest: str, expires_s: int) -> str | None:
        validate_digest(digest)
        return None


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------


class S3BlobStore:
    """Blobs as objects in an S3-compatible bucket (AWS, MinIO, Ceph, moto).

    Configured from ``Settings`` (``s3_endpoint``, ``s3_bucket``, ``s3_prefix``,
    ``s3_region``, keys, multipart threshold and chunk, timeouts and attempts; the keyword
    arguments override the last three). Objects appear atomically (a single
    PUT or a completed multipart upload); an interrupted multipart upload is aborted by the
    transfer manager; a bucket lifecycle rule that aborts incomplete multipart uploads is
    still recommended for crashes.

    Note: S3 answers a HEAD on a missing bucket with a bare 404, so ``exists`` / ``size``
    cannot tell it from a missing blob; ``check()`` and every GET/PUT can.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
        max_pool_connections: int = 32,
    ) -> None:
        if not settings.s3_bucket:
            raise ValueError("S3BlobStore needs settings.s3_bucket (STATEHUB_S3_BUCKET)")
        self.bucket = settings.s3_bucket
        self.endpoint = settings.s3_endpoint or None
        prefix = settings.s3_prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self._transfer = TransferConfig(
            multipart_threshold=settings.s3_multipart_threshold,
            multipart_chunksize=settings.s3_multipart_chunk,
            max_concurrency=8,
            preferred_transfer_client="classic",
        )
        config = Config(
            signature_version="s3v4",
            region_name=settings.s3_region or None,
            # Bounded so that an outage answers 503 in seconds (settings.py), not minutes.
            connect_timeout=connect_timeout or settings.s3_connect_timeout_s,
            read_timeout=read_timeout or settings.s3_read_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts or settings.s3_max_attempts},
            max_pool_connections=max_pool_connections,
            # Custom endpoints (MinIO, Ceph) rarely have wildcard DNS for virtual hosts.
            s3={"addressing_style": "path" if self.endpoint else "auto"},
        )
        credentials: dict[str, str] = {}
        if settings.s3_access_key_id or settings.s3_secret_access_key:
            credentials = {
                "aws_access_key_id": settings.s3_access_key_id,
                "aws_secret_access_key": settings.s3_secret_access_key,
            }
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=settings.s3_region or None,
            config=config,
            **credentials,
        )
        # Presigned URLs are for clients: signed for the address they reach the store at.
        public = settings.s3_public_endpoint or None
        self._signer: Any = self._client
        if public and public != self.endpoint:
            self._signer = session.client(
                "s3",
                endpoint_url=public,
                region_name=settings.s3_region or None,
                config=config,
                **credentials,
            )
        self._region = settings.s3_region

    def __repr__(self) -> str:
        where = self.endpoint or "aws"
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={where!r})"

    def _key(self, digest: str) -> str:
        return self.prefix + blob_key(digest)

    # -- exception translation (the only place boto3/botocore errors are caught) -------------

    def _where(self) -> str:
        return f"bucket {self.bucket!r} at {self.endpoint or 'AWS S3'}"

    def _from_client_error(self, exc: ClientError, digest: str | None) -> StorageError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or code
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        operation = getattr(exc, "operation_name", "request")
        if code == "NoSuchBucket" or (digest is None and code in ("404", "NotFound")):
            return StorageUnavailable(
                f"S3 bucket {self.bucket!r} does not exist at {self.endpoint or 'AWS S3'}: "
                "create it or fix STATEHUB_S3_BUCKET",
                detail={"bucket": self.bucket},
            )
        if digest is not None and code in ("NoSuchKey", "404", "NotFound"):
            return BlobNotFound(
                f"blob {digest} not found in {self._where()}", detail={"digest": digest}
            )
        if code in ("InvalidRange", "416"):
            return StorageError(
                f"blob {digest} is shorter than the range asked for in {self._where()}",
                detail={"digest": digest},
            )
        if code in _TRANSIENT_CODES or status >= 500:
            return StorageUnavailable(
                f"S3 {operation} failed on {self._where()}, try again later: {code}: {message}"
            )
        if code in _ACCESS_CODES or status == 403:
            return StorageUnavailable(
                f"S3 {operation} denied on {self._where()} ({code}): check "
                "STATEHUB_S3_ACCESS_KEY_ID / STATEHUB_S3_SECRET_ACCESS_KEY and the bucket policy"
            )
        return StorageError(f"S3 {operation} failed on {self._where()}: {code}: {message}")

    @contextlib.contextmanager
    def _s3_errors(self, digest: str | None = None) -> Iterator[None]:
        """Translate boto3/botocore exceptions raised in the block, most specific first."""
        try:
            yield
        except ClientError as exc:
            raise self._from_client_error(exc, digest) from exc
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError):
                raise self._from_client_error(cause, digest) from exc
            raise StorageError(f"S3 upload to {self._where()} failed: {exc}") from exc
        except (BotoConnectionError, HTTPClientError, IncompleteReadError) as exc:
            # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError, SSLError,
            # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError, short bodies.
            raise StorageUnavailable(f"S3 {self._where()} cannot be reached: {exc}") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StorageUnavailable(
                f"no usable S3 credentials for {self._where()}: set "
                "STATEHUB_S3_ACCESS_KEY_ID / STATEHUB_S3_SECRET_ACCESS_KEY"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 request to {self._where()} failed: {exc}") from exc

    # -- BlobStore --------------------------------------------------------------------------

    def _head(self, digest: str) -> dict[str, Any] | None:
        key = self._key(digest)
        try:
            with self._s3_errors(digest):
                head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=key)
                return head
        except BlobNotFound:
            return None

    def put_file(self, digest: str, path: Path) -> bool:
        """Upload ``path`` under ``digest`` (multipart above ``s3_multipart_threshold``).

        Skips the upload when an object of the same size is already stored and returns
        ``False``. ``path`` is read, not removed; the caller unlinks it afterwards.

        Raises:
            InvalidRef: ``digest`` is not a sha256 hex digest (before any I/O).
            FileNotFoundError: ``path`` does not exist.
            StorageUnavailable: the endpoint cannot be reached, the bucket is missing, ...
            StorageError: any other S3 failure.
        """
        key = self._key(digest)
        size = Path(path).stat().st_size
        head = self._head(digest)
        if head is not None:
            if int(head["ContentLength"]) == size:
                return False
            log.warning(
                "blob %s in %s has %s bytes, expected %s: uploading it again",
                digest,
                self._where(),
                head["ContentLength"],
                size,
            )
        with self._s3_errors(digest):
            self._client.upload_file(
                os.fspath(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        return True

    def exists(self, digest: str) -> bool:
        return self._head(digest) is not None

    def size(self, digest: str) -> int:
        key = self._key(digest)
        with self._s3_errors(digest):
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    def _get_range(self, digest: str, start: int, end: int) -> Any:
        """One ranged GET for ``[start, end)`` (non-empty); returns the streaming body."""
        key = self._key(digest)
        with self._s3_errors(digest):
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
        body = response["Body"]
        length = int(response.get("ContentLength", -1))
        if length != end - start:
            body.close()
            raise _short_blob(digest, start, end, max(length, 0))
        return body

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        self._key(digest)  # validate before anything else
        length = _check_range(start, end)
        if length == 0:
            if start > self.size(digest):
                raise _short_blob(digest, start, end, 0)
            return b""
        body = self._get_range(digest, start, end)
        try:
            with self._s3_errors(digest):
                data: bytes = body.read()
        finally:
            body.close()
        if len(data) != length:
            raise _short_blob(digest, start, end, len(data))
        return data

    def iter_range(self, digest: str, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        self._key(digest)
        length = _check_range(start, end)
        _check_chunk_size(chunk_size)
        if length == 0:
            self.read_range(digest, start, end)  # existence and bounds
            return _empty_stream()
        body = self._get_range(digest, start, end)

        chunks = _read_chunks(
            body.read, lambda: self._s3_errors(digest), digest, start, end, chunk_size
        )
        return _RangeStream(chunks, body.close)

    def delete(self, digest: str) -> None:
        key = self._key(digest)
        with self._s3_errors(digest):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def iter_digests(self) -> Iterator[str]:
        return (blob.digest for blob in self.iter_stored())

    def iter_stored(self) -> Iterator[StoredBlob]:
        root = self.prefix + "blobs/sha256/"
        paginator = self._client.get_paginator("list_objects_v2")
        with self._s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root):
                for item in page.get("Contents", ()):
                    shard, _, name = item["Key"][len(root) :].partition("/")
                    if _DIGEST_RE.fullmatch(name) and name[:2] == shard:
                        yield StoredBlob(name, int(item["Size"]), item["LastModified"])

    def remove_stale_temp(self, older_than: datetime, *, dry_run: bool = False) -> list[str]:
        """Abort multipart uploads under the blob and staging prefixes started before
        ``older_than``, and delete staged objects older than that (direct pushes that never
        finished)."""
        removed = []
        uploads = self._client.get_paginator("list_multipart_uploads")
        objects = self._client.get_paginator("list_objects_v2")
        with self._s3_errors():
            for root in (self.prefix + "blobs/", f"{self.prefix}{STAGING_DIR}/"):
                for page in uploads.paginate(Bucket=self.bucket, Prefix=root):
                    for upload in page.get("Uploads", ()):
                        if upload["Initiated"] >= older_than:
                            continue
                        if not dry_run:
                            self._client.abort_multipart_upload(
                                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                            )
                        removed.append(f"multipart:{upload['Key']}")
            for page in objects.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}{STAGING_DIR}/"):
                for item in page.get("Contents", ()):
                    if item["LastModified"] >= older_than:
                        continue
                    if not dry_run:
                        self._client.delete_object(Bucket=self.bucket, Key=item["Key"])
                    removed.append(f"staged:{item['Key']}")
        return removed

    def check(self) -> None:
        try:
            with self._s3_errors():
                self._client.head_bucket(Bucket=self.bucket)
        except StorageUnavailable:
            raise
        except StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc

    # -- staged uploads: a client uploads straight to the bucket (service.direct) ----------

    def _staged_key(self, name: str) -> str:
        if _STAGED_RE.fullmatch(name) is None:
            raise InvalidRef(f"invalid staged upload name {name[:80]!r}")
        return f"{self.prefix}{STAGING_DIR}/{name}"

    def start_staged(self, part_count: int, expires_s: int) -> tuple[str, str, list[str]]:
        """A multipart upload under the staging prefix, and a presigned URL for each part.

        Returns its name (a random hex string), its S3 upload id, and the part URLs in order.
        """
        name = secrets.token_hex(16)
        key = self._staged_key(name)
        with self._s3_errors():
            upload_id: str = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
            )["UploadId"]
            urls = [
                self._signer.generate_presigned_url(
                    "upload_part",
                    Params={
                        "Bucket": self.bucket,
                        "Key": key,
                        "UploadId": upload_id,
                        "PartNumber": number,
                    },
                    ExpiresIn=expires_s,
                )
                for number in range(1, part_count + 1)
            ]
        return name, upload_id, urls

    def finish_staged(self, name: str, upload_id: str, etags: list[str]) -> int:
        """Complete a staged upload from its parts' ETags (part 1 first); its size.

        Raises:
            InvalidRequest: the parts do not complete the upload (missing, wrong ETag, or
                the upload is gone: aborted, completed, expired).
        """
        key = self._staged_key(name)
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, start=1)]
        try:
            with self._s3_errors():
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except StorageError as exc:
            cause = exc.__cause__
            code = (
                cause.response.get("Error", {}).get("Code")
                if isinstance(cause, ClientError)
                else ""
            )
            if code in _STAGED_PART_CODES:
                raise InvalidRequest(
                    f"the parts sent do not complete the upload ({code}): upload every part "
                    "to its URL, then send each part's ETag in order",
                    detail={"s3_code": code},
                ) from exc
            raise
        with self._s3_errors():
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        return int(head["ContentLength"])

    def iter_staged(self, name: str, chunk_size: int) -> Iterator[bytes]:
        """A completed staged upload's bytes, in order (one GET)."""
        key = self._staged_key(name)
        _check_chunk_size(chunk_size)
        with self._s3_errors():
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            while True:
                with self._s3_errors():
                    chunk: bytes = body.read(chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def adopt_staged(self, name: str, digest: str, size: int) -> None:
        """Move a completed staged upload into place as blob ``digest`` (a server-side copy:
        one request up to S3's 5 GiB limit on a copy, parts above it), then delete the
        staged object."""
        key = self._key(digest)
        source = {"Bucket": self.bucket, "Key": self._staged_key(name)}
        with self._s3_errors(digest):
            if size <= _MAX_COPY_BYTES:
                self._client.copy_object(
                    CopySource=source,
                    Bucket=self.bucket,
                    Key=key,
                    ContentType="application/octet-stream",
                    MetadataDirective="REPLACE",
                )
            else:
                self._client.copy(
                    source,
                    self.bucket,
                    key,
                    ExtraArgs={"ContentType": "application/octet-stream"},
                    Config=self._transfer,
                )
        self.discard_staged(name, None)

    def discard_staged(self, name: str, upload_id: str | None) -> None:
        """Delete a staged object, or abort its upload where ``upload_id`` is given."""
        key = self._staged_key(name)
        with self._s3_errors():
            if upload_id is not None:
                try:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                        raise
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def presigned_url(self, digest: str, expires_s: int) -> str | None:
        key = self._key(digest)
        if not isinstance(expires_s, int) or expires_s <= 0:
            raise ValueError(f"expires_s must be a positive int, got {expires_s!r}")
        with self._s3_errors(digest):
            url: str = self._signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=expires_s,
            )
        return url

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests and development setups)."""
        try:
            self.check()
            return
        except StorageUnavailable as exc:
            missing = isinstance(exc.__cause__, ClientError) and str(
                exc.__cause__.response.get("Error", {}).get("Code")
            ) in ("404", "NotFound", "NoSuchBucket")
            if not missing:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region and self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            with self._s3_errors():
                self._client.create_bucket(**kwargs)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in (
                "BucketAlreadyOwnedByYou",
            ):
                return
            raise


def open_blob_store(settings: Settings) -> BlobStore:
    """The configured store: S3 when ``settings.s3_bucket`` is set, else ``data_dir``."""
    if settings.uses_s3:
        return S3BlobStore(settings)
    return LocalBlobStore(settings.data_dir)
