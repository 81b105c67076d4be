"""Every launch of the engine's kernels asks for fused multiply-adds, whatever Triton's
default (triton_common.LAUNCH_OPTIONS): with TRITON_DEFAULT_FP_FUSION=0 here, the default
Triton announces for 3.10, each kernel the engine launches still compiles with fusion on.

A stand-in driver (bench/compile_only.py) compiles each launch for an H100 instead of
running it; one small job takes the fused path and then the per-layer path, and the
partial-gradient sum is launched alone, so every kernel is compiled. Run by
tests/kernels/test_gpu_compile.py in a subprocess, because TRITON_INTERPRET (set by the
test suite) must be off when kernels are defined.

Usage: python -m tests.kernels.fp_fusion_check
"""

from __future__ import annotations

import importlib.util
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"
os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402

GLUON = importlib.util.find_spec("triton.experimental.gluon") is not None  # Triton >= 3.6


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    from gradserve.kernels import partial_sums, triton_engine
    from tests.jobs import ensemble_job, random_job

    compiled = {}
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled[self.fn.__name__] = kernel
        return kernel

    JITFunction.run = compile_only
    try:
        sizes = (5, 13, 7, 3)
        job = ensemble_job(random_job(sizes, 2, 37, seed=1), sizes)
        for path in ("fused", "per_layer"):
            triton_engine.run(job, "cpu", path=path)
        if GLUON:  # IEEE float32 on the Gluon kernels, fused and per-layer
            for path in ("fused", "per_layer"):
                triton_engine.run(job, "cpu", path=path, float32_matmul="gluon")
        # the sum of per-program partials, which a job on the CPU never splits for
        partial_sums.sum_partials(torch.zeros(2, 3, 64), [(0, 64)])
    finally:
        JITFunction.run = launch
    expected = {"_fused_mlp_kernel", "_sum_partials_kernel", "_batched_matmul_kernel",
                "_loss_kernel", "_column_sum_kernel"}  # fmt: skip
    if GLUON:
        expected |= {"_fp32_batched_matmul_kernel", "_fused_fp32_kernel"}
    assert set(compiled) == expected, sorted(compiled)
    for name, kernel in sorted(compiled.items()):
        fused = kernel.metadata.enable_fp_fusion
        print(f"{name}: enable_fp_fusion={fused}")
        assert fused is True, name
    return 0


if __name__ == "__main__":
    sys.exit(main())
