"""DP-SGD pieces both engines share (see spec.Privacy): clip factors and the noise."""

from __future__ import annotations

import torch

from gradserve.kernels.spec import EnsembleJob


def samples_per_loss_unit(job: EnsembleJob) -> int:
    """N under the mean reduction, 1 under sum: a sample's own loss is its contribution to
    the model's loss times this."""
    return job.num_samples if job.loss.reduction == "mean" else 1


def clip_factors(contribution_norms: torch.Tensor, job: EnsembleJob) -> torch.Tensor:
    """[M, N] factor each sample's gradient is scaled by: Opacus' C / (norm + 1e-6), at
    most 1, of the norm of the sample's own-loss gradient."""
    own = contribution_norms * samples_per_loss_unit(job)
    return (job.privacy.clip_norm / (own + 1e-6)).clamp(max=1.0)


def add_noise(weight_grads, bias_grads, job: EnsembleJob, device) -> None:
    """Add N(0, (sigma * C / scale)^2) noise in place, drawn in the documented order."""
    dp = job.privacy
    if dp.noise_multiplier == 0:
        return
    gen = torch.Generator(device=device).manual_seed(dp.noise_seed)
    std = dp.noise_multiplier * dp.clip_norm / samples_per_loss_unit(job)
    for w, b in zip(weight_grads, bias_grads, strict=True):
        for t in (w, b):
            noise = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
            t.add_(noise.to(t.dtype), alpha=std)
