"""Layers without a bias (nn.Linear(..., bias=False), MLPSpec.layers_without_bias): every
engine computes them with a zero bias, returns a zero gradient for it (so optimiser steps
keep it zero) and leaves it out of per-sample gradient norms and DP clipping; checked
against the float64 oracle and per-sample reference built with bias=False modules."""

import dataclasses

import pytest
import torch

from gradserve import kernels
from gradserve.kernels import Optimizer, Privacy
from tests import per_sample
from tests.jobs import ensemble_job, random_job
from tests.oracle import assert_matches_oracle, engine_tensors, oracle_for

SIZES = (5, 13, 7, 3)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bias_free(tensors, sizes, without, **options):
    """(the job's tensors without those biases, its engine job with zero ones)."""
    job = ensemble_job(tensors, sizes, **options)
    job.mlp = dataclasses.replace(job.mlp, layers_without_bias=tuple(without))
    job.biases = [torch.zeros_like(b) if i in without else b for i, b in enumerate(job.biases)]
    kept = {k: v for k, v in tensors.items()
            if not any(k == f"layers.{i}.bias" for i in without)}  # fmt: skip
    return kept, job


def without_dropped(named: dict, without) -> dict:
    """An engine's results less the zero gradients of the biases that are not there."""
    for i in without:
        grad = named.pop(f"layers.{i}.bias.grad")
        assert not grad.any()
    return named


@pytest.mark.parametrize("without", [(0,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_gradients_equal_the_oracles_of_bias_free_modules(engine, without):
    tensors = random_job(SIZES, 3, 37, loss="cross_entropy", shared_inputs=True, seed=70)
    kept, job = bias_free(tensors, SIZES, without, hidden="tanh", loss="cross_entropy")
    got = kernels.run(job, engine, torch.device(DEVICE))
    ref = oracle_for(SIZES, kept, hidden="tanh", loss="cross_entropy")
    assert set(ref.grads) == {k + ".grad" for k in kept if k.startswith("layers.")}
    assert_matches_oracle(without_dropped(engine_tensors(got), without), ref, "float32")


def test_the_per_layer_triton_path_too():
    wide = (5, 150, 3)  # wider than the fused kernel's 128
    tensors = random_job(wide, 2, 9, seed=71)
    kept, job = bias_free(tensors, wide, (0,))
    got = kernels.run(job, "triton", torch.device(DEVICE))
    assert_matches_oracle(without_dropped(engine_tensors(got), (0,)), oracle_for(wide, kept),
                          "float32")  # fmt: skip


# The torch engine in float64 (to float64's rounding), the Triton engine's fused kernel in
# float32 (to float32's: the interpreter, or a GPU's FMA units).
NORM_ENGINES = {"torch": ("float64", 1e-9, 1e-12), "triton": ("float32", 1e-5, 1e-7)}


@pytest.mark.parametrize("without", [(1,), (0, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("engine", ["torch", "triton"])
def test_per_sample_norms_and_clipping_leave_the_missing_biases_out(engine, reduction, without):
    """Against per-sample gradients of bias=False modules (vmap(grad), float64)."""
    precision, rtol, atol = NORM_ENGINES[engine]
    tensors = random_job(SIZES, 2, 11, seed=72, dtype=torch.float64)
    kept, job = bias_free(tensors, SIZES, without, reduction=reduction, precision=precision,
                          input_gradients=False, per_sample_losses=False,
                          forward_outputs=False)  # fmt: skip
    job.outputs = dataclasses.replace(job.outputs, per_sample_gradient_norms=True)
    ref = per_sample.per_sample_gradients(kept, SIZES, "relu", "mse", reduction)
    assert not any(f"layers.{i}.bias" in ref for i in without)
    scale = 11 if reduction == "mean" else 1  # a sample's own loss: N x its contribution
    device = torch.device(DEVICE if engine == "triton" else "cpu")
    got = kernels.run(job, engine, device)
    torch.testing.assert_close(got.per_sample_grad_norm.double().cpu(), per_sample.norms(ref),
                               rtol=rtol, atol=atol)  # fmt: skip
    clip = float((per_sample.norms(ref) * scale).median())  # clips about half the samples
    job.privacy = Privacy(clip_norm=clip)
    clipped = kernels.run(job, engine, device)
    want = per_sample.clipped_sums(ref, clip, scale)
    for i in range(3):
        torch.testing.assert_close(clipped.weight_grads[i].double().cpu(),
                                   want[f"layers.{i}.weight"], rtol=rtol, atol=atol)  # fmt: skip
        if i in without:
            assert not clipped.bias_grads[i].any()
        else:
            torch.testing.assert_close(clipped.bias_grads[i].double().cpu(),
                                       want[f"layers.{i}.bias"], rtol=rtol, atol=atol)  # fmt: skip


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimiser_steps_keep_a_missing_bias_at_zero(kind):
    """Momentum, weight decay and Adam's moments all leave a zero bias with zero gradients
    at zero; the other parameters train as with bias=False torch modules."""
    tensors = random_job(SIZES, 2, 16, seed=73)
    kept, job = bias_free(tensors, SIZES, (0, 2))
    optimizers = {
        "sgd": (Optimizer("sgd", 4, 0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01,
                                          nesterov=True)),
        "adamw": (Optimizer("adamw", 4, 0.01, weight_decay=0.1),
                  lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)),
    }  # fmt: skip
    opt, make = optimizers[kind]
    job.optimizer = opt
    job.outputs = kernels.OutputRequest()
    got = kernels.run(job, "torch", torch.device("cpu"))
    assert not got.biases[0].any() and not got.biases[2].any()
    nets = []
    for k in range(2):
        net = torch.nn.Sequential(torch.nn.Linear(5, 13, bias=False), torch.nn.ReLU(),
                                  torch.nn.Linear(13, 7), torch.nn.ReLU(),
                                  torch.nn.Linear(7, 3, bias=False)).double()  # fmt: skip
        with torch.no_grad():
            for i, layer in ((0, net[0]), (1, net[2]), (2, net[4])):
                layer.weight.copy_(tensors[f"layers.{i}.weight"][k])
                if layer.bias is not None:
                    layer.bias.copy_(tensors[f"layers.{i}.bias"][k])
        optim = make(net.parameters())
        for _ in range(4):
            optim.zero_grad()
            torch.nn.functional.mse_loss(net(tensors["inputs"][k].double()),
                                         tensors["targets"][k].double()).backward()  # fmt: skip
            optim.step()
        nets.append(net)
    for i, index in ((0, 0), (1, 2), (2, 4)):
        want = torch.stack([net[index].weight.detach() for net in nets])
        torch.testing.assert_close(got.weights[i].double(), want, rtol=1e-5, atol=1e-6)
    want_bias = torch.stack([net[2].bias.detach() for net in nets])
    torch.testing.assert_close(got.biases[1].double(), want_bias, rtol=1e-5, atol=1e-6)
