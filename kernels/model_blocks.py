"""Jobs cut along the model axis, and their results joined back.

Models of an ensemble are independent: the models [start, stop) of a job are a job of
their own (the same samples, each model's own parameters and per-model tensors), and the
results of consecutive blocks, joined along the model axis, are the whole job's.
"""

from __future__ import annotations

import dataclasses

import torch

from gradserve.kernels.spec import EnsembleJob, EnsembleResult


def _per_model(t: torch.Tensor, per_model_dims: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor given per model; a shared one as it is."""
    return t[start:stop] if t.dim() == per_model_dims else t


def models(job: EnsembleJob, start: int, stop: int) -> EnsembleJob:
    """The job of models [start, stop) (views of the job's tensors, no copies)."""
    target_dims = 2 if job.loss.name == "cross_entropy" else 3
    return dataclasses.replace(
        job,
        weights=[w[start:stop] for w in job.weights],
        biases=[b[start:stop] for b in job.biases],
        inputs=_per_model(job.inputs, 3, start, stop),
        targets=_per_model(job.targets, target_dims, start, stop),
        sample_weights=None
        if job.sample_weights is None
        else _per_model(job.sample_weights, 2, start, stop),
    )


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


class JoinedResult:
    """The results of consecutive blocks of models (gradients, losses and per-sample
    tensors; not optimiser steps), copied into one result as they come, so that each
    block's own tensors are freed before the next block runs."""

    def __init__(self, num_models: int):
        self.num_models = num_models
        self.result: EnsembleResult | None = None
        self.next_model = 0

    def add(self, block: EnsembleResult) -> None:
        if self.result is None:
            self.result = EnsembleResult(
                **{name: self._allocate(getattr(block, name)) for name in PER_MODEL_RESULTS},
                engine=block.engine,
                device=block.device,
            )
        start, stop = self.next_model, self.next_model + block.loss.shape[0]
        for name in PER_MODEL_RESULTS:
            joined = _tensors(getattr(self.result, name))
            for whole, part in zip(joined, _tensors(getattr(block, name)), strict=True):
                whole[start:stop].copy_(part)
        self.next_model = stop

    def _allocate(self, value):
        """Room for every model's rows of a result like `value`."""
        if value is None:
            return None
        if isinstance(value, list):
            return [self._allocate(t) for t in value]
        return value.new_empty(self.num_models, *value.shape[1:])


def _tensors(value) -> list[torch.Tensor]:
    """A result's tensors: none, one, or one per layer."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]
