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

IEEE float32 also runs on the Gluon GEMM (kernels/gluon_matmul.py: 8x8 outputs a thread,
one shared-memory byte per FMA where tl.dot's tiles load 1.4 to 1.7) in the tile shapes of
GLUON_CONFIGS, against the same fixed shape: whether it is faster, and in which tiles, is
what decides whether float32_matmul="gluon" should be the default.

On the CPU (TRITON_INTERPRET=1, a small shape whose products reach 128 on both sides) it
only checks that every tile shape computes the same gradients:
`python bench/layered_sweep.py --cpu-check`.
"""

from __future__ import annotations

import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench import sweep  # noqa: E402
from bench.common import plain_autograd_layers, precision_and_method  # noqa: E402
from gradserve.kernels import gluon_matmul, torch_engine, triton_engine, triton_layered  # noqa: E402

TARGET = (16, 1024, (1024, 1024, 1024, 1))  # M, N, layer sizes: the width-1024 benchmark row
CPU_CHECK = (1, 130, (20, 150, 140, 3))  # 130 x 150 x 140 products take the large tiles
# ("tl.dot", BLOCK_P, BLOCK_Q, BLOCK_K, warps, stages): triton_layered's kernel. The fixed
# shape first. Then shorter K steps; half tiles with 4 warps (168 registers on sm_90 for
# float32: three programs, 12 warps,
# per SM where the fixed shape has one of 8, the same FMAs per shared-memory load); a
# deeper pipeline; and small tiles (more programs, less reuse). Last, twice the outputs per
# thread (128x128 with 4 warps, 256x128 with 8): for IEEE float32 on sm_90, 1.25-1.39 bytes
# of shared memory loaded per FMA against the fixed shape's 1.38-1.52, with up to 0.3 KB
# of register spills where the fixed shape has none (bench/ptxas_report.py's measure,
# triton 3.6).
FIXED = ("tl.dot",) + tuple(triton_layered.LARGE_TILES[key]
                            for key in ("BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps",
                                        "num_stages"))  # fmt: skip
CONFIGS = [
    FIXED,
    ("tl.dot", 128, 128, 16, 8, 3),
    ("tl.dot", 128, 128, 16, 8, 4),
    ("tl.dot", 128, 64, 32, 4, 3),
    ("tl.dot", 64, 128, 32, 4, 3),
    ("tl.dot", 128, 64, 32, 4, 4),
    ("tl.dot", 128, 64, 16, 4, 4),
    ("tl.dot", 64, 64, 32, 4, 3),
    ("tl.dot", 128, 128, 32, 4, 3),
    ("tl.dot", 256, 128, 32, 8, 3),
]
# ("gluon", BLOCK_P, BLOCK_Q, BLOCK_K, warps, options): the Gluon GEMM, IEEE float32 only.
# Its large tiles first (gluon_matmul.LARGE_TILES: 128-142 registers on sm_90, one or two
# 8-warp programs per SM, two copies of the tiles in shared memory: one barrier a K step);
# the tiles in one copy (two barriers a step); capped at 128 registers, two programs an SM
# fit; K steps of 8 and 32; half tiles with 4 warps (more programs, the same bytes per FMA).
GLUON_CONFIGS = [
    ("gluon", 128, 128, 16, 8, None),
    ("gluon", 128, 128, 16, 8, {"buffers": 1}),
    ("gluon", 128, 128, 16, 8, {"maxnreg": 128}),
    ("gluon", 128, 128, 8, 8, None),
    ("gluon", 128, 128, 32, 8, None),
    ("gluon", 128, 64, 16, 4, None),
    ("gluon", 64, 128, 16, 4, None),
]
# The width-1024 targets' precisions first: float32 (IEEE, the one behind its target),
# then bfloat16; float32 as three tf32 products last.
PRECISIONS = ("float32", "bfloat16", "float32 tf32x3")


def tiles_of(config):
    """The tiles function of the config's kernel (triton_layered._tiles or
    gluon_matmul.tiles_for) with `config` for the products a GPU gives large tiles (on the
    CPU too, for the check); the others keep the small ones."""
    kernel, block_p, block_q, block_k, warps, last = config
    small = triton_layered.SMALL_TILES if kernel == "tl.dot" else gluon_matmul.SMALL_TILES
    large = dict(BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps)
    if kernel == "tl.dot":
        large["num_stages"] = last
    else:
        large.update(last or {})

    def tiles(p, q, device):
        return dict(large if triton_layered.takes_large_tiles(p, q) else small)

    return tiles


def run_with(job, device, config, float32_matmul="ieee"):
    """The job with `config`'s tiles; a Gluon config runs IEEE float32 on the Gluon GEMM
    (float32_matmul="gluon")."""
    gluon = config[0] == "gluon"
    owner, name = (gluon_matmul, "tiles_for") if gluon else (triton_layered, "_tiles")
    fixed = getattr(owner, name)
    setattr(owner, name, tiles_of(config))
    try:
        return triton_engine.run(job, device, float32_matmul="gluon" if gluon else float32_matmul)
    finally:
        setattr(owner, name, fixed)


def _cell(value) -> str:
    """A config's value as a table cell: options as `name value`."""
    if isinstance(value, dict):
        return ", ".join(f"{name} {v}" for name, v in value.items())
    return "" if value is None else str(value)


