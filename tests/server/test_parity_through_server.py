"""Gradients through a real server and the real client equal the float64 oracle."""

import re

import numpy as np
import pytest
import torch

from gradserve import kernels
from tests.jobs import random_job
from tests.oracle import assert_close_per_model, assert_matches_oracle, oracle, oracle_for

ODD_SIZES = (5, 13, 7, 3)


def params_of(tensors):
    return {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}


def check(client, layer_sizes, tensors, precision="float32", **opts):
    result = client.compute(
        params_of(tensors),
        tensors["inputs"].numpy(),
        tensors["targets"].numpy(),
        sample_weights=tensors["sample_weights"].numpy() if "sample_weights" in tensors else None,
        precision=precision,
        input_gradients=True,
        per_sample_losses=True,
        forward_outputs=True,
        **opts,
    )
    names = {"hidden_activation": "hidden", "output_activation": "output"}
    ref = oracle_for(layer_sizes, tensors, **{names.get(k, k): v for k, v in opts.items()})
    assert isinstance(result.loss, np.ndarray)
    assert result.engine == opts.get("backend", "torch").replace("auto", "torch")
    assert result.device == "cpu"
    got = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in result.tensors.items()}
    assert_matches_oracle(got, ref, precision)
    return result


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("shared", [False, True], ids=["per_model", "shared"])
@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_server_matches_oracle_for_every_activation_and_loss(
    client, hidden, loss, reduction, shared, m
):
    tensors = random_job(ODD_SIZES, m, 9, loss=loss, shared_inputs=shared, seed=m + 1)
    check(client, ODD_SIZES, tensors, hidden_activation=hidden, loss=loss, reduction=reduction)


@pytest.mark.parametrize(
    "layer_sizes, m, n", [((1, 1), 1, 1), ((7, 1, 9, 2), 5, 1), ((3, 17, 17, 4), 2, 33)]
)
def test_server_awkward_shapes_with_sample_weights(client, layer_sizes, m, n):
    tensors = random_job(layer_sizes, m, n, sample_weights=True, seed=3)
    check(client, layer_sizes, tensors, hidden_activation="softplus", output_activation="sigmoid")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "shared",
    [("inputs",), ("targets",), ("inputs", "sample_weights"), ("targets", "sample_weights")],
)
def test_each_sample_tensor_is_shared_or_per_model_on_its_own(client, shared, backend):
    """E.g. one set of inputs with per-model targets, or with per-model (bootstrap) sample
    weights: each sample tensor may be [N, ...] or [M, N, ...] whatever the others are."""
    tensors = random_job(ODD_SIZES, 3, 11, sample_weights=True, seed=5)
    for name in shared:
        tensors[name] = tensors[name][0].clone()
    check(client, ODD_SIZES, tensors, hidden_activation="tanh", backend=backend)


def test_server_float64_job(client):
    tensors = random_job(ODD_SIZES, 3, 6, dtype=torch.float64, seed=8)
    result = check(client, ODD_SIZES, tensors, precision="float64", hidden_activation="gelu")
    assert result.loss.dtype == np.float64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_leaky_relu_slopes_and_huber_delta_cross_the_wire(client, backend):
    """Hidden and output leaky_relu each keep their own slope, on either engine."""
    tensors = random_job(ODD_SIZES, 2, 8, seed=12)
    result = client.compute(
        params_of(tensors),
        tensors["inputs"].numpy(),
        tensors["targets"].numpy(),
        hidden_activation=("leaky_relu", 0.2),
        output_activation=("leaky_relu", 0.6),
        loss="huber",
        huber_delta=0.1,
        backend=backend,
    )
    assert result.engine == backend
    ref = oracle(
        ODD_SIZES,
        tensors,
        tensors["inputs"],
        tensors["targets"],
        hidden="leaky_relu",
        negative_slope=0.2,
        output="leaky_relu",
        output_slope=0.6,
        loss="huber",
        huber_delta=0.1,
    )
    assert_close_per_model("loss", result.loss, ref.loss, "float32")
    for name, grad in result.gradients.items():
        assert_close_per_model(name, grad, ref.grads[f"{name}.grad"], "float32")


def test_bfloat16_gradient_transport_is_within_bf16_tolerance(client):
    tensors = random_job(ODD_SIZES, 3, 10, seed=4)
    full = client.compute(params_of(tensors), tensors["inputs"].numpy(), tensors["targets"].numpy())
    half = client.compute(
        params_of(tensors),
        tensors["inputs"].numpy(),
        tensors["targets"].numpy(),
        gradient_dtype="bfloat16",
    )
    grad_bytes = sum(v.nbytes for k, v in full.tensors.items() if k.endswith(".grad"))
    assert half.summary["bytes_sent"] == full.summary["bytes_sent"] - grad_bytes // 2
    # numpy has no bfloat16: the result says which tensors it widened
    assert {k for k, d in half.wire_dtypes.items() if d == "bfloat16"} == {
        k for k in full.tensors if k.endswith(".grad")
    }
    assert set(full.wire_dtypes.values()) == {"float32"}
    for name, g in full.gradients.items():
        assert_close_per_model(name, half.gradients[name], torch.from_numpy(g), "bfloat16")


