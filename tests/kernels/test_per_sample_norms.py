"""Per-sample gradient norms of the torch engine against torch.func.vmap(grad) per-sample
gradients in float64 (independent of the engine's code)."""

import grpc
import pytest
import torch

from gradserve import kernels
from gradserve.kernels import torch_engine
from tests import per_sample
from tests.jobs import ensemble_job, random_job

SIZES = (5, 9, 4, 3)


def reference_norms(tensors, hidden, loss, reduction):
    grads = per_sample.per_sample_gradients(tensors, SIZES, hidden, loss, reduction)
    return per_sample.norms(grads)


@pytest.mark.parametrize("reduction", kernels.REDUCTIONS)
@pytest.mark.parametrize("loss", kernels.LOSSES)
@pytest.mark.parametrize("hidden", kernels.ACTIVATIONS)
def test_norms_equal_vmap_grad_per_sample_gradients(hidden, loss, reduction):
    tensors = random_job(SIZES, 3, 7, loss=loss, sample_weights=True, seed=5, dtype=torch.float64)
    job = ensemble_job(
        tensors, SIZES, hidden=hidden, loss=loss, reduction=reduction, precision="float64"
    )
    job.outputs = kernels.OutputRequest(parameter_gradients=False, per_sample_gradient_norms=True)
    got = torch_engine.run(job).per_sample_grad_norm
    ref = reference_norms(tensors, hidden, loss, reduction)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)


def test_norms_through_the_server_and_triton_refusal(client):
    from gradserve.client import GradserveError

    tensors = random_job(SIZES, 4, 6, sample_weights=True, seed=2)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    args = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    result = client.compute(
        *args,
        sample_weights=tensors["sample_weights"].numpy(),
        per_sample_gradient_norms=True,
        hidden_activation="tanh",
    )
    assert result.engine == "torch" and result.per_sample_grad_norm.shape == (4, 6)
    ref = reference_norms({k: v.double() for k, v in tensors.items()}, "tanh", "mse", "mean")
    torch.testing.assert_close(
        torch.from_numpy(result.per_sample_grad_norm).double(), ref, rtol=1e-5, atol=1e-8
    )
    with pytest.raises(GradserveError) as err:
        client.compute(*args, per_sample_gradient_norms=True, backend="triton")
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
