"""Random jobs for tests: weights scaled like nn.Linear's init, never zeros."""

from __future__ import annotations

import random

import torch


def random_job(
    layer_sizes,
    m: int,
    n: int,
    *,
    loss: str = "mse",
    shared_inputs: bool = False,
    sample_weights: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, (d_in, d_out) in enumerate(zip(layer_sizes[:-1], layer_sizes[1:], strict=True)):
        bound = d_in**-0.5
        tensors[f"layers.{i}.weight"] = (torch.rand(m, d_out, d_in, generator=g) * 2 - 1) * bound
        tensors[f"layers.{i}.bias"] = (torch.rand(m, d_out, generator=g) * 2 - 1) * bound
    lead = (n,) if shared_inputs else (m, n)
    tensors["inputs"] = torch.randn(*lead, layer_sizes[0], generator=g)
    d_last = layer_sizes[-1]
    if loss == "cross_entropy":
        tensors["targets"] = torch.randint(0, d_last, lead, generator=g)
    elif loss == "bce_with_logits":
        tensors["targets"] = torch.rand(*lead, d_last, generator=g)
    else:
        tensors["targets"] = torch.randn(*lead, d_last, generator=g)
    if sample_weights:
        tensors["sample_weights"] = torch.rand(*lead, generator=g) + 0.5
    for k, v in tensors.items():
        if v.is_floating_point():
            tensors[k] = v.to(dtype)
    return tensors


def drawn_job(r: random.Random, seed: int, max_models: int, max_samples: int):
    """(layer_sizes, loss, tensors) of a job drawn by `r`: depth, odd widths (cross_entropy
    two classes at least), loss, M and N, sample weights or none, each of inputs, targets
    and sample weights per model or shared; float64 values of random_job(seed)."""
    from gradserve import kernels

    sizes = tuple(r.choice((1, 2, 3, 5, 8, 13)) for _ in range(r.randint(2, 4)))
    loss = r.choice(kernels.LOSSES)
    if loss == "cross_entropy":
        sizes = (*sizes[:-1], max(2, sizes[-1]))
    m, n = r.randint(1, max_models), r.randint(1, max_samples)
    tensors = random_job(sizes, m, n, loss=loss, sample_weights=r.random() < 0.5, seed=seed,
                         dtype=torch.float64)  # fmt: skip
    for name in ("inputs", "targets", "sample_weights"):
        if name in tensors and r.random() < 0.5:
            tensors[name] = tensors[name][0].clone()
    return sizes, loss, tensors


def drawn_engine_job(r: random.Random, seed: int, max_models: int, max_samples: int,
                     without_bias: float):  # fmt: skip
    """An engine job in float64 drawn by `r`: drawn_job's tensors, the activations (leaky
    slope 0.2), reduction (Huber delta 0.5) and outputs asked for (per-sample gradient norms
    among them), and each layer without bias at the chance `without_bias`."""
    import dataclasses

    from gradserve import kernels

    sizes, loss, tensors = drawn_job(r, seed, max_models, max_samples)
    job = ensemble_job(
        tensors, sizes, hidden=r.choice(kernels.ACTIVATIONS), output=r.choice(kernels.ACTIVATIONS),
        loss=loss, reduction=r.choice(kernels.REDUCTIONS), precision="float64",
        negative_slope=0.2, huber_delta=0.5, input_gradients=r.random() < 0.5,
        per_sample_losses=r.random() < 0.5, forward_outputs=r.random() < 0.5,
    )  # fmt: skip
    biasless = tuple(i for i in range(len(sizes) - 1) if r.random() < without_bias)
    for i in biasless:
        job.biases[i] = torch.zeros_like(job.biases[i])
    job.mlp = dataclasses.replace(job.mlp, layers_without_bias=biasless)
    job.outputs = dataclasses.replace(job.outputs, per_sample_gradient_norms=r.random() < 0.4)
    return job


def ensemble_job(
    tensors,
    layer_sizes,
    *,
    hidden="relu",
    output="identity",
    loss="mse",
    reduction="mean",
    precision="float32",
    negative_slope=0.01,
    output_slope=None,  # the output leaky_relu's slope when it differs from the hidden one
    huber_delta=1.0,
    input_gradients=True,
    per_sample_losses=True,
    forward_outputs=True,
):
    """An engine job (gradserve.kernels.EnsembleJob) over the tensors of random_job()."""
    from gradserve import kernels as k

    num_layers = len(layer_sizes) - 1
    return k.EnsembleJob(
        mlp=k.MLPSpec(
            tuple(layer_sizes),
            k.Activation(hidden, negative_slope),
            k.Activation(output, negative_slope if output_slope is None else output_slope),
        ),
        loss=k.LossSpec(loss, reduction, huber_delta),
        weights=[tensors[f"layers.{i}.weight"] for i in range(num_layers)],
        biases=[tensors[f"layers.{i}.bias"] for i in range(num_layers)],
        inputs=tensors["inputs"],
        targets=tensors["targets"],
        sample_weights=tensors.get("sample_weights"),
        precision=precision,
        outputs=k.OutputRequest(True, input_gradients, per_sample_losses, forward_outputs),
    )


def float32_job(job):
    """A float64 engine job in float32: its precision and floating-point tensors (class
    indices stay integers)."""
    import dataclasses

    def narrow(t):
        return t if t is None or not t.is_floating_point() else t.float()

    return dataclasses.replace(
        job, precision="float32", weights=[w.float() for w in job.weights],
        biases=[b.float() for b in job.biases], inputs=job.inputs.float(),
        targets=narrow(job.targets), sample_weights=narrow(job.sample_weights),
    )  # fmt: skip
