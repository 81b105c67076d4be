"""Per-sample gradients from torch.func.vmap(grad) over plain nn modules in float64: the
reference for per-sample gradient norms and DP-SGD clipping (shares no code with the
engines)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from tests.oracle import activation_module


def sample_loss(loss: str, y, t, w, count):
    """One sample's contribution to the model's reduced loss (y [dL], t [dL] or class)."""
    if loss == "cross_entropy":
        value = F.cross_entropy(y.unsqueeze(0), t.unsqueeze(0).long(), reduction="sum")
    elif loss == "mse":
        value = F.mse_loss(y, t, reduction="sum")
    elif loss == "l1":
        value = F.l1_loss(y, t, reduction="sum")
    elif loss == "huber":
        value = F.huber_loss(y, t, reduction="sum")
    else:
        value = F.binary_cross_entropy_with_logits(y, t, reduction="sum")
    return value * w / count


def per_sample_gradients(
    tensors,
    sizes,
    hidden,
    loss,
    reduction,
    *,
    output="identity",
    negative_slope=0.01,
    output_slope=None,
) -> dict[str, torch.Tensor]:
    """ "layers.{i}.weight" / "layers.{i}.bias" -> [M, N, ...]: each sample's gradient of its
    contribution to its model's loss (per-model inputs, targets and sample weights)."""
    m, n = tensors["layers.0.weight"].shape[0], tensors["inputs"].shape[-2]
    count = 1 if reduction == "sum" else n * (1 if loss == "cross_entropy" else sizes[-1])
    layers = len(sizes) - 1
    out: dict[str, list[torch.Tensor]] = {}
    # a layer whose bias is missing has none (nn.Linear(..., bias=False))
    kinds = [("weight", "bias") if f"layers.{i}.bias" in tensors else ("weight",)
             for i in range(layers)]  # fmt: skip
    for k in range(m):
        mods = []
        for i in range(layers):
            mods.append(nn.Linear(sizes[i], sizes[i + 1], bias=len(kinds[i]) == 2).double())
            if i < layers - 1:
                mods.append(activation_module(hidden, negative_slope))
            else:
                slope = negative_slope if output_slope is None else output_slope
                mods.append(activation_module(output, slope))
        net = nn.Sequential(*mods)
        params = {
            f"{2 * i}.{kind}": tensors[f"layers.{i}.{kind}"][k].double()
            for i in range(layers)
            for kind in kinds[i]
        }
        x = tensors["inputs"][k].double()
        t = tensors["targets"][k]
        t = t if loss == "cross_entropy" else t.double()
        weights = tensors.get("sample_weights")
        w = torch.ones(n, dtype=torch.float64) if weights is None else weights[k].double()

        def f(p, xn, tn, wn, net=net):
            return sample_loss(loss, functional_call(net, p, (xn,)), tn, wn, count)

        grads = vmap(grad(f), in_dims=(None, 0, 0, 0))(params, x, t, w)
        for i in range(layers):
            for kind in kinds[i]:
                out.setdefault(f"layers.{i}.{kind}", []).append(grads[f"{2 * i}.{kind}"])
    return {name: torch.stack(g) for name, g in out.items()}


def norms(per_sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """[M, N] norm of each sample's gradient over all parameters."""
    first = next(iter(per_sample.values()))
    m, n = first.shape[:2]
    return sum(g.reshape(m, n, -1).square().sum(-1) for g in per_sample.values()).sqrt()


def clipped_sums(per_sample, clip_norm: float, scale: int) -> dict[str, torch.Tensor]:
    """DP-SGD without noise, by definition: each sample's own-loss gradient (contribution
    times `scale`) clipped to clip_norm, summed over samples, divided by `scale`."""
    own = {k: g * scale for k, g in per_sample.items()}
    factor = (clip_norm / (norms(own) + 1e-6)).clamp(max=1.0)
    return {
        k: (g * factor.reshape(*factor.shape, *[1] * (g.dim() - 2))).sum(1) / scale
        for k, g in own.items()
    }
