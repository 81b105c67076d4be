"""Streamed (micro-batched) jobs through a real server: equal to the one-shot result, for
N far beyond what the server holds at once, and refused cleanly when malformed."""

import grpc
import numpy as np
import pytest
import torch

from gradserve.client import GradserveError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.v1 import wire
from tests.jobs import random_job

SIZES = (7, 12, 5, 3)


def shared_job(m, n, loss="mse", seed=40, weights=True):
    t = random_job(SIZES, m, n, loss=loss, shared_inputs=True, sample_weights=weights, seed=seed)
    params = {k: v.numpy() for k, v in t.items() if k.startswith("layers.")}
    kw = {"sample_weights": t["sample_weights"].numpy()} if weights else {}
    return params, t["inputs"].numpy(), t["targets"].numpy(), kw


@pytest.mark.parametrize(
    "loss, reduction, micro",
    [
        ("mse", "mean", 1000),
        ("cross_entropy", "sum", 333),
        ("huber", "mean", 1),
        ("l1", "sum", 5000),
    ],
)
def test_streamed_equals_one_shot(client, loss, reduction, micro):
    n = 2500 if micro > 1 else 37
    params, x, y, kw = shared_job(4, n, loss)
    opts = dict(loss=loss, reduction=reduction, hidden_activation="softplus", **kw)
    whole = client.compute(params, x, y, **opts)
    streamed = client.compute(params, x, y, micro_batch_samples=micro, **opts)
    np.testing.assert_allclose(streamed.loss, whole.loss, rtol=2e-6)
    for name, g in whole.gradients.items():
        # float32 sums in another grouping: compare per model by relative L2 error
        for k in range(4):
            err = np.linalg.norm(streamed.gradients[name][k] - g[k]) / np.linalg.norm(g[k])
            assert err < 1e-5, (name, k, err)


@pytest.mark.parametrize("loss, reduction", [("mse", "mean"), ("cross_entropy", "sum")])
def test_streamed_dp_sgd_equals_one_shot(client, loss, reduction):
    """Clipping per sample as the whole job would, the noise drawn once as for the whole."""
    params, x, y, kw = shared_job(3, 700, loss)
    opts = dict(loss=loss, reduction=reduction, clip_norm=0.05, noise_multiplier=0.8,
                noise_seed=12, **kw)  # fmt: skip
    whole = client.compute(params, x, y, **opts)
    streamed = client.compute(params, x, y, micro_batch_samples=128, **opts)
    clean = client.compute(params, x, y, **{**opts, "noise_multiplier": 0.0})
    plain = client.compute(params, x, y, loss=loss, reduction=reduction, **kw)
    for name, g in whole.gradients.items():
        np.testing.assert_allclose(streamed.gradients[name], g, rtol=1e-4, atol=1e-7)
        assert not np.allclose(clean.gradients[name], g)  # the noise is there
        assert not np.allclose(plain.gradients[name], clean.gradients[name])  # and clipping


def test_streamed_on_the_triton_engine(client):
    params, x, y, kw = shared_job(3, 300, "bce_with_logits")
    opts = dict(loss="bce_with_logits", backend="triton", **kw)
    whole = client.compute(params, x, y, **opts)
    streamed = client.compute(params, x, y, micro_batch_samples=64, **opts)
    assert streamed.engine == "triton"
    np.testing.assert_allclose(streamed.loss, whole.loss, rtol=2e-6)
    for name, g in whole.gradients.items():
        np.testing.assert_allclose(streamed.gradients[name], g, rtol=1e-4, atol=1e-7)


def test_non_finite_sample_mid_stream_is_refused(client):
    params, x, y, _ = shared_job(2, 400, weights=False)
    x = x.copy()
    x[333, 2] = np.nan  # in the fourth micro-batch
    with pytest.raises(GradserveError) as err:
        client.compute(params, x, y, micro_batch_samples=100)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in err.value.details
    assert client.compute(params, x[:300], y[:300], micro_batch_samples=100).loss.shape == (2,)


