"""Admission control: bounds on the jobs admitted at once and on the bytes they hold,
checked from the header (declared sizes) before any payload byte is stored."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import grpc

from gradserve.server.errors import JobError, too_large

# Suggested wait before retrying a refused job, sent as gRPC's retry pushback trailer.
RETRY_PUSHBACK_MS = 100


class ServerBusy(JobError):
    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_pushback_ms = RETRY_PUSHBACK_MS


class Admission:
    def __init__(self, max_inflight_bytes: int, max_queued_jobs: int):
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued_jobs = max_queued_jobs
        self.inflight_bytes = 0
        self.inflight_jobs = 0
        self._idle: asyncio.Event | None = None

    async def wait_idle(self) -> None:
        """Return once no job is admitted (used to drain before shutdown)."""
        while self.inflight_jobs:
            self._idle = asyncio.Event()
            await self._idle.wait()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        # Only the event loop thread touches the counters, so no lock is needed.
        if nbytes > self.max_inflight_bytes:  # would not fit even into an idle server
            raise too_large(
                f"job holds {nbytes} bytes (payload and results), more than the server's "
                f"limit on bytes in flight, {self.max_inflight_bytes}"
            )
        if self.inflight_jobs >= self.max_queued_jobs:
            raise ServerBusy(
                f"server busy: {self.inflight_jobs} jobs admitted (limit "
                f"{self.max_queued_jobs}); retry in {RETRY_PUSHBACK_MS} ms"
            )
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise ServerBusy(
                f"server busy: {self.inflight_bytes} bytes held by admitted jobs, this job "
                f"needs {nbytes}, limit {self.max_inflight_bytes}; retry in "
                f"{RETRY_PUSHBACK_MS} ms"
            )
        self.inflight_bytes += nbytes
        self.inflight_jobs += 1
        try:
            yield
        finally:
            self.inflight_bytes -= nbytes
            self.inflight_jobs -= 1
            if self.inflight_jobs == 0 and self._idle is not None:
                self._idle.set()
