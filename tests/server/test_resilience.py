"""The server under hostile streams, fuzzing, load and clients that walk away."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradserve.client import NO_RETRIES, GradientClient
from gradserve.client._loadgen import run_load
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire
from tests.jobs import random_job
from tests.process_memory import memory_bytes
from tests.server.test_bad_input import CASES, LIMITED_SERVER_FLAGS, valid_stream
from tests.server.test_ops import job_log_lines
from tests.servers import run_server


def wait_idle(address: str, timeout: float = 30.0) -> pb.ServerStats:
    deadline = time.monotonic() + timeout
    with GradientClient(address) as client:
        while True:
            s = client.server_info().stats
            if (s.inflight_jobs, s.inflight_bytes, s.queued_jobs) == (0, 0, 0):
                return s
            assert time.monotonic() < deadline, f"server never went idle: {s}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def hostile_server():
    with run_server(*LIMITED_SERVER_FLAGS) as srv:
        yield srv


def test_bad_input_battery_keeps_memory_bounded(hostile_server):
    with grpc.insecure_channel(hostile_server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        codes = set()
        for round_ in range(4):
            if round_ == 1:
                baseline = memory_bytes(hostile_server.process.pid) / 2**20
            for stream, expected in CASES.values():
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Compute(iter(stream), timeout=30))
                assert err.value.code() == expected
                codes.add(err.value.code())
        grown = memory_bytes(hostile_server.process.pid) / 2**20 - baseline
        responses = list(stub.Compute(iter(valid_stream()), timeout=30))
    assert len(CASES) >= 25 and grpc.StatusCode.INTERNAL not in codes
    assert responses[-1].HasField("summary")
    assert grown < 64, f"RSS grew by {grown:.0f} MiB over three rounds of bad input"
    wait_idle(hostile_server.address)


chunk_messages = st.builds(
    lambda name, offset, data: pb.ComputeRequest(
        chunks=[pb.TensorChunk(name=name, offset=offset, data=data)]
    ).SerializeToString(),
    st.sampled_from(["inputs", "targets", "layers.0.weight", "layers.1.bias", "x"]),
    st.integers(min_value=-8, max_value=200),
    st.binary(max_size=64),
)
mutated_header = st.builds(
    lambda header, cut: header[:cut],
    st.just(valid_stream()[0].SerializeToString()),
    st.integers(min_value=0, max_value=400),
)
request_streams = st.lists(
    st.one_of(chunk_messages, mutated_header, st.binary(max_size=64)), max_size=6
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.one_of(
        request_streams,
        st.builds(
            lambda head, tail: [valid_stream()[0].SerializeToString(), *tail],
            st.none(),
            request_streams,
        ),
    )
)
def test_fuzzed_request_streams_get_a_clean_status(hostile_server, stream):
    with grpc.insecure_channel(hostile_server.address) as channel:
        raw = channel.stream_stream(wire.COMPUTE_METHOD)
        try:
            list(raw(iter(stream), timeout=10))
        except grpc.RpcError as e:
            assert e.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            }, e.details()
    assert hostile_server.process.poll() is None


def test_64_concurrent_clients_times_20_jobs_without_errors(server):
    report = asyncio.run(
        run_load(
            server.address,
            concurrency=64,
            jobs_per_client=20,
            layer_sizes=[16, 32, 32, 1],
            models=1,
            samples=32,
        )
    )
    print(
        f"\n64 clients x 20 jobs: {report.throughput:.0f} jobs/s, "
        f"p50 {1e3 * report.percentile(50):.1f} ms, p99 {1e3 * report.percentile(99):.1f} ms"
    )
    assert report.errors == {}
    assert len(report.latencies) == 1280


def big_job_stream(chunk=1 << 20, sizes=(1024, 1024, 1)):
    tensors = random_job(sizes, 1, 4, seed=1)
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=sizes),
        tensors=[
            pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    messages = [pb.ComputeRequest(header=header).SerializeToString()]
    for name, value in tensors.items():
        raw = memoryview(value.numpy().tobytes())
        messages += [
            wire.encode_chunk(name, o, raw[o : o + chunk]) for o in range(0, len(raw), chunk)
        ]
    return messages


def test_cancel_mid_upload_leaks_nothing(server):
    messages = big_job_stream()
    sent_some, release = threading.Event(), threading.Event()

    def stream():
        yield from messages[:3]
        sent_some.set()
        release.wait(10)

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(wire.COMPUTE_METHOD)(stream(), timeout=30)
        first = next(call)  # accepted: the server holds the job's buffers now
        assert pb.ComputeResponse.FromString(first).HasField("accepted")
        assert sent_some.wait(10)
        with GradientClient(server.address) as probe:
            assert probe.server_info().stats.inflight_jobs >= 1
        call.cancel()
        release.set()
    wait_idle(server.address)


def test_cancel_mid_download_leaks_nothing(server):
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(wire.COMPUTE_METHOD)(iter(big_job_stream()), timeout=30)
        received = [next(call), next(call)]  # accepted, then the first results
        assert len(received) == 2
        call.cancel()
    wait_idle(server.address)


@pytest.mark.parametrize("micro_batch_samples", [0, 8192])
def test_a_client_that_stops_reading_then_cancels_is_no_server_fault(micro_batch_samples):
    """The server's write of a result waits for a client that does not read (64 MB of input
    gradients; a streamed job's while its upload goes on); the client cancels. The failed
    write is the client's going: the job is logged CANCELLED, not a server fault."""
    from tests.server.test_stream_window import request_messages, streamed_job

    header, tensors = streamed_job(2_000_000)
    header.micro_batch_samples = micro_batch_samples
    header.outputs.input_gradients = True
    with run_server() as server:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_stream(wire.COMPUTE_METHOD)(
                request_messages(header, tensors, [0]), timeout=60
            )
            with GradientClient(server.address) as probe:
                deadline = time.monotonic() + 30
                while probe.server_info().stats.inflight_jobs < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            time.sleep(3)  # the upload and compute done, or the stream stalled: writes wait
            call.cancel()
        stats = wait_idle(server.address)
        assert stats.failed_jobs == 1 and stats.completed_jobs == 0
        log = "".join(server.log)
        assert "failed inside the server" not in log, log
        assert re.search(r"job=\S+ peer=\S* outcome=CANCELLED", log), log
        with GradientClient(server.address) as client:  # and it serves on
            assert client.server_info().version


