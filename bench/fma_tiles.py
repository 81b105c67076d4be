"""How fast can a Triton kernel multiply in IEEE float32 on the FMA units, by outputs per thread?

The fused kernel's IEEE float32 products are `tl.dot(input_precision="ieee")`, which Triton
lowers to FMAs with each thread computing at most a 4x4 block of outputs at a time; each
FMA then costs a thread 1.5 to 3 bytes of shared-memory loads, and an H100 SM returns 128
bytes of shared memory a clock against 128 FMAs (bench/results/ptxas_sm90.md). Gluon
(`triton.experimental.gluon`, Triton's explicit-layout language, in the same wheel) lets a
kernel choose its per-thread tile: 8x8 outputs halve the bytes per FMA, as cuBLAS's SGEMM
tiles do.

This times the pattern both would have in the fused kernel, a chain of 64-wide layers
h <- relu(h @ W) in blocks of BM samples: each layer's result, computed in registers, goes
through shared memory to be the next product's operand, W stays in shared memory. Rows:
- tl.dot: the fused kernel's own product (`triton_common._ieee_dot`, K-chunks of 16);
- Gluon: the product as 64 rank-1 updates, a column of h and a row of W loaded from shared
  memory in the accumulator's layout each step (h stored column-major, so both are
  contiguous per thread), with the per-thread tile and warps of the row.
Each row is checked against torch in float64 on the GPU, then timed: TFLOP/s and its
fraction of torch's float32 matmul on the same card in the same run.

`--cpu-check` checks every row on the CPU (the tl.dot rows under Triton's interpreter, the
Gluon rows through kernels/gluon_cpu.py, which has no way to see a missing barrier), and so
the inputs, reference and check; `--static` compiles every row for sm_90a without a GPU
and gives registers, spills, FFMAs and the shared-memory bytes each thread loads per FMA
(ptxas and nvdisasm from the Triton wheel).

  python bench/fma_tiles.py --out out/gpu/fma_tiles.md      (GPU; gpu_check.sh fma)
  TRITON_INTERPRET=1 python bench/fma_tiles.py --cpu-check
  env -u TRITON_INTERPRET python bench/fma_tiles.py --static --out bench/results/fma_tiles_sm90.md
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import markdown_table, write_lines  # noqa: E402
from gradserve.kernels import gluon_cpu  # noqa: E402
from gradserve.kernels.gluon_matmul import _sync_threads  # noqa: E402
from gradserve.kernels.triton_common import _ieee_dot  # noqa: E402
from gradserve.kernels.triton_engine import interpreted  # noqa: E402

WIDTH = 64  # the layers' width: the benchmark target's hidden width
LAYERS = 64  # layers a program runs: enough products to time the FMA units, not the loads
# Layers of the correctness check: over 64, rounding compounds far past one product's.
CHECK_LAYERS = 4
ROWS = 65536  # samples in all: 512 to 1024 programs, several waves on an H100's 132 SMs
FUSED_K_CHUNK = 16  # the fused kernel's IEEE float32 K-chunks at width 64 (FMA_K_CHUNK)

# (product, samples per program, warps, per-thread tile, threads per warp as [rows, cols]).
# The per-thread tile and thread arrangement cover BM x WIDTH exactly with the warps
# stacked along the rows; tl.dot rows take Triton's own layout.
CONFIGS = [
    ("tl.dot", 64, 8, None, None),  # the fused kernel's launch at the target
    ("tl.dot", 64, 4, None, None),
    ("tl.dot", 128, 4, None, None),
    ("tl.dot", 128, 8, None, None),
    ("gluon", 64, 8, (4, 4), (2, 16)),  # Triton's 4x4, for comparison
    ("gluon", 64, 4, (8, 4), (2, 16)),
    ("gluon", 64, 2, (8, 8), (4, 8)),
    ("gluon", 128, 4, (8, 8), (4, 8)),
    ("gluon", 128, 8, (8, 4), (2, 16)),
    ("gluon", 256, 8, (8, 8), (4, 8)),
]


STATIC_NOTES = """FFMA: one layer's, per thread (the loop over layers is not unrolled).
Shared B loaded per FMA: what each thread loads from shared memory (LDS, LDSM) over its
FFMAs. An H100 SM returns 128 bytes of shared memory a clock (a register per thread of a
warp) and issues 128 FMAs a clock, so at 1.00 shared memory keeps pace with the FMA units
and above it sets the pace (2.19: at most 46% of FMA issue). Triton's FMA lowering gives a
thread 4x4 outputs at a time; more samples a thread repeat that tile, which shares some
loads (1.44 at 128 samples with 4 warps; the fused kernel spills there). Gluon's 8x8
tiles load a column of 8 samples and a row of 8 weights (two 16-byte loads each) per 64
FMAs. None of it is a time: `bash bench/gpu_check.sh fma` measures."""


# One compile a row for the check's layers and the timed ones alike.
@triton.jit(do_not_specialize=["layers"])
def _chain_tl_dot(x_ptr, w_ptr, out_ptr, layers, BM: tl.constexpr, W: tl.constexpr,
                  K_CHUNK: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, W)
    h = tl.load(x_ptr + rows[:, None] * W + cols[None, :])
    w = tl.load(w_ptr + cols[:, None] * W + cols[None, :])
    for _ in range(layers):
        h = tl.maximum(_ieee_dot(h, w, K_CHUNK), 0.0)
    tl.store(out_ptr + rows[:, None] * W + cols[None, :], h)


@gluon.jit(do_not_specialize=["layers"])
def _chain_gluon(x_ptr, w_ptr, out_ptr, layers, BM: gl.constexpr, W: gl.constexpr,
                 ACC: gl.constexpr):  # fmt: skip
    rows = gl.program_id(0) * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
    w_rows = gl.arange(0, W, layout=gl.SliceLayout(1, ACC))
    cols = gl.arange(0, W, layout=gl.SliceLayout(0, ACC))
    h = gl.load(x_ptr + rows[:, None] * W + cols[None, :])
    w = gl.load(w_ptr + w_rows[:, None] * W + cols[None, :])
    # W row-major: row k is contiguous. h column-major (order [0, 1]): column k is.
    w_s = gl.allocate_shared_memory(gl.float32, [W, W], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), w)
    h_s = gl.allocate_shared_memory(gl.float32, [BM, W], gl.SwizzledSharedLayout(1, 1, 1, [0, 1]))
    for _ in range(layers):
        _sync_threads()  # every thread has read the previous layer's h
        h_s.store(h)
        _sync_threads()  # and every thread's part of this one is there
        acc = gl.zeros([BM, W], gl.float32, ACC)
        for k in gl.static_range(W):
            acc += h_s.slice(k, 1, dim=1).load(ACC) * w_s.slice(k, 1, dim=0).load(ACC)
        h = gl.maximum(acc, 0.0)
    gl.store(out_ptr + rows[:, None] * W + cols[None, :], h)


def acc_layout(bm: int, warps: int, tile, threads):
    """The accumulator's layout: `tile` outputs a thread, `threads` threads a warp, the
    warps stacked along the rows; it must cover [bm, WIDTH] exactly."""
    if tile[0] * threads[0] * warps != bm or tile[1] * threads[1] != WIDTH:
        raise ValueError(f"{tile} x {threads} x {warps} warps does not cover {bm} x {WIDTH}")
    return gl.BlockedLayout(list(tile), list(threads), [warps, 1], [1, 0])


def launch(config, x, w, out, layers: int, warmup: bool = False):
    product, bm, warps, tile, threads = config
    grid = (x.shape[0] // bm,)
    if product == "tl.dot":
        return _chain_tl_dot.run(x, w, out, layers, bm, WIDTH, FUSED_K_CHUNK, grid=grid,
                                 warmup=warmup, num_warps=warps)  # fmt: skip
    acc = acc_layout(bm, warps, tile, threads)
    if interpreted():
        return gluon_cpu.run(_chain_gluon, grid, x, w, out, layers, bm, WIDTH, acc)
    return _chain_gluon.run(x, w, out, layers, bm, WIDTH, acc, grid=grid, warmup=warmup,
                            num_warps=warps)  # fmt: skip


def label(config) -> list:
    product, bm, warps, tile, _ = config
    return [product, bm, warps, f"{tile[0]}x{tile[1]}" if tile else "Triton's (4x4)"]


def inputs(device: str):
    """Random samples and a weight of sqrt(2) times an orthogonal matrix (a relu halves a
    random vector's energy on average), float64 for the reference and float32 for the
    kernels. Over the check's few layers h keeps about its scale; over the timed 64 it
    shrinks (to about 3e-7 of it), far above float32's subnormal range."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, WIDTH, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=gen, dtype=torch.float64))
    w = (q * 2**0.5).contiguous()  # the kernels read it row-major; QR's Q is column-major
    x, w = x.to(device), w.to(device)
    return x, w, x.float(), w.float()


def relative_error(config, x64, w64, x, w) -> float:
    """The kernel's h after CHECK_LAYERS layers against torch's in float64 (relative L2)."""
    out = torch.empty_like(x)
    launch(config, x, w, out, CHECK_LAYERS)
    expected = x64
    for _ in range(CHECK_LAYERS):
        expected = torch.relu(expected @ w64)
    return ((out.double() - expected).norm() / expected.norm()).item()


def verdict(error: float) -> str:
    # IEEE float32 sums of 64 products, a few layers deep: about 2e-7 relative.
    return f"{error:.1e} ({'right' if error < 1e-5 else 'WRONG'})"


def static_rows() -> list:
    from triton.runtime import driver

    from bench.compile_only import CompileOnlyDriver
    from bench.ptxas_report import count, ptxas_usage, sass_mix, shared_bytes_per_fma

    driver.set_active(CompileOnlyDriver())  # compiles for sm_90a, never launches
    _, _, x, w = inputs("cpu")
    rows = []
    for config in CONFIGS:
        binary = launch(config, x, w, torch.empty_like(x), LAYERS, warmup=True)
        regs, spills, _ = ptxas_usage(binary.asm["ptx"])
        ops = sass_mix(binary.asm["cubin"])
        rows.append(label(config) + [regs, spills, count(ops, ("FFMA",)),
                                     shared_bytes_per_fma(ops)])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def gpu_rows(out_path: str | None, header: list[str], lines: list[str]) -> int:
    """Check and time every row, writing the table after each; the number of rows that
    were wrong or failed."""
    from bench.kernels_gpu import measured_peaks

    x64, w64, x, w = inputs("cuda")
    bad = 0
    peak = measured_peaks()["float32"]  # torch's float32 matmul (no tf32) at 8192 cubed
    flops = 2 * ROWS * WIDTH * WIDTH * LAYERS
    lines += [f"torch float32 matmul (8192^3): {peak:.1f} TFLOP/s", "",
              markdown_table(header, [])]  # fmt: skip
    for config in CONFIGS:
        out = torch.empty_like(x)
        try:
            error = relative_error(config, x64, w64, x, w)
            ms = triton.testing.do_bench(lambda c=config, o=out: launch(c, x, w, o, LAYERS))
            tflops = flops / ms / 1e9
            cells = [verdict(error), f"{ms:.3f}", f"{tflops:.1f}", f"{100 * tflops / peak:.0f}%"]
        except Exception as exc:  # noqa: BLE001 (a row that fails to build or run says why)
            cells = [f"FAILED: {type(exc).__name__}: {str(exc)[:120]}", "", "", ""]
        bad += "WRONG" in cells[0] or "FAILED" in cells[0]
        lines.append("| " + " | ".join(str(c) for c in label(config) + cells) + " |")
        print(lines[-1], flush=True)
        write_lines(out_path, lines)
    return bad


def cpu_check() -> int:
    """Every row on a few samples on the CPU (tl.dot's under the interpreter, Gluon's
    through gluon_cpu), checked as on the GPU: the kernels' arithmetic, the inputs, the
    reference and the check itself, before a GPU call relies on them. Exit status 1 if a
    row is wrong."""
    global ROWS
    ROWS = 256
    x64, w64, x, w = inputs("cpu")
    wrong = 0
    for config in CONFIGS:
        cell = verdict(relative_error(config, x64, w64, x, w))
        wrong += "WRONG" in cell
        print("| " + " | ".join(str(c) for c in label(config) + [cell]) + " |", flush=True)
    return 1 if wrong else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--static", action="store_true", help="compile for sm_90a, no GPU")
    parser.add_argument("--cpu-check", action="store_true",
                        help="every row on the CPU (TRITON_INTERPRET=1), checked only")  # fmt: skip
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    title = [f"# IEEE float32 products by outputs per thread: a chain of {LAYERS} layers "
             f"{WIDTH} wide, {ROWS} samples", "",
             f"triton {triton.__version__}, torch {torch.__version__}"]  # fmt: skip
    product = ["product", "samples per program", "warps", "outputs per thread"]
    if args.cpu_check:
        sys.exit(cpu_check())
    if args.static:
        assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"
        header = product + ["registers", "spill stores / loads (B)", "FFMA",
                            "shared B loaded per FMA"]  # fmt: skip
        lines = title + ["", "Compiled for sm_90a without a GPU (ptxas -v, nvdisasm).", "",
                         markdown_table(header, static_rows()), "", STATIC_NOTES]  # fmt: skip
        write_lines(args.out, lines)
        print("\n".join(lines))
        return
    header = product + [f"relative error, {CHECK_LAYERS} layers", "ms", "TFLOP/s",
                        "of torch's float32"]  # fmt: skip
    lines = title + [f"GPU: {torch.cuda.get_device_name()}"]
    sys.exit(1 if gpu_rows(args.out, header, lines) else 0)


if __name__ == "__main__":
    main()
