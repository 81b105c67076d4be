"""A server's throughput and memory under a long load of jobs of many shapes (CPU).

Three clients send jobs back to back for --seconds, each cycling through the same 40 jobs
of random shapes (M from 64 to 1024, N from 16 to 256, widths from 16 to 128): what the
server's resident memory does while busy (sampled every 5 s), its peak, and where it is
once idle. Memory freed by one job of one shape is reused by jobs of others or given back
(server/memory.py); this shows whether it piles up instead.
Usage: python bench/mixed_load.py [--seconds S] [--heap-ceiling-bytes B1,B2,...]
(one server each, in turn: a row per --heap-ceiling-bytes value)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import numpy_ensemble, write_table  # noqa: E402
from bench.transfer import gradserve_server  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402
from gradserve.server.memory import HEAP_ALLOCATION_CEILING  # noqa: E402
from gradserve.server.service import RELEASE_MEMORY_AFTER_IDLE_S  # noqa: E402
from tests.process_memory import memory_bytes  # noqa: E402

CLIENTS, SHAPES, SAMPLE_EVERY_S = 3, 40, 5.0


def random_jobs(seed: int = 1) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    jobs = []
    for _ in range(SHAPES):
        m, n = pick.choice([64, 128, 256, 512, 1024]), pick.choice([16, 32, 64, 128, 256])
        width = pick.choice([16, 32, 48, 64, 96, 128])
        sizes = (pick.choice([8, 16, 32]), width, width, pick.choice([1, 4]))
        params, x, y = numpy_ensemble(rng, m, n, sizes)
        jobs.append((params, x, y))
    return jobs


def run_load(jobs, seconds: float, *flags: str) -> list:
    """One server under the load: its row of the table."""
    done: list[int] = []
    with gradserve_server("--device", "cpu", *flags) as (server, address):
        stop_at = time.monotonic() + seconds

        def client(offset: int) -> None:
            with GradientClient(address, timeout=300) as c:
                k = 0
                while time.monotonic() < stop_at:
                    c.compute(*jobs[(offset + k) % len(jobs)])
                    k += 1
                done.append(k)

        threads = [threading.Thread(target=client, args=(i * 13,)) for i in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        samples = []
        while any(t.is_alive() for t in threads):
            time.sleep(SAMPLE_EVERY_S)
            if time.monotonic() < stop_at:
                samples.append(memory_bytes(server.pid) >> 20)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        time.sleep(2 * RELEASE_MEMORY_AFTER_IDLE_S + 0.5)
        idle = memory_bytes(server.pid) >> 20
        peak = memory_bytes(server.pid, "VmHWM") >> 20
    busy = f"{min(samples)} / {statistics.median(samples):.0f} / {max(samples)}"
    return [f"{sum(done) / elapsed:.1f}", busy, peak, idle]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=90)
    parser.add_argument(
        "--heap-ceiling-bytes", default=f"{HEAP_ALLOCATION_CEILING},{2 << 20},0"
    )  # the default, a ceiling at two messages, and glibc's own adaptive policy
    args = parser.parse_args()
    jobs = random_jobs()
    rows = []
    for ceiling in args.heap_ceiling_bytes.split(","):
        row = run_load(jobs, args.seconds, "--heap-ceiling-bytes", ceiling)
        rows.append([f"{int(ceiling) / 2**20:g} MiB", *row])
    write_table(
        "mixed_load.md",
        f"{CLIENTS} clients, jobs of {SHAPES} shapes back to back for {args.seconds:g} s (CPU)",
        ["--heap-ceiling-bytes", "jobs/s", "server RSS MiB while busy (min / median / max)",
         "peak MiB", "idle MiB"],
        rows,
        f"One server per row, in turn; RSS sampled every {SAMPLE_EVERY_S:g} s while the "
        f"clients ran; 'idle' {2 * RELEASE_MEMORY_AFTER_IDLE_S + 0.5:g} s after they stopped. "
        "CPU figures are for comparison within this run only. Command: `python "
        "bench/mixed_load.py`.",
    )  # fmt: skip


if __name__ == "__main__":
    main()
