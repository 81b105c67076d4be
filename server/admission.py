"""Admission control: bounds on the jobs admitted at once and on the bytes they hold,
checked from the header (declared sizes) before any payload byte is stored."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

import grpc

from gradserve.server.errors import JobError, too_large

# Refused jobs' retries the server aims to see per second at most, whatever their number.
RETRIES_PER_S = 100
MAX_PUSHBACK_S = 10.0


class RetryPacer:
    """The wait a refused job is told (gRPC's retry pushback trailer, which clients follow):
    the least one while few refused jobs wait, so that a retry finds room soon after it
    frees, and longer when many wait, so that their retries come about RETRIES_PER_S a
    second in all. A job told to wait p seconds comes back once per p, so over a span of T
    seconds the waits told add up to about T times the number of jobs waiting: each second
    that sum estimates the crowd, and the next second's pushback shares RETRIES_PER_S
    among it."""

    def __init__(self, least_s: float, clock: Callable[[], float] = time.monotonic):
        self.least_s = least_s
        self.most_s = max(MAX_PUSHBACK_S, least_s)
        self.pushback_s = least_s
        self.clock = clock
        self.window_start = clock()
        self.told_s = 0.0  # the waits told since window_start

    def pushback_ms(self) -> int:
        """The pushback for a refusal now (and counts it)."""
        now = self.clock()
        elapsed = now - self.window_start
        if elapsed >= 1.0:
            waiting = self.told_s / elapsed
            if elapsed > 2 * (self.pushback_s + 1.0):
                waiting = 0  # they would all have come back by now: the crowd has gone
            self.pushback_s = min(self.most_s, max(self.least_s, waiting / RETRIES_PER_S))
            self.window_start, self.told_s = now, 0.0
        self.told_s += self.pushback_s
        return round(self.pushback_s * 1000)


class ServerBusy(JobError):
    def __init__(self, message: str, pushback_ms: int):
        message = f"{message}; retry in {pushback_ms} ms"
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        self.retry_pushback_ms = pushback_ms


class Admission:
    def __init__(
        self,
        max_inflight_bytes: int,
        max_queued_jobs: int,
        retry_pushback_ms: int,
        on_idle: Callable[[], None] | None = None,
    ):
        self.on_idle = on_idle  # called when the last admitted job ends
        self.max_inflight_bytes = max_inflight_bytes
        self.max_queued_jobs = max_queued_jobs
        self.inflight_bytes = 0
        self.inflight_jobs = 0
        self.pacer = RetryPacer(retry_pushback_ms / 1000)
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
                f"job holds {nbytes} bytes (payload and results; a streamed job's stream "
                "window too), more than the server's "
                f"limit on bytes in flight, {self.max_inflight_bytes}"
            )
        if self.inflight_jobs >= self.max_queued_jobs:
            raise ServerBusy(
                f"server busy: {self.inflight_jobs} jobs admitted (limit {self.max_queued_jobs})",
                self.pacer.pushback_ms(),
            )
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise ServerBusy(
                f"server busy: {self.inflight_bytes} bytes held by admitted jobs, this job "
                f"needs {nbytes}, limit {self.max_inflight_bytes}",
                self.pacer.pushback_ms(),
            )
        self.inflight_bytes += nbytes
        self.inflight_jobs += 1
        try:
            yield
        finally:
            self.inflight_bytes -= nbytes
            self.inflight_jobs -= 1
            if self.inflight_jobs == 0:
                if self._idle is not None:
                    self._idle.set()
                if self.on_idle is not None:
                    self.on_idle()
