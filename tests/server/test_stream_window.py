"""--stream-window-bytes: how far a job's upload may run ahead of the server's reads.

A streamed job's client sends while the server's engine is busy with another job; the
server reads two micro-batches ahead of its compute and then stops, so what the client
still gets to send is what gRPC lets wait: the stream's flow-control window (and the
transports' buffers). With a fixed window that lead follows the window, either way."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from gradserve.client import GradientClient
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire
from tests.oracle import oracle
from tests.servers import run_server

SIZES = (8, 16, 1)
MICRO_BATCH = 8192  # samples: 288 KiB of inputs and targets
MiB = 1 << 20


def streamed_job(n: int) -> tuple[pb.JobHeader, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    params = {}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        params[f"layers.{i}.weight"] = rng.standard_normal((1, b, a), dtype=np.float32)
        params[f"layers.{i}.bias"] = rng.standard_normal((1, b), dtype=np.float32)
    x = rng.standard_normal((n, SIZES[0]), dtype=np.float32)
    y = rng.standard_normal((1, n, SIZES[-1]), dtype=np.float32)
    tensors = {**params, "inputs": x, "targets": y}
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=SIZES),
        micro_batch_samples=MICRO_BATCH,
        tensors=[
            pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    return header, tensors


def request_messages(header: pb.JobHeader, tensors: dict[str, np.ndarray], sent: list[int]):
    """The job's request messages, one chunk each; `sent[0]` counts the sample bytes handed
    to gRPC so far."""
    yield pb.ComputeRequest(header=header).SerializeToString()
    n = header.tensors[-1].shape[1]
    params = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    for name, p in params.items():
        yield wire.encode_chunk(name, 0, memoryview(p).cast("B"))
    for start in range(0, n, MICRO_BATCH):
        end = min(n, start + MICRO_BATCH)
        for name in ("inputs", "targets"):
            data = memoryview(tensors[name]).cast("B")
            row = len(data) // n
            sent[0] += (end - start) * row
            yield wire.encode_chunk(name, start * row, data[start * row : end * row])


def busy_engine_job(client: GradientClient, done: threading.Event) -> None:
    """One job of about 3e11 FLOPs (seconds on a CPU): the engine's only thread is busy."""
    rng = np.random.default_rng(1)
    sizes, n = (256, 2048, 2048, 1), 12_000
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"layers.{i}.weight"] = (rng.standard_normal((1, b, a)) / a**0.5).astype("f4")
        params[f"layers.{i}.bias"] = rng.standard_normal((1, b)).astype("f4")
    x = rng.standard_normal((1, n, sizes[0])).astype("f4")
    y = rng.standard_normal((1, n, 1)).astype("f4")
    try:
        client.compute(params, x, y)
    finally:
        done.set()


def upload_lead(window: int) -> int:
    """Sample bytes a streamed job's client got to send while a server with this stream
    window computed another job."""
    header, tensors = streamed_job(4_000_000)  # 144 MB of samples
    with run_server("--stream-window-bytes", str(window)) as server:
        with GradientClient(server.address, timeout=120) as client:
            busy_done = threading.Event()
            busy = threading.Thread(target=busy_engine_job, args=(client, busy_done))
            busy.start()
            while client.server_info().stats.inflight_jobs < 1:
                time.sleep(0.01)
            time.sleep(0.3)  # its 30 MB upload in, its compute begun
            sent = [0]
            with grpc.insecure_channel(server.address) as channel:
                call = channel.stream_stream(wire.COMPUTE_METHOD)(
                    request_messages(header, tensors, sent), timeout=120
                )
                # the lead once it has stopped growing for a second
                last, still_since = 0, time.monotonic()
                while not last or time.monotonic() - still_since < 1.0:
                    time.sleep(0.05)
                    if sent[0] != last:
                        last, still_since = sent[0], time.monotonic()
                assert not busy_done.is_set(), "the busy job ended before the lead settled"
                call.cancel()
            busy.join(timeout=120)
            # the cancelled job is gone and the server serves on
            while (stats := client.server_info().stats).inflight_jobs:
                time.sleep(0.05)
            assert stats.inflight_bytes == 0
    return last


def test_a_fixed_stream_window_bounds_how_far_an_upload_runs_ahead():
    # Measured on a 2-core host, idle and with two or six busy processes: 0.8-1.1 MiB
    # with 64 KiB (about three micro-batches: the server's two ahead and one more on its
    # way), 20-24 MiB with 16 MiB; gRPC's adaptive window (no flag): 6.2-6.7 MiB.
    small, large = upload_lead(65536), upload_lead(16 * MiB)
    assert small < 4 * MICRO_BATCH * 36 + 1 * MiB, small
    assert large > 16 * MiB, large


def test_a_streamed_jobs_fixed_window_counts_against_the_bytes_in_flight():
    """A streamed job holds its parameters, about three micro-batches and its results, and
    with a fixed window as many bytes more may wait in gRPC: admission counts them."""
    from gradserve.client import GradserveError

    header, tensors = streamed_job(100_000)
    params = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    x, y = tensors["inputs"], tensors["targets"]
    # held: 3 micro-batches of 36-byte samples and the parameters; results: the loss and
    # the gradients
    param_bytes = sum(p.nbytes for p in params.values())
    held = 3 * MICRO_BATCH * 36 + param_bytes + (4 + param_bytes)
    window = 1 * MiB
    limit = held + window // 2
    flags = ("--stream-window-bytes", str(window), "--max-inflight-bytes", str(limit))
    with run_server(*flags) as server, GradientClient(server.address, timeout=60) as client:
        assert client.server_info().limits.stream_window_bytes == window
        assert f"stream_window={window}" in "".join(server.log)  # the start's log line says so
        with pytest.raises(GradserveError) as refused:
            client.compute(params, x, y, micro_batch_samples=MICRO_BATCH)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"job holds {held + window} bytes" in str(refused.value)
        # a job the limit allows, window and all, runs on the same server
        quarter = MICRO_BATCH // 4  # holds 3/4 of three micro-batches less: 663552 bytes
        result = client.compute(params, x, y, micro_batch_samples=quarter)
    wide = {k: torch.from_numpy(v).double() for k, v in params.items()}
    x64, y64 = torch.from_numpy(x).double(), torch.from_numpy(y).double()
    ref = oracle(SIZES, wide, x64.expand(1, *x64.shape), y64)
    np.testing.assert_allclose(result.loss, ref.loss.numpy(), rtol=1e-5)
    for name, g in ref.grads.items():
        got = result.gradients[name.removesuffix(".grad")]
        np.testing.assert_allclose(got, g.numpy(), rtol=1e-4, atol=1e-6)  # float32 sums
