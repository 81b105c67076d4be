"""IEEE float32 at width 128 compiles without drowning in register spills (no GPU needed).

Triton lowers an IEEE float32 tl.dot to FMAs, and with a whole 128-long K in one dot ptxas
gave the fused kernel 32 registers and ~55 KB of spill stores per thread (sm_90, triton
3.6 and 3.9): over half of its instructions were local-memory loads and stores. The
kernels multiply in K-chunks of 32 (triton_common._ieee_dot), which keeps it in registers.
This compiles the kernel through the engine's own launcher for sm_90 (ptxas as Triton
ships it) and checks the spill bytes; run by tests/kernels/test_register_spills.py in a
subprocess, because TRITON_INTERPRET must be off when kernels are defined.

Usage: python -m tests.kernels.register_spills_check
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402

# Spill stores per thread allowed. With K-chunks: 0.4 KB (triton 3.6), 1.2 KB (3.9).
MAX_SPILL_BYTES = 8192


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    from bench import ptxas_report
    from gradserve.kernels import triton_engine, triton_fused

    code = triton_engine.precision_code("float32")
    config = triton_fused.launch_config(128, 256, 4, torch.device("cpu"), code)
    chosen = (config.block_n, config.num_warps, None, config.resident, config.carry)
    found = ptxas_report.row("float32", chosen, False, False, chosen, ptxas_report.WIDE_SIZES)
    registers, spills = found[8], found[9]
    stores = int(spills.split(" / ")[0])
    print(f"float32 {ptxas_report.WIDE_SIZES} at {chosen[:2]}: {registers} registers, "
          f"spill stores / loads {spills} B")  # fmt: skip
    assert stores <= MAX_SPILL_BYTES, f"{stores} B of spill stores per thread"
    return 0


if __name__ == "__main__":
    sys.exit(main())
