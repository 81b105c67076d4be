"""Launch-configuration sweep of the fused kernel at the benchmark target shape.

For each precision, times the Triton engine with every (BLOCK_N, num_warps) in the grid
below in place of launch_config's choice, next to torch eager in the same run, and checks
that each configuration's gradients agree with the chosen one's (they differ only in the
order of float32 sums). bench/ptxas_report.py predicts the register spills of these
configurations without a GPU; this measures what they cost. Run it on a GPU after
bench/gpu_check.sh (about 2 minutes on an H100):

  python bench/fused_sweep.py --out $OUT/fused_sweep.md

On the CPU (TRITON_INTERPRET=1, a tiny shape) it only checks that every configuration
computes the same gradients: `python bench/fused_sweep.py --cpu-check`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from gradserve import kernels  # noqa: E402
from gradserve.kernels import torch_engine, triton_engine, triton_fused  # noqa: E402

TARGET = (1024, 256, (32, 64, 64, 64, 1))  # M, N, layer sizes: the benchmark target
CPU_CHECK = (2, 37, (5, 13, 7, 3))
BLOCK_NS = (32, 64, 128)
WARPS = (4, 8)
PRECISIONS = ("float32", "tf32", "bfloat16")


def make_job(m, n, sizes, precision, device):
    g = torch.Generator(device=device).manual_seed(0)
    weights, biases = [], []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        weights.append(torch.randn(m, b, a, device=device, generator=g) * a**-0.5)
        biases.append(torch.randn(m, b, device=device, generator=g) * 0.1)
    x = torch.randn(m, n, sizes[0], device=device, generator=g)
    y = torch.randn(m, n, sizes[-1], device=device, generator=g)
    return kernels.EnsembleJob(
        mlp=kernels.MLPSpec(tuple(sizes), kernels.Activation("relu")),
        loss=kernels.LossSpec("mse"),
        weights=weights, biases=biases, inputs=x, targets=y, precision=precision,
    )  # fmt: skip


def with_config(block_n: int | None, warps: int | None):
    """launch_config with BLOCK_N and num_warps replaced (None: its own choice)."""
    chosen = triton_fused.launch_config

    def config(dp, n, m, device):
        own_block, _, _, own_warps = chosen(dp, n, m, device)
        block = block_n or own_block
        return block, *triton_fused.sample_splits(n, block, m, device), warps or own_warps

    return config


def run_with(job, device, block_n=None, warps=None):
    original = triton_fused.launch_config
    triton_fused.launch_config = with_config(block_n, warps)
    try:
        return triton_engine.run(job, device)
    finally:
        triton_fused.launch_config = original


def median_ms(fn, device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def largest_difference(a, b) -> float:
    """Largest |a - b| over all parameter gradients, relative to the largest |b|."""
    pairs = list(zip(a.weight_grads + a.bias_grads, b.weight_grads + b.bias_grads, strict=True))
    scale = max(float(y.abs().max()) for _, y in pairs)
    return max(float((x - y).abs().max()) for x, y in pairs) / scale


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-check", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_check else "cuda")
    m, n, sizes = CPU_CHECK if args.cpu_check else TARGET
    dp = triton_fused.padded_width(sizes)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    precisions = ("float32",) if args.cpu_check else PRECISIONS
    lines = [
        f"# Fused kernel launch configurations on {card}",
        "",
        f"M={m}, N={n}, layer sizes {list(sizes)} (padded width {dp}), relu, mse; torch "
        f"{torch.__version__}, triton {triton.__version__}. Times: median ms"
        + (" of triton.testing.do_bench." if device.type == "cuda" else " (interpreter)."),
        "",
        "| precision | BLOCK_N | warps | triton ms | vs chosen | vs eager "
        "| max grad difference vs chosen | launch_config's choice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for precision in precisions:
        job = make_job(m, n, sizes, precision, device)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        own_block, _, _, own_warps = triton_fused.launch_config(dp, n, m, device)
        chosen = run_with(job, device)
        t_chosen = median_ms(lambda job=job: run_with(job, device), device)
        t_eager = median_ms(lambda job=job: torch_engine.run(job, device), device)
        for block_n, warps in itertools.product(BLOCK_NS, WARPS):
            result = run_with(job, device, block_n, warps)
            diff = largest_difference(result, chosen)
            worst = max(worst, diff)
            t = median_ms(lambda job=job, b=block_n, w=warps: run_with(job, device, b, w), device)
            mark = "yes" if (block_n, warps) == (own_block, own_warps) else ""
            lines.append(
                f"| {precision} | {block_n} | {warps} | {t:.3f} | {t_chosen / t:.2f}x "
                f"| {t_eager / t:.2f}x | {diff:.1e} | {mark} |"
            )
            print(lines[-1], flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
    lines += ["", "'vs chosen' > 1: faster than launch_config's choice. Command: "
              "`python bench/fused_sweep.py`."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    # Every configuration computes the same sums in another order: float32 rounding only
    # (bf16 operands round identically in each), so a large difference is a kernel bug.
    if worst > 1e-4:
        raise SystemExit(f"a configuration's gradients differ by {worst:.1e} (relative)")


if __name__ == "__main__":
    main()
