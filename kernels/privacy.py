"""DP-SGD pieces both engines share (see spec.Privacy): clip factors and the noise."""

from __future__ import annotations

import torch

from gradserve.kernels.spec import EnsembleJob, Privacy


def samples_per_loss_unit(job: EnsembleJob) -> int:
    """N under the mean reduction, 1 under sum: a sample's own loss is its contribution to
    the model's loss times this (and the noise is divided by it)."""
    return job.num_samples if job.loss.reduction == "mean" else 1


def own_loss_scale(job: EnsembleJob) -> float:
    """Contribution norm -> own-loss norm, for the clip factors. A micro-batch of a streamed
    job carries the whole job's factor (its own reduction is a sum)."""
    scale = job.privacy.own_loss_scale
    return float(samples_per_loss_unit(job)) if scale is None else scale


def clip_factors(contribution_norms: torch.Tensor, job: EnsembleJob) -> torch.Tensor:
    """[M, N] factor each sample's gradient is scaled by: Opacus' C / (norm + 1e-6), at
    most 1, of the norm of the sample's own-loss gradient."""
    own = contribution_norms * own_loss_scale(job)
    return (job.privacy.clip_norm / (own + 1e-6)).clamp(max=1.0)


def add_noise(weight_grads, bias_grads, dp: Privacy, loss_unit: int, device) -> None:
    """Add N(0, (sigma * C / loss_unit)^2) noise in place, drawn in the documented order;
    loss_unit: samples_per_loss_unit of the job."""
    if dp.noise_multiplier == 0:
        return
    gen = torch.Generator(device=device).manual_seed(dp.noise_seed)
    std = dp.noise_multiplier * dp.clip_norm / loss_unit
    for w, b in zip(weight_grads, bias_grads, strict=True):
        for t in (w, b):
            noise = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
            t.add_(noise.to(t.dtype), alpha=std)
