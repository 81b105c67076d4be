"""The upload's timer on its own: reads simulated by sleeps on a real event loop, so that
what is counted against the minimum rate (and what is not) is seen read by read. The same
timer in a real server: test_resilience.py."""

from __future__ import annotations

import asyncio

import pytest

from gradserve.server.timers import UploadTimer


async def reads(timer: UploadTimer, waits: list[float], nbytes: int, at_read: dict) -> int:
    """Simulated reads after the header's that each wait `waits[i]` seconds and bring
    `nbytes`, calling `at_read[i](timer)` as read i starts: how many were done before the
    timer ended them."""
    timer.received(0)  # the header: the rate's clock starts
    done = 0
    try:
        for i, wait in enumerate(waits):
            if i in at_read:
                at_read[i](timer)
            timer.arm()
            try:
                await asyncio.sleep(wait)
            finally:
                timer.disarm()
            timer.received(nbytes)
            done += 1
    except asyncio.CancelledError:
        pass
    return done


def run(waits: list[float], nbytes: int, timeout_s: float, min_rate: float, at_read=None):
    async def main():
        timer = UploadTimer(timeout_s, min_rate)
        return timer, await reads(timer, waits, nbytes, at_read or {})

    return asyncio.run(main())


def test_a_trickle_ends_once_its_waiting_outruns_the_idle_timeout_plus_its_bytes_at_the_rate():
    # Each read waits 0.2 s (well inside the 1 s idle timeout) and earns 0.1 s: the
    # allowance of 1 s shrinks by 0.1 s a read, and the 10th read cannot wait its 0.2 s.
    timer, done = run([0.2] * 30, nbytes=100, timeout_s=1.0, min_rate=1000)
    assert timer.too_slow and not timer.fired
    assert 8 <= done <= 10, done
    assert timer.received_bytes == 100 * done
    assert timer.waited_s == pytest.approx(1.0 + done * 0.1, abs=0.1)


def test_an_upload_at_the_minimum_rate_or_faster_is_never_ended():
    # 0.1 s a read, each earning 0.15 s: the allowance grows.
    timer, done = run([0.1] * 15, nbytes=150, timeout_s=0.3, min_rate=1000)
    assert done == 15 and not timer.too_slow and not timer.fired


def test_without_a_minimum_rate_only_the_idle_timeout_ends_reads():
    timer, done = run([0.2] * 8 + [0.8], nbytes=1, timeout_s=0.4, min_rate=0)
    assert done == 8 and timer.fired and not timer.too_slow


def test_a_client_silent_after_its_header_is_idle_not_slow():
    timer, done = run([0.6], 1, 0.4, 1e9)
    assert done == 0 and timer.fired and not timer.too_slow


def test_waiting_for_the_first_message_does_not_count_against_the_rate():
    async def main():
        timer = UploadTimer(0.5, 1e9)
        timer.arm()
        await asyncio.sleep(0.3)  # the header's read
        timer.disarm()
        return timer, await reads(timer, [0.3], 1, {})

    timer, done = asyncio.run(main())
    assert done == 1 and not timer.too_slow and timer.waited_s == pytest.approx(0.3, abs=0.1)


def computes(timer: UploadTimer) -> None:
    timer.computing(True)


def later(seconds: float, busy: bool):
    """At a read's start: the job starts (busy) or ends its compute `seconds` into it."""
    return lambda timer: asyncio.get_running_loop().call_later(seconds, timer.computing, busy)


def computes_until(seconds: float):
    return lambda timer: (computes(timer), later(seconds, False)(timer))


def test_waiting_while_the_job_computes_is_not_counted():
    # 0.6 s of waiting against an allowance of 0.4 s, all of it while the job computes.
    timer, done = run([0.3, 0.3], 1, 0.4, 1e9, at_read={0: computes})
    assert done == 2 and not timer.too_slow and timer.waited_s == 0


def test_waiting_counts_again_from_when_the_compute_ends_mid_read():
    # A first read uses 0.3 s of the allowance of 1 s; the second would wait 1.2 s, the
    # compute ending 0.1 s into it: 0.7 s later (before the idle timeout's 1 s from then)
    # the allowance is out.
    timer, done = run([0.3, 1.2], 1, 1.0, 1e9, at_read={1: computes_until(0.1)})
    assert done == 1 and timer.too_slow and not timer.fired
    assert timer.waited_s == pytest.approx(1.0, abs=0.1)


def test_a_compute_starting_mid_read_stops_the_count():
    # A first read uses 0.5 s of the allowance of 1 s; the second waits 0.9 s, counted
    # for its first 0.2 s only.
    timer, done = run([0.5, 0.9], 1, 1.0, 1e9, at_read={1: later(0.2, True)})
    assert done == 2 and not timer.too_slow and not timer.fired
    assert timer.waited_s == pytest.approx(0.7, abs=0.1)


def test_the_idle_timeout_does_not_end_a_read_while_the_job_computes():
    timer, done = run([0.5], 1, 0.3, 0, at_read={0: computes})
    assert done == 1 and not timer.fired


def test_a_reads_silence_counts_from_the_computes_end():
    # Against a 0.5 s idle timeout: a read of 0.6 s, silent 0.2 s after a compute ending
    # 0.4 s into it, runs; one of 1 s, silent 0.9 s after a compute ending 0.1 s into it,
    # is ended.
    timer, done = run([0.6], 1, 0.5, 0, at_read={0: computes_until(0.4)})
    assert done == 1 and not timer.fired
    timer, done = run([1.0], 1, 0.5, 0, at_read={0: computes_until(0.1)})
    assert done == 0 and timer.fired


def test_an_interrupt_ends_a_read_that_waits_while_the_job_computes():
    def computes_then_fails(timer: UploadTimer) -> None:
        computes(timer)
        asyncio.get_running_loop().call_later(0.1, timer.interrupt)

    timer, done = run([0.5], 1, 1.0, 1e9, at_read={0: computes_then_fails})
    assert done == 0 and timer.interrupted and not (timer.fired or timer.too_slow)
