"""DP-SGD gradients (per-sample clipping, summed, noised) on the CPU: the torch engine
against the peers a PyTorch user would reach for, same inputs, same run.

Peers: Opacus (GradSampleModule per-sample gradients + DPOptimizer clipping, one model at a
time, as Opacus trains one model) and torch.func.vmap(grad) per-sample gradients over the
stacked ensemble, clipped and summed by hand. Each produces every model's clipped gradient
sum (noise multiplier 0, so the results can be compared; noise adds one randn per
parameter to every implementation alike).
Usage: python bench/privacy.py [--repeats R]
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import make_nets, median_seconds, write_table  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import torch_engine  # noqa: E402

SHAPES = [(64, 256, (16, 64, 64, 1)), (16, 1024, (32, 128, 128, 4))]
CLIP = 0.5


def engine_fn(nets, x, y, sizes):
    n_layers = len(sizes) - 1
    job = kernels.EnsembleJob(
        mlp=kernels.MLPSpec(sizes, kernels.Activation("tanh")),
        loss=kernels.LossSpec("mse"),
        weights=[
            torch.stack([net[2 * i].weight.detach() for net in nets]) for i in range(n_layers)
        ],
        biases=[torch.stack([net[2 * i].bias.detach() for net in nets]) for i in range(n_layers)],
        inputs=x,
        targets=y,
        privacy=kernels.Privacy(CLIP),
    )
    return lambda: torch_engine.run(job).weight_grads


def vmap_fn(nets, x, y):
    params, buffers = stack_module_state(nets)
    base = nets[0]
    n = x.shape[0]

    def sample_loss(p, xs, ys):
        out = functional_call(base, (p, buffers), (xs.unsqueeze(0),))
        return ((out.squeeze(0) - ys) ** 2).mean()  # the sample's own loss (Opacus' scale)

    per_model = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)), in_dims=(0, None, None))

    def run():
        g = per_model(params, x, y)  # name -> [M, N, ...]
        sq = sum(t.reshape(*t.shape[:2], -1).square().sum(-1) for t in g.values())
        factor = (CLIP / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        return {
            k: (t * factor.reshape(*factor.shape, *[1] * (t.dim() - 2))).sum(1) / n
            for k, t in g.items()
        }

    return run


def opacus_fn(nets, x, y):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Opacus' hooks warn that the inputs need no gradient; they need none here.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    models = [GradSampleModule(net, loss_reduction="mean") for net in nets]
    optimizers = [
        DPOptimizer(
            torch.optim.SGD(mod.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=CLIP,
            expected_batch_size=x.shape[0],
        )
        for mod in models
    ]

    def run():
        for mod, opt in zip(models, optimizers, strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(mod(x), y).backward()
            opt.pre_step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for m, n, sizes in SHAPES:
        nets = make_nets(m, sizes, nn.Tanh)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, sizes[0], generator=g)
        y = torch.randn(n, sizes[-1], generator=g)
        # The peers compute the same thing: check before timing.
        ours, theirs = engine_fn(nets, x, y, sizes)(), vmap_fn(nets, x, y)()
        torch.testing.assert_close(ours[0], theirs["0.weight"], rtol=1e-4, atol=1e-6)
        times = {
            "engine": median_seconds(engine_fn(nets, x, y, sizes), repeats=args.repeats),
            "vmap(grad)": median_seconds(vmap_fn(nets, x, y), repeats=args.repeats),
        }
        try:
            times["opacus"] = median_seconds(opacus_fn(nets, x, y), repeats=args.repeats)
        except ImportError:
            times["opacus"] = None
        ms = {k: (f"{v * 1e3:.1f}" if v else "n/a") for k, v in times.items()}
        ratio = {k: (f"{v / times['engine']:.1f}x" if v else "n/a") for k, v in times.items()}
        rows.append(
            [
                f"M={m} N={n} {list(sizes)}",
                ms["engine"],
                ms["vmap(grad)"],
                ms["opacus"],
                ratio["vmap(grad)"],
                ratio["opacus"],
            ]
        )
    write_table(
        "privacy.md",
        "DP-SGD clipped gradients: torch engine vs vmap(grad) and Opacus (CPU, same run)",
        ["shape", "engine ms", "vmap(grad) ms", "opacus ms", "vmap / engine", "opacus / engine"],
        rows,
        "Median of repeats on this machine; ratios are the comparable figures (CPU times are "
        "of a shared 2-core VM). Command: python bench/privacy.py",
    )


if __name__ == "__main__":
    main()
