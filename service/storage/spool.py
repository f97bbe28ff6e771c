"""Spooling request bodies to disk while hashing them: never the whole body in memory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.errors import StorageUnavailable, TooLarge


@dataclass(frozen=True)
class Spooled:
    path: Path
    size: int
    digest: str


class SpoolFile:
    """A unique ``.incomplete`` file in the spool directory, removed unless handed over."""

    def __init__(
        self,
        spool_dir: Path,
        *,
        max_bytes: int,
        min_free_bytes: int,
        expected_bytes: int | None = None,
    ):
        spool_dir.mkdir(parents=True, exist_ok=True)
        if expected_bytes is not None and expected_bytes > max_bytes:
            raise TooLarge(
                f"upload of {expected_bytes} bytes exceeds the limit of {max_bytes} bytes",
                detail={"bytes": expected_bytes, "limit": max_bytes},
            )
        free = shutil.disk_usage(spool_dir).free
        if free - (expected_bytes or 0) < min_free_bytes:
            raise StorageUnavailable(
                "the server's spool disk is full; try again later",
                detail={"free_bytes": free},
            )
        self.path = spool_dir / f"{uuid.uuid4().hex}.incomplete"
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard
        self._hash = hashlib.sha256()
        self._size = 0
        self._max_bytes = max_bytes

    def write(self, chunk: bytes | memoryview) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise TooLarge(
                f"upload exceeds the limit of {self._max_bytes} bytes",
                detail={"limit": self._max_bytes},
            )
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as exc:
            raise StorageUnavailable(f"cannot spool the upload: {exc.strerror}") from exc

    def finish(self) -> Spooled:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return Spooled(self.path, self._size, self._hash.hexdigest())

    def discard(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the flush on close too
            self._file.close()
        self.path.unlink(missing_ok=True)


def spool_bytes(spool_dir: Path, data: bytes, *, min_free_bytes: int) -> Spooled:
    """``data`` as a spooled file (hashed, fsynced), for bytes the server holds already:
    a header it built, a file a commit carried inline."""
    spool = SpoolFile(spool_dir, max_bytes=max(len(data), 1), min_free_bytes=min_free_bytes)
    try:
        spool.write(data)
        return spool.finish()
    except BaseException:
        spool.discard()
        raise


def hash_file(path: Path, chunk: int = 8 * 1024 * 1024) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size
