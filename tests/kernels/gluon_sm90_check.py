"""The Gluon IEEE float32 kernels do on sm_90 what they are for, with the ptxas and nvdisasm
Triton ships, no GPU needed.

The GEMM (kernels/gluon_matmul.py): each thread loads at most one shared-memory byte per
FMA (8x8 outputs a thread; Triton's tl.dot GEMM loads 1.4 to 1.7), without register
spills, in the shared memory an SM has; compiled through its own launcher for the three
products of a 1024-wide layer (forward with its K-contiguous weights, dW with dZ^T's
P-contiguous rows, dZ), at both tile sizes.

The fused kernel (kernels/gluon_fused.py), through the engine at the benchmark target's
network and at odd widths, with and without input gradients: few register spills, and the
shared memory of two programs an SM (whose registers let two run). Run by
tests/kernels/test_sm90_resources.py in a subprocess, because TRITON_INTERPRET must be off
when kernels are defined.

Usage: python -m tests.kernels.gluon_sm90_check
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402
from bench.ptxas_report import ptxas_usage, sass_mix, shared_bytes_per_fma  # noqa: E402

SM90_SHARED_BYTES = 232448  # what one thread block may use on sm_90 (227 KB)
# Spill stores per thread allowed in the fused kernel (all 255 registers in use): at the
# target 0 B (triton 3.9) and 12 B (3.6); with every width padded (64, 16, 64, 16) 0.1 KB
# (3.9) and 1.1 KB (3.6), none of it in the products' loops' FMAs.
MAX_FUSED_SPILL_BYTES = 2048


def products(batch: int = 2, n: int = 256, width: int = 1024):
    """(name, a, b, epilogue) of a width x width layer's per-layer GEMMs, with the strides
    triton_layered.layered_mlp gives them."""
    h = torch.randn(batch, n, width)
    w = torch.randn(batch, width, width)
    dz = torch.randn(batch, n, width)
    yield "forward: H @ W^T", h, w.transpose(1, 2), 1
    yield "dW = dZ^T @ H", dz.transpose(1, 2), h, 0
    yield "dZ = (dZ @ W) * act'", dz, w, 2


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    from gradserve.kernels import gluon_matmul

    kernel = gluon_matmul._fp32_batched_matmul_kernel
    run = kernel.run
    compiled = []

    def compile_only(*args, grid, warmup, **kwargs):
        compiled.append(run(*args, grid=grid, warmup=True, **kwargs))
        return compiled[-1]

    kernel.run = compile_only
    failures = []
    try:
        for tiles in (gluon_matmul.LARGE_TILES, gluon_matmul.SMALL_TILES):
            for name, a, b, epilogue in products():
                c = torch.empty(a.shape[0], a.shape[1], b.shape[2])
                gluon_matmul.launch(a, b, c, torch.empty(c.shape[0], c.shape[2]),
                                    torch.empty_like(c), c.shape[0], epilogue=epilogue, act=1,
                                    slope=0.0, tiles=tiles)  # fmt: skip
                binary = compiled[-1]
                regs, spills, _ = ptxas_usage(binary.asm["ptx"])
                per_fma = shared_bytes_per_fma(sass_mix(binary.asm["cubin"]))
                shared = binary.metadata.shared
                print(f"{tiles['BLOCK_P']}x{tiles['BLOCK_Q']}x{tiles['BLOCK_K']}, "
                      f"{tiles['num_warps']} warps, {name}: {regs} registers, spill stores / "
                      f"loads {spills} B, {per_fma} shared B per FMA, {shared} B of shared "
                      f"memory")  # fmt: skip
                if int(spills.split(" / ")[0]) or float(per_fma) > 1.0:
                    failures.append(name)
                if shared > SM90_SHARED_BYTES:
                    failures.append(name)
    finally:
        del kernel.run
    failures += fused_failures()
    assert not failures, failures
    return 0


def fused_failures() -> list[str]:
    """The fused kernel's specialisations that spill more than MAX_FUSED_SPILL_BYTES or
    need more shared memory than two programs an SM have."""
    from gradserve.kernels import gluon_fused, triton_engine
    from tests.jobs import ensemble_job, random_job

    kernel = gluon_fused._fused_fp32_kernel
    run = kernel.run
    compiled = []

    def compile_only(*args, grid, warmup, **kwargs):
        compiled.append(run(*args, grid=grid, warmup=True, **kwargs))
        return compiled[-1]

    kernel.run = compile_only
    failures = []
    try:
        for sizes, hidden, loss, input_gradients in (
            ((32, 64, 64, 64, 1), "relu", "mse", False),
            ((37, 5, 60, 3), "gelu", "cross_entropy", True),
        ):
            tensors = random_job(sizes, 2, 256, loss=loss)
            job = ensemble_job(tensors, sizes, hidden=hidden, loss=loss,
                               input_gradients=input_gradients)  # fmt: skip
            compiled.clear()
            try:
                triton_engine.run(job, "cpu", float32_matmul="gluon", path="fused")
            except Exception:  # noqa: BLE001 (compiled, never launched: no results to sum)
                if not compiled:
                    raise
            binary = compiled[-1]
            regs, spills, _ = ptxas_usage(binary.asm["ptx"])
            shared = binary.metadata.shared
            print(f"fused {list(sizes)} {hidden} {loss}, input gradients {input_gradients}: "
                  f"{regs} registers, spill stores / loads {spills} B, {shared} B of shared "
                  f"memory")  # fmt: skip
            if (
                int(spills.split(" / ")[0]) > MAX_FUSED_SPILL_BYTES
                or shared > SM90_SHARED_BYTES // 2
            ):
                failures.append(f"fused {sizes}")
    finally:
        del kernel.run
    return failures


if __name__ == "__main__":
    sys.exit(main())
