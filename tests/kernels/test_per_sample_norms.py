"""Per-sample gradient norms of the torch engine against torch.func.vmap(grad) per-sample
gradients in float64 (independent of the engine's code)."""

import grpc
import pytest
import torch

from gradserve import kernels
from gradserve.kernels import torch_engine, triton_engine
from tests import per_sample
from tests.jobs import ensemble_job, random_job

SIZES = (5, 9, 4, 3)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_norms(tensors, hidden, loss, reduction, sizes=SIZES):
    grads = per_sample.per_sample_gradients(tensors, sizes, hidden, loss, reduction)
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


@pytest.mark.parametrize(
    "hidden, loss, sizes",
    [
        *[(h, loss, SIZES) for h in ("sigmoid", "softplus", "gelu")  # f(0) != 0 for two
          for loss in ("mse", "cross_entropy", "bce_with_logits")],
        ("sigmoid", "mse", (37, 5, 70, 3)),  # layers padded to 64, 16, 128, 16
    ],
)  # fmt: skip
def test_triton_engine_norms_equal_vmap_grad(hidden, loss, sizes):
    """The fused kernel's norm pass (float32, interpreter on CPUs), odd widths padded."""
    tensors = random_job(sizes, 3, 37, loss=loss, sample_weights=True, seed=7)
    job = ensemble_job(tensors, sizes, hidden=hidden, loss=loss)
    job.outputs = kernels.OutputRequest(True, True, False, False, True)
    got = triton_engine.run(job, DEVICE)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    ref = reference_norms(wide, hidden, loss, "mean", sizes)
    torch.testing.assert_close(got.per_sample_grad_norm.double().cpu(), ref, rtol=1e-5, atol=1e-9)
    plain = torch_engine.run(job)  # input gradients come from the norm pass
    torch.testing.assert_close(got.input_grads.cpu(), plain.input_grads, rtol=1e-5, atol=1e-7)


def test_norms_through_the_server_on_both_engines(client):
    from gradserve.client import GradserveError

    tensors = random_job(SIZES, 4, 6, sample_weights=True, seed=2)
    params = {k: v.numpy() for k, v in tensors.items() if k.startswith("layers.")}
    args = (params, tensors["inputs"].numpy(), tensors["targets"].numpy())
    ref = reference_norms({k: v.double() for k, v in tensors.items()}, "tanh", "mse", "mean")
    for backend in ("torch", "triton"):
        result = client.compute(
            *args,
            sample_weights=tensors["sample_weights"].numpy(),
            per_sample_gradient_norms=True,
            hidden_activation="tanh",
            backend=backend,
        )
        assert result.engine == backend and result.per_sample_grad_norm.shape == (4, 6)
        torch.testing.assert_close(
            torch.from_numpy(result.per_sample_grad_norm).double(), ref, rtol=1e-5, atol=1e-8
        )
    wide = random_job((3, 130, 2), 2, 5, seed=3)  # wider than the fused kernel takes
    wide_args = [{k: v.numpy() for k, v in wide.items() if k.startswith("layers.")},
                 wide["inputs"].numpy(), wide["targets"].numpy()]  # fmt: skip
    with pytest.raises(GradserveError) as err:
        client.compute(*wide_args, per_sample_gradient_norms=True, backend="triton")
    assert err.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert client.compute(*wide_args, per_sample_gradient_norms=True).engine == "torch"
