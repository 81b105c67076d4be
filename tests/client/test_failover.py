"""Several addresses with some servers down: jobs go to the servers that answer, without
backing off first, and come back to a server once it is up again."""

import asyncio
import socket
import time

import grpc
import numpy as np
import pytest

from gradserve.client import (
    AsyncGradientClient,
    GradientClient,
    GradserveError,
    RetryPolicy,
    _connection,
)
from gradserve.client._connection import Failover

# Back-off drawn from up to 30 s: a job that backed off before trying the live server would
# outlast the test's time bound by far.
PATIENT = RetryPolicy(initial_backoff_s=30, max_backoff_s=30)


def dead_address() -> str:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def small_job(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {
        "layers.0.weight": rng.standard_normal((2, 4, 3)).astype(np.float32),
        "layers.0.bias": rng.standard_normal((2, 4)).astype(np.float32),
    }
    return (
        params,
        rng.standard_normal((5, 3)).astype(np.float32),
        rng.standard_normal((5, 4)).astype(np.float32),
    )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_jobs_skip_a_dead_address_without_backing_off(server, asynchronous):
    addresses = [dead_address(), server.address, dead_address()]
    job = small_job()
    jobs = 12

    def run_sync():
        with GradientClient(addresses, retry=PATIENT, timeout=60) as client:
            return [client.compute(*job).loss for _ in range(jobs)]

    async def run_async():
        async with AsyncGradientClient(addresses, retry=PATIENT, timeout=60) as client:
            return [(await client.compute(*job)).loss for _ in range(jobs)]

    started = time.monotonic()
    losses = asyncio.run(run_async()) if asynchronous else run_sync()
    assert time.monotonic() - started < 10  # one job backing off could take up to 30 s
    for loss in losses:
        np.testing.assert_array_equal(loss, losses[0])


def test_with_every_address_down_a_job_fails_unavailable():
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.05)
    with GradientClient([dead_address(), dead_address()], retry=policy) as client:
        with pytest.raises(GradserveError) as err:
            client.compute(*small_job())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def trailing_metadata(self):
        return ()


class _Invalid(_Unavailable):
    def code(self):
        return grpc.StatusCode.INVALID_ARGUMENT


def test_failover_order_and_recovery(monkeypatch):
    failover = Failover(3)
    assert [failover.first() for _ in range(4)] == [0, 1, 2, 0]  # round-robin
    # address 1 refuses: the job moves on to 2 at once, and new jobs pass 1 over
    assert failover.after(1, _Unavailable(), 0.4) == (2, 0.0)
    assert [failover.first() for _ in range(3)] == [2, 2, 0]
    # a shard pinned to address 1 goes to the next one up
    assert failover.first(pinned=1) == 2
    # a refusal by a server that answered is no outage: the policy's wait stands
    assert failover.after(2, _Invalid(), 0.3) == (0, 0.3)
    assert failover.after(0, _Unavailable(), None) == (2, None)  # no retry stays none
    # every address down: the policy's back-off
    assert failover.after(2, _Unavailable(), 0.5)[1] == 0.5
    # an answer clears an address at once; else it gets jobs again after DOWN_FOR_S
    failover.answered(1)
    assert not failover.is_down(1) and failover.is_down(0)
    monkeypatch.setattr(_connection, "DOWN_FOR_S", 0.05)
    failover.after(1, _Unavailable(), 0.1)
    assert failover.is_down(1)
    time.sleep(0.1)
    assert not failover.is_down(1)