def test_streamed_job_refuses_per_model_samples_and_per_sample_outputs(client):
    params, x, y, _ = shared_job(3, 50, weights=False)
    per_model = np.broadcast_to(x, (3, *x.shape)).copy()
    per_model_y = np.broadcast_to(y, (3, *y.shape)).copy()
    bootstrap = np.ones((3, 50), dtype=np.float32)
    cases = [
        ((params, per_model, y), {}, "tensors[inputs].shape"),
        ((params, x, per_model_y), {}, "tensors[targets].shape"),
        ((params, x, y), {"sample_weights": bootstrap}, "tensors[sample_weights].shape"),
        ((params, x, y), {"per_sample_losses": True}, "outputs.per_sample_losses"),
        ((params, x, y), {"input_gradients": True}, "outputs.input_gradients"),
    ]
    for args, kw, field in cases:
        with pytest.raises(GradserveError) as err:
            client.compute(*args, micro_batch_samples=10, **kw)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert field in [f for f, _ in err.value.violations]
    with pytest.raises(GradserveError) as err:
        client.compute(params, x, y, micro_batch_samples=10, optimizer="sgd", learning_rate=0.1)
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


def raw_stream(params, x, y, order):
    """A streamed job's request messages with its chunks in the given order."""
    tensors = {**params, "inputs": x, "targets": y}
    header = pb.JobHeader(
        architecture=pb.Architecture(layer_sizes=SIZES),
        micro_batch_samples=10,
        tensors=[
            pb.TensorDescriptor(name=k, dtype=pb.DATA_TYPE_FLOAT32, shape=v.shape)
            for k, v in tensors.items()
        ],
    )
    messages = [pb.ComputeRequest(header=header).SerializeToString()]
    for name, start, end in order:
        data = memoryview(np.ascontiguousarray(tensors[name])).cast("B")
        row = len(data) // (x.shape[0] if name in ("inputs", "targets") else 1)
        if name.startswith("layers."):
            start, end, row = 0, 1, len(data)
        messages.append(wire.encode_chunk(name, start * row, data[start * row : end * row]))
    return messages


