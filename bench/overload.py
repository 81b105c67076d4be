"""A burst larger than the server admits: twelve ~166 MB jobs (M=16, N=40000, [64, 64, 1],
per-model inputs) against a real CPU server whose --max-inflight-bytes holds one of them.
The same jobs go one after another (the peer: nothing is refused), through compute_many
with all twelve in flight and the client's default retry policy (refusals carry a retry
pushback; the client waits and retries until room frees up), from four separate clients
with three jobs each (no client hears of another's jobs ending: only the pushback paces
their retries), and with NO_RETRIES (how many a client that does not retry loses). Same
server, same run, repeated; reports each repeat's ratio to the one-after-another time.
Usage: python bench/overload.py [--repeats R]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from bench.transfer import gradserve_server  # noqa: E402
from gradserve.client import NO_RETRIES, GradientClient, GradserveError  # noqa: E402

JOBS, MODELS, SAMPLES, SIZES = 12, 16, 40000, [64, 64, 1]
CLIENTS = 4
INFLIGHT_BYTES = 250_000_000  # one job's payload and results fit, two do not


def make_job() -> dict:
    rng = np.random.default_rng(0)
    params = {}
    for i, (d_in, d_out) in enumerate(zip(SIZES, SIZES[1:], strict=False)):
        params[f"layers.{i}.weight"] = rng.standard_normal((MODELS, d_out, d_in), np.float32)
        params[f"layers.{i}.bias"] = rng.standard_normal((MODELS, d_out), np.float32)
    inputs = rng.standard_normal((MODELS, SAMPLES, SIZES[0]), np.float32)
    targets = rng.standard_normal((MODELS, SAMPLES, SIZES[-1]), np.float32)
    return dict(model=params, inputs=inputs, targets=targets)


def separate_clients(address: str, job: dict) -> None:
    """CLIENTS clients, each with its share of the jobs one after another, all at once."""

    def share(_) -> None:
        with GradientClient(address, timeout=600) as client:
            for _ in range(JOBS // CLIENTS):
                client.compute(**job)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(share, range(CLIENTS)))


def timed(fn) -> tuple[float, list]:
    started = time.perf_counter()
    results = fn()
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    job = make_job()
    job_mb = sum(a.nbytes for a in (*job["model"].values(), job["inputs"], job["targets"])) / 1e6
    rows = []
    flags = ("--max-inflight-bytes", str(INFLIGHT_BYTES), "--log-level", "WARNING")
    with gradserve_server(*flags) as (_, address):
        burst_of = [job] * JOBS
        with GradientClient(address, timeout=600) as client:
            client.compute(**job)  # warm up
            for repeat in range(args.repeats):
                alone, _ = timed(lambda: [client.compute(**j) for j in burst_of])
                burst, results = timed(lambda: client.compute_many(burst_of, max_in_flight=JOBS))
                failed = sum(isinstance(r, GradserveError) for r in results)
                shared, _ = timed(lambda: separate_clients(address, job))
                with GradientClient(address, retry=NO_RETRIES, timeout=600) as bare:
                    lost = bare.compute_many(burst_of, max_in_flight=JOBS)
                refused = sum(isinstance(r, GradserveError) for r in lost)
                rows.append(
                    [repeat + 1, f"{burst / alone:.2f}x", f"{shared / alone:.2f}x", failed, refused]
                )
    write_table(
        "overload.md",
        f"A burst of {JOBS} jobs against a server that admits one at a time (CPU)",
        [
            "repeat",
            "compute_many time vs one after another",
            f"{CLIENTS} clients x {JOBS // CLIENTS} jobs vs one after another",
            "jobs failed (default retries)",
            "jobs refused (NO_RETRIES)",
        ],
        rows,
        f"Each job: M={MODELS}, N={SAMPLES}, {SIZES}, per-model inputs, {job_mb:.0f} MB up; "
        f"server --max-inflight-bytes {INFLIGHT_BYTES}. compute_many keeps all {JOBS} in "
        "flight; refused jobs carry a retry pushback, and the default RetryPolicy retries "
        "them (for up to busy_retry_s) and as soon as another job of the client ends. "
        f"The {CLIENTS} clients each run their share one after another, all at once, "
        "failing nothing. "
        "Ratios > 1: the burst took longer than the same jobs run one after another. "
        "Command: `python bench/overload.py`.",
    )


if __name__ == "__main__":
    main()
