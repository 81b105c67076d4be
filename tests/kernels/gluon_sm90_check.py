"""The Gluon IEEE float32 GEMM (kernels/gluon_matmul.py) does on sm_90 what it is for: each
thread loads at most one shared-memory byte per FMA (8x8 outputs a thread; Triton's tl.dot
GEMM loads 1.4 to 1.7), without register spills, in the shared memory an SM has.

Compiled through its own launcher for the three products of a 1024-wide layer (forward
with its K-contiguous weights, dW with dZ^T's P-contiguous rows, dZ), at both tile sizes,
with the ptxas and nvdisasm Triton ships; no GPU needed. Run by
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
    assert not failures, failures
    return 0


if __name__ == "__main__":
    sys.exit(main())
