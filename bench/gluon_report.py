"""What the Gluon IEEE float32 kernels compile to on an H100 (sm_90a), no GPU needed.

float32_matmul="gluon" runs IEEE float32 on Gluon kernels whose threads hold up to 8x8
outputs of each product (kernels/gluon_fused.py, kernels/gluon_matmul.py), to load one
byte of shared memory per FMA where Triton's tl.dot loads 1.4 to 2.3 (an H100 SM returns
128 bytes of shared memory a clock against 128 FMAs). This compiles them through their
launchers, as on a GPU, and reports registers and spills (ptxas -v), shared memory,
programs per SM, and from the SASS (nvdisasm) the barriers, the FFMAs' share of the
instructions and the shared-memory bytes loaded per FFMA (bench/ptxas_report.py's
measure). The Gluon fused kernel's products loop over K (the Triton kernel's are
unrolled), so its static counts are not a block's work and those columns are left blank
for both fused kernels; the Gluon kernel's product loops load 1.00 byte per FMA (4 rank-1
updates an iteration: 256 FFMA, 16 LDS.128), and bench/results/ptxas_sm90.md has the
Triton kernel's mix.
None of it is a time: `bash bench/gpu_check.sh` times float32_matmul="gluon".

  env -u TRITON_INTERPRET python bench/gluon_report.py    (bench/results/gluon_sm90.md)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import write_table  # noqa: E402
from bench.compile_only import CompileOnlyDriver  # noqa: E402
from bench.ptxas_report import (  # noqa: E402
    count,
    programs_per_sm,
    ptxas_usage,
    sass_mix,
    shared_bytes_per_fma,
)

TARGET_SIZES = (32, 64, 64, 64, 1)
# Every width padded (to 64, 16, 64, 16): masks everywhere, and products of every shape.
PADDED_SIZES = (37, 5, 60, 3)
HEADER = ["kernel", "job or product", "tiles / block", "warps", "registers",
          "spill stores / loads (B)", "shared memory (KB)", "programs per SM",
          "SASS instructions", "barriers", "FFMA", "FFMA share",
          "shared B loaded per FMA"]  # fmt: skip


class _CompileOnly:
    """Within it, `kernel`'s launches compile for sm_90a and return the compiled kernel
    (`.compiled`: every one), launching nothing."""

    def __init__(self, kernel):
        self.kernel, self.compiled = kernel, []

    def __enter__(self):
        run = self.kernel.run

        def compile_only(*args, grid, warmup, **kwargs):
            self.compiled.append(run(*args, grid=grid, warmup=True, **kwargs))
            return self.compiled[-1]

        self.kernel.run = compile_only
        return self

    def __exit__(self, *exc):
        del self.kernel.run


def _cells(binary, warps: int, per_fma: bool = True) -> list:
    regs, spills, _ = ptxas_usage(binary.asm["ptx"])
    ops = sass_mix(binary.asm["cubin"])
    shared = binary.metadata.shared
    per_sm = programs_per_sm(int(regs), warps, shared)
    instructions, ffma = sum(ops.values()), count(ops, ("FFMA",))
    cells = [warps, int(regs), spills, round(shared / 1024), per_sm, instructions,
             count(ops, ("BAR",))]  # fmt: skip
    if not per_fma:
        return cells + ["", "", ""]
    return cells + [ffma, f"{100 * ffma / instructions:.0f}%", shared_bytes_per_fma(ops)]


def gemm_rows(batch: int = 2, n: int = 256, width: int = 1024) -> list:
    """The Gluon GEMM for the three products of a width x width layer, with the strides
    triton_layered.layered_mlp gives them, at both tile sizes."""
    from gradserve.kernels import gluon_matmul

    h = torch.randn(batch, n, width)
    w = torch.randn(batch, width, width)
    dz = torch.randn(batch, n, width)
    products = [("forward: H @ W^T", h, w.transpose(1, 2), 1),
                ("dW = dZ^T @ H", dz.transpose(1, 2), h, 0),
                ("dZ = (dZ @ W) * act'", dz, w, 2)]  # fmt: skip
    rows = []
    with _CompileOnly(gluon_matmul._fp32_batched_matmul_kernel) as compiling:
        for tiles in (gluon_matmul.LARGE_TILES, gluon_matmul.SMALL_TILES):
            for name, a, b, epilogue in products:
                c = torch.empty(a.shape[0], a.shape[1], b.shape[2])
                gluon_matmul.launch(a, b, c, torch.empty(c.shape[0], c.shape[2]),
                                    torch.empty_like(c), c.shape[0], epilogue=epilogue, act=1,
                                    slope=0.0, tiles=tiles)  # fmt: skip
                shape = f"{tiles['BLOCK_P']} x {tiles['BLOCK_Q']} x {tiles['BLOCK_K']}"
                rows.append(["Gluon GEMM", f"{name}, width {width}", shape]
                            + _cells(compiling.compiled[-1], tiles["num_warps"]))  # fmt: skip
    return rows


def _job(sizes, hidden, loss, input_gradients):
    from tests.jobs import ensemble_job, random_job

    tensors = random_job(sizes, 2, 256, loss=loss)
    return ensemble_job(tensors, sizes, hidden=hidden, loss=loss, input_gradients=input_gradients)


FUSED_JOBS = [(TARGET_SIZES, "relu", "mse", False), (PADDED_SIZES, "gelu", "cross_entropy", True)]


def fused_rows(with_triton: bool = True) -> list:
    """The Gluon fused kernel through the engine for FUSED_JOBS (N=256), and the Triton
    fused kernel at the same jobs (`with_triton`)."""
    from gradserve.kernels import gluon_fused, triton_engine, triton_fused

    rows = []
    for sizes, hidden, loss, input_gradients in FUSED_JOBS:
        job = _job(sizes, hidden, loss, input_gradients)
        label = f"{list(sizes)} {hidden} {loss}" + (", input gradients" if input_gradients else "")
        widths = triton_fused.padded_widths(sizes)
        triton_block = triton_fused.launch_config(widths, 256, 2, torch.device("cpu"), 0).block_n
        kernels = [("Gluon fused", gluon_fused._fused_fp32_kernel, "gluon", gluon_fused.BLOCK_N)]
        if with_triton:
            kernels.append(("Triton fused (tl.dot)", triton_fused._fused_mlp_kernel, "ieee",
                            triton_block))  # fmt: skip
        for name, kernel, method, block in kernels:
            with _CompileOnly(kernel) as compiling:
                try:
                    triton_engine.run(job, "cpu", float32_matmul=method, path="fused")
                except Exception:  # noqa: BLE001 (compiled, not run: nothing to sum after it)
                    if not compiling.compiled:
                        raise
            binary = compiling.compiled[-1]
            warps = binary.metadata.num_warps
            rows.append([name, label, f"{block} samples"] + _cells(binary, warps, per_fma=False))
    return rows


def main() -> None:
    driver.set_active(CompileOnlyDriver())  # for this process: it compiles, never launches
    write_table(
        "gluon_sm90.md",
        "Gluon IEEE float32 kernels on sm_90a (H100): registers, spills and SASS, no GPU needed",
        HEADER,
        gemm_rows() + fused_rows(),
        f"Triton {triton.__version__}, sm_90a; ptxas -v of the PTX, nvdisasm of the cubin, "
        "compiled through the kernels' launchers (the arguments specialised as on a GPU). "
        "Programs per SM: what registers (64K) and shared memory (227 KB) allow. FFMA share: "
        "of the SASS instructions (the GEMM's K loop, two K steps, counted once). Shared B "
        "loaded per FMA: over the whole kernel. Fused kernels: see the script's docstring. "
        "Command: `env -u TRITON_INTERPRET python bench/gluon_report.py`.",
    )


if __name__ == "__main__":
    main()
