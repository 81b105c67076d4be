"""Load generation for `gradserve-client bench`: C concurrent clients, each sending J jobs
back to back, reporting throughput and latency percentiles (as ghz or perf_analyzer do)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from gradserve.client._aio import AsyncGradientClient
from gradserve.client._connection import NO_RETRIES
from gradserve.client._errors import GradserveError


@dataclass
class LoadReport:
    jobs: int
    errors: dict[str, int]
    seconds: float
    latencies: list[float]  # seconds, successful jobs
    jobs_per_launch: float
    first_error: str | None = None  # "CODE: message" of the first job that failed

    @property
    def throughput(self) -> float:
        return (self.jobs - sum(self.errors.values())) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def as_dict(self) -> dict:
        return {
            "jobs": self.jobs,
            "errors": self.errors,
            "seconds": round(self.seconds, 4),
            "jobs_per_second": round(self.throughput, 2),
            "p50_ms": round(1e3 * self.percentile(50), 3),
            "p95_ms": round(1e3 * self.percentile(95), 3),
            "p99_ms": round(1e3 * self.percentile(99), 3),
            "mean_jobs_per_launch": round(self.jobs_per_launch, 2),
            "first_error": self.first_error,
        }


def random_ensemble(layer_sizes: list[int], models: int, samples: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:], strict=True)):
        params[f"layers.{i}.weight"] = (rng.standard_normal((models, b, a)) / np.sqrt(a)).astype(
            np.float32
        )
        params[f"layers.{i}.bias"] = np.zeros((models, b), np.float32) + 0.01
    x = rng.standard_normal((samples, layer_sizes[0])).astype(np.float32)
    y = rng.standard_normal((samples, layer_sizes[-1])).astype(np.float32)
    return params, x, y


async def run_load(
    address: str | list[str], *, concurrency: int, jobs_per_client: int, layer_sizes: list[int],
    models: int, samples: int, timeout: float = 60.0, **connection,
) -> LoadReport:  # fmt: skip
    """connection: AsyncGradientClient's token / TLS arguments. No retries, so that errors
    are counted as the server gave them."""
    params, x, y = random_ensemble(layer_sizes, models, samples)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    first_error: list[str] = []
    launch_sizes: list[int] = []

    async def one_client() -> None:
        async with AsyncGradientClient(
            address, timeout=timeout, retry=NO_RETRIES, **connection
        ) as client:
            for _ in range(jobs_per_client):
                start = time.perf_counter()
                try:
                    result = await client.compute(params, x, y)
                except GradserveError as e:
                    errors[e.code.name] = errors.get(e.code.name, 0) + 1
                    first_error[:] = first_error or [f"{e.code.name}: {e.details}"]
                    continue
                latencies.append(time.perf_counter() - start)
                launch_sizes.append(result.summary["jobs_in_launch"])

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return LoadReport(
        jobs=concurrency * jobs_per_client,
        errors=errors,
        seconds=seconds,
        latencies=latencies,
        jobs_per_launch=float(np.mean(launch_sizes)) if launch_sizes else 0.0,
        first_error=first_error[0] if first_error else None,
    )
