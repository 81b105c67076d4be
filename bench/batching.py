"""Dynamic batching on the CPU: 64 concurrent clients sending M=1, N=32, [16, 32, 32, 1]
jobs to a real server with batching on (default policy) and off (--batch-max-jobs 1),
same run, same load generator (`gradserve-client bench`, in its own process), and the raw
grpcio peer: the same 64 callers making one-message echo calls of the job's size against
bench/echo_server.py. Reports throughput, p50/p99 latency, CPU per job of server and
client, the server's peak RSS, and the most batching could gain on this machine.
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
from bench.common import median_seconds, write_table  # noqa: E402
from bench.transfer import start  # noqa: E402
from gradserve.client._job import JobOptions, build_job  # noqa: E402
from gradserve.client._loadgen import random_ensemble  # noqa: E402
from gradserve.client._models import normalize  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) / 1024


LAYER_SIZES, SAMPLES, CONCURRENCY = [16, 32, 32, 1], 32, 64
LONE_JOBS = 300


def gradserve_load(address: str, jobs: int, concurrency: int = CONCURRENCY) -> dict:
    """`gradserve-client bench` in its own process: 64 clients, `jobs` jobs each."""
    cmd = [sys.executable, "-m", "gradserve.client", "--address", address, "bench",
           "--concurrency", str(concurrency), "--jobs-per-client", str(jobs),
           "--layer-sizes", ",".join(map(str, LAYER_SIZES)), "--models", "1",
           "--samples", str(SAMPLES), "--json"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def echo_load(address: str, calls: int, nbytes: int, concurrency: int = CONCURRENCY) -> dict:
    """bench/echo_load.py in its own process: the same callers, raw grpcio, no service."""
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "echo_load.py"), address,
           str(concurrency), str(calls), str(nbytes)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads(out.stdout)
    report["jobs_per_second"] = report.pop("calls_per_second")
    return report


def measure(
    server_cmd: list[str], port_file: str, load, per_client: int, concurrency: int = CONCURRENCY
) -> tuple[dict, float]:
    """Start the server, warm it up, run the load; adds CPU ms per job of both sides."""
    server, address = start(server_cmd, port_file)
    try:
        load(address, 2)  # warm-up: connections, allocator, first launches
        server_cpu = cpu_seconds(server.pid)
        client_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = load(address, per_client)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        jobs = concurrency * per_client
        report["server_cpu_ms_per_job"] = 1e3 * (cpu_seconds(server.pid) - server_cpu) / jobs
        client_seconds = after.ru_utime + after.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime
        report["client_cpu_ms_per_job"] = 1e3 * client_seconds / jobs
        return report, peak_rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait()


def run(flags: list[str], per_client: int, concurrency: int = CONCURRENCY) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gradserve.server", "--port", "0", "--port-file",
               f"{tmp}/port", "--log-level", "WARNING", *flags]  # fmt: skip
        load = lambda address, n: gradserve_load(address, n, concurrency)  # noqa: E731
        return measure(cmd, f"{tmp}/port", load, per_client, concurrency)


def run_echo(nbytes: int, per_client: int, concurrency: int = CONCURRENCY) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
               f"{tmp}/port"]  # fmt: skip
        load = lambda address, n: echo_load(address, n, nbytes, concurrency)  # noqa: E731
        return measure(cmd, f"{tmp}/port", load, per_client, concurrency)


def request_bytes() -> int:
    """Bytes one of the benchmark's jobs sends (header and tensors, as the client sends)."""
    params, x, y = random_ensemble(LAYER_SIZES, 1, SAMPLES)
    job = build_job(normalize(params), x, y, None, JobOptions())
    return sum(len(message) for message in job.requests())


