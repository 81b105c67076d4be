"""The retry pushback a busy server tells refused jobs: its least while few wait, longer
while many do, so that their retries stay near admission.RETRIES_PER_S a second."""

import heapq

from gradserve.server.admission import MAX_PUSHBACK_S, RETRIES_PER_S, RetryPacer


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def crowd(pacer: RetryPacer, clock: Clock, waiting: int, seconds: float) -> list[float]:
    """`waiting` refused jobs, each coming back when the pushback it was told has passed,
    for `seconds`; the times of their retries."""
    start = clock.now
    due = [(start + k / waiting, k) for k in range(waiting)]  # first refusals spread
    heapq.heapify(due)
    retries = []
    while due[0][0] < start + seconds:
        clock.now, job = heapq.heappop(due)
        retries.append(clock.now)
        heapq.heappush(due, (clock.now + pacer.pushback_ms() / 1000, job))
    return retries


def per_second(retries: list[float], since: float) -> float:
    later = [t for t in retries if t >= since]
    return len(later) / (max(later) - since)


def test_few_waiting_jobs_are_told_the_least_wait():
    clock = Clock()
    pacer = RetryPacer(0.1, clock)
    crowd(pacer, clock, waiting=4, seconds=5)
    assert pacer.pushback_ms() == 100


def test_many_waiting_jobs_are_told_to_wait_longer_and_retry_at_the_paced_rate():
    clock = Clock()
    pacer = RetryPacer(0.1, clock)
    retries = crowd(pacer, clock, waiting=500, seconds=30)
    # 500 jobs sharing RETRIES_PER_S retries a second: about 5 s each
    assert abs(pacer.pushback_s - 500 / RETRIES_PER_S) < 1.0
    assert per_second(retries, since=15) < 1.5 * RETRIES_PER_S
    # (with the least wait throughout they would come 50 times as often)


def test_the_wait_is_capped_and_falls_back_once_the_crowd_is_gone():
    clock = Clock()
    pacer = RetryPacer(0.1, clock)
    crowd(pacer, clock, waiting=100_000, seconds=20)
    assert pacer.pushback_s == MAX_PUSHBACK_S
    clock.now += 30  # nobody refused for a while
    assert pacer.pushback_ms() == 100


def test_a_least_wait_above_the_cap_is_kept():
    """--retry-pushback-ms beyond the usual cap is the operator's word: never less."""
    clock = Clock()
    pacer = RetryPacer(100.0, clock)
    clock.now += 5
    assert pacer.pushback_ms() == 100_000
    crowd(pacer, clock, waiting=3, seconds=400)
    assert pacer.pushback_ms() == 100_000
