"""Per-sample gradient norms of the torch engine against torch.func.vmap(grad) per-sample
gradients in float64 (independent of the engine's code)."""

import grpc
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradserve import kernels
from gradserve.kernels import torch_engine
from tests.jobs import ensemble_job, random_job
from tests.oracle import activation_module

SIZES = (5, 9, 4, 3)


def sample_loss(loss: str, y, t, w, count):
    """One sample's contribution to the model's reduced loss (y [dL], t [dL] or class)."""
    if loss == "cross_entropy":
        value = F.cross_entropy(y.unsqueeze(0), t.unsqueeze(0).long(), reduction="sum")
    elif loss == "mse":
        value = F.mse_loss(y, t, reduction="sum")
    elif loss == "l1":
        value = F.l1_loss(y, t, reduction="sum")
    elif loss == "huber":
        value = F.huber_loss(y, t, reduction="sum")
    else:
        value = F.binary_cross_entropy_with_logits(y, t, reduction="sum")
    return value * w / count


def reference_norms(tensors, hidden, loss, reduction):
    m, n = tensors["layers.0.weight"].shape[0], tensors["inputs"].shape[-2]
    d_out = SIZES[-1]
    count = 1 if reduction == "sum" else n * (1 if loss == "cross_entropy" else d_out)
    norms = []
    for k in range(m):
        mods = []
        for i in range(len(SIZES) - 1):
            mods.append(nn.Linear(SIZES[i], SIZES[i + 1]).double())
            mods.append(activation_module(hidden if i < len(SIZES) - 2 else "identity"))
        net = nn.Sequential(*mods)
        params = {
            f"{2 * i}.{kind}": tensors[f"layers.{i}.{kind}"][k].double()
            for i in range(len(SIZES) - 1)
            for kind in ("weight", "bias")
        }
        x = tensors["inputs"][k].double()
        t = tensors["targets"][k]
        t = t if loss == "cross_entropy" else t.double()
        w = tensors["sample_weights"][k].double()

        def f(p, xn, tn, wn, net=net):
            return sample_loss(loss, functional_call(net, p, (xn,)), tn, wn, count)

        per_sample = vmap(grad(f), in_dims=(None, 0, 0, 0))(params, x, t, w)
        norms.append(
            torch.stack([g.reshape(n, -1).square().sum(1) for g in per_sample.values()])
            .sum(0)
            .sqrt()
        )
    return torch.stack(norms)


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
