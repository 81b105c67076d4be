"""Health, reflection, metrics and graceful drain of a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError
from tests.jobs import random_job
from tests.servers import run_server

SIZES = (4, 8, 2)


def params_of(tensors):
    return {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}


def run_jobs(address, count):
    with GradientClient(address, timeout=60) as client:
        for seed in range(count):
            t = random_job(SIZES, 2, 5, seed=seed)
            client.compute(params_of(t), t["inputs"].numpy(), t["targets"].numpy())


def test_health_is_serving_for_the_server_and_the_service(server):
    with GradientClient(server.address) as client:
        assert client.health() == "SERVING"
        assert client.health("gradserve.v1.GradientService") == "SERVING"
        with pytest.raises(GradserveError) as err:
            client.health("no.such.Service")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_service_from_the_server_alone(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"gradserve.v1.GradientService", "grpc.health.v1.Health"} <= services
        proto = database.FindFileContainingSymbol("gradserve.v1.ComputeRequest")
        assert proto.package == "gradserve.v1"
        assert "JobHeader" in {m.name for m in proto.message_type}


def test_metrics_are_scraped_and_parsed():
    from gradserve.v1 import wire
    from tests.server.test_resilience import big_job_stream

    with run_server("--metrics-port", "0", "--upload-idle-timeout-s", "1") as srv:
        url = next(
            re.search(r"metrics on (\S+)", line)[1] for line in srv.log if "metrics on" in line
        )
        run_jobs(srv.address, 3)
        with GradientClient(srv.address) as client, pytest.raises(GradserveError):
            client.compute(
                {"layers.0.weight": [[[1.0]]], "layers.0.bias": [[0.0]]}, [[1.0, 2.0]], [[0.0]]
            )  # inputs too wide: INVALID_ARGUMENT
        released = threading.Event()

        def header_then_silence():
            yield big_job_stream()[0]
            released.wait(30)

        with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError):
            try:  # ended by the upload idle timeout
                list(channel.stream_stream(wire.COMPUTE_METHOD)(header_then_silence()))
            finally:
                released.set()
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        s.labels["outcome"]: s.value
        for s in families["gradserve_request"].samples
        if s.name == "gradserve_request_total"
    }
    assert requests["ok"] == 3 and requests["INVALID_ARGUMENT"] == 1
    assert requests["DEADLINE_EXCEEDED"] == 1
    timed_out = {
        s.labels["timer"]: s.value
        for s in families["gradserve_timed_out"].samples
        if s.name == "gradserve_timed_out_total"
    }
    assert timed_out == {"upload_idle": 1}
    launches = [
        s.value for s in families["gradserve_launch"].samples if s.name == "gradserve_launch_total"
    ]
    assert sum(launches) >= 1
    phases = {
        s.labels["phase"]
        for s in families["gradserve_request_duration_seconds"].samples
        if "phase" in s.labels
    }
    assert phases == {"upload", "queue", "compute", "download"}
    assert families["gradserve_inflight_jobs"].samples[0].value == 0
    assert families["gradserve_compiled_kernels"].samples[0].value >= 0
    assert families["gradserve_compiled_kernel_evictions"].samples[0].value == 0
    assert families["gradserve_kernel_cache_bytes"].samples[0].value == 0  # CPU: never pruned
    assert families["process_resident_memory_bytes"].samples[0].value > 0


def test_sigterm_drains_in_flight_jobs_refuses_new_ones_and_exits_zero():
    from tests.server.test_batching import slot_held

    with run_server("--batch-max-delay-ms", "1500") as srv:
        jobs = [random_job(SIZES, 1, 6, seed=s) for s in range(4)]

        async def scenario():
            async with AsyncGradientClient(srv.address, timeout=60) as client:
                with GradientClient(srv.address) as probe, contextlib.ExitStack() as held:
                    # another caller's job stalled mid-upload: queued jobs wait the delay
                    held.enter_context(slot_held(probe, random_job(SIZES, 1, 4), srv.address))
                    in_flight = [
                        asyncio.ensure_future(client.compute(
                            params_of(t), t["inputs"].numpy(), t["targets"].numpy()))
                        for t in jobs
                    ]  # fmt: skip
                    deadline = time.monotonic() + 30
                    while probe.server_info().stats.queued_jobs < 4:  # all four queued
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.02)
                    srv.process.send_signal(signal.SIGTERM)
                    while probe.health() == "SERVING":
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.02)
                    late = jobs[0]
                    with pytest.raises(GradserveError) as refused:
                        probe.compute(
                            params_of(late), late["inputs"].numpy(), late["targets"].numpy()
                        )
                    held.close()  # the stalled caller gives up; the queued jobs run
                    return await asyncio.gather(*in_flight), refused.value

        results, refused = asyncio.run(scenario())
        assert refused.code == grpc.StatusCode.UNAVAILABLE
        assert all(r.loss.shape == (1,) for r in results)
        assert srv.process.wait(timeout=30) == 0


def test_a_metrics_port_in_use_ends_the_start_with_a_message(server):
    """The first server's gRPC port is taken, so a second server cannot export metrics on
    it: it exits at once, naming the flag, before it serves anything."""
    import subprocess
    import sys

    port = server.address.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "gradserve.server", "--port", "0", "--metrics-port", port],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"--metrics-port {port}" in done.stderr and "Traceback" not in done.stderr
    assert "serving on" not in done.stderr


def job_log_lines(server, job_id: str, timeout: float = 10.0) -> list[str]:
    """The server's log lines that mention the job (the log is read by a thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in list(server.log) if f"job={job_id}" in line]
        if lines:
            return lines
        time.sleep(0.05)
    return []


@pytest.mark.parametrize(
    "tag, logged",
    [
        ("sweep-42/trial_7", "tag=sweep-42/trial_7 "),
        ("run 7\n2026-01-01 00:00:00,000 INFO gradserve.server job=0 outcome=ok",
         'tag="run 7\\n2026-01-01 00:00:00,000 INFO gradserve.server job=0 outcome=ok" '),
        ('a"b é', 'tag="a\\"b \\u00e9" '),
    ],
)  # fmt: skip
def test_a_job_logs_one_line_and_its_tag_cannot_forge_another(client, server, tag, logged):
    t = random_job(SIZES, 2, 5, seed=0)
    result = client.compute(params_of(t), t["inputs"].numpy(), t["targets"].numpy(), tag=tag)
    (line,) = job_log_lines(server, result.job_id)
    assert "outcome=ok" in line and "engine=torch M=2 N=5 layers=[4, 8, 2]" in line
    assert logged in line and line.endswith("\n") and line.count("\n") == 1
