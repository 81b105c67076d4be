"""compute_many's job list: every job built, and so checked, before any is sent.

A job with a mistake in it (an unknown option, a missing argument) raises at once, naming
its position, instead of after the jobs before it have run and their results are dropped.
Shared by the sync and asyncio clients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gradserve.client._connection import call_timeout
from gradserve.client._job import JobOptions, build_job, whole_number
from gradserve.client._models import normalize

REQUIRED = ("model", "inputs", "targets")


def check_max_in_flight(max_in_flight: int) -> None:
    if not whole_number(max_in_flight) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a whole number >= 1, got {max_in_flight!r}")


def checked_jobs(jobs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The jobs (dicts of compute() arguments), each built once to check it. The wire jobs
    are dropped again: a job converts what it must (a transposed tensor, a list) as it is
    built, and jobs sharing one such input would each hold a copy if all were kept."""
    checked = list(jobs)
    for i, job in enumerate(checked):
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
        try:
            call_timeout(options.pop("timeout", None), None)
            build_job(
                normalize(job["model"]), job["inputs"], job["targets"], sample_weights,
                JobOptions(**options),
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise type(e)(f"job {i}: {e}") from e
    return checked
