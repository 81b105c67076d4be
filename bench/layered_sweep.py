"""Tile sweep of the per-layer path's batched GEMM at the benchmark's width-1024 shape.

The per-layer path (kernels/triton_layered.py) multiplies every product with both sides
>= 128 in one fixed tile shape (triton_layered._tiles: 128x128, K steps of 32, 8 warps, 3
pipeline stages). For IEEE float32 that product runs on the FMA units, at 67% of the
card's fp32 matmul peak in bench/results/kernels_gpu_h100.md, and ptxas gives its 8-warp
program all 255 registers: one program, 8 warps, per SM. This times the Triton engine with
each tile shape in CONFIGS in place of the fixed one (for the products with both sides >=
128; smaller ones keep theirs), next to torch eager in the same run, and checks that each
shape's gradients agree with the fixed shape's (K steps of another size add the same
products in another order: float32 rounding only). Run it on a GPU:

  python bench/layered_sweep.py --out $OUT/layered_sweep.md

On the CPU (TRITON_INTERPRET=1, a small shape whose products reach 128 on both sides) it
only checks that every tile shape computes the same gradients:
`python bench/layered_sweep.py --cpu-check`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
from triton.runtime.errors import OutOfResources

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import compile_in_parallel, precision_and_method, share, write_lines  # noqa: E402
from bench.fused_sweep import largest_difference, make_job, median_ms  # noqa: E402
from gradserve.kernels import torch_engine, triton_engine, triton_layered  # noqa: E402

TARGET = (16, 1024, (1024, 1024, 1024, 1))  # M, N, layer sizes: the width-1024 benchmark row
CPU_CHECK = (1, 130, (20, 150, 140, 3))  # 130 x 150 x 140 products take the large tiles
# (BLOCK_P, BLOCK_Q, BLOCK_K, warps, stages). The fixed shape first. Then shorter K steps;
# half tiles with 4 warps (168 registers on sm_90 for float32: three programs, 12 warps,
# per SM where the fixed shape has one of 8, the same FMAs per shared-memory load); a
# deeper pipeline; and small tiles (more programs, less reuse).
FIXED = tuple(triton_layered.LARGE_TILES[key]
              for key in ("BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps", "num_stages"))  # fmt: skip
CONFIGS = [
    FIXED,
    (128, 128, 16, 8, 3),
    (128, 128, 16, 8, 4),
    (128, 64, 32, 4, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 4, 4),
    (128, 64, 16, 4, 4),
    (64, 64, 32, 4, 3),
]
# The width-1024 targets' precisions first: float32 (IEEE, the one behind its target),
# then bfloat16; float32 as three tf32 products last.
PRECISIONS = ("float32", "bfloat16", "float32 tf32x3")


def tiles_of(config):
    """triton_layered._tiles with `config` for the products a GPU gives large tiles (on
    the CPU too, for the check); the others keep the small ones."""
    block_p, block_q, block_k, warps, stages = config

    def tiles(p, q, device):
        if not triton_layered.takes_large_tiles(p, q):
            return dict(triton_layered.SMALL_TILES)
        return dict(BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps,
                    num_stages=stages)  # fmt: skip

    return tiles


def run_with(job, device, config, float32_matmul="ieee"):
    fixed = triton_layered._tiles
    triton_layered._tiles = tiles_of(config)
    try:
        return triton_engine.run(job, device, float32_matmul=float32_matmul)
    finally:
        triton_layered._tiles = fixed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument(
        "--compile-workers", type=int, default=None,
        help="processes compiling the kernels ahead of the timing run (default: one per "
        "CPU core up to 16 on a GPU, none on the CPU)",
    )  # fmt: skip
    parser.add_argument("--compile-share", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_check else "cuda")
    m, n, sizes = CPU_CHECK if args.cpu_check else TARGET
    precisions = ("float32",) if args.cpu_check else PRECISIONS
    runs = [(label, config) for label in precisions for config in CONFIGS]
    if args.compile_share:  # a child of compile_in_parallel: run its share once, no timing
        for label, config in share(runs, args.compile_share):
            precision, method = precision_and_method(label)
            try:
                run_with(make_job(m, n, sizes, precision, device), device, config, method)
            except OutOfResources:  # compiled, does not launch: the timing run says so
                pass
        return
    workers = args.compile_workers
    if workers is None:
        workers = 0 if args.cpu_check else min(16, os.cpu_count() or 1, len(runs))
    if workers:
        compile_in_parallel(__file__, workers, ["--cpu-check"] if args.cpu_check else [])
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    lines = [
        f"# Per-layer GEMM tile shapes on {card}",
        "",
        f"M={m}, N={n}, layer sizes {list(sizes)}, relu, mse; torch {torch.__version__}, "
        f"triton {triton.__version__}. Times: median ms"
        + (" of triton.testing.do_bench." if device.type == "cuda" else " (interpreter)."),
        "",
        "| precision | BLOCK_P | BLOCK_Q | BLOCK_K | warps | stages | triton ms | vs fixed "
        "| vs eager | max grad difference vs fixed | the fixed shape |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for label in precisions:
        precision, method = precision_and_method(label)
        job = make_job(m, n, sizes, precision, device)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        fixed = run_with(job, device, FIXED, method)
        t_fixed = median_ms(lambda job=job, f=method: run_with(job, device, FIXED, f), device)
        t_eager = median_ms(lambda job=job: torch_engine.run(job, device), device)
        for config in CONFIGS:
            shape = " | ".join(str(v) for v in config)
            try:
                result = run_with(job, device, config, method)
            except OutOfResources as error:  # a row that says so, and the sweep goes on
                lines.append(f"| {label} | {shape} | does not fit: {error} | | | | |")
                print(lines[-1], flush=True)
                write_lines(args.out, lines)
                continue
            diff = largest_difference(result, fixed)
            worst = max(worst, diff)
            t = median_ms(lambda job=job, c=config, f=method: run_with(job, device, c, f), device)
            mark = "yes" if config == FIXED else ""
            lines.append(
                f"| {label} | {shape} | {t:.3f} | {t_fixed / t:.2f}x | {t_eager / t:.2f}x "
                f"| {diff:.1e} | {mark} |"
            )
            print(lines[-1], flush=True)
            write_lines(args.out, lines)  # row by row: a cut-off run keeps what it measured
        torch.backends.cuda.matmul.allow_tf32 = False
    lines += ["", "'vs fixed' > 1: faster than triton_layered._tiles' shape. Command: "
              "`python bench/layered_sweep.py`."]  # fmt: skip
    write_lines(args.out, lines)
    print("\n".join(lines))
    # Every shape adds the same products in another order: float32 rounding only (bf16
    # operands round identically in each), so a large difference is a kernel bug.
    if worst > 1e-4:
        raise SystemExit(f"a tile shape's gradients differ by {worst:.1e} (relative)")


if __name__ == "__main__":
    main()
