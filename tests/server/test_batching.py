"""Dynamic batching, admission, cancellation and back-pressure against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from gradserve.client import (
    NO_RETRIES,
    AsyncGradientClient,
    GradientClient,
    GradserveError,
    RetryPolicy,
)
from gradserve.client._job import JobOptions, build_job
from gradserve.client._models import normalize
from gradserve.kernels import torch_engine
from gradserve.server.batching import batch_key, merge, split
from gradserve.v1 import gradserve_pb2 as pb
from tests.jobs import ensemble_job, random_job
from tests.process_memory import memory_bytes
from tests.servers import run_server

SIZES = (16, 32, 32, 1)


def params_of(tensors):
    return {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}


def solo(tensors, sizes=SIZES, **options):
    """The job's result computed alone, in this process."""
    return torch_engine.run(ensemble_job(tensors, sizes, **options))


def assert_matches_solo(result, tensors, sizes=SIZES):
    ref = solo(tensors, sizes)
    np.testing.assert_allclose(result.loss, ref.loss.numpy(), rtol=1e-5, atol=1e-7)
    for i in range(len(sizes) - 1):
        for kind, grads in (("weight", ref.weight_grads), ("bias", ref.bias_grads)):
            np.testing.assert_allclose(
                result.gradients[f"layers.{i}.{kind}"], grads[i].numpy(), rtol=1e-5, atol=1e-7
            )


def stats(address) -> pb.ServerStats:
    with GradientClient(address) as c:
        return c.server_info().stats


