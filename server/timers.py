"""Timers that end a job whose client stalls its stream: an upload that stops or crawls, a
download the client stops reading."""

from __future__ import annotations

import asyncio


class IdleTimer:
    """Ends a job whose read of its request stream (or, in TimedWrites, write of its
    response stream) waits too long, by cancelling its handler (a timer per read is far
    cheaper than wrapping every read in asyncio.wait_for, which creates a task each time)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.task = asyncio.current_task()
        self.handle: asyncio.TimerHandle | None = None
        self.waiting = False  # a read waits
        self.fired = False
        self.interrupted = False

    def arm(self) -> None:
        if self.interrupted:  # came while no read waited: this read ends at once
            self.task.cancel()
            return
        self.waiting = True
        self.handle = asyncio.get_running_loop().call_later(self.timeout_s, self._fire)

    def disarm(self) -> None:
        self.waiting = False
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def interrupt(self) -> None:
        """End the read that waits, or else the next one, the same way (for a failure beside
        the reads that a client waiting for results before it sends more would otherwise
        never hear of)."""
        self.interrupted = True
        if self.waiting:
            self.disarm()
            self.task.cancel()

    def _fire(self) -> None:
        self.fired = True
        self.task.cancel()


class UploadTimer(IdleTimer):
    """The IdleTimer of a job's reads, which also ends an upload coming slower than
    `min_rate` bytes a second (as Apache's mod_reqtimeout MinRate): the reads may wait, in
    all, the idle timeout plus the bytes received so far at that rate. Without it a client
    sending a byte just inside each idle timeout would hold its job's admitted bytes for
    as long as it liked. Neither clock runs while the job computes (`computing`): a
    streamed job's client may wait for a micro-batch's results before it sends the next
    one, and a read's silence counts from the compute's end. The rate's clock starts once
    the first message is in (a client silent from the start is idle, not slow). min_rate 0:
    no minimum."""

    def __init__(self, timeout_s: float, min_rate: float):
        super().__init__(timeout_s)
        self.min_rate = min_rate
        self.allowance_s = timeout_s  # counted waiting left
        self.received_bytes = 0
        self.waited_s = 0.0  # counted waiting so far
        self.too_slow = False
        self.paused = False
        self.started = False  # a message is in: the rate's clock runs
        self.counted_from = 0.0  # where the waiting read's counted time starts
        # Set where a timer ended a read that awaited only the half-close (every tensor byte
        # in): how long it waited.
        self.unclosed_s: float | None = None

    def received(self, nbytes: int) -> None:
        self.started = True
        self.received_bytes += nbytes
        if self.min_rate:
            self.allowance_s += nbytes / self.min_rate

    def arm(self) -> None:
        if self.interrupted:
            self.task.cancel()
            return
        self.waiting = True
        if not self.paused:
            self._start_clocks()

    def disarm(self) -> None:
        if self.waiting and not self.paused:
            self._count()
        super().disarm()

    def computing(self, busy: bool) -> None:
        """While busy, a waiting read is not timed."""
        if busy == self.paused:
            return
        self.paused = busy
        if not self.waiting:
            return
        if busy:
            self._count()
            self.handle.cancel()
            self.handle = None
        else:
            self._start_clocks()

    def _start_clocks(self) -> None:
        loop = asyncio.get_running_loop()
        self.counted_from = loop.time()
        if self.min_rate and self.started and self.allowance_s < self.timeout_s:
            self.handle = loop.call_later(self.allowance_s, self._fire_slow)
        else:
            self.handle = loop.call_later(self.timeout_s, self._fire)

    def _count(self) -> None:
        if not self.started:
            return
        waited = asyncio.get_running_loop().time() - self.counted_from
        self.allowance_s -= waited
        self.waited_s += waited

    def _fire_slow(self) -> None:
        self._count()
        self.counted_from = asyncio.get_running_loop().time()  # counted once
        self.too_slow = True
        self.task.cancel()


class TimedWrites:
    """A job's call context whose writes end the job (through `timer`, an IdleTimer) when
    one waits longer than the timer's timeout for the client to read: a write waits while
    the client leaves earlier messages unread (gRPC flow control), and a client that never
    reads again would otherwise keep the job's results and its admitted bytes forever.
    Everything else is the context's."""

    def __init__(self, context, timer: IdleTimer):
        self._context = context
        self.timer = timer

    async def write(self, message) -> None:
        self.timer.arm()
        try:
            await self._context.write(message)
        finally:
            self.timer.disarm()

    def __getattr__(self, name: str):
        return getattr(self._context, name)
