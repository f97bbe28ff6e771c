"""The server fixes glibc's mmap threshold at start (service/allocator.py): on this Linux
machine the call must take effect, or the fetch memory bounds hold only on a quiet machine."""

from __future__ import annotations

import sys

import pytest

from service.allocator import bound_allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_mmap_threshold_is_fixed_on_linux() -> None:
    assert bound_allocator() is True