def test_gradients_beyond_the_transport_dtype_are_refused_not_sent_as_infinities(client):
    """float16 ends at 65504: a gradient past it is OUT_OF_RANGE naming the tensor and the
    option to change; bfloat16 (float32's range) carries the same job; NaN and infinities
    a job allows stay what they are."""
    import grpc

    from gradserve.client import GradserveError

    tensors = random_job(ODD_SIZES, 2, 9, seed=5)
    params, targets = params_of(tensors), tensors["targets"].numpy()
    inputs = tensors["inputs"].numpy() * 1e4  # weight gradients far past 65504
    with pytest.raises(GradserveError) as err:
        client.compute(params, inputs, targets, reduction="sum", gradient_dtype="float16")
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    # the first gradient sent that does not fit (the last layer's, here) is named
    assert re.match(r"layers\.\d\.(weight|bias)\.grad: \d+ values beyond the range of float16",
                    err.value.details)  # fmt: skip
    assert err.value.violations[0][0] == "gradient_dtype"
    full = client.compute(params, inputs, targets, reduction="sum")
    half = client.compute(params, inputs, targets, reduction="sum", gradient_dtype="bfloat16")
    for name, g in full.gradients.items():
        assert_close_per_model(name, half.gradients[name], torch.from_numpy(g), "bfloat16")

    with_nan = tensors["inputs"].numpy().copy()
    with_nan[0, 0, 0] = np.nan  # model 0, sample 0
    result = client.compute(
        params, with_nan, targets, gradient_dtype="float16", allow_non_finite=True
    )
    assert np.isnan(result.gradients["layers.0.weight"][0]).any()
    assert np.isfinite(result.gradients["layers.0.weight"][1]).all()


def test_float16_jobs_refuse_weights_and_inputs_that_float16_cannot_hold(client):
    """A float16 job rounds its weights and inputs to float16, whose largest value is
    65504: a finite 7e4 there would become Inf and that model's results NaN. Refused,
    naming the tensor, unless the job allows non-finite values; bfloat16 (float32's range)
    takes the same values, and so do biases and targets, which stay float32."""
    import grpc

    from gradserve.client import GradserveError

    tensors = random_job(ODD_SIZES, 2, 9, seed=6)
    params, inputs, targets = params_of(tensors), tensors["inputs"].numpy(), tensors["targets"]
    big_input = inputs.copy()
    big_input[1, 3, 0] = -7e4
    big_weight = {**params, "layers.1.weight": params["layers.1.weight"].copy()}
    big_weight["layers.1.weight"][0, 2, 4] = 7e4
    for job_params, job_inputs, name in ((params, big_input, "inputs"),
                                         (big_weight, inputs, "layers.1.weight")):  # fmt: skip
        with pytest.raises(GradserveError) as err:
            client.compute(job_params, job_inputs, targets.numpy(), precision="float16")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"tensor {name!r} holds values beyond float16's range" in err.value.details
        wide = client.compute(job_params, job_inputs, targets.numpy(), precision="bfloat16")
        assert np.isfinite(wide.loss).all()
        allowed = client.compute(job_params, job_inputs, targets.numpy(), precision="float16",
                                 allow_non_finite=True)  # fmt: skip
        assert not np.isfinite(allowed.loss).all()
    at_the_edge = inputs.copy()
    at_the_edge[0, 0, 0] = 65504.0  # float16's largest value
    big_bias = {**params, "layers.0.bias": params["layers.0.bias"] * 1e5}
    for job_params, job_inputs, job_targets in ((params, at_the_edge, targets),
                                                (big_bias, inputs, targets * 1e5)):  # fmt: skip
        result = client.compute(job_params, job_inputs, job_targets.numpy(), precision="float16")
        assert np.isfinite(result.loss).all()
    # a streamed job's samples are checked as each micro-batch is cut
    shared = random_job(ODD_SIZES, 2, 9, shared_inputs=True, seed=6)
    shared_inputs = shared["inputs"].numpy().copy()
    shared_inputs[7, 1] = 1e6
    with pytest.raises(GradserveError, match="'inputs' holds values beyond float16's range"):
        client.compute(params_of(shared), shared_inputs, shared["targets"].numpy(),
                       precision="float16", micro_batch_samples=4)  # fmt: skip


def test_loss_only_job_sends_no_gradients(client):
    tensors = random_job(ODD_SIZES, 2, 5)
    result = client.compute(
        params_of(tensors),
        tensors["inputs"].numpy(),
        tensors["targets"].numpy(),
        parameter_gradients=False,
    )
    assert result.gradients is None
    assert list(result.tensors) == ["loss"]


@pytest.mark.parametrize("layer_sizes", [ODD_SIZES, (5, 150, 3)])
def test_triton_engine_through_the_server(client, layer_sizes):
    """backend="triton" runs the Triton engine (Triton's interpreter on CPU-only machines)."""
    tensors = random_job(layer_sizes, 3, 37, loss="cross_entropy", shared_inputs=True, seed=6)
    result = check(
        client,
        layer_sizes,
        tensors,
        loss="cross_entropy",
        hidden_activation="tanh",
        backend="triton",
    )
    assert result.engine == "triton"
