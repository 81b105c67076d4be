"""Torch engine vs what a PyTorch user would write, on the CPU, same inputs, same run.

Peers: a per-model Python loop of nn.Sequential + autograd, torch.func.vmap(grad(...)) over
stacked parameters, and torch.compile of that vmap(grad) (compiled before timing; needs a
C++ compiler, as inductor builds CPU kernels). Each computes loss and every parameter
gradient of every model.
Usage: python bench/engine_cpu.py [--repeats R] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import interleaved_medians, make_nets, write_table  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import torch_engine  # noqa: E402
from gradserve.server.memory import keep_freed_memory  # noqa: E402

SHAPES = [
    # (M, N, layer_sizes)
    (256, 64, (32, 64, 64, 1)),
    (1024, 32, (16, 32, 32, 1)),
    (64, 256, (64, 128, 128, 8)),
    # Jobs of 64 and 128 MiB activations, which the engine runs in blocks of models
    # (torch_engine.block_shape): bench/kernels_gpu.py's target, and a wider one.
    (1024, 256, (32, 64, 64, 64, 1)),
    (64, 4096, (64, 128, 128, 8)),
]


def run_shape(m, n, sizes, repeats, with_compile):
    nets = make_nets(m, sizes)
    x = torch.randn(m, n, sizes[0])
    y = torch.randn(m, n, sizes[-1])
    params, buffers = stack_module_state(nets)
    params = {k: v.detach() for k, v in params.items()}

    def loop():
        for i, net in enumerate(nets):
            net.zero_grad()
            nn.functional.mse_loss(net(x[i]), y[i]).backward()

    base = nets[0]

    def loss_fn(p, xb, yb):
        return nn.functional.mse_loss(functional_call(base, p, (xb,)), yb)

    vmapped = vmap(grad(loss_fn))

    def vmap_grad():
        vmapped(params, x, y)

    num_layers = len(sizes) - 1
    job = kernels.EnsembleJob(
        mlp=kernels.MLPSpec(tuple(sizes), kernels.Activation("relu")),
        loss=kernels.LossSpec("mse"),
        weights=[params[f"{2 * i}.weight"] for i in range(num_layers)],
        biases=[params[f"{2 * i}.bias"] for i in range(num_layers)],
        inputs=x,
        targets=y,
    )

    def engine():
        torch_engine.run(job, "cpu")

    # Same answer before timing anything.
    got = torch_engine.run(job, "cpu").weight_grads[0]
    ref = vmapped(params, x, y)["0.weight"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)

    fns = {"loop": loop, "vmap": vmap_grad, "engine": engine}
    if with_compile:
        compiled = torch.compile(vmapped)
        got = compiled(params, x, y)["0.weight"]  # compiles here, outside the timing
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
        fns["compile"] = lambda: compiled(params, x, y)
    t = interleaved_medians(fns, repeats=repeats)
    t_loop, t_vmap, t_engine = t["loop"], t["vmap"], t["engine"]
    t_compile = t.get("compile", float("nan"))
    return t_loop, t_vmap, t_compile, t_engine


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    keep_freed_memory()  # as in the server: every side's tensors reuse freed heap memory
    rows = []
    for m, n, sizes in SHAPES:
        t_loop, t_vmap, t_compile, t_engine = run_shape(
            m, n, sizes, args.repeats, not args.no_compile
        )
        rows.append(
            [
                f"M={m} N={n} {list(sizes)}",
                f"{t_engine * 1e3:.2f}",
                f"{t_vmap * 1e3:.2f}",
                f"{t_compile * 1e3:.2f}",
                f"{t_loop * 1e3:.1f}",
                f"{t_loop / t_engine:.1f}x",
                f"{t_vmap / t_engine:.2f}x",
                f"{t_compile / t_engine:.2f}x",
            ]
        )
    write_table(
        "engine_cpu.md",
        "Torch engine vs per-model loop, vmap(grad) and torch.compile(vmap(grad)), CPU (relu, "
        "mse, float32)",
        [
            "job",
            "engine ms",
            "vmap(grad) ms",
            "compile(vmap(grad)) ms",
            "loop ms",
            "engine vs loop",
            "engine vs vmap",
            "engine vs compile",
        ],  # fmt: skip
        rows,
        "Median wall time of loss + all parameter gradients, one call of each in turn, with "
        "the server's allocator setting (server/memory.py); ratios > 1 mean the engine is "
        "faster. Command: `python bench/engine_cpu.py`. CPU times are for comparison within "
        "this run only.",
    )


if __name__ == "__main__":
    main()
