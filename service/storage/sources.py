"""What every reader of stored bytes offers: a stored blob, a composed version, a verified one.

The fetch body, the blob download and integrity checks read through this protocol only, so
they never ask which kind of source they were handed (and mypy checks that each kind fits).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol


class ByteSource(Protocol):
    def read_range(self, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the blob named ``digest``."""
        ...

    def iter_range(
        self, digest: str, start: int, end: int, chunk_size: int
    ) -> Iterator[bytes | memoryview]:
        """``[start, end)`` in pieces of at most ``chunk_size`` bytes, in order."""
        ...
