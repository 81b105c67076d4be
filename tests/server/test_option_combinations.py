"""Random jobs through a real server and the real client, against the float64 oracle.

Each seed draws a whole job as a user might send it: odd widths, M, N, activations with
their own leaky_relu slopes, loss, reduction, each of inputs, targets and sample weights
shared or per model, numpy or torch, float64 parameters, int32 class indices, an engine,
a gradient dtype, per-sample outputs and DP-SGD clipping (gradient norms and clipped sums
against torch.func's per-sample gradients), and streaming in micro-batches. What
one-option-at-a-time tests miss is where the options meet.
"""

import random

import numpy as np
import pytest
import torch

from gradserve import kernels
from tests import per_sample
from tests.jobs import random_job
from tests.oracle import assert_close_per_model, oracle

WIDTHS = (1, 2, 3, 5, 7, 13, 16, 17, 31, 33)


def draw(seed: int):
    """(layer sizes, tensors, compute() arguments, oracle options) of one random job."""
    r = random.Random(seed)
    sizes = tuple(r.choice(WIDTHS) for _ in range(r.randint(2, 4)))
    loss = r.choice(kernels.LOSSES)
    m, n = r.randint(1, 3), r.choice([1, 2, 5, 37, 65])
    tensors = random_job(sizes, m, n, loss=loss, sample_weights=r.random() < 0.5, seed=seed)
    for name in ("inputs", "targets", "sample_weights"):
        if name in tensors and r.random() < 0.4:
            tensors[name] = tensors[name][0].clone()
    hidden, output = r.choice(kernels.ACTIVATIONS), r.choice(kernels.ACTIVATIONS)
    hidden_slope, output_slope = r.choice([0.01, 0.2]), r.choice([0.05, 0.3])
    reduction = r.choice(kernels.REDUCTIONS)

    as_numpy = r.random() < 0.5
    kind = (lambda t: t.numpy()) if as_numpy else (lambda t: t)
    params = {k: kind(v) for k, v in tensors.items() if k.startswith("layers.")}
    if r.random() < 0.3:
        params = {k: v.astype(np.float64) if as_numpy else v.double() for k, v in params.items()}
    targets = tensors["targets"]
    if loss == "cross_entropy" and r.random() < 0.5:
        targets = targets.int()
    micro = r.choice([0, 0, 2, 16])
    outputs = dict(
        input_gradients=r.random() < 0.4,
        per_sample_losses=r.random() < 0.4,
        forward_outputs=r.random() < 0.4,
        per_sample_gradient_norms=r.random() < 0.4,
    )
    arguments = dict(
        model=params,
        inputs=kind(tensors["inputs"]),
        targets=kind(targets),
        sample_weights=kind(tensors["sample_weights"]) if "sample_weights" in tensors else None,
        hidden_activation=(hidden, hidden_slope) if hidden == "leaky_relu" else hidden,
        output_activation=(output, output_slope) if output == "leaky_relu" else output,
        loss=loss,
        reduction=reduction,
        backend=r.choice(["torch", "triton", "auto"]),
        micro_batch_samples=micro,
        gradient_dtype=r.choice([None, "float64"]),
        **outputs,
    )
    options = dict(
        hidden=hidden, output=output, negative_slope=hidden_slope, output_slope=output_slope,
        loss=loss, reduction=reduction, sample_weights=tensors.get("sample_weights"),
    )  # fmt: skip
    clipped = r.random() < 0.25  # DP-SGD clipping (without noise, to compare)
    return sizes, tensors, arguments, options, clipped


def per_sample_reference(sizes, tensors, options) -> dict[str, torch.Tensor]:
    """Each sample's gradients by torch.func in float64, every sample tensor per model."""
    m = tensors["layers.0.weight"].shape[0]
    shared = {"inputs": 2, "sample_weights": 1,
              "targets": 1 if options["loss"] == "cross_entropy" else 2}  # fmt: skip
    per_model = {k: v.expand(m, *v.shape) if shared.get(k) == v.dim() else v
                 for k, v in tensors.items()}  # fmt: skip
    return per_sample.per_sample_gradients(
        per_model, sizes, options["hidden"], options["loss"], options["reduction"],
        output=options["output"], negative_slope=options["negative_slope"],
        output_slope=options["output_slope"],
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(48))
def test_random_jobs_through_the_server_match_the_oracle(client, seed):
    sizes, tensors, arguments, options, clipped = draw(seed)
    ref = oracle(sizes, tensors, tensors["inputs"], tensors["targets"], **options)
    want = {name[: -len(".grad")]: g for name, g in ref.grads.items()}
    samples = None
    if clipped or arguments.get("per_sample_gradient_norms"):
        samples = per_sample_reference(sizes, tensors, options)
    if clipped:
        # each sample's own-loss gradient (its contribution times N under a mean) clipped
        # at the median norm, so that about half are
        own = tensors["inputs"].shape[-2] if options["reduction"] == "mean" else 1
        clip = max(float((per_sample.norms(samples) * own).median()), 1e-6)
        arguments["clip_norm"] = clip
        want = per_sample.clipped_sums(samples, clip, own)
    result = client.compute(**arguments)

    def close(name, got, expected):
        assert_close_per_model(name, torch.as_tensor(np.asarray(got)), expected, "float32")

    close("loss", result.loss, ref.loss)
    assert sorted(result.gradients) == sorted(want)
    for name, grad in result.gradients.items():
        close(name, grad, want[name])
    if arguments.get("input_gradients"):
        close("inputs.grad", result.input_gradients, ref.input_grads)
    if arguments.get("per_sample_losses"):
        close("per_sample_loss", result.per_sample_loss, ref.per_sample_loss)
    if arguments.get("forward_outputs"):
        close("outputs", result.outputs, ref.outputs)
    if arguments.get("per_sample_gradient_norms"):
        close("per_sample_grad_norm", result.tensors["per_sample_grad_norm"],
              per_sample.norms(samples))  # fmt: skip
