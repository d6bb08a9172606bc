"""glibc malloc settings for a process that handles multi-megabyte request bodies.

By default glibc hands a freed block of more than ~128 KB back to the kernel (munmap, or trimming
the top of a heap, which thread arenas do eagerly), so the next request's buffers of that size
start on fresh pages and every 4 KB page costs a page fault. A 12 MP upload is copied a few times
per request (joined from its chunks, split out of its multipart body): thousands of page faults
per body, nearly none with the settings below (measured in bench/RESULTS.md). Both settings are needed:
fixing only the trim threshold also fixes glibc's adaptive mmap threshold at its 128 KB start.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(megabytes: int) -> bool:
    """Serve allocations under `megabytes` from the heap and keep up to that much freed memory at
    the top of each heap for reuse. Returns whether it applied: glibc only (elsewhere, or with 0,
    the C library's defaults stay). Call before starting threads; forked children inherit it."""
    if megabytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    limit = megabytes * 1024 * 1024
    return bool(mallopt(_M_MMAP_THRESHOLD, limit)) and bool(mallopt(_M_TRIM_THRESHOLD, limit))
