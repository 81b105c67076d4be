"""Dynamic batching on the CPU: 64 concurrent clients sending M=1, N=32, [16, 32, 32, 1]
jobs to a real server with batching on (default policy) and off (--batch-max-jobs 1),
same run, same load generator (`gradserve-client bench`, in its own process).
Reports throughput, p50/p99 latency and the server's peak RSS.
Usage: python bench/batching.py [--jobs-per-client J]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from bench.transfer import start  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
            server_cpu = cpu_seconds(server.pid)
            client_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            report = load([address, jobs_per_client])
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            jobs = 64 * jobs_per_client
            report["server_cpu_ms_per_job"] = 1e3 * (cpu_seconds(server.pid) - server_cpu) / jobs
            report["client_cpu_ms_per_job"] = (
                1e3
                * (after.ru_utime + after.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime)
                / jobs
            )
            return report, peak_rss_mib(server.pid)
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
                f"{r['server_cpu_ms_per_job']:.2f}",
                f"{r['client_cpu_ms_per_job']:.2f}",
                f"{rss:.0f}",
                r["errors"] or 0,
            ]
        )
    write_table(
        "batching.md",
        "Dynamic batching: 64 concurrent clients, M=1, N=32, [16, 32, 32, 1] jobs (CPU)",
        [
            "server",
            "jobs/s",
            "p50 ms",
            "p99 ms",
            "jobs per launch",
            "server CPU ms/job",
            "client CPU ms/job",
            "peak RSS MiB",
            "errors",
        ],
        rows,
        f"Throughput with batching / without: "
        f"{on['jobs_per_second'] / off['jobs_per_second']:.2f}x."
        f" {64 * args.jobs_per_client} jobs per server after a warm-up; the load generator "
        "(one asyncio process) and the server share the machine's cores, and CPU time per "
        "job shows where they go: most of a job's cost here is its gRPC stream handling, "
        "which batching cannot share, not the engine launch. Command: "
        "`python bench/batching.py`.",
    )


if __name__ == "__main__":
    main()
