"""Two real replicas behind a real nginx (grpc_pass): killing one mid-stream loses no job."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import signal
import socket
import subprocess

import grpc
import numpy as np
import pytest

from gradserve.client import GradientClient, RetryPolicy
from gradserve.kernels import torch_engine
from tests.jobs import ensemble_job, random_job
from tests.servers import run_server

TEMPLATE = pathlib.Path(__file__).parents[2] / "deploy" / "nginx" / "gradserve.conf.template"
SIZES = (8, 16, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def nginx(replicas: list[str], runtime: pathlib.Path, read_timeout: str | None = None):
    """The deployment's nginx in front of `replicas`; `read_timeout` replaces its
    grpc_read_timeout (300 s) to test silences in seconds."""
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if not pathlib.Path(nginx_bin).exists():
        pytest.fail("nginx is not installed (scripts/test.sh installs it)")
    listen = f"127.0.0.1:{free_port()}"
    conf = TEMPLATE.read_text()
    conf = conf.replace(
        "${UPSTREAM_SERVERS}",
        "\n        ".join(f"server {r} max_fails=1 fail_timeout=10s;" for r in replicas),
    )
    conf = conf.replace("${LISTEN}", listen).replace("${RUNTIME_DIR}", str(runtime))
    if read_timeout is not None:
        assert "grpc_read_timeout 300s;" in conf
        conf = conf.replace("grpc_read_timeout 300s;", f"grpc_read_timeout {read_timeout};")
    path = runtime / "nginx.conf"
    path.write_text(conf)
    subprocess.run(
        [nginx_bin, "-t", "-c", str(path), "-p", str(runtime)], check=True, capture_output=True
    )
    proc = subprocess.Popen(
        [nginx_bin, "-c", str(path), "-p", str(runtime), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
    )
    try:
        with grpc.insecure_channel(listen) as channel:  # nginx is listening...
            grpc.channel_ready_future(channel).result(timeout=30)
        with GradientClient(listen, timeout=30) as probe:  # ...and reaches a healthy replica
            assert probe.health() == "SERVING"
        yield listen
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_killing_a_replica_during_a_stream_of_jobs_loses_none(tmp_path):
    with run_server() as first, run_server() as second:
        with nginx([first.address, second.address], tmp_path) as address:
            policy = RetryPolicy(max_attempts=6, initial_backoff_s=0.05)
            jobs = [random_job(SIZES, 3, 16, seed=s) for s in range(40)]
            served_by_second_before = second_jobs = 0
            with GradientClient(address, retry=policy, timeout=60) as client:
                for i, tensors in enumerate(jobs):
                    if i == 15:
                        with GradientClient(second.address) as direct:
                            served_by_second_before = direct.server_info().stats.completed_jobs
                        first.process.kill()  # SIGKILL: no drain, connections just die
                    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
                    result = client.compute(
                        params, tensors["inputs"].numpy(), tensors["targets"].numpy()
                    )
                    ref = torch_engine.run(ensemble_job(tensors, SIZES))
                    for j in range(2):
                        np.testing.assert_allclose(
                            result.gradients[f"layers.{j}.weight"],
                            ref.weight_grads[j].numpy(),
                            rtol=1e-5,
                            atol=1e-7,
                        )
            with GradientClient(second.address) as direct:
                second_jobs = direct.server_info().stats.completed_jobs
    assert first.process.returncode == -signal.SIGKILL
    assert served_by_second_before > 0  # nginx spread jobs over both replicas
    assert second_jobs - served_by_second_before >= 40 - 15  # the rest went to the survivor


@pytest.mark.parametrize("heartbeat_s, streamed", [("0", False), ("0.5", False), ("0.5", True)])
def test_a_job_queued_past_the_proxys_read_timeout_is_kept_by_heartbeats(
    tmp_path, heartbeat_s, streamed
):
    """nginx ends a response stream silent for its grpc_read_timeout (2 s here, 300 s
    deployed), whatever pings cross it. A job queued behind a training job (one job per
    launch) hears nothing for seconds: without heartbeats nginx cuts it (504: UNAVAILABLE);
    with them it completes. A streamed job's upload stalls while its first micro-batch
    waits: it too hears heartbeats then, its per-sample results coming back after."""
    from gradserve.client import NO_RETRIES, GradserveError
    from tests.server.test_heartbeats import engine_occupied, job_args

    args = job_args(50)
    options = dict(micro_batch_samples=64, per_sample_losses=True) if streamed else {}
    flags = ("--batch-max-jobs", "1", "--heartbeat-s", heartbeat_s)
    with run_server(*flags) as replica, nginx([replica.address], tmp_path, "2s") as address:
        # the training job goes to the replica directly: it streams its steps' losses
        with engine_occupied(replica.address, args, 6):
            with GradientClient(address, retry=NO_RETRIES, timeout=60) as client:
                try:  # queued until the training job's 6 s deadline ends it
                    result = client.compute(*args, **options)
                except GradserveError as e:
                    result = e
        with GradientClient(replica.address) as direct:
            alone = direct.compute(*args, per_sample_losses=True)
    if heartbeat_s == "0":
        assert isinstance(result, GradserveError) and result.code == grpc.StatusCode.UNAVAILABLE
        return
    assert not isinstance(result, GradserveError), result
    assert result.summary["queue_seconds"] > 3
    np.testing.assert_allclose(result.loss, alone.loss, rtol=1e-5)
    if streamed:
        np.testing.assert_allclose(result.tensors["per_sample_loss"],
                                   alone.tensors["per_sample_loss"], rtol=1e-6)  # fmt: skip
