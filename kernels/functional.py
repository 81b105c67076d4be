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
        per = cross_entropy(y, targets.expand(y.shape[:2]))
    else:
        t = targets.expand_as(y)
        if name == "mse":
            elem = (y - t).square()
        elif name == "l1":
            elem = (y - t).abs()
        elif name == "huber":
            elem = F.huber_loss(y, t, reduction="none", delta=loss.huber_delta)
        elif name == "bce_with_logits":
            elem = _LogisticLoss.apply(y, t)
        else:
            raise ValueError(f"unknown loss {name!r}")
        per = elem.sum(dim=-1)
    if sample_weights is not None:
        per = per * sample_weights
    return per


class _LogisticLoss(torch.autograd.Function):
    """torch's binary_cross_entropy_with_logits of logits y and targets t, elementwise, with
    a gradient that keeps its digits where the logit is confident and right. torch's own
    computes sigmoid(y) - t, and log(1 + e^-|y|) for the loss, which cancel there (y = 8,
    t = 1: 3 to 4 digits left in float32). With s = sigmoid(-|y|), the gradient is s - t
    where y <= 0 (sigmoid(y) = s) and (1 - t) - s where y > 0: on a CPU, a job with 100
    logistic outputs takes 1.3x its time with torch's loss, one output the same
    (bench/losses_cpu.py). triton_common's loss_block computes the same."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = y.abs().neg_().exp_()  # e^-|y|
        ctx.save_for_backward(y, t, e)
        return torch.addcmul(y.clamp_min(0.0), y, t, value=-1.0).add_(e.log1p())

    @staticmethod
    def backward(ctx, grad_elem: torch.Tensor):
        y, t, e = ctx.saved_tensors
        s = e / (1.0 + e)  # sigmoid(-|y|)
        return torch.where(y > 0, (1.0 - t) - s, s - t).mul_(grad_elem), None


def cross_entropy(y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torch's cross_entropy of logits y [M, N, C] and class indices [M, N], per sample."""
    return _CrossEntropy.apply(y, targets)


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy in a form that keeps its digits where the target is confidently right.
    There torch's (the textbook log-sum-exp) computes log(total) of a total just above 1 and
    a gradient e_t / total - 1, which cancel (a margin of 8: 3 to 4 digits left in float32).
    Here, with e = exp(y - max y), e_t the target's and `others` the sum of the rest: where
    the target's logit is within log 2 of the largest (e_t >= 1/2) the loss is
    log1p(others / e_t), and the target's gradient is always -others / total. By hand: with
    autograd of that form a CPU job of 100 classes took 1.8x its time with torch's
    cross_entropy, by hand as long within the noise (0.8x to 1.1x, bench/losses_cpu.py).
    triton_common's loss_block computes the same."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        peak = y.amax(dim=-1, keepdim=True)
        index = targets.unsqueeze(-1)
        far = (y.gather(-1, index) - peak).squeeze(-1)  # the target's logit - the largest
        e = (y - peak).exp_()
        e_t = e.gather(-1, index)
        others = e.scatter_(-1, index, 0.0).sum(dim=-1)  # the target's share zeroed ...
        e.scatter_(-1, index, e_t)  # ... and put back
        e_t = e_t.squeeze(-1)
        total = others + e_t
        near = e_t >= 0.5
        per = torch.where(
            near, torch.log1p(others / torch.where(near, e_t, 1.0)), total.log() - far
        )
        ctx.save_for_backward(e, index, total, others)
        return per

    @staticmethod
    def backward(ctx, grad_per: torch.Tensor):
        e, index, total, others = ctx.saved_tensors
        scale = (grad_per / total).unsqueeze(-1)
        grad_y = e * scale  # softmax ...
        grad_y.scatter_(-1, index, -others.unsqueeze(-1) * scale)  # ... - one-hot, as others
        return grad_y, None


def reduce_loss(per: torch.Tensor, loss: LossSpec, output_width: int) -> torch.Tensor:
    """Weighted per-sample losses [M, N] -> per-model loss [M]."""
    total = per.sum(dim=-1)
    if loss.reduction == "sum":
        return total
    count = per.shape[-1] * (1 if loss.name == "cross_entropy" else output_width)
    return total / count
