"""The C allocator, bounded for a server that streams tensors through worker threads.

glibc serves an allocation over its mmap threshold with a mapping of its own, returned to
the system on free, but the threshold is dynamic: once such a block is freed it rises to
that size (up to 32 MiB), so the next tensors of that size come from the heap of the
thread's arena and stay there when freed. A fetch decodes and casts pieces of megabytes on
whichever of anyio's worker threads runs the next chunk, so each thread's arena kept its
peak: one 384 MiB cast fetch grew the server by 108-122 MiB on a quiet machine and 156-184
MiB under CPU load (more threads took part), against a 150 MiB bound. A fixed threshold
(which also turns the adjustment off) maps every block from 256 KiB up and gives it back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger("statehub")

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: server memory may grow per thread")
        return False
    return True
