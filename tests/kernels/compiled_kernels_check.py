"""kernels.compiled_kernels against Triton's real caches, on a machine without a GPU.

A stand-in driver (bench/compile_only.py) lets Triton's launcher compile kernels as for an
H100 without launching them, so its per-device caches of compiled kernels fill as on a GPU. Run by
tests/kernels/test_compiled_kernels.py in a subprocess, because TRITON_INTERPRET (set by
the test suite) must be off when kernels are defined.

Usage: python -m tests.kernels.compiled_kernels_check
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    from gradserve.kernels import compiled_kernels, triton_fused, triton_layered

    kernels = compiled_kernels.engine_kernels()
    for kernel in (triton_fused._fused_mlp_kernel, triton_fused._sum_partials_kernel,
                   triton_layered._batched_matmul_kernel):  # fmt: skip
        assert kernel in kernels, kernel
    partial, out = torch.zeros(4, 2, 64), torch.zeros(4, 64)

    def compile_with(block: int) -> None:  # one specialisation per BLOCK
        triton_fused._sum_partials_kernel.run(
            partial, out, 2, 64, BLOCK=block, grid=(4, 1), warmup=True
        )

    compiled_kernels.set_limit(2)
    seen = []
    for block in (256, 512, 1024, 256):
        compile_with(block)
        held = compiled_kernels.held()
        seen.append((held, compiled_kernels.enforce(), compiled_kernels.held()))
    # two kept; the third is one too many: all dropped; the first again: compiled anew
    expected = [(1, False, 1), (2, False, 2), (3, True, 0), (1, False, 1)]
    assert seen == expected, seen
    assert compiled_kernels.evictions() == 1
    print("compiled kernels stay within the limit:", seen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