def wait_until_idle(address, timeout=30.0) -> pb.ServerStats:
    """Poll the server's gauges until no job is admitted (the handlers may still be
    unwinding right after a client gives up)."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(address)
        if (s.inflight_jobs, s.inflight_bytes, s.queued_jobs) == (0, 0, 0):
            return s
        assert time.monotonic() < deadline, f"server never went idle: {s}"
        time.sleep(0.05)


async def compute_all(address, jobs, **options):
    # No client retries: these tests count what the server itself accepts and refuses.
    async with AsyncGradientClient(address, timeout=120, retry=NO_RETRIES) as client:
        return await asyncio.gather(
            *(
                client.compute(params_of(t), t["inputs"].numpy(), t["targets"].numpy(), **options)
                for t in jobs
            ),
            return_exceptions=True,
        )


@pytest.fixture(scope="module")
def batching_server():
    # A long delay makes batch formation independent of machine speed.
    with run_server("--batch-max-delay-ms", "200") as running:
        yield running


def test_concurrent_jobs_share_launches_and_get_their_solo_results(batching_server):
    jobs = [random_job(SIZES, 1, 32, seed=s) for s in range(32)]
    before = stats(batching_server.address)
    # another caller's job mid-upload: the first arrivals wait for the rest (all queued,
    # they would launch at once, a few at a time as the client's streams come in)
    with GradientClient(batching_server.address) as client:
        with slot_held(client, random_job(SIZES, 1, 4, seed=0), batching_server.address):
            results = asyncio.run(compute_all(batching_server.address, jobs))
    after = stats(batching_server.address)
    launches = after.launches - before.launches
    assert after.launched_jobs - before.launched_jobs == 32
    assert launches <= 4, f"32 jobs took {launches} launches"
    assert max(r.summary["jobs_in_launch"] for r in results) >= 8
    for result, tensors in zip(results, jobs, strict=True):
        assert_matches_solo(result, tensors)


def test_different_architectures_are_never_mixed(batching_server):
    wide = (16, 48, 1)
    jobs = [random_job(SIZES, 2, 32, seed=s) for s in range(6)]
    jobs += [random_job(wide, 2, 32, seed=s) for s in range(6)]
    jobs += [random_job(SIZES, 2, 20, seed=s) for s in range(6)]  # another N
    results = asyncio.run(compute_all(batching_server.address, jobs))
    for i, (result, tensors) in enumerate(zip(results, jobs, strict=True)):
        assert result.summary["jobs_in_launch"] <= 6
        assert result.summary["models_in_launch"] <= 12
        assert_matches_solo(result, tensors, wide if 6 <= i < 12 else SIZES)


def test_shared_input_jobs_merge_into_one_launch(batching_server):
    jobs = [
        random_job(SIZES, 3, 32, shared_inputs=True, sample_weights=True, seed=s) for s in range(5)
    ]

    async def run():
        async with AsyncGradientClient(batching_server.address, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.compute(
                        params_of(t),
                        t["inputs"].numpy(),
                        t["targets"].numpy(),
                        sample_weights=t["sample_weights"].numpy(),
                    )
                    for t in jobs
                )
            )

    # another caller's job mid-upload keeps the first arrivals waiting for the rest
    with GradientClient(batching_server.address) as client:
        with slot_held(client, random_job(SIZES, 1, 4, seed=0), batching_server.address):
            results = asyncio.run(run())
    for result, tensors in zip(results, jobs, strict=True):
        assert result.summary["jobs_in_launch"] == 5
        ref = solo(tensors)
        np.testing.assert_allclose(
            result.gradients["layers.0.weight"], ref.weight_grads[0].numpy(), rtol=1e-5, atol=1e-7
        )


def test_cancelled_job_inside_a_batch_leaves_the_others_correct(batching_server):
    jobs = [random_job(SIZES, 1, 32, seed=100 + s) for s in range(8)]

    async def run():
        async with AsyncGradientClient(batching_server.address, timeout=120) as client:
            tasks = [
                asyncio.ensure_future(
                    client.compute(params_of(t), t["inputs"].numpy(), t["targets"].numpy())
                )
                for t in jobs
            ]
            await asyncio.sleep(0.05)  # well inside the 200 ms batch delay: all are queued
            tasks[3].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

    # Another caller's job, stalled mid-upload, keeps the batch waiting (all queued, it
    # would launch at once).
    with GradientClient(batching_server.address) as client:
        with slot_held(client, random_job(SIZES, 1, 4, seed=0), batching_server.address):
            results = asyncio.run(run())
    assert isinstance(results[3], asyncio.CancelledError)
    for i, (result, tensors) in enumerate(zip(results, jobs, strict=True)):
        if i != 3:
            assert_matches_solo(result, tensors)
    wait_until_idle(batching_server.address)


def test_deadline_shorter_than_the_queue_delay_leaks_nothing():
    with run_server("--batch-max-delay-ms", "1500") as server:
        tensors = random_job(SIZES, 1, 32, seed=1)
        with GradientClient(server.address) as client:
            # another caller's job mid-upload: the queued one waits the delay for it
            with slot_held(client, random_job(SIZES, 1, 4, seed=0), server.address):
                with pytest.raises(GradserveError) as err:
                    client.compute(
                        params_of(tensors),
                        tensors["inputs"].numpy(),
                        tensors["targets"].numpy(),
                        timeout=0.3,
                    )
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        idle = wait_until_idle(server.address)
        assert idle.launched_jobs == 0  # it left the queue before any launch
        assert idle.failed_jobs == 2  # and the stalled job, cancelled


def test_a_lone_callers_job_launches_at_once_and_others_wait_for_company():
    """The batch delay is for jobs that could join: when every job the server holds is
    queued, the batch launches at once (a sequential caller's job used to wait the whole
    delay, 2 ms by default: about half a small job's round trip); while another caller's
    job is on its way, the queued one waits for it, up to the delay."""
    with run_server("--batch-max-delay-ms", "1500") as server:
        tensors = random_job(SIZES, 1, 32, seed=2)
        args = (params_of(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
        with GradientClient(server.address, timeout=30) as client:
            alone = [client.compute(*args).summary["queue_seconds"] for _ in range(3)]
            with slot_held(client, random_job(SIZES, 1, 4, seed=0), server.address):
                accompanied = client.compute(*args).summary["queue_seconds"]
    assert max(alone) < 0.5
    assert accompanied >= 1.5


def test_flood_past_the_admission_bound_is_refused_and_the_rest_succeed():
    with run_server("--batch-max-delay-ms", "300", "--max-queued-jobs", "4") as server:
        jobs = [random_job(SIZES, 1, 32, seed=s) for s in range(12)]
        results = asyncio.run(compute_all(server.address, jobs))
        refused = [r for r in results if isinstance(r, GradserveError)]
        served = [
            (r, t) for r, t in zip(results, jobs, strict=True) if not isinstance(r, Exception)
        ]
        assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert all("retry" in r.details for r in refused)
        assert len(served) >= 4
        for result, tensors in served:
            assert_matches_solo(result, tensors)
        wait_until_idle(server.address)


def test_slow_readers_do_not_grow_server_memory_with_the_job_count():
    # Each job: 16 MiB of weights up, 16 MiB of gradients down. 16 clients that never read
    # their results would pin 512 MiB without a bound; the admission bound allows ~3 jobs.
    sizes = (2048, 2048, 1)
    tensors = random_job(sizes, 1, 4, seed=3)
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=sizes),
        tensors=[
            pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    chunk = 1 << 20
    requests = [pb.ComputeRequest(header=header)]
    for name, value in tensors.items():
        raw = value.numpy().tobytes()
        requests += [
            pb.ComputeRequest(chunks=[pb.TensorChunk(name=name, offset=o, data=raw[o : o + chunk])])
            for o in range(0, len(raw), chunk)
        ]
    with run_server("--max-inflight-bytes", str(100 << 20), "--batch-max-delay-ms", "0") as srv:
        from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

        baseline = memory_bytes(srv.process.pid)
        channel = grpc.insecure_channel(srv.address)
        stub = pb_grpc.GradientServiceStub(channel)
        calls, refused = [], 0
        for _ in range(16):
            call = stub.Compute(iter(requests), timeout=60)
            try:
                first = next(call)  # accepted; then this client stops reading
                assert first.HasField("accepted")
                calls.append(call)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
        deadline = time.monotonic() + 30
        while stats(srv.address).launched_jobs < len(calls) and time.monotonic() < deadline:
            time.sleep(0.05)  # let the admitted jobs reach their (stalled) result streams
        grown = memory_bytes(srv.process.pid) - baseline
        for call in calls:
            call.cancel()
        channel.close()
        assert refused >= 10
        assert grown < 256 << 20, f"server RSS grew by {grown >> 20} MiB"
        wait_until_idle(srv.address)


def test_merge_then_split_equals_separate_runs():
    a = random_job(SIZES, 2, 9, shared_inputs=True, loss="cross_entropy", seed=1)
    b = random_job(SIZES, 3, 9, loss="cross_entropy", seed=2)
    jobs = [ensemble_job(t, SIZES, loss="cross_entropy") for t in (a, b)]
    parts = split(torch_engine.run(merge(jobs)), [2, 3])
    for part, job in zip(parts, jobs, strict=True):
        alone = torch_engine.run(job)
        torch.testing.assert_close(part.loss, alone.loss)
        for got, ref in zip(
            part.weight_grads + [part.input_grads, part.per_sample_loss],
            alone.weight_grads + [alone.input_grads, alone.per_sample_loss],
            strict=True,
        ):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_jobs_sharing_different_sample_tensors_merge_correctly():
    """Two shared-input jobs, one with shared targets and per-model sample weights, the
    other the other way round: one launch, each job's own results."""
    a = random_job(SIZES, 2, 9, sample_weights=True, seed=3)
    b = random_job(SIZES, 3, 9, sample_weights=True, seed=4)
    a["inputs"], a["targets"] = a["inputs"][0].clone(), a["targets"][0].clone()
    b["inputs"], b["sample_weights"] = b["inputs"][0].clone(), b["sample_weights"][0].clone()
    jobs = [ensemble_job(t, SIZES) for t in (a, b)]
    assert batch_key(jobs[0], "torch") == batch_key(jobs[1], "torch")
    parts = split(torch_engine.run(merge(jobs)), [2, 3])
    for part, job in zip(parts, jobs, strict=True):
        alone = torch_engine.run(job)
        torch.testing.assert_close(part.loss, alone.loss)
        for got, ref in zip(part.weight_grads, alone.weight_grads, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_a_job_with_its_parameters_on_the_device_merges_with_jobs_from_the_host():
    """A streamed job stepping on each micro-batch keeps its parameters on the engine's
    device; merged with jobs whose tensors came from the wire, the merged parameters go
    there ("meta" stands in for a GPU here: devices and shapes, no values)."""
    jobs = [ensemble_job(random_job(SIZES, m, 9, seed=m), SIZES) for m in (2, 3)]
    jobs[1].weights = [w.to("meta") for w in jobs[1].weights]
    jobs[1].biases = [b.to("meta") for b in jobs[1].biases]
    merged = merge(jobs)
    for t in (*merged.weights, *merged.biases):
        assert t.device.type == "meta" and t.shape[0] == 5
    assert merged.inputs.device.type == "cpu"  # every job's samples on the host still


@pytest.mark.gpu
def test_a_job_with_its_parameters_on_the_gpu_merges_into_the_same_results():
    jobs = [ensemble_job(random_job(SIZES, m, 9, seed=m), SIZES) for m in (2, 3)]
    device = torch.device("cuda")
    on_gpu = ensemble_job(random_job(SIZES, 3, 9, seed=3), SIZES)
    on_gpu.weights = [w.to(device) for w in on_gpu.weights]
    on_gpu.biases = [b.to(device) for b in on_gpu.biases]
    parts = split(torch_engine.run(merge([jobs[0], on_gpu]), device), [2, 3])
    alone = torch_engine.run(jobs[1], device)
    torch.testing.assert_close(parts[1].loss, alone.loss)
    for got, ref in zip(parts[1].weight_grads, alone.weight_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def _raw_call(client, tensors, requests=None):
    job = build_job(
        normalize(params_of(tensors)),
        tensors["inputs"].numpy(),
        tensors["targets"].numpy(),
        None,
        JobOptions(),
    )
    return client._computes[0](requests or job.requests(), timeout=30)


@contextlib.contextmanager
def slot_held(client, tensors, address):
    """A job that sends its header and a first chunk, then stays silent: it holds an
    admission slot until the block ends."""
    release = threading.Event()
    first = next(iter(build_job(
        normalize(params_of(tensors)), tensors["inputs"].numpy(),
        tensors["targets"].numpy(), None, JobOptions(),
    ).requests(chunk_bytes=64)))  # fmt: skip

    def stalled():
        yield first
        release.wait(30)

    holder = _raw_call(client, tensors, stalled())
    try:
        deadline = time.monotonic() + 10
        while stats(address).inflight_jobs < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield
    finally:
        release.set()
        holder.cancel()


def test_refused_jobs_carry_a_retry_pushback_trailer():
    """A server at its bound on admitted jobs says when to retry (100 ms)."""
    with run_server("--max-queued-jobs", "1") as server:
        tensors = random_job(SIZES, 1, 4, seed=0)
        with GradientClient(server.address, retry=NO_RETRIES) as client:
            with slot_held(client, tensors, server.address):
                with pytest.raises(grpc.RpcError) as err:
                    list(_raw_call(client, tensors))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "100"
    # ...which the client's retry policy follows instead of its own back-off, however many
    # attempts came before (spread by up to a quarter)
    for attempt in (0, 10):
        wait = RetryPolicy().delay(attempt, err.value, first_attempt_at=time.monotonic())
        assert 0.1 <= wait <= 0.125


def test_a_busy_servers_refusals_are_retried_until_room_frees_up():
    """The one admission slot stays taken for 1.5 s, longer than four attempts 100 ms apart
    last: the default policy keeps retrying a busy server's refusals (busy_retry_s) and the
    job runs once the slot is free; a policy whose busy time is shorter gives up."""
    with run_server("--max-queued-jobs", "1") as server:
        tensors = random_job(SIZES, 1, 4, seed=0)
        job = (params_of(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
        with GradientClient(server.address, retry=NO_RETRIES) as holder_client:
            with GradientClient(server.address, timeout=60) as client, ThreadPoolExecutor() as pool:
                with slot_held(holder_client, tensors, server.address):
                    started = time.monotonic()
                    waiting = pool.submit(client.compute, *job)
                    time.sleep(1.5)
                    assert not waiting.done()
                # the slot is free: the next retry is admitted
                assert waiting.result(timeout=10).loss.shape == (1,)
                assert time.monotonic() - started < 6  # not the holder's 30 s stall
            impatient = RetryPolicy(initial_backoff_s=0.05, busy_retry_s=0.5)
            with GradientClient(server.address, retry=impatient, timeout=60) as client:
                with slot_held(holder_client, tensors, server.address):
                    started = time.monotonic()
                    with pytest.raises(GradserveError) as refused:
                        client.compute(*job)
                    assert time.monotonic() - started < 1.5
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_refused_job_retries_as_soon_as_a_sibling_job_ends(asynchronous):
    """The one admission slot is held by a training job of the same client (40 optimiser
    steps); the job refused meanwhile is told to wait 100 s (the server's pushback), but
    retries as soon as its sibling ends: compute_many's case, where a client's own jobs
    hold the room."""
    policy = RetryPolicy()
    slow_job = random_job(SIZES, 4, 20000, seed=1)
    slow_args = (params_of(slow_job), slow_job["inputs"].numpy(), slow_job["targets"].numpy())
    training = dict(optimizer="sgd", steps=40, learning_rate=0.01)
    quick = random_job(SIZES, 1, 4, seed=2)
    quick_args = (params_of(quick), quick["inputs"].numpy(), quick["targets"].numpy())
    with run_server("--max-queued-jobs", "1", "--retry-pushback-ms", "100000") as server:

        def admitted() -> float:
            while stats(server.address).inflight_jobs < 1:
                time.sleep(0.01)
            return time.monotonic()

        def timed_sync():
            pool = ThreadPoolExecutor()
            with GradientClient(server.address, retry=policy) as client, pool:
                slow = pool.submit(client.compute, *slow_args, **training)
                started = admitted()
                client.compute(*quick_args)
                waited, slow_ended_first = time.monotonic() - started, slow.done()
                slow.result()
            return waited, slow_ended_first

        async def timed_async():
            async with AsyncGradientClient(server.address, retry=policy) as client:
                slow = asyncio.ensure_future(client.compute(*slow_args, **training))
                started = await asyncio.to_thread(admitted)
                await client.compute(*quick_args)
                waited, slow_ended_first = time.monotonic() - started, slow.done()
                await slow
            return waited, slow_ended_first

        waited, slow_ended_first = asyncio.run(timed_async()) if asynchronous else timed_sync()
    assert slow_ended_first  # the quick job was refused while the slot was taken
    assert waited < 15  # without the wake-up: the pushback's 100 s


def test_async_client_sees_the_servers_refusal_of_a_job_it_is_still_uploading():
    """A job of many messages refused from its header while the client still sends: the
    async client gets the server's status, not grpc.aio's INTERNAL "Internal error from
    Core" (grpc/grpc#36066), so a busy refusal is retried until the slot frees and a
    malformed job names its field."""
    big = random_job([64, 64, 8], 64, 4000, seed=3)  # ~2 MiB of inputs: several messages
    big_args = (params_of(big), big["inputs"].numpy(), big["targets"].numpy())
    tensors = random_job(SIZES, 1, 4, seed=0)
    with run_server("--max-queued-jobs", "1") as server:

        async def busy_then_free():
            async with AsyncGradientClient(server.address, timeout=60, chunk_bytes=1 << 16) as c:
                with GradientClient(server.address, retry=NO_RETRIES) as holder_client:
                    with slot_held(holder_client, tensors, server.address):
                        waiting = asyncio.ensure_future(c.compute(*big_args))
                        await asyncio.sleep(1.0)
                        assert not waiting.done(), waiting.exception()
                return await waiting

        assert asyncio.run(busy_then_free()).loss.shape == (64,)

        async def malformed():
            wrong = (big_args[0], big["inputs"].numpy()[:, :, :63], big_args[2])
            async with AsyncGradientClient(server.address, chunk_bytes=1 << 16) as c:
                errors = []
                for _ in range(5):
                    with pytest.raises(GradserveError) as err:
                        await c.compute(*wrong)
                    errors.append(err.value)
                return errors

        for error in asyncio.run(malformed()):
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error.details
            assert error.violations, error.details


def test_a_job_over_the_servers_limits_is_not_retried():
    """A job that holds more bytes than the server admits in all can never run there: its
    RESOURCE_EXHAUSTED carries a pushback of -1, and the client does not retry it."""
    with run_server("--max-inflight-bytes", "1") as server:
        tensors = random_job(SIZES, 1, 4, seed=0)
        with GradientClient(server.address, retry=NO_RETRIES) as client:
            with pytest.raises(grpc.RpcError) as err:
                list(_raw_call(client, tensors))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
        assert RetryPolicy().delay(0, err.value) is None
        before = stats(server.address).failed_jobs
        with GradientClient(server.address) as client:  # the default policy: 4 attempts
            with pytest.raises(GradserveError) as refused:
                client.compute(params_of(tensors), tensors["inputs"].numpy(),
                               tensors["targets"].numpy())  # fmt: skip
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stats(server.address).failed_jobs == before + 1  # tried once


def test_a_batch_that_runs_out_of_memory_is_retried_job_by_job(monkeypatch):
    """Device memory that holds each job but not the merged batch (stood in for by an engine
    that refuses launches of more than 3 models): every job still gets its own result."""
    from gradserve import kernels
    from gradserve.server import batching
    from gradserve.server.worker import DeviceWorker

    real_run = kernels.run

    def engine(job, name, device):
        if job.num_models > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real_run(job, name, device)

    monkeypatch.setattr(batching.kernels, "run", engine)
    tensors = [random_job(SIZES, 2, 9, seed=40 + s) for s in range(3)]
    jobs = [ensemble_job(t, SIZES) for t in tensors]

    async def run():
        batcher = batching.DynamicBatcher(
            DeviceWorker(torch.device("cpu")), batching.BatchingPolicy(max_delay_s=0.2)
        )
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(j, "torch", 1) for j in jobs)), batcher
        finally:
            await batcher.stop()

    launched, batcher = asyncio.run(run())
    assert batcher.launches == 3  # the batch of 6 models failed, then one launch per job
    for got, job in zip(launched, jobs, strict=True):
        alone = torch_engine.run(job)
        torch.testing.assert_close(got.result.loss, alone.loss)
        for g, ref in zip(got.result.weight_grads, alone.weight_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


def test_small_cpu_launches_run_on_one_thread_and_large_ones_on_all(monkeypatch):
    """A second intra-op thread gains little on a small launch and takes a core from the
    event loop serving small jobs (server.worker.SMALL_CPU_LAUNCH_FLOPS)."""
    from gradserve import kernels
    from gradserve.server import batching
    from gradserve.server.worker import SMALL_CPU_LAUNCH_FLOPS, DeviceWorker

    real_run, threads_seen = kernels.run, []

    def engine(job, name, device):
        threads_seen.append(torch.get_num_threads())
        return real_run(job, name, device)

    monkeypatch.setattr(batching.kernels, "run", engine)
    small, large = (1, 32), (64, 2048)  # (M, N) of [16, 32, 32, 1] jobs
    jobs = [ensemble_job(random_job(SIZES, m, n, seed=60), SIZES) for m, n in (small, large)]
    assert kernels.flops(jobs[0].mlp, *small) < SMALL_CPU_LAUNCH_FLOPS
    assert kernels.flops(jobs[1].mlp, *large) >= SMALL_CPU_LAUNCH_FLOPS

    async def run():
        batcher = batching.DynamicBatcher(DeviceWorker(torch.device("cpu")),
                                          batching.BatchingPolicy(max_delay_s=0))  # fmt: skip
        batcher.start()
        try:
            return [await batcher.submit(j, "torch", 1) for j in jobs]
        finally:
            await batcher.stop()

    before = torch.get_num_threads()
    launched = asyncio.run(run())
    assert threads_seen == [1, before]
    assert torch.get_num_threads() == before  # restored
    for got, job in zip(launched, jobs, strict=True):
        torch.testing.assert_close(got.result.loss, torch_engine.run(job).loss)
