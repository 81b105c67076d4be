"""Keep message-sized allocations in the heap (glibc).

Every request and response message of a large job is a ~1 MiB bytes object (gRPC's copy of
a received message, or our encoded chunk), allocated and freed dozens of times per job.
glibc's defaults serve such sizes from the heap but return the freed top of the heap to
the system once it passes a small, self-adjusting trim threshold, so the next message
page-faults the same memory in again: on the 2-core test VM that was a large part of the
gap between a 64 MiB job's upload and raw gRPC streaming (bench/transfer.py). Fixing the
mmap threshold above a default-size message and the trim threshold at a few messages'
worth keeps that memory mapped; larger buffers are still mapped per use (and the big
payload buffers come from server.buffers.BufferPool).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("gradserve.server")

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_message_memory(chunk_bytes: int) -> bool:
    """Serve allocations up to twice chunk_bytes (a message and its framing) from the heap
    and keep up to eight of them freed at its top. Larger allocations keep being mapped
    per use, as by default: a lower ceiling kept the server's memory where it was for
    streamed jobs (a 4 MiB one let it settle ~30 MiB higher). Returns whether the
    allocator took the setting (only glibc has these knobs; elsewhere its own policy
    stays)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no glibc mallopt: allocator defaults for message buffers")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_threshold = min(2 * chunk_bytes, 1 << 30)
    trim_threshold = min(8 * chunk_bytes, 1 << 30)
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
