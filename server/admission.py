"""Admission control: a bound on payload bytes held by all jobs at once, checked from the
header (declared sizes) before any payload byte is stored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gradserve.server.errors import too_large


class Admission:
    def __init__(self, max_inflight_bytes: int):
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0
        self.inflight_jobs = 0

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        # Only the event loop thread touches the counters, so no lock is needed.
        if self.inflight_bytes + nbytes > self.max_inflight_bytes:
            raise too_large(
                f"server busy: {self.inflight_bytes} payload bytes in flight, job needs "
                f"{nbytes}, limit {self.max_inflight_bytes}; retry later"
            )
        self.inflight_bytes += nbytes
        self.inflight_jobs += 1
        try:
            yield
        finally:
            self.inflight_bytes -= nbytes
            self.inflight_jobs -= 1
