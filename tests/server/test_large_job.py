"""A job of more than 64 MiB crosses intact in default-size chunks, no message over 4 MiB."""

import grpc
import numpy as np
import torch

from gradserve.client import GradientClient
from gradserve.kernels import torch_engine
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
