"""Jobs cut along the sample axis, and their results added back.

A job's loss and parameter gradients are sums over its samples, scaled by its reduction.
The samples [start, stop) of a job, run with the sum reduction (samples()), give that
block's share of those sums; the blocks' shares added in float64 (add()) and scaled as the
job's reduction scales them (reduce()) are the whole job's, up to float rounding. A block's
per-sample results are its samples' rows, their gradients (input gradients, per-sample
gradient norms) scaled as the loss is (rows()). DP-SGD: each block clips as the whole job
would (block_privacy()); the noise is drawn once, for the reduced sums, as for the whole
job (the same seed gives the same noise).

The torch engine runs a CPU job whose one model's activations are large this way
(torch_engine.block_shape), and the server a streamed job, whose micro-batches are
such blocks (server/streaming.py). `job` below is anything with a job's mlp, loss,
num_samples, precision and privacy: an EnsembleJob, or the server's plan of one.
"""

from __future__ import annotations

import dataclasses

import torch

from gradserve.kernels import privacy
from gradserve.kernels.spec import EnsembleJob, EnsembleResult, LossSpec, Privacy, compute_dtype
from gradserve.v1.shapes import SAMPLE_TENSORS, is_per_model

# Results with a row per sample ([M, N, ...]).
PER_SAMPLE_RESULTS = ("per_sample_loss", "per_sample_grad_norm", "outputs", "input_grads")


def loss_divisor(job) -> int:
    """What the job's reduction divides the summed loss and gradients by."""
    if job.loss.reduction == "sum":
        return 1
    per_sample = 1 if job.loss.name == "cross_entropy" else job.mlp.layer_sizes[-1]
    return job.num_samples * per_sample


def block_loss(job) -> LossSpec:
    """A block's loss: the job's, summed over the block's samples."""
    return LossSpec(job.loss.name, "sum", job.loss.huber_delta)


def block_privacy(job) -> Privacy | None:
    """Clipping as the whole job would clip, without noise: that comes once, in reduce().
    A sample's contribution to a block's summed loss is its contribution to the job's times
    loss_divisor(job), hence the scale from there to its own loss."""
    dp = job.privacy
    if dp is None:
        return None
    unit = privacy.own_loss_scale(job) / loss_divisor(job)
    return dataclasses.replace(dp, noise_multiplier=0.0, own_loss_scale=unit)


def samples(job: EnsembleJob, start: int, stop: int) -> EnsembleJob:
    """The block of samples [start, stop) of `job` (views of its sample tensors)."""
    cross_entropy = job.loss.name == "cross_entropy"

    def rows(name: str) -> torch.Tensor | None:
        t = getattr(job, name)
        if t is None:
            return None
        return t[:, start:stop] if is_per_model(name, t.shape, cross_entropy) else t[start:stop]

    return dataclasses.replace(
        job,
        **{name: rows(name) for name in SAMPLE_TENSORS},
        loss=block_loss(job),
        privacy=block_privacy(job),
    )


def add(total: EnsembleResult | None, part: EnsembleResult) -> EnsembleResult:
    """Add a block's summed loss and gradients into the running total, kept in float64 (in
    place): float32 running sums lose digits with every addition, their error growing with
    the number of blocks (as one float32 sum over all samples grows with N,
    kernels/linear_layer.py), and small blocks make many. Its per-sample results are not
    kept (rows() takes them)."""
    if total is None:
        total = dataclasses.replace(part, loss=part.loss.double())
        if part.weight_grads is not None:
            total.weight_grads = [g.double() for g in part.weight_grads]
            total.bias_grads = [g.double() for g in part.bias_grads]
        for name in PER_SAMPLE_RESULTS:
            setattr(total, name, None)
    else:
        total.loss += part.loss
        if part.weight_grads is not None:
            for t, p in zip(total.weight_grads + total.bias_grads,
                            part.weight_grads + part.bias_grads, strict=True):  # fmt: skip
                t += p
    return total


def reduce(total: EnsembleResult, job, device) -> EnsembleResult:
    """Apply the job's reduction to the summed loss and gradients and round them to the
    job's dtype, then add the job's DP noise."""
    divisor = loss_divisor(job)
    dtype = compute_dtype(job.precision)
    total.loss = (total.loss / divisor).to(dtype)
    if total.weight_grads is not None:
        total.weight_grads = [(t / divisor).to(dtype) for t in total.weight_grads]
        total.bias_grads = [(t / divisor).to(dtype) for t in total.bias_grads]
    if job.privacy is not None and total.weight_grads is not None:
        unit = privacy.samples_per_loss_unit(job)
        privacy.add_noise(total.weight_grads, total.bias_grads, job.privacy, unit, device)
    return total


def rows(part: EnsembleResult, job) -> dict[str, torch.Tensor]:
    """A block's per-sample results ([M, n, ...]) by result name, final: a sample's
    gradients are of its contribution to the loss, so reduced as the loss is (its loss and
    outputs are the same whatever the reduction)."""
    divisor = loss_divisor(job)
    out = {}
    for name in PER_SAMPLE_RESULTS:
        value = getattr(part, name)
        if value is not None:
            reduced = name in ("per_sample_grad_norm", "input_grads") and divisor != 1
            out[name] = value / divisor if reduced else value
    return out