def test_a_client_that_stops_reading_loses_its_job_after_the_download_idle_timeout():
    """A raw client sends a job of 4 MiB of results, reads its accepted message and nothing
    more, with no deadline: gRPC's flow control holds the server's next write, and after
    --download-idle-timeout-s the job ends, its bytes freed (the server idle; without the
    timeout it held them for as long as the client stayed) and counted as failed at once.
    The client hears DEADLINE_EXCEEDED once it reads again, and the server serves on."""
    with run_server("--download-idle-timeout-s", "1") as server:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_stream(wire.COMPUTE_METHOD)(iter(big_job_stream()))
            next(call)  # accepted: the job holds its admitted bytes from here on
            stats = wait_idle(server.address, timeout=20)
            assert (stats.completed_jobs, stats.failed_jobs) == (0, 1)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "read no result message for 1.0 s" in err.value.details()
        with GradientClient(server.address) as client:
            tensors = random_job([3, 4, 1], 2, 5, seed=2)
            client.compute(_params(tensors), tensors["inputs"].numpy(),
                           tensors["targets"].numpy())  # fmt: skip


def test_a_slow_reader_within_the_download_idle_timeout_gets_all_its_results():
    """The timeout bounds each wait for the client to read, not the whole download: a
    client that takes 0.6 s over each of the job's ~5 result messages (3 s in all) against
    a 2 s timeout gets every one and the summary."""
    with run_server("--download-idle-timeout-s", "2") as server:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_stream(wire.COMPUTE_METHOD)(iter(big_job_stream()))
            messages = []
            for message in call:
                messages.append(message)
                time.sleep(0.6)
        assert len(messages) >= 5
        assert pb.ComputeResponse.FromString(messages[-1]).HasField("summary")


def paced(messages: list[bytes], pause: float, stop: threading.Event):
    """The messages of a job, the header at once and then one every `pause` seconds, until
    the last or until `stop` is set."""
    yield messages[0]
    for message in messages[1:]:
        if stop.wait(pause):
            return
        yield message


