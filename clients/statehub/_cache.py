"""The client's cache of fetched and pulled bodies, kept the way huggingface_hub keeps one.

A fetch body depends only on the version and the plan, which its ETag names; the server
answers a request that names the ETag it would send (``If-None-Match``) with ``304`` and no
body. So the cache keeps each body once, by its sha256, and remembers per request (server,
path, target and policy) which ETag and body it got. Under ``STATEHUB_CACHE`` (default
``~/.cache/statehub``)::

    blobs/<sha256>          a body, exactly as received (its digest checked before it lands)
    blobs/<sha256>.checked  "<size> <mtime_ns>" of the body when it was checked; its own
                            mtime is the body's last use (the LRU order)
    requests/<key>.json     {"etag", "digest", "size", "ref", "kind"} of one request
    answers/<key>.json      a small JSON answer kept for offline use (a snapshot's listing)
    tmp/                    bodies being received (``.incomplete``)
    lock                    held (flock) while bodies land or are evicted

Writes are atomic (``.incomplete`` + rename), so a reader sees a whole file or none; the
lock keeps the size bound exact when several processes store at once. A body is trusted
while its size and mtime are those recorded when its digest was checked; one changed since
(an edit, a truncation, a copy from elsewhere) is hashed again before it is read and
dropped if it no longer matches, so a corrupted entry is fetched afresh, never loaded.
(Hashing every read would cost more than the load it guards: 0.07 s per 100 MB here.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: atomic renames still keep entries whole; the bound is loose
    fcntl = None  # type: ignore[assignment]

GiB = 1024**3
DEFAULT_MAX_BYTES = 50 * GiB
STALE_INCOMPLETE_S = 24 * 3600
_SHA256 = re.compile(r"[0-9a-f]{64}")  # a body still arriving after a day was abandoned


def default_root() -> Path:
    return Path(os.environ.get("STATEHUB_CACHE") or "~/.cache/statehub").expanduser()


def offline_from_env() -> bool:
    return os.environ.get("STATEHUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def max_bytes_from_env() -> int:
    value = os.environ.get("STATEHUB_CACHE_MAX_BYTES", "").strip()
    return int(value) if value else DEFAULT_MAX_BYTES


@dataclass
class CachedBody:
    """A cached body, open: eviction by another process cannot take it away mid-read."""

    handle: io.BufferedReader
    digest: str
    size: int
    etag: str

    def close(self) -> None:
        self.handle.close()


@dataclass(frozen=True)
class CacheEntry:
    """One request the cache answers, as ``statehub cache ls`` shows it."""

    kind: str
    ref: str
    digest: str
    size: int
    last_used: float


class Cache:
    """Bodies under ``root``, at most ``max_bytes`` of them (least recently used go first)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self._blobs = self.root / "blobs"
        self._requests = self.root / "requests"
        self._tmp = self.root / "tmp"
        self._answers = self.root / "answers"

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> Cache:
        """The cache at ``root`` (default ``STATEHUB_CACHE``), bounded by
        ``STATEHUB_CACHE_MAX_BYTES``."""
        return cls(root if root is not None else default_root(), max_bytes_from_env())

    @staticmethod
    def key(*parts: Any) -> str:
        """The name of a request: a digest of what determines its answer."""
        canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, key: str) -> CachedBody | None:
        """The body last received for this request, open, or None."""
        record = self._record(key)
        if record is None:
            return None
        blob = self._blobs / record["digest"]
        try:
            handle = open(blob, "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            return None
        digest = record["digest"]
        stat = os.fstat(handle.fileno())
        if self._checked(digest) != (stat.st_size, stat.st_mtime_ns):
            # Changed since it was checked (or never checked): hash it again, or drop it.
            if stat.st_size != record["size"] or _sha256_of(handle) != digest:
                handle.close()
                self.drop(digest)
                return None
            self._mark_checked(digest, stat)
        marker = self._blobs / f"{digest}.checked"
        with contextlib.suppress(FileNotFoundError):
            os.utime(marker)  # used now: the LRU order
        return CachedBody(handle, digest, record["size"], record["etag"])

    def drop(self, digest: str) -> None:
        """Forget a body that failed its check; requests naming it become misses."""
        with self._locked():
            self._remove_body(digest)

    # -- writing ---------------------------------------------------------------------------

    def can_hold(self, size: int) -> bool:
        """Whether a body of ``size`` bytes may be kept (the bound, the free disk)."""
        if size > self.max_bytes:
            return False
        self._tmp.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self._tmp).free > size

    def receive(self, key: str, *, kind: str, ref: str) -> Receiver:
        """Somewhere to write a body as it arrives, for the request ``key``."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        return Receiver(self, key, kind, ref)

    def store(
        self, handle: IO[bytes], key: str, *, digest: str, etag: str, kind: str, ref: str
    ) -> None:
        """Move a received body, its digest checked, into place and record the request;
        then evict down to the bound."""
        handle.flush()
        os.fsync(handle.fileno())
        size = handle.tell()
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._requests.mkdir(parents=True, exist_ok=True)
        blob = self._blobs / digest
        with self._locked():
            os.replace(handle.name, blob)  # equal content if another process stored it too
            self._mark_checked(digest, blob.stat())
            record = {"etag": etag, "digest": digest, "size": size, "kind": kind, "ref": ref}
            _write_atomic(self._requests / f"{key}.json", json.dumps(record).encode(), self._tmp)
            self._evict(self.max_bytes, keep=digest)

    def remember(self, key: str, answer: Any) -> None:
        """Keep a small JSON answer (a version's file listing) for offline use."""
        self._answers.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._answers / f"{key}.json", json.dumps(answer).encode(), self._tmp)

    def recall(self, key: str) -> Any | None:
        try:
            return json.loads((self._answers / f"{key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    # -- housekeeping ----------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """The requests the cache can answer, most recently used first."""
        used = {digest: last for digest, _, last in self._bodies()}
        found = []
        for path in sorted(self._requests.glob("*.json")) if self._requests.exists() else []:
            record = self._record(path.stem)
            if record is not None and record["digest"] in used:
                found.append(
                    CacheEntry(
                        record["kind"],
                        record["ref"],
                        record["digest"],
                        record["size"],
                        used[record["digest"]],
                    )
                )
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def size(self) -> int:
        return sum(size for _, size, _ in self._bodies())

    def prune(self, max_bytes: int | None = None) -> int:
        """Evict least recently used bodies down to ``max_bytes`` (default the bound), and
        forget requests whose body is gone and abandoned downloads. Returns bytes freed."""
        with self._locked():
            return self._evict(self.max_bytes if max_bytes is None else max_bytes)

    def verify(self) -> list[str]:
        """Hash every body again (a change on disk that kept its size and mtime escapes the
        check on lookup); drop the ones that no longer match. Returns their digests."""
        bad = []
        for digest, _, _ in self._bodies():
            try:
                with open(self._blobs / digest, "rb") as handle:
                    matches = _sha256_of(handle) == digest
            except FileNotFoundError:
                continue
            if not matches:
                self.drop(digest)
                bad.append(digest)
        return bad

    def clear(self) -> int:
        """Remove everything; returns the bytes freed."""
        freed = self.prune(0)
        for path in self._answers.glob("*.json") if self._answers.exists() else []:
            path.unlink(missing_ok=True)
        return freed

    def _evict(self, max_bytes: int, *, keep: str = "") -> int:
        """Under the lock: the oldest bodies go until the rest fit in ``max_bytes``."""
        bodies = sorted(self._bodies(), key=lambda body: body[2])
        total = sum(size for _, size, _ in bodies)
        freed = 0
        for digest, size, _ in bodies:
            if total <= max_bytes:
                break
            if digest == keep:
                continue
            self._remove_body(digest)
            total -= size
            freed += size
        # Requests whose body is gone: read every record only when a body just went (or
        # when asked to prune), not on each store (a store is every fetch's last step).
        if freed or not keep:
            for path in self._requests.glob("*.json") if self._requests.exists() else []:
                record = self._record(path.stem)
                if record is None or not (self._blobs / record["digest"]).exists():
                    path.unlink(missing_ok=True)
        cutoff = time.time() - STALE_INCOMPLETE_S
        for path in self._tmp.glob("*.incomplete") if self._tmp.exists() else []:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff or max_bytes == 0:
                    path.unlink()
        return freed

    def _remove_body(self, digest: str) -> None:
        for name in (digest, f"{digest}.checked"):
            (self._blobs / name).unlink(missing_ok=True)

    def _bodies(self) -> list[tuple[str, int, float]]:
        """(digest, size, last use) of every stored body."""
        found = []
        for path in self._blobs.iterdir() if self._blobs.exists() else []:
            if "." in path.name:
                continue
            try:
                size = path.stat().st_size
                last = (self._blobs / f"{path.name}.checked").stat().st_mtime
            except FileNotFoundError:
                last = 0.0  # never checked (a crash between the two writes): first to go
            found.append((path.name, size, last))
        return found

    def _record(self, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads((self._requests / f"{key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        # A record names a file to open and, if it fails its check, to delete: only a
        # sha256 may name one (never a path), and the rest must be what store() writes.
        if not isinstance(record, dict) or not _SHA256.fullmatch(str(record.get("digest"))):
            return None
        if not isinstance(record.get("size"), int) or not isinstance(record.get("etag"), str):
            return None
        record.setdefault("kind", "fetch")
        record.setdefault("ref", "?")
        return record

    def _checked(self, digest: str) -> tuple[int, int] | None:
        try:
            size, mtime_ns = (self._blobs / f"{digest}.checked").read_text().split()
            return int(size), int(mtime_ns)
        except (FileNotFoundError, ValueError):
            return None

    def _mark_checked(self, digest: str, stat: os.stat_result) -> None:
        marker = f"{stat.st_size} {stat.st_mtime_ns}".encode()
        _write_atomic(self._blobs / f"{digest}.checked", marker, self._tmp)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield


class Receiver:
    """A body written to ``tmp/`` as its chunks pass through ``wrap``; ``commit`` moves it
    into the cache once its digest is known, ``close`` removes what was not committed."""

    def __init__(self, cache: Cache, key: str, kind: str, ref: str) -> None:
        self._cache = cache
        self._key = key
        self._kind = kind
        self._ref = ref
        self._path = cache._tmp / f"{uuid.uuid4().hex}.incomplete"
        self._handle = open(self._path, "wb")  # noqa: SIM115 - closed by close()
        self._failed = False

    def wrap(self, chunks: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        """``chunks`` as they are, written to the cache on the way; a write that fails (the
        disk filled meanwhile) ends the writing, never the caller's transfer."""
        for chunk in chunks:
            if not self._failed:
                try:
                    self._handle.write(chunk)
                except OSError as exc:
                    self._failed = True
                    warnings.warn(f"statehub cache: cannot keep {self._ref}: {exc}", stacklevel=2)
            yield chunk

    def commit(self, *, digest: str, etag: str, size: int) -> None:
        """Keep the body (its ``size`` bytes hash to ``digest``, checked by the caller).
        A cache that cannot take it (a full disk, a clear meanwhile) costs nothing but the
        next fetch's bytes."""
        try:
            if not self._failed and self._handle.tell() == size:
                self._cache.store(
                    self._handle,
                    self._key,
                    digest=digest,
                    etag=etag,
                    kind=self._kind,
                    ref=self._ref,
                )
        except OSError as exc:
            warnings.warn(f"statehub cache: cannot keep {self._ref}: {exc}", stacklevel=3)
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()
        self._path.unlink(missing_ok=True)


def _sha256_of(handle: io.BufferedReader) -> str:
    handle.seek(0)
    digest = hashlib.file_digest(handle, "sha256").hexdigest()
    handle.seek(0)
    return digest


def _write_atomic(path: Path, data: bytes, tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    partial = tmp / f"{uuid.uuid4().hex}.incomplete"
    partial.write_bytes(data)
    os.replace(partial, path)
