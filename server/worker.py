"""Runs engine launches off the event loop: one thread per device, so launches on a device
run one at a time (the device is the bottleneck anyway, and process-global flags such as
TF32 stay per launch)."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

# CPU launches of fewer FLOPs (per step) than this run on one of torch's threads. A second
# thread gains little on them (0.24 vs 0.20 ms for 12 tiny jobs in one launch, alone), while
# under a load of small jobs it takes a core from the event loop that serves them: with 64
# clients of M=1, N=32, [16, 32, 32, 1] jobs (`gradserve-client bench`, bench/batching.py's
# load), 1.15x the jobs per second on two cores with one thread (six runs each way).
SMALL_CPU_LAUNCH_FLOPS = 1e7


class DeviceWorker:
    def __init__(self, device: torch.device):
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")

    async def call(self, fn, *args):
        """Run a blocking function on this device's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.contextmanager
    def threads_for(self, flops_per_step: float):
        """torch's intra-op threads for one launch on this device: one for a small CPU
        launch, else as many as torch has (its default: the cores)."""
        if self.device.type != "cpu" or flops_per_step >= SMALL_CPU_LAUNCH_FLOPS:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
