"""A stand-in for the CUDA driver, for compiling Triton kernels on a machine without a GPU.

Triton's launch path asks the active driver for the target, device and stream; answered as
an H100 would, `kernel.run(..., warmup=True)` binds and specialises the arguments as on
the GPU and compiles (PTX and cubin, with the ptxas Triton ships) without launching, and
Triton's per-device caches fill as they would there. Used by bench/ptxas_report.py and
tests/kernels/compiled_kernels_check.py.
"""

from __future__ import annotations

from triton.backends.compiler import GPUTarget


class CompileOnlyDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0
