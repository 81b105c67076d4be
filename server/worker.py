"""Runs engine launches off the event loop: one thread per device, so launches on a device
run one at a time (the device is the bottleneck anyway, and process-global flags such as
TF32 stay per launch)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch


class DeviceWorker:
    def __init__(self, device: torch.device):
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{device}")

    async def call(self, fn, *args):
        """Run a blocking function on this device's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
