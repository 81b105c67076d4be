"""Dynamic batching on the CPU: 64 concurrent clients sending M=1, N=32, [16, 32, 32, 1]
jobs to a real server with batching on (default policy) and off (--batch-max-jobs 1),
same run, same load generator (`gradserve-client bench`, in its own process).
Reports throughput, p50/p99 latency and the server's peak RSS.
Usage: python bench/batching.py [--jobs-per-client J]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from bench.transfer import start  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) / 1024


def load(args: list) -> dict:
    """`gradserve-client bench` in its own process: 64 clients, J jobs each."""
    address, jobs = args
    cmd = [sys.executable, "-m", "gradserve.client", "--address", address, "bench",
           "--concurrency", "64", "--jobs-per-client", str(jobs), "--layer-sizes", "16,32,32,1",
           "--models", "1", "--samples", "32", "--json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run(flags: list[str], jobs_per_client: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "gradserve.server",
            "--port",
            "0",
            "--port-file",
            f"{tmp}/port",
            "--log-level",
            "WARNING",
            *flags,
        ]
        server, address = start(cmd, f"{tmp}/port")
        try:
            load([address, 2])  # warm-up: connections, allocator, first launches
            return load([address, jobs_per_client]), peak_rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs-per-client", type=int, default=20)
    args = parser.parse_args()
    on, rss_on = run([], args.jobs_per_client)
    off, rss_off = run(["--batch-max-jobs", "1"], args.jobs_per_client)
    rows = []
    for name, r, rss in (
        ("batching on (default policy)", on, rss_on),
        ("batching off (--batch-max-jobs 1)", off, rss_off),
    ):
        rows.append(
            [
                name,
                r["jobs_per_second"],
                r["p50_ms"],
                r["p99_ms"],
                r["mean_jobs_per_launch"],
                f"{rss:.0f}",
                r["errors"] or 0,
            ]
        )
    write_table(
        "batching.md",
        "Dynamic batching: 64 concurrent clients, M=1, N=32, [16, 32, 32, 1] jobs (CPU)",
        ["server", "jobs/s", "p50 ms", "p99 ms", "jobs per launch", "peak RSS MiB", "errors"],
        rows,
        f"Throughput with batching / without: "
        f"{on['jobs_per_second'] / off['jobs_per_second']:.2f}x."
        f" {64 * args.jobs_per_client} jobs per server after a warm-up; client and server share "
        "the machine's cores. Command: `python bench/batching.py`.",
    )


if __name__ == "__main__":
    main()
