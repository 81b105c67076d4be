"""A job of more than 64 MiB crosses intact in default-size chunks, no message over 4 MiB."""

import asyncio
import time

import grpc
import numpy as np
import pytest
import torch

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError
from gradserve.kernels import torch_engine
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import wire
from tests.jobs import ensemble_job, random_job
from tests.servers import run_server

FOUR_MIB = 4 << 20


def test_job_over_64_mib_round_trips_in_small_messages():
    sizes = (4096, 4096, 3)
    tensors = random_job(sizes, 1, 5, seed=21)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total > 64 << 20

    # The server's message limit is max_chunk_bytes + 1 MiB = 4 MiB, the client's is gRPC's
    # default 4 MiB: any larger message in either direction fails the call.
    with run_server("--max-chunk-bytes", str(3 << 20)) as server:
        channel = grpc.insecure_channel(
            server.address,
            options=[
                ("grpc.max_receive_message_length", FOUR_MIB),
                ("grpc.max_send_message_length", FOUR_MIB),
            ],
        )
        with GradientClient(server.address, channel=channel, timeout=300) as client:
            params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
            result = client.compute(
                params, tensors["inputs"].numpy(), tensors["targets"].numpy(), forward_outputs=True
            )
    assert result.summary["bytes_received"] == total
    grads_bytes = sum(g.nbytes for g in result.gradients.values())
    assert result.summary["bytes_sent"] >= grads_bytes > 64 << 20

    local = torch_engine.run(ensemble_job(tensors, sizes))
    np.testing.assert_allclose(result.outputs, local.outputs.numpy(), rtol=1e-5, atol=1e-6)
    for i in range(2):
        for name, ref in (
            (f"layers.{i}.weight", local.weight_grads[i]),
            (f"layers.{i}.bias", local.bias_grads[i]),
        ):
            got = torch.from_numpy(result.gradients[name])
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def large_job_with_nan_at_the_end():
    tensors = random_job((2048, 2048, 1), 1, 3, seed=5)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    params["layers.1.bias"][...] = np.nan  # the last tensor uploaded
    return params, tensors["inputs"].numpy(), tensors["targets"].numpy()


def test_large_job_refused_after_its_upload_fails_cleanly_in_both_clients(server):
    """The server acknowledges a multi-message job before its bytes arrive; the clients then
    page in the result buffers once their upload is handed over. A job refused after that
    (non-finite values are checked when all bytes are in) must still end with its status."""
    params, x, y = large_job_with_nan_at_the_end()
    with GradientClient(server.address, timeout=60) as client:
        with pytest.raises(GradserveError) as err:
            client.compute(params, x, y)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    async def run_async():
        async with AsyncGradientClient(server.address, timeout=60) as client:
            return await client.compute(params, x, y)

    with pytest.raises(GradserveError) as err:
        asyncio.run(run_async())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("timeout", [0.005, 0.02, 0.05])
def test_deadline_during_a_large_upload_ends_the_call(server, timeout):
    params, x, y = large_job_with_nan_at_the_end()
    params["layers.1.bias"][...] = 1.0
    start = time.monotonic()
    with GradientClient(server.address, timeout=timeout) as client:
        try:
            client.compute(params, x, y)
        except GradserveError as e:
            assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10


# Limits raised past what the machine holds, for jobs larger than it.
UNLIMITED = ("--max-work-bytes", str(10**16), "--max-inflight-bytes", str(10**16))


