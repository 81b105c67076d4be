"""compute_many's job list: every job built, and so checked, before any is sent.

A job with a mistake in it (an unknown option, a missing argument) raises at once, naming
its position, instead of after the jobs before it have run and their results are dropped.
Shared by the sync and asyncio clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gradserve.client._connection import call_timeout
from gradserve.client._job import JobOptions, WireJob, build_job
from gradserve.client._models import normalize

REQUIRED = ("model", "inputs", "targets")


def check_max_in_flight(max_in_flight: int) -> None:
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a whole number >= 1, got {max_in_flight!r}")


def built_jobs(jobs: Iterable[Mapping[str, Any]]) -> list[tuple[WireJob, float | None]]:
    """Each job (a dict of compute() arguments) as a wire job and its own timeout."""
    built = []
    for i, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise TypeError(
                f"job {i}: compute_many takes dicts of compute() arguments "
                f"(model=, inputs=, targets=, ...), got {type(job).__name__}"
            )
        missing = [name for name in REQUIRED if name not in job]
        if missing:
            raise TypeError(f"job {i}: missing compute() argument(s) {', '.join(missing)}")
        options = {k: v for k, v in job.items() if k not in REQUIRED}
        sample_weights = options.pop("sample_weights", None)
        timeout = options.pop("timeout", None)
        try:
            call_timeout(timeout, None)
            wire_job = build_job(
                normalize(job["model"]), job["inputs"], job["targets"], sample_weights,
                JobOptions(**options),
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise type(e)(f"job {i}: {e}") from e
        built.append((wire_job, timeout))
    return built
