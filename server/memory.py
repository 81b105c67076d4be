"""Keep freed memory of message and working-tensor sizes in the heap while jobs come (glibc),
and give it back when they stop.

Every request and response message of a large job is a ~1 MiB bytes object (gRPC's copy of
a received message, or our encoded chunk), allocated and freed dozens of times per job, and
every engine launch allocates and frees its activations and gradients, a few MiB each for
ordinary jobs ([M, width, N] floats). glibc maps each allocation above its mmap threshold
afresh and unmaps it when freed, and returns the freed top of the heap to the system once
it passes the trim threshold, so the next message or tensor page-faults the same memory in
again. Both cost: with glibc's defaults a 64 MiB job's upload lagged raw gRPC streaming
(bench/transfer.py), and with an mmap threshold of two messages (2 MiB) a CPU server's
compute of jobs of 4 to 8 MiB activations took 1.5x to 2.5x as long as with the setting
below (bench/server_compute.py, the two back to back, two runs) and 1.3x to 3.5x the
engine's own time in a plain process.

So allocations up to glibc's largest mmap threshold (32 MiB) come from the heap, where a
freed block serves the next one of its size (a launch's backward pass reuses what its
forward pass freed), and as much freed top of the heap stays mapped: eight default-size
messages, or one block at that ceiling (with 8 MiB, an 8 MiB block freed at the top went
back and was faulted in again: a third of them in tests/server/test_memory.py's sliding
probe). Keeping 64 MiB made a streamed job's peak memory vary more (35-77 MiB of growth in
tests/server/test_streamed_jobs.py's per-sample results test; 37-45 MiB with 32 and with
8). Larger allocations are still mapped per use (the big payload buffers come from
server.buffers.BufferPool). What the heap holds freed goes back to the system once the
server has been idle for a moment (IdleRelease): three jobs of 8 MiB activations left a CPU
server ~140 MiB larger while idle (torch's huge pages hold whole 2 MiB pages of the heap),
and the release took it back to within 10 MiB of where it was.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("gradserve.server")

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold (half its 64 MiB thread-arena heaps on 64-bit).
HEAP_ALLOCATION_CEILING = 32 << 20


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve allocations up to HEAP_ALLOCATION_CEILING from the heap and keep as much freed
    at its top. Returns whether the allocator took the setting (only glibc has these
    knobs; elsewhere its own policy stays)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.info("no glibc mallopt: allocator defaults for messages and working memory")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATION_CEILING)) and bool(
        mallopt(_M_TRIM_THRESHOLD, HEAP_ALLOCATION_CEILING)
    )


def release_freed_memory() -> bool:
    """Give the heap's freed pages, in every thread's arena, back to the system (glibc's
    malloc_trim). Returns whether there was such a call to make."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


class IdleRelease:
    """Calls `release` (in a thread, through `run_in_thread`) once the server has had no
    job for `after_s` seconds: memory freed by a burst of jobs serves the jobs that follow
    it closely, and goes back to the system when they stop."""

    def __init__(
        self,
        after_s: float,
        busy: Callable[[], bool],
        run_in_thread: Callable[[Callable[[], object]], object],
        release: Callable[[], object] = release_freed_memory,
    ):
        self.after_s = after_s
        self.busy = busy
        self.run_in_thread = run_in_thread
        self.release = release
        self.releases = 0
        self._timer: asyncio.TimerHandle | None = None

    def idle(self) -> None:
        """The last job in flight has ended: release after `after_s` unless one comes."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.after_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self.busy():  # a job came since; its end schedules the next release
            return
        self.releases += 1
        self.run_in_thread(self.release)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
