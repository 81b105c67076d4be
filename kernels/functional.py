"""Activations and losses in torch, shared by the torch engine and the Triton launchers.

The loss rules (matching torch.nn's losses when there are no sample weights):
  per-sample loss  l[m, n] = w[n] * sum over outputs of the elementwise loss
                   (cross_entropy: w[n] * CE of the sample)
  sum reduction    loss[m] = sum_n l[m, n]
  mean reduction   loss[m] = sum_n l[m, n] / (N * dL)  (cross_entropy: / N)
Sample weights scale each sample's contribution; the mean still divides by the count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradserve.kernels.spec import Activation, LossSpec


def activate(z: torch.Tensor, act: Activation) -> torch.Tensor:
    name = act.name
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "leaky_relu":
        return F.leaky_relu(z, act.negative_slope)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    if name == "gelu":
        return F.gelu(z)
    if name == "silu":
        return F.silu(z)
    if name == "softplus":
        return F.softplus(z)
    raise ValueError(f"unknown activation {name!r}")


def per_sample_loss(
    y: torch.Tensor, targets: torch.Tensor, loss: LossSpec, sample_weights: torch.Tensor | None
) -> torch.Tensor:
    """y [M, N, dL], targets broadcastable -> weighted per-sample losses [M, N]."""
    name = loss.name
    if name == "cross_entropy":
        m, n, c = y.shape
        t = targets.expand(m, n).reshape(-1)
        per = F.cross_entropy(y.reshape(m * n, c), t, reduction="none").reshape(m, n)
    else:
        t = targets.expand_as(y)
        if name == "mse":
            elem = (y - t).square()
        elif name == "l1":
            elem = (y - t).abs()
        elif name == "huber":
            elem = F.huber_loss(y, t, reduction="none", delta=loss.huber_delta)
        elif name == "bce_with_logits":
            elem = F.binary_cross_entropy_with_logits(y, t, reduction="none")
        else:
            raise ValueError(f"unknown loss {name!r}")
        per = elem.sum(dim=-1)
    if sample_weights is not None:
        per = per * sample_weights
    return per


def reduce_loss(per: torch.Tensor, loss: LossSpec, output_width: int) -> torch.Tensor:
    """Weighted per-sample losses [M, N] -> per-model loss [M]."""
    total = per.sum(dim=-1)
    if loss.reduction == "sum":
        return total
    count = per.shape[-1] * (1 if loss.name == "cross_entropy" else output_width)
    return total / count
