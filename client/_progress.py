"""A text progress bar for the CLI's uploads and downloads, fed by compute(on_progress=...).

On a terminal it redraws one line in place (at most ten times a second); into a file or a
pipe it writes a line at most once a second, so logs stay readable. Each phase ends with its
line at 100%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

MIB = 1 << 20


class ProgressBar:
    """Callable as on_progress(phase, done_bytes, total_bytes). Phases whose total is under
    `min_bytes` are not shown: small jobs finish before a bar would say anything."""

    def __init__(
        self,
        stream: TextIO,
        min_bytes: int = 0,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream
        self.min_bytes = min_bytes
        self.width = width
        self.clock = clock
        self.in_place = stream.isatty()
        self.interval = 0.1 if self.in_place else 1.0
        self.phase: str | None = None
        self.started = self.drawn = 0.0
        self.start_bytes = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if total < self.min_bytes:
            return
        now = self.clock()
        if phase != self.phase:  # the rate counts from the phase's first report
            self.phase, self.started, self.start_bytes = phase, now, done
            self.drawn = -self.interval
        finished = done >= total
        if not finished and now - self.drawn < self.interval:
            return
        self.drawn = now
        seconds = now - self.started
        self._draw(phase, done, total, (done - self.start_bytes) / seconds if seconds else None)
        if finished:
            self.phase = None

    def _draw(self, phase: str, done: int, total: int, bytes_per_second: float | None) -> None:
        fraction = min(done / total, 1.0) if total else 1.0
        filled = round(fraction * self.width)
        rate = "" if bytes_per_second is None else f"  {bytes_per_second / MIB:7.1f} MiB/s"
        line = (
            f"{phase:<8} [{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:5.1f}%"
            f"  {done / MIB:.1f}/{total / MIB:.1f} MiB{rate}"
        )
        finished = done >= total
        if self.in_place:
            self.stream.write("\r" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