def launch_ms(models: int) -> float:
    """Median torch-engine time of one launch of `models` of the benchmark's networks."""
    import torch

    from gradserve.kernels import EnsembleJob, engines
    from gradserve.kernels.spec import Activation, LossSpec, MLPSpec

    params, x, y = random_ensemble(LAYER_SIZES, models, SAMPLES)
    n_layers = len(LAYER_SIZES) - 1
    job = EnsembleJob(
        mlp=MLPSpec(tuple(LAYER_SIZES), Activation("relu"), Activation("identity")),
        loss=LossSpec(),
        weights=[torch.from_numpy(params[f"layers.{i}.weight"]) for i in range(n_layers)],
        biases=[torch.from_numpy(params[f"layers.{i}.bias"]) for i in range(n_layers)],
        inputs=torch.from_numpy(x),
        targets=torch.from_numpy(y),
    )
    cpu = torch.device("cpu")
    return 1e3 * median_seconds(lambda: engines.run(job, "torch", cpu), repeats=200, warmup=20)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs-per-client", type=int, default=20)
    args = parser.parse_args()
    per_client = args.jobs_per_client
    nbytes = request_bytes()
    on, rss_on = run([], per_client)
    off, rss_off = run(["--batch-max-jobs", "1"], per_client)
    echo, rss_echo = run_echo(nbytes, per_client)
    # A lone caller, one job after another: what the batch delay would cost it.
    lone, _ = run([], LONE_JOBS, concurrency=1)
    lone_echo, _ = run_echo(nbytes, LONE_JOBS, concurrency=1)
    one, per_64 = launch_ms(1), launch_ms(CONCURRENCY) / CONCURRENCY
    rows = []
    for name, r, rss in (
        ("batching on (default policy)", on, rss_on),
        ("batching off (--batch-max-jobs 1)", off, rss_off),
        (f"raw grpcio echo, {nbytes} B each way, no service", echo, rss_echo),
    ):
        rows.append(
            [
                name,
                r["jobs_per_second"],
                r["p50_ms"],
                r["p99_ms"],
                r.get("mean_jobs_per_launch", ""),
                f"{r['server_cpu_ms_per_job']:.2f}",
                f"{r['client_cpu_ms_per_job']:.2f}",
                f"{rss:.0f}",
                r.get("errors") or 0,
            ]
        )
    grpc_cost = echo["server_cpu_ms_per_job"] + echo["client_cpu_ms_per_job"]
    ideal = (grpc_cost + one) / (grpc_cost + per_64)
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
        f"{on['jobs_per_second'] / off['jobs_per_second']:.2f}x. "
        f"{CONCURRENCY * per_client} jobs (calls) per server after a warm-up; each load "
        "generator (one asyncio process, a channel per client) shares the machine's cores "
        "with its server.\n\n"
        f"What batching can save here: the torch engine takes {one:.3f} ms for a launch of "
        f"one of these jobs and {per_64:.3f} ms per job in a launch of 64 (in-process, same "
        f"run), while gRPC alone costs {grpc_cost:.2f} ms of CPU per call (raw echo row, "
        "server + client). Where throughput is bound by CPU, it goes as 1 / CPU per job, "
        "and batching can only remove the launch cost: whatever a service's per-job cost c "
        f"(at least gRPC's), its gain is (c + {one:.3f}) / (c + {per_64:.3f}), at most "
        f"({grpc_cost:.2f} + {one:.3f}) / ({grpc_cost:.2f} + {per_64:.3f}) = {ideal:.2f}x on "
        "these cores. The measured ratio can exceed that because without batching the "
        "launches also queue one by one on the engine thread, which then waits for the "
        "event loop's GIL.\n\n"
        f"A lone caller (one client, {LONE_JOBS} jobs one after another, default policy): "
        f"p50 {lone['p50_ms']:.3f} ms per job; the raw echo of the same bytes p50 "
        f"{lone_echo['p50_ms']:.3f} ms ({lone['p50_ms'] / lone_echo['p50_ms']:.2f}x). Its "
        "jobs launch at once rather than waiting the batch delay (2 ms) for company: "
        "every job the server holds is queued. Command: `python bench/batching.py`.",
    )


if __name__ == "__main__":
    main()
