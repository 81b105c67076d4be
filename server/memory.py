"""Keep freed job memory in the process heap for the next job.

glibc serves every allocation above its mmap threshold (at most 32 MiB by default) with a
fresh mmap and unmaps it on free, so each large job's buffers page-fault in anew: on the
2-core test VM, filling a fresh 64 MiB buffer takes twice as long as refilling a reused one,
and that fault cost was the largest part of the gap between a 64 MiB job's transfer and raw
gRPC streaming (bench/transfer.py). Raising the mmap and trim thresholds to a bound keeps
up to that many freed bytes mapped for reuse; the process's memory then stays near its
largest recent job (at most the bound above it) instead of returning to the baseline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gradserve.server")

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(limit_bytes: int) -> bool:
    """Let the heap hold up to limit_bytes of freed memory for reuse (0 leaves the
    allocator's defaults). Returns whether the allocator took the setting: only glibc has
    these knobs; elsewhere the server runs with its allocator's own policy."""
    if limit_bytes <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: freed job memory returns to the system")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    value = min(limit_bytes, (1 << 31) - 1)  # mallopt takes a C int
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))