def outputs_larger_than_the_machine() -> dict[str, np.ndarray]:
    """The tensors of a job whose forward outputs (16384 x 65536 x 32 float32, 137 GB)
    no machine here holds, sent in 30 MB."""
    rng = np.random.default_rng(0)
    m, n, sizes = 16384, 65536, (1, 8, 32)
    tensors = {}
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        tensors[f"layers.{i}.weight"] = rng.standard_normal((m, d_out, d_in), dtype=np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal((m, d_out), dtype=np.float32)
    tensors["inputs"] = rng.standard_normal((n, sizes[0]), dtype=np.float32)
    tensors["targets"] = rng.standard_normal((n, sizes[-1]), dtype=np.float32)
    return tensors


def skip_where_every_allocation_succeeds():
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":  # every allocation succeeds and the OOM killer decides
            pytest.skip("the kernel overcommits memory unconditionally here")


def a_small_job_is_served(address: str, tensors) -> None:
    with GradientClient(address, timeout=60) as client:
        small = {k: v[:2] for k, v in tensors.items() if k.startswith("layers.")}
        result = client.compute(small, tensors["inputs"][:5], tensors["targets"][:5])
        assert result.loss.shape == (2,)


def test_a_job_larger_than_the_machine_gets_resource_exhausted_and_the_server_goes_on():
    """The forward outputs a job asks for cannot be allocated (the CPU engine allocates a
    large job's results before its first block). That is the job's size, not a server
    fault: RESOURCE_EXHAUSTED, and the next job is served. Sent by a raw gRPC client: the
    Python client would fail first, making room for them (the next test)."""
    skip_where_every_allocation_succeeds()
    tensors = outputs_larger_than_the_machine()
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=(1, 8, 32)),
        outputs=pb.Outputs(forward_outputs=True),
        tensors=[pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
                 for k, v in tensors.items()],
    )  # fmt: skip
    messages = [pb.ComputeRequest(header=header).SerializeToString()]
    for name, value in tensors.items():
        data = memoryview(value).cast("B")
        for offset in range(0, len(data), 1 << 20):
            messages.append(wire.encode_chunk(name, offset, data[offset : offset + (1 << 20)]))
    with run_server(*UNLIMITED) as server:
        with grpc.insecure_channel(server.address) as channel:
            compute = channel.stream_stream(
                wire.COMPUTE_METHOD, request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError) as err:
                list(compute(iter(messages), timeout=120))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "ran out of memory" in err.value.details()
        a_small_job_is_served(server.address, tensors)


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_results_the_client_cannot_hold_get_resource_exhausted_and_the_server_goes_on(
    client_kind,
):
    """The Python clients make room for a job's results when the server accepts it: where
    they cannot, RESOURCE_EXHAUSTED naming them (not numpy's MemoryError), the call
    cancelled, and the server serves the next job."""
    skip_where_every_allocation_succeeds()
    tensors = outputs_larger_than_the_machine()
    params = {k: v for k, v in tensors.items() if k.startswith("layers.")}
    job = (params, tensors["inputs"], tensors["targets"])

    async def compute_async(address):
        async with AsyncGradientClient(address, timeout=120) as client:
            await client.compute(*job, forward_outputs=True)

    with run_server(*UNLIMITED) as server:
        with pytest.raises(GradserveError) as err:
            if client_kind == "sync":
                with GradientClient(server.address, timeout=120) as client:
                    client.compute(*job, forward_outputs=True)
            else:
                asyncio.run(compute_async(server.address))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details
        assert "outputs [16384, 65536, 32]" in err.value.details
        a_small_job_is_served(server.address, tensors)


def test_working_memory_is_estimated_for_the_blocks_a_cpu_server_computes():
    """--max-work-bytes 200 MiB: one model of 262,144 samples through a layer of 64 (64 MiB
    of activations, four copies of each layer's in float64 whole: 553 MB) runs, in blocks
    of 16,384 samples (torch_engine.block_shape); a job of 128 MiB of weights (twice that
    held while it runs) is refused with RESOURCE_EXHAUSTED."""
    rng = np.random.default_rng(1)

    def params(m, sizes):
        out = {}
        for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
            out[f"layers.{i}.weight"] = rng.standard_normal((m, d_out, d_in), dtype=np.float32)
            out[f"layers.{i}.bias"] = rng.standard_normal((m, d_out), dtype=np.float32)
        return out

    n = 1 << 18
    x = rng.standard_normal((n, 1), dtype=np.float32)
    y = rng.standard_normal((n, 1), dtype=np.float32)
    with run_server("--max-work-bytes", str(200 << 20)) as server:
        with GradientClient(server.address, timeout=120) as client:
            result = client.compute(params(1, (1, 64, 1)), x, y)
            assert np.isfinite(result.loss).all()
            wide = params(4096, (8, 1024, 1))
            with pytest.raises(GradserveError) as err:
                client.compute(wide, rng.standard_normal((16, 8), dtype=np.float32), y[:16])
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "working memory" in err.value.details