@pytest.mark.parametrize(
    "case",
    ["samples before parameters", "inputs far ahead of targets", "stream ends early"],
)
def test_malformed_streams_get_invalid_argument(server, case):
    params, x, y, _ = shared_job(2, 100, weights=False)
    layers = [(k, 0, 1) for k in params]
    if case == "samples before parameters":
        order = [("inputs", 0, 10)] + layers
    elif case == "inputs far ahead of targets":
        order = layers + [("inputs", k, k + 10) for k in range(0, 100, 10)] + [("targets", 0, 100)]
    else:
        order = layers + [("inputs", 0, 50), ("targets", 0, 50)]
    messages = raw_stream(params, x, y, order)
    with grpc.insecure_channel(server.address) as channel:
        compute = channel.stream_stream(
            wire.COMPUTE_METHOD, request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            list(compute(iter(messages), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        stub = pb_grpc.GradientServiceStub(channel)
        assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).version


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def test_four_million_samples_stream_through_bounded_server_memory():
    """N = 4,000,000 (144 MB of samples): the server's peak RSS grows by well under the job's
    input bytes, and the result equals the float64 oracle summed over pieces."""
    from gradserve.client import GradientClient
    from tests.oracle import oracle
    from tests.servers import run_server

    sizes, m, n = (8, 16, 1), 2, 4_000_000
    g = torch.Generator().manual_seed(41)
    params = {
        "layers.0.weight": torch.randn(m, 16, 8, generator=g) / 8**0.5,
        "layers.0.bias": torch.randn(m, 16, generator=g) * 0.1,
        "layers.1.weight": torch.randn(m, 1, 16, generator=g) / 4,
        "layers.1.bias": torch.randn(m, 1, generator=g) * 0.1,
    }
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    input_bytes = x.numel() * 4 + y.numel() * 4

    with run_server() as server, GradientClient(server.address, timeout=600) as client:
        pid = server.process.pid
        # A small streamed job first: the server's first job costs ~10-20 MiB of one-off
        # growth (thread arenas, buffers) whatever its size.
        client.compute({k: v.numpy() for k, v in params.items()}, x[:20_000].numpy(),
                       y[:20_000].numpy(), micro_batch_samples=20_000)  # fmt: skip
        before = rss_kib(pid, "VmRSS")
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        result = client.compute(
            {k: v.numpy() for k, v in params.items()}, x.numpy(), y.numpy(),
            hidden_activation="tanh", micro_batch_samples=20_000,
        )  # fmt: skip
        growth = (rss_kib(pid, "VmHWM") - before) * 1024
    # Measured here: 9-14 MiB on idle cores, 26-35 MiB with both cores busy (gRPC's flow
    # control lets more bytes wait in the server when it reads slower than the client
    # sends), the same for N = 2M and 4M; one-shot, N = 2M: 861 MiB.
    assert growth < input_bytes / 2, f"server peak RSS grew {growth >> 20} MiB"

    # The oracle's float64 sums over pieces of 250,000 samples, then the mean.
    wide = {k: v.double() for k, v in params.items()}
    loss = torch.zeros(m, dtype=torch.float64)
    grads = {k: torch.zeros_like(v) for k, v in wide.items()}
    for start in range(0, n, 250_000):
        xs, ys = x[start : start + 250_000], y[start : start + 250_000]
        piece = oracle(sizes, wide, xs.expand(m, *xs.shape), ys.expand(m, *ys.shape),
                       hidden="tanh", reduction="sum")  # fmt: skip
        loss += piece.loss
        for k in grads:
            grads[k] += piece.grads[k + ".grad"]
    np.testing.assert_allclose(result.loss, (loss / n).numpy(), rtol=1e-6)
    for k, ref in grads.items():
        ref = ref / n
        for j in range(m):
            err = np.linalg.norm(result.gradients[k][j] - ref[j].numpy()) / ref[j].norm().item()
            assert err < 1e-5, (k, j, err)  # float32 tolerance: sums in float64 over 200 groups


def test_streamed_layers_without_bias_equal_one_shot(client):
    """Plain and DP-clipped gradients of a network whose first and last layers have no
    bias: the streamed job's equal the one-shot job's, and no such bias comes back."""
    params, x, y, kw = shared_job(3, 700, weights=False)
    del params["layers.0.bias"], params["layers.2.bias"]
    for opts in ({}, dict(clip_norm=0.05)):
        whole = client.compute(params, x, y, **opts)
        streamed = client.compute(params, x, y, micro_batch_samples=128, **opts)
        assert sorted(streamed.gradients) == sorted(params)
        for name, g in whole.gradients.items():
            np.testing.assert_allclose(streamed.gradients[name], g, rtol=1e-4, atol=1e-7)


def test_micro_batch_sums_keep_their_digits_however_many():
    """The server adds micro-batches' summed gradients in float64: 50,000 of them (e.g. 16
    samples each of 800,000) come out within float32's rounding of the exact sum (2e-8 to
    3e-8 here), where float32 running sums were 1.5e-6 to 3.2e-6 off; their error grows
    with the number of parts."""
    from types import SimpleNamespace

    from gradserve.kernels import EnsembleResult
    from gradserve.server import streaming

    g = torch.Generator().manual_seed(5)
    parts = 50_000
    # per-part sums with a common drift, as a gradient not yet at its minimum has
    weights = torch.randn(parts, 2, 4, 3, generator=g) + 0.5
    biases = torch.randn(parts, 2, 4, generator=g) - 0.3
    losses = torch.rand(parts, 2, generator=g)
    total = None
    for k in range(parts):
        part = EnsembleResult(loss=losses[k].clone(), weight_grads=[weights[k].clone()],
                              bias_grads=[biases[k].clone()])  # fmt: skip
        total = streaming.accumulate(total, part)
    count = 16 * parts
    plan = SimpleNamespace(loss=SimpleNamespace(name="mse", reduction="mean"), num_samples=count,
                           mlp=SimpleNamespace(layer_sizes=(3, 4, 1)), precision="float32",
                           privacy=None)  # fmt: skip
    result = streaming.scale(total, plan, "cpu")
    for got, exact in ((result.loss, losses.double().sum(0) / count),
                       (result.weight_grads[0], weights.double().sum(0) / count),
                       (result.bias_grads[0], biases.double().sum(0) / count)):  # fmt: skip
        assert got.dtype == torch.float32
        error = ((got.double() - exact).norm() / exact.norm()).item()
        assert error < 1e-7, error
