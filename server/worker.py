"""Runs engine work off the event loop: one thread per device, so jobs on a device run one
at a time (the device is the bottleneck anyway, and global flags such as TF32 stay
per-job)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from gradserve import kernels
from gradserve.kernels import EnsembleJob, EnsembleResult


@dataclass
class Completed:
    result: EnsembleResult
    encoded: list[tuple[str, memoryview]]
    queue_seconds: float
    compute_seconds: float


class DeviceWorker:
    def __init__(self, device: torch.device):
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")

    async def call(self, fn, *args):
        """Run a blocking helper (payload checks, decoding) on this device's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, job: EnsembleJob, engine: str, encode) -> Completed:
        """Run the job; `encode(result)` turns it into wire bytes on the same thread."""
        submitted = time.perf_counter()

        def work() -> Completed:
            started = time.perf_counter()
            result = kernels.run(job, engine, self.device)
            encoded = encode(result)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            done = time.perf_counter()
            return Completed(result, encoded, started - submitted, done - started)

        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
