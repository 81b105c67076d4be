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
compute of jobs of 4 to 64 MiB activations (the largest in blocks of 4 MiB) took 1.97x to
2.46x as long as with the setting below (bench/server_compute.py --compare-ceiling 2097152,
two runs) and 1.88x to 2.86x the engine's own time in a plain process.

So allocations up to glibc's largest mmap threshold (32 MiB, --heap-ceiling-bytes by
default) come from the heap, where a freed block serves the next one of its size (a
launch's backward pass reuses what its forward pass freed), and as much freed top of the
heap stays mapped: eight default-size messages, or one block at that ceiling (with 8 MiB,
an 8 MiB block freed at the top went back and was faulted in again: a third of them in
tests/server/test_memory.py's sliding probe). Keeping 64 MiB made a streamed job's peak
memory vary more in a few runs (35-77 MiB of growth in tests/server/test_streamed_jobs.py's
per-sample results test; 37-45 MiB with 32 and with 8), though over 46 runs with 32 it
grew 75-81 MiB in three (34-45 in the rest). Larger allocations are still mapped per use
(the big payload buffers come from server.buffers.BufferPool). What the heap holds freed
goes back to the system once the server has been idle for a moment, and every few seconds
while it is busy (HeapRelease): three jobs of 8 MiB activations left a CPU server ~70 MiB
larger while idle (torch's huge pages hold whole 2 MiB pages of the heap), and the release
took it back to within 10 MiB of where it was. The cost is memory while busy: three clients
sending jobs of 40 shapes for 90 s (bench/mixed_load.py) got 1.40x the jobs/s of a 2 MiB
ceiling, and the server's memory peaked at 948 MiB where with 2 MiB at 715
(--heap-ceiling-bytes sets the ceiling; glibc's own adaptive policy did about as 32 MiB
there).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable

log = logging.getLogger("gradserve.server")

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses a larger mmap threshold (half its 64 MiB thread-arena heaps on 64-bit).
HEAP_ALLOCATION_CEILING = 32 << 20
_MESSAGES_KEPT = 8 << 20  # freed top of the heap kept at least: eight 1 MiB messages


@functools.cache
def _libc():
    """The C library, found and loaded once (find_library runs ldconfig or a compiler, and
    the release runs every few seconds while the server is busy)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(ceiling: int = HEAP_ALLOCATION_CEILING) -> bool:
    """Serve allocations up to `ceiling` bytes from the heap and keep as much freed at its
    top, and at least eight default-size messages' worth. Returns whether the allocator took
    the setting (only glibc has these knobs; elsewhere, or with a ceiling of 0, its own
    policy stays)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None or not ceiling:
        log.info("allocator defaults for messages and working memory")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, ceiling)) and bool(
        mallopt(_M_TRIM_THRESHOLD, max(ceiling, _MESSAGES_KEPT))
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


class HeapRelease:
    """Gives the heap's freed memory back to the system (`release`, run in a thread through
    `run_in_thread`) once the server has been idle for `idle_s` after a job, and every
    `busy_s` while jobs keep it busy: memory freed by one job serves the jobs that follow it
    closely, and none piles up under a long load of jobs of many sizes. Checked every
    `idle_s / 2` seconds between start() and stop()."""

    def __init__(
        self,
        idle_s: float,
        busy_s: float,
        busy: Callable[[], bool],
        run_in_thread: Callable[[Callable[[], object]], object],
        release: Callable[[], object] = release_freed_memory,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.idle_s, self.busy_s = idle_s, busy_s
        self.busy = busy
        self.run_in_thread = run_in_thread
        self.release = release
        self.clock = clock
        self.released_at = clock()
        self.idle_since: float | None = None  # the last job's end, unless released since
        self.releases = 0
        self._timer: asyncio.TimerHandle | None = None

    def idle(self) -> None:
        """The last job in flight has ended."""
        self.idle_since = self.clock()

    def tick(self) -> None:
        now = self.clock()
        if self.busy():
            due = now - self.released_at >= self.busy_s
        else:
            due = self.idle_since is not None and now - self.idle_since >= self.idle_s
        if due:
            self.idle_since = None
            self.released_at = now
            self.releases += 1
            self.run_in_thread(self.release)

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.idle_s / 2, self._tick)

    def _tick(self) -> None:
        self.tick()
        self.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