def configs_of(label: str) -> list:
    """IEEE float32 takes the Gluon GEMM's tiles too; the other precisions tl.dot's only."""
    return CONFIGS + GLUON_CONFIGS if label == "float32" else CONFIGS


def main():
    args = sweep.arguments().parse_args()
    device = torch.device("cpu" if args.cpu_check else "cuda")
    m, n, sizes = CPU_CHECK if args.cpu_check else TARGET
    precisions = ("float32",) if args.cpu_check else PRECISIONS

    def compile_one(run):
        label, config = run
        precision, method = precision_and_method(label)
        run_with(sweep.make_job(m, n, sizes, precision, device), device, config, method)

    runs = [(label, config) for label in precisions for config in configs_of(label)]
    passed = ["--cpu-check"] if args.cpu_check else []
    if sweep.compile_ahead(__file__, args, runs, compile_one, passed):
        return
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    lines = [
        f"# Per-layer GEMM tile shapes on {card}",
        "",
        f"M={m}, N={n}, layer sizes {list(sizes)}, relu, mse; torch {torch.__version__}, "
        f"triton {triton.__version__}. Times: median ms"
        + (" of triton.testing.do_bench." if device.type == "cuda" else " (interpreter)."),
        "",
        "| precision | kernel | BLOCK_P | BLOCK_Q | BLOCK_K | warps | stages (tl.dot) or "
        "options (gluon) | triton ms | vs fixed | vs eager | max grad difference vs "
        "fixed | the fixed shape |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for label in precisions:
        precision, method = precision_and_method(label)
        job = sweep.make_job(m, n, sizes, precision, device)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        fixed = run_with(job, device, FIXED, method)
        t_fixed = sweep.median_ms(lambda job=job, f=method: run_with(job, device, FIXED, f), device)
        with plain_autograd_layers():
            t_eager = sweep.median_ms(lambda job=job: torch_engine.run(job, device), device)
        worst = max(worst, sweep.time_configurations(
            label, configs_of(label),
            lambda config, job=job, f=method: run_with(job, device, config, f),
            lambda config: " | ".join(_cell(v) for v in config), FIXED, fixed,
            t_fixed, t_eager,
            device, lines, args.out,
        ))  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = False
    legend = (
        "'vs fixed' > 1: faster than triton_layered._tiles' shape. Command: "
        "`python bench/layered_sweep.py`."
    )
    sweep.finish(lines, args.out, legend, worst, "a tile shape")


if __name__ == "__main__":
    main()
