"""Freed memory of message and working-tensor sizes stays mapped between uses (glibc), and
goes back to the system once the server is idle."""

import asyncio
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.process_memory import memory_bytes

# Allocate and fill 64 blocks and report the minor page faults the process took, with the
# server's setting or glibc's defaults. "window": four at a time, then all four freed (a
# stream's messages in flight); "sliding": each new block with the last three still in
# use, the oldest freed (a launch's activations and gradients). With the setting the same
# heap memory serves block after block.
PROBE = textwrap.dedent(
    """
    import resource, sys
    from gradserve.server.memory import keep_freed_memory

    block, pattern, keep = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "keep"
    took = keep_freed_memory() if keep else False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = []
    for _ in range(64):
        if pattern == "window" and len(live) == 4:
            live = []
        elif pattern == "sliding" and len(live) == 3:
            live.pop(0)
        live.append(bytearray(block))  # zero-filled: every page written
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def faults(block_bytes: int, pattern: str, keep: bool) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(block_bytes), pattern, "keep" if keep else "default"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


GLIBC = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


@GLIBC
def test_message_buffers_are_not_faulted_in_again_for_each_message():
    took, kept = faults(1 << 20, "window", keep=True)
    assert took == "True"
    _, default = faults(1 << 20, "window", keep=False)
    pages_per_block = (1 << 20) // 4096
    assert default > 32 * pages_per_block, default  # glibc's defaults: faulted anew
    assert kept < 5 * pages_per_block, kept  # the first window only


@GLIBC
@pytest.mark.parametrize("block_bytes", [3 << 20, 8 << 20, 30 << 20])
def test_working_tensors_reuse_the_memory_freed_before_them(block_bytes):
    took, kept = faults(block_bytes, "sliding", keep=True)
    assert took == "True"
    assert kept < 5 * (block_bytes // 4096), kept  # the first three blocks and the fourth


@GLIBC
def test_blocks_above_the_heap_ceiling_are_still_mapped_per_use():
    from gradserve.server.memory import HEAP_ALLOCATION_CEILING

    block = HEAP_ALLOCATION_CEILING + (16 << 20)
    _, kept = faults(block, "sliding", keep=True)
    assert kept > 32 * (block // 4096), kept  # unmapped when freed: nothing held between uses


def test_heap_release_after_an_idle_spell_and_every_few_seconds_while_busy():
    from gradserve.server.memory import HeapRelease

    now, busy, released = [0.0], [False], []
    heap = HeapRelease(
        1.0, 5.0, busy=lambda: busy[0], run_in_thread=lambda fn: fn(),
        release=lambda: released.append(now[0]), clock=lambda: now[0],
    )  # fmt: skip

    def at(t):
        now[0] = t
        heap.tick()

    at(3.0)
    assert released == []  # no job yet: nothing freed to give back
    busy[0] = True
    at(4.0)
    busy[0] = False
    heap.idle()  # the job ended at 4.0
    at(4.5)
    assert released == []  # not idle long enough
    at(5.0)
    assert released == [5.0]
    at(9.0)
    assert released == [5.0]  # idle, nothing since: no further release
    busy[0] = True  # from here a long run of jobs
    at(9.5)
    at(10.5)
    assert released == [5.0, 10.5]  # busy for five seconds since the last release
    at(12.0)
    at(15.5)
    assert released == [5.0, 10.5, 15.5] and heap.releases == 3


def test_heap_release_ticks_between_start_and_stop():
    from gradserve.server.memory import HeapRelease

    async def scenario():
        released = []
        heap = HeapRelease(
            0.02, 5.0, busy=lambda: False, run_in_thread=lambda fn: fn(),
            release=lambda: released.append(1),
        )  # fmt: skip
        heap.start()
        heap.idle()
        await asyncio.sleep(0.1)
        assert released == [1]
        heap.stop()
        heap.idle()
        await asyncio.sleep(0.1)
        assert released == [1]  # stopped: no more ticks

    asyncio.run(scenario())


@GLIBC
def test_an_idle_server_gives_back_the_memory_its_jobs_freed():
    """Jobs of 8 MiB activations (M=1024, N=64, [16, 32, 32, 1]) leave their freed memory
    in the server's heap for the next ones; a second after the last, it goes back."""
    from gradserve.client import GradientClient
    from gradserve.server.service import RELEASE_MEMORY_AFTER_IDLE_S
    from tests.servers import run_server

    rng = np.random.default_rng(5)
    m, n, sizes = 1024, 64, (16, 32, 32, 1)
    params = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        params[f"layers.{i}.weight"] = rng.standard_normal((m, b, a), dtype=np.float32) / a
        params[f"layers.{i}.bias"] = rng.standard_normal((m, b), dtype=np.float32)
    x = rng.standard_normal((m, n, sizes[0]), dtype=np.float32)
    y = rng.standard_normal((m, n, 1), dtype=np.float32)
    quiet = 2 * RELEASE_MEMORY_AFTER_IDLE_S + 0.5  # released between 1 and 1.5 idle spells
    with run_server() as server, GradientClient(server.address, timeout=60) as client:
        pid = server.process.pid
        client.compute(params, x, y)  # the first job's one-off growth (threads, arenas)
        time.sleep(quiet)
        before = memory_bytes(pid)
        for _ in range(3):
            client.compute(params, x, y)
        time.sleep(quiet)
        grown = memory_bytes(pid) - before
    # Measured here: 70 MiB more right after the jobs (torch's huge pages hold whole 2 MiB
    # pages of the heap; 141-145 MiB when the engine ran such jobs whole, not in blocks),
    # 6-8 MiB more once released.
    assert grown < 48 << 20, f"server RSS {grown >> 20} MiB above its level before the jobs"
