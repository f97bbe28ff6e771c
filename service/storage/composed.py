"""A version's bytes composed of ranges of stored blobs, read as if they were one blob.

Tensor-level deduplication stores a version whose tensors mostly exist already as a list
of *extents*: its header and new tensors in a blob of their own, every other tensor as a
range of the blob that first brought it. ``ComposedBlob`` offers the two read methods of a
``BlobStore`` over that list, so the fetch and download paths (and the verification of
``service.integrity``) read a composed version exactly like a whole one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import StorageError
from service.storage.blobs import BlobStore
from service.storage.sources import ByteSource


@dataclass(frozen=True)
class Extent:
    blob: str  # digest of the blob holding these bytes
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_json(self) -> list[Any]:
        return [self.blob, self.start, self.end]

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> Extent:
        blob, start, end = value
        return cls(str(blob), int(start), int(end))


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Drop empty extents and join those adjacent in the same blob (one read, not many)."""
    merged: list[Extent] = []
    for extent in extents:
        if extent.length == 0:
            continue
        last = merged[-1] if merged else None
        if last is not None and last.blob == extent.blob and last.end == extent.start:
            merged[-1] = Extent(last.blob, last.start, extent.end)
        else:
            merged.append(extent)
    return merged


# Pieces of one blob at most this far apart are read together (the gap is dropped): the
# tiny tensors a deduplicated push stores anew sit between the large shared ones.
COALESCE_GAP = 64 * 1024
# A composed range is streamed in windows of this many bytes, each read at once.
STREAM_WINDOW = 8 * 1024 * 1024


class ComposedBlob:
    """The logical bytes ``[0, size)`` of a composed version; ``digest`` is its name."""

    def __init__(self, blobs: BlobStore, digest: str, extents: Sequence[Extent]) -> None:
        self._blobs = blobs
        self._digest = digest
        self._extents = list(extents)
        self._starts: list[int] = []  # logical offset where each extent begins
        position = 0
        for extent in self._extents:
            self._starts.append(position)
            position += extent.length
        self.size = position

    def _pieces(self, start: int, end: int) -> Iterator[tuple[Extent, int, int]]:
        """(extent, physical start, physical end) for the logical range ``[start, end)``."""
        if start < 0 or end > self.size or start > end:
            raise StorageError(f"range [{start}, {end}) is outside composed blob {self._digest}")
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < end and index < len(self._extents):
            extent, base = self._extents[index], self._starts[index]
            lo, hi = start - base, min(end - base, extent.length)
            yield extent, extent.start + lo, extent.start + hi
            start = base + hi
            index += 1

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        """The range as few reads as its extents allow: the pieces in one blob at most
        ``COALESCE_GAP`` apart are one read (a deduplicated version alternates between the
        blob of its new tensors and the blobs it shares, tensor by tensor)."""
        assert digest == self._digest
        pieces = list(self._pieces(start, end))
        if len(pieces) == 1:
            extent, lo, hi = pieces[0]
            return self._blobs.read_range(extent.blob, lo, hi)
        spans: dict[str, list[list[int]]] = {}
        for extent, lo, hi in sorted(pieces, key=lambda p: (p[0].blob, p[1])):
            runs = spans.setdefault(extent.blob, [])
            if runs and runs[-1][0] <= lo <= runs[-1][1] + COALESCE_GAP:
                runs[-1][1] = max(runs[-1][1], hi)
            else:
                runs.append([lo, hi])
        read: dict[str, list[tuple[int, bytes]]] = {
            blob: [(lo, self._blobs.read_range(blob, lo, hi)) for lo, hi in runs]
            for blob, runs in spans.items()
        }
        out = bytearray()
        for extent, lo, hi in pieces:
            runs_read = read[extent.blob]
            index = bisect.bisect_right([r[0] for r in runs_read], lo) - 1
            base, data = runs_read[index]
            out += memoryview(data)[lo - base : hi - base]
        return bytes(out)

    def iter_range(self, digest: str, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        """The range in order: an extent piece of at least ``STREAM_WINDOW`` bytes (a shard
        of a folder version) as one stream of its blob, runs of smaller pieces (the
        tensor-by-tensor alternation of a deduplicated version) in windows read as
        ``read_range`` reads. Memory: one window; requests: one per large piece, about one
        per window and blob for the small ones."""
        assert digest == self._digest
        if start < 0 or end > self.size or start > end:
            raise StorageError(f"range [{start}, {end}) is outside composed blob {self._digest}")
        window = max(chunk_size, STREAM_WINDOW)
        run_start = position = start  # logical bytes [run_start, position) are small pieces
        for extent, lo, hi in self._pieces(start, end):
            if hi - lo >= window:
                yield from self._windows(run_start, position, window, chunk_size)
                yield from self._blobs.iter_range(extent.blob, lo, hi, chunk_size)
                run_start = position + hi - lo
            position += hi - lo
        yield from self._windows(run_start, position, window, chunk_size)

    def _windows(self, start: int, end: int, window: int, chunk_size: int) -> Iterator[bytes]:
        for lo in range(start, end, window):
            data = self.read_range(self._digest, lo, min(lo + window, end))
            if len(data) <= chunk_size:
                yield data
                continue
            for offset in range(0, len(data), chunk_size):
                yield data[offset : offset + chunk_size]


def version_bytes(blobs: BlobStore, digest: str, extents: Sequence[Any] | None) -> ByteSource:
    """What a version's bytes are read from: its blob in ``blobs``, or the composition its
    ``extents`` describe (both offer ``read_range``/``iter_range`` under ``digest``)."""
    if extents is None:
        return blobs
    return ComposedBlob(blobs, digest, [Extent.from_json(e) for e in extents])
