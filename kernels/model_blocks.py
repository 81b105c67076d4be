"""Jobs cut along the model axis, and their results joined back.

Models of an ensemble are independent: the models [start, stop) of a job are a job of
their own (the same samples, each model's own parameters and per-model tensors), and the
results of consecutive blocks, copied into one result along the model axis, are the
whole job's.
"""

from __future__ import annotations

import dataclasses

import torch

from gradserve.kernels.spec import EnsembleJob, EnsembleResult, compute_dtype
from gradserve.v1.shapes import SAMPLE_TENSORS, is_per_model


def models(job: EnsembleJob, start: int, stop: int) -> EnsembleJob:
    """The job of models [start, stop) (views of the job's tensors, no copies)."""
    cross_entropy = job.loss.name == "cross_entropy"

    def rows(name: str) -> torch.Tensor | None:
        t = getattr(job, name)
        if t is None or not is_per_model(name, t.shape, cross_entropy):
            return t  # shared by all models
        return t[start:stop]

    return dataclasses.replace(
        job,
        weights=[w[start:stop] for w in job.weights],
        biases=[b[start:stop] for b in job.biases],
        **{name: rows(name) for name in SAMPLE_TENSORS},
    )


def allocate_result(job: EnsembleJob, device) -> EnsembleResult:
    """Room for every result `job` asks for (its losses, gradients and per-sample tensors,
    in the job's compute dtype), allocated before any block runs: a job whose results the
    machine cannot hold fails at once."""
    dtype = compute_dtype(job.precision)
    m, n = job.num_models, job.num_samples
    sizes, want = job.mlp.layer_sizes, job.outputs

    def empty(*shape):
        return torch.empty(shape, dtype=dtype, device=device)

    result = EnsembleResult(loss=empty(m), engine="torch", device=str(device))
    if want.parameter_gradients:
        result.weight_grads = [empty(*w.shape) for w in job.weights]
        result.bias_grads = [empty(*b.shape) for b in job.biases]
    if want.input_gradients:
        result.input_grads = empty(m, n, sizes[0])
    if want.per_sample_losses:
        result.per_sample_loss = empty(m, n)
    if want.per_sample_gradient_norms:
        result.per_sample_grad_norm = empty(m, n)
    if want.forward_outputs:
        result.outputs = empty(m, n, sizes[-1])
    return result


# The results with a row per model: a tensor, or a list of them (one per layer).
PER_MODEL_RESULTS = (
    "loss",
    "weight_grads",
    "bias_grads",
    "input_grads",
    "per_sample_loss",
    "per_sample_grad_norm",
    "outputs",
)


def copy_models(result: EnsembleResult, block: EnsembleResult, start: int) -> None:
    """Copy a block's results (models start, start + 1, ...) into the job's."""
    stop = start + block.loss.shape[0]
    for name in PER_MODEL_RESULTS:
        whole, part = _tensors(getattr(result, name)), _tensors(getattr(block, name))
        for w, p in zip(whole, part, strict=True):
            w[start:stop].copy_(p)


def _tensors(value) -> list[torch.Tensor]:
    """A result's tensors: none, one, or one per layer."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