def test_an_upload_trickling_below_the_minimum_rate_loses_its_job():
    """A raw client sends the header of a 4 MiB job at once, then a 4 KiB chunk every
    0.25 s (16 KiB/s; each read well inside the 1 s idle timeout), against a minimum of
    64 KiB/s: its reads may wait 1 s plus 1/16 s per chunk, so after about 1.3 s the job
    ends (its trickle would take over four minutes), its admitted bytes freed and the job
    counted as failed while the client still sends, and the server serves on."""
    stop = threading.Event()
    flags = ("--upload-idle-timeout-s", "1", "--min-upload-bytes-per-s", "65536")
    with run_server(*flags) as server:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_stream(wire.COMPUTE_METHOD)(
                paced(big_job_stream(chunk=4096), 0.25, stop), timeout=60
            )
            try:
                job_id = pb.ComputeResponse.FromString(next(call)).accepted.job_id
                # idle within 20 s, where the trickle would run for over four minutes
                stats = wait_idle(server.address, timeout=20)
                with pytest.raises(grpc.RpcError) as err:
                    list(call)
            finally:
                stop.set()
        assert (stats.completed_jobs, stats.failed_jobs) == (0, 1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "slower than the server's minimum of 65536 bytes/s" in err.value.details()
        (line,) = job_log_lines(server, job_id)
        assert re.search(r"outcome=DEADLINE_EXCEEDED .* timeout=upload_rate .*slower than", line)
        with GradientClient(server.address) as client:
            tensors = random_job([3, 4, 1], 2, 5, seed=2)
            client.compute(_params(tensors), tensors["inputs"].numpy(),
                           tensors["targets"].numpy())  # fmt: skip


def test_an_upload_pausing_between_chunks_at_several_times_the_minimum_rate_runs():
    """64 KiB every 0.15 s (427 KiB/s) against a minimum of 128 KiB/s and a 1 s idle
    timeout: 2.4 s of waiting in all, each chunk earning 0.5 s."""
    messages = big_job_stream(chunk=65536, sizes=(256, 1024, 1))
    flags = ("--upload-idle-timeout-s", "1", "--min-upload-bytes-per-s", str(128 << 10))
    with run_server(*flags) as server, grpc.insecure_channel(server.address) as channel:
        responses = list(channel.stream_stream(wire.COMPUTE_METHOD)(
            paced(messages, 0.15, threading.Event()), timeout=60))  # fmt: skip
    assert len(messages) >= 17
    assert pb.ComputeResponse.FromString(responses[-1]).HasField("summary")


def _params(tensors):
    return {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}


def _holds_or_held_a_job(client: GradientClient) -> bool:
    stats = client.server_info().stats
    return stats.inflight_jobs + stats.completed_jobs > 0


def test_a_job_on_a_server_that_stopped_answering_moves_to_a_live_one(monkeypatch):
    """The first server is frozen (SIGSTOP: a hung host sends no reset) while it trains a
    job; the client's keepalive pings go unanswered, the connection drops and the job is
    retried on the second server. Without pings the job would wait forever. The retry
    trains from the first step again; on_step hears of each step once."""
    import os
    import signal

    from gradserve.client import _connection

    monkeypatch.setattr(_connection, "KEEPALIVE_TIME_MS", 1000)
    monkeypatch.setattr(_connection, "KEEPALIVE_TIMEOUT_MS", 1000)
    tensors = random_job([8, 32, 32, 1], 16, 512, shared_inputs=True, seed=41)
    args = (_params(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
    steps, seen, stepping = 500, [], threading.Event()

    def on_step(k, losses):
        seen.append(k)
        if k >= 10:
            stepping.set()

    # ~2.5 s of training here (10 s with two busy processes): frozen at about step 10
    training = dict(optimizer="sgd", learning_rate=0.01, steps=steps, on_step=on_step)
    with run_server() as frozen, run_server() as live:
        outcome = {}

        def job():
            with GradientClient([frozen.address, live.address]) as client:
                try:
                    outcome["result"] = client.compute(*args, **training)
                except Exception as e:  # noqa: BLE001 - reported below
                    outcome["error"] = e

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        assert stepping.wait(20), "the job never trained on the first server"
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            # The retry reaches the live server within a few keepalive periods (~2 s; 30 s
            # leaves room for busy cores); the steps it then trains may take longer.
            with GradientClient(live.address) as watcher:
                deadline = time.monotonic() + 30
                while not _holds_or_held_a_job(watcher):
                    assert time.monotonic() < deadline, "the job still waits on the frozen server"
                    time.sleep(0.1)
                thread.join(timeout=120)
                assert not thread.is_alive(), "the retried job never ended"
                assert watcher.server_info().stats.completed_jobs == 1  # the retry ran there
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].losses.shape == (steps, 16)
    assert seen == list(range(steps))


def test_a_new_client_passes_over_a_frozen_server_it_cannot_connect_to(monkeypatch):
    """A frozen server's kernel still completes TCP handshakes, but no HTTP/2 follows: the
    connection attempt times out (1 s here) and the job runs on the live server."""
    import os
    import signal

    from gradserve.client import _connection

    monkeypatch.setattr(_connection, "CONNECT_TIMEOUT_MS", 1000)
    tensors = random_job([8, 32, 32, 1], 4, 64, shared_inputs=True, seed=44)
    args = (_params(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
    with run_server() as frozen, run_server() as live:
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with GradientClient([frozen.address, live.address], timeout=60) as client:
                result = client.compute(*args)
            took = time.monotonic() - started
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
    assert result.loss.shape == (4,)
    assert took < 10  # gRPC's default connect timeout alone is 20 s


def test_client_pings_do_not_end_a_job_the_server_is_silent_on(monkeypatch):
    """A job queued behind a long one gets nothing from the server for seconds while its
    client pings every 1.2 s. The server accepts the pings: gRPC's default takes pings more
    often than every 5 minutes, while it sends nothing, for abuse and closes the connection
    at the third ("too_many_pings"), failing the job."""
    from concurrent.futures import ThreadPoolExecutor

    from gradserve.client import NO_RETRIES, GradserveError, _connection

    slow = random_job([8, 32, 32, 1], 16, 512, shared_inputs=True, seed=42)
    quick = random_job([8, 32, 32, 1], 16, 512, shared_inputs=True, seed=43)
    with run_server("--batch-max-jobs", "1") as server:
        with GradientClient(server.address) as first, ThreadPoolExecutor() as pool:
            # far more steps than 8 s allow: its deadline ends it, and the engine is free
            holder = pool.submit(
                first.compute, _params(slow), slow["inputs"].numpy(), slow["targets"].numpy(),
                optimizer="sgd", learning_rate=0.01, steps=100_000, timeout=8,
            )  # fmt: skip
            deadline = time.monotonic() + 20
            while first.server_info().stats.inflight_jobs < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            monkeypatch.setattr(_connection, "KEEPALIVE_TIME_MS", 1200)
            started = time.monotonic()
            with GradientClient(server.address, retry=NO_RETRIES) as pinging:
                result = pinging.compute(
                    _params(quick), quick["inputs"].numpy(), quick["targets"].numpy()
                )
            waited = time.monotonic() - started
            with pytest.raises(GradserveError):
                holder.result(timeout=60)
    assert result.loss.shape == (16,)
    assert waited > 4  # queued long enough for three pings


def test_a_job_outlasting_the_connection_age_runs_to_its_end():
    """--max-connection-age-s closes connections so that clients re-resolve; a job longer
    than the age (and than age + grace, were there one) still finishes on its connection,
    and the next job goes over a new one."""
    tensors = random_job([8, 32, 32, 1], 16, 512, shared_inputs=True, seed=45)
    args = (_params(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
    with run_server("--max-connection-age-s", "0.25") as server:
        with GradientClient(server.address, retry=NO_RETRIES, timeout=120) as client:
            started = time.monotonic()
            trained = client.compute(*args, optimizer="sgd", learning_rate=0.01, steps=2000)
            took = time.monotonic() - started
            again = client.compute(*args)
    assert trained.losses.shape == (2000, 16) and again.loss.shape == (16,)
    assert took > 0.5, f"the job took {took:.2f} s, not past age + grace"
