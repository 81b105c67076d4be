"""Heartbeats: a job that waits or computes with nothing to send gets an empty response
after each --heartbeat-s of silence (proxies end silent streams; see
test_load_balancer for nginx), its accepted message first."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import grpc
import numpy as np
import pytest

from gradserve.client import GradientClient, GradserveError
from gradserve.client._job import JobOptions, build_job
from gradserve.client._models import normalize
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire
from tests.jobs import random_job
from tests.servers import run_server


@contextlib.contextmanager
def engine_occupied(address: str, args, seconds: float):
    """Another caller's training job holds the only launch (--batch-max-jobs 1) for about
    `seconds`, from its first step on."""
    stepping = threading.Event()

    def occupy():
        with GradientClient(address) as busy:
            with contextlib.suppress(GradserveError):  # its deadline ends it
                busy.compute(*args, optimizer="sgd", learning_rate=0.01, steps=100_000,
                             on_step=lambda k, _: stepping.set(), timeout=seconds)  # fmt: skip

    occupier = threading.Thread(target=occupy, daemon=True)
    occupier.start()
    assert stepping.wait(30)
    try:
        yield
    finally:
        occupier.join(30)


def queued_responses(address: str, args, **options) -> list[pb.ComputeResponse]:
    """The raw responses of a job sent as the client sends it."""
    job = build_job(normalize(args[0]), *args[1:], None, JobOptions(**options))
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(wire.COMPUTE_METHOD)(job.requests(), timeout=60)
        return [pb.ComputeResponse.FromString(raw) for raw in call]


def job_args(seed: int):
    tensors = random_job((8, 32, 1), 16, 512, shared_inputs=True, seed=seed)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    return params, tensors["inputs"].numpy(), tensors["targets"].numpy()


@pytest.mark.parametrize("training", [False, True])
def test_a_queued_job_hears_heartbeats_then_its_results(training):
    options = dict(optimizer="sgd", learning_rate=0.01, steps=3) if training else {}
    args = job_args(51)
    with run_server("--batch-max-jobs", "1", "--heartbeat-s", "0.2") as server:
        with engine_occupied(server.address, args, 2):
            responses = queued_responses(server.address, args, **options)
        with GradientClient(server.address) as client:
            alone = client.compute(*args, **options)
    # one message job: its accepted message waits for results, but goes as the first beat
    assert responses[0].HasField("accepted") and not responses[0].chunks
    empty = [r for r in responses[1:-1] if r.ByteSize() == 0]
    assert len(empty) >= 3  # queued about 2 s at one beat per 0.2 s
    assert responses[-1].HasField("summary")
    names = [c.name for r in responses for c in r.chunks]
    received = {n: b"".join(c.data for r in responses for c in r.chunks if c.name == n)
                for n in names}  # fmt: skip
    key = "losses" if training else "loss"
    expected = np.asarray(alone.losses if training else alone.loss, np.float32).tobytes()
    assert received[key] == expected


def test_heartbeats_can_be_turned_off():
    args = job_args(52)
    with run_server("--batch-max-jobs", "1", "--heartbeat-s", "0") as server:
        with engine_occupied(server.address, args, 1):
            responses = queued_responses(server.address, args)
    assert len(responses) == 1 and responses[0].HasField("summary")


def test_a_streamed_job_hears_heartbeats_while_its_first_micro_batch_waits():
    """A streamed job's upload stalls while its first micro-batch waits in the queue: the
    heartbeats go out then, before any of its per-sample rows, and the sync and async
    clients skip them among the rows."""
    from gradserve.client import AsyncGradientClient

    args = job_args(53)
    options = dict(micro_batch_samples=64, per_sample_losses=True)
    with run_server("--batch-max-jobs", "1", "--heartbeat-s", "0.2") as server:
        with engine_occupied(server.address, args, 2):
            responses = queued_responses(server.address, args, **options)
        with engine_occupied(server.address, args, 2):
            with GradientClient(server.address) as client:
                synced = client.compute(*args, **options)
        with engine_occupied(server.address, args, 2):

            async def run():
                async with AsyncGradientClient(server.address) as client:
                    return await client.compute(*args, **options)

            awaited = asyncio.run(run())
        with GradientClient(server.address) as client:
            alone = client.compute(*args, per_sample_losses=True)
    rows = [
        i for i, r in enumerate(responses) if any(c.name == "per_sample_loss" for c in r.chunks)
    ]
    beats = [i for i, r in enumerate(responses) if r.ByteSize() == 0]
    assert len([i for i in beats if i < rows[0]]) >= 3  # queued about 2 s at one per 0.2 s
    for result in (synced, awaited):
        assert result.summary["queue_seconds"] > 1
        np.testing.assert_allclose(result.loss, alone.loss, rtol=1e-6)
        np.testing.assert_allclose(result.tensors["per_sample_loss"],
                                   alone.tensors["per_sample_loss"], rtol=1e-6)  # fmt: skip
