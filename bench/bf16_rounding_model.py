"""What bf16 matmul operands alone cost the fused kernel's gradients, on the CPU.

A float64 model of the fused kernel's bfloat16 path on the job of the GPU test
`test_triton_norms_and_dp_clipping_match_the_torch_engine` (64 models [32, 64, 64, 64, 1],
silu, mse, N=1000): every matmul operand rounded to bf16 where the kernel rounds it (the
layer input and weight going forward; dLoss/dz and the weight for the next gradient, dLoss/dz
and the layer input for the weight gradient), everything else exact. The per-sample norm pass,
the clip factors and the clipped second backward pass follow the kernel. Against the same
model with no rounding (checked here against the torch engine in float64), its worst model's
relative L2 errors are what the GPU test may expect from rounding alone: errors far beyond
them on a GPU point at the kernel, not at bf16.

Usage: python bench/bf16_rounding_model.py [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_lines  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import torch_engine  # noqa: E402
from tests.jobs import ensemble_job, random_job  # noqa: E402

SIZES = (32, 64, 64, 64, 1)
M, N, SEED = 64, 1000, 51  # the GPU test's job


def exact(a: torch.Tensor) -> torch.Tensor:
    return a


def bf16(a: torch.Tensor) -> torch.Tensor:
    return a.float().bfloat16().double()


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def model(tensors, rounded, clip: float | None):
    """(per-sample norms [M, N], weight gradients, bias gradients) of the mean mse loss,
    with the clip norm's per-sample clipping when given (the norms are of each sample's
    contribution, its own loss's gradient / N, as the kernel computes them)."""
    layers = len(SIZES) - 1
    w = [tensors[f"layers.{i}.weight"].double() for i in range(layers)]
    b = [tensors[f"layers.{i}.bias"].double() for i in range(layers)]
    h, zs, inputs = tensors["inputs"].double(), [], []
    for i in range(layers):
        inputs.append(h)
        zs.append(rounded(h) @ rounded(w[i]).transpose(1, 2) + b[i][:, None, :])
        h = zs[-1] * torch.sigmoid(zs[-1]) if i < layers - 1 else zs[-1]
    dy = 2 * (h - tensors["targets"].double()) / N

    def backward(g):
        squares = torch.zeros(M, N, dtype=torch.float64)
        dw, db = [None] * layers, [None] * layers
        for i in reversed(range(layers)):
            dz = g if i == layers - 1 else g * silu_grad(zs[i])
            squares += (dz * dz).sum(-1) * ((inputs[i] * inputs[i]).sum(-1) + 1)
            dw[i] = rounded(dz).transpose(1, 2) @ rounded(inputs[i])
            db[i] = dz.sum(1)
            g = rounded(dz) @ rounded(w[i])
        return squares.sqrt(), dw, db

    norms, dw, db = backward(dy)
    if clip is not None:  # backprop is linear in dLoss/dy: scaling it clips the gradient
        factor = (clip / (norms * N + 1e-6)).clamp(max=1.0)
        _, dw, db = backward(dy * factor[..., None])
    return norms, dw, db


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-model relative L2 difference of a from b."""
    dims = tuple(range(1, a.dim()))
    return ((a - b).norm(dim=dims) / b.norm(dim=dims)).max().item()


def whole(dw, db) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in dw + db], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    results = os.path.join(os.path.dirname(__file__), "results")
    parser.add_argument("--out", default=os.path.join(results, "bf16_rounding_model.md"))
    args = parser.parse_args()
    tensors = random_job(SIZES, M, N, seed=SEED)
    truth = ensemble_job({k: v.double() for k, v in tensors.items()}, SIZES, hidden="silu",
                         precision="float64")  # fmt: skip
    truth.outputs = kernels.OutputRequest(True, False, False, False, True)
    engine = torch_engine.run(truth, "cpu")
    norms, dw, _ = model(tensors, exact, None)
    # the model itself, unrounded, is the torch engine's float64 arithmetic
    assert worst(norms, engine.per_sample_grad_norm) < 1e-12
    assert all(worst(a, e) < 1e-12 for a, e in zip(dw, engine.weight_grads, strict=True))
    clip = float(norms.median()) * N  # about half the samples clipped, as in the GPU test
    truth.privacy = kernels.Privacy(clip)
    clipped = torch_engine.run(truth, "cpu")
    _, dw, _ = model(tensors, exact, clip)
    assert all(worst(a, e) < 1e-12 for a, e in zip(dw, clipped.weight_grads, strict=True))

    lines = [
        "# bf16 matmul operands alone: the fused kernel's rounding, modelled in float64",
        "",
        f"Job of the GPU DP-norm test: M={M}, N={N}, {list(SIZES)}, silu, mse (seed {SEED}). "
        "Worst model's relative L2 difference from the unrounded model (which matches the "
        "torch engine's float64 to 1e-12).",
        "",
        "| clipping | norms | weight gradients (worst layer) | whole gradient |",
        "|---|---|---|---|",
    ]
    for label, c in (("none", None), ("clip norm at the median (half clipped)", clip)):
        ref, got = model(tensors, exact, c), model(tensors, bf16, c)
        layers = max(worst(a, e) for a, e in zip(got[1], ref[1], strict=True))
        lines.append(f"| {label} | {worst(got[0], ref[0]):.1e} | {layers:.1e} "
                     f"| {worst(whole(*got[1:]), whole(*ref[1:])):.1e} |")  # fmt: skip
    lines += ["", "Command: `python bench/bf16_rounding_model.py`."]
    write_lines(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
