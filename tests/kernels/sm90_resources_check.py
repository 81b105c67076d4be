"""The fused kernel fits an H100's SM at the configurations it is launched with (no GPU
needed): registers without heavy spills, and shared memory; and so does the per-layer
path's loss kernel at every output width (check_loss_kernel).

Spills: Triton lowers an IEEE float32 tl.dot to FMAs, and with a whole 128-long K in one
dot ptxas gave the fused kernel 32 registers and ~55 KB of spill stores per thread (sm_90,
triton 3.6 and 3.9): over half of its instructions were local-memory loads and stores. The
kernels multiply in K-chunks (triton_common._ieee_dot: of 16 in the fused kernel, 32 where
K is 128), which keeps it in registers.

Shared memory: with the parameter-gradient sums carried across the loop over blocks
(LaunchConfig.carry), Triton's software pipeliner buffered that loop into 352 KB of shared
memory at tf32 128/8, more than an SM has (227 KB): the launch would fail. fused_mlp
launches with num_stages=1; the configurations the GPU sweep times with `carry` are checked
here.

This compiles the kernel through the engine's own launcher for sm_90 (ptxas as Triton
ships it); run by tests/kernels/test_sm90_resources.py in a subprocess, because
TRITON_INTERPRET must be off when kernels are defined.

Usage: python -m tests.kernels.sm90_resources_check
"""

from __future__ import annotations

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402

# Spill stores per thread allowed. With K-chunks: 0.2 KB (triton 3.6), 1.0 KB (3.9).
MAX_SPILL_BYTES = 8192
# The loss kernel's: none measured (triton 3.6 and 3.9); a fixed 32-row tile had 8 to 74 KB.
MAX_LOSS_SPILL_BYTES = 256


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    from bench import fused_sweep, ptxas_report, sweep
    from bench.ptxas_report import SM90_SHARED_BYTES
    from gradserve.kernels import triton_engine, triton_fused

    code = triton_engine.precision_code("float32")
    config = triton_fused.launch_config(
        triton_fused.padded_widths(ptxas_report.WIDE_SIZES), 256, 4, torch.device("cpu"), code
    )
    chosen = (config.block_n, config.num_warps, None, config.resident, config.carry)
    found = ptxas_report.row("float32", chosen, False, False, chosen, ptxas_report.WIDE_SIZES)
    registers, spills = found[8], found[9]
    stores = int(spills.split(" / ")[0])
    print(f"float32 {ptxas_report.WIDE_SIZES} at {chosen[:2]}: {registers} registers, "
          f"spill stores / loads {spills} B")  # fmt: skip
    assert stores <= MAX_SPILL_BYTES, f"{stores} B of spill stores per thread"

    job = sweep.make_job(4, 256, ptxas_report.TARGET_SIZES, "tf32", torch.device("cpu"))
    for swept in fused_sweep.CONFIGS:
        if swept[4] and swept[:2] in ((128, 8), (64, 4), (32, 4)):  # carry
            shared = ptxas_report.compile_through_launcher(job, swept).metadata.shared
            print(f"tf32 {ptxas_report.TARGET_SIZES} at {swept}: {shared} B of shared memory")
            assert shared <= SM90_SHARED_BYTES, f"{swept}: {shared} B of shared memory"
    check_loss_kernel()
    return 0


def check_loss_kernel() -> None:
    """The per-layer path's loss kernel at the tile loss_block_shape gives each output
    width, up to the widest a job may have (8192): no heavy spills, compiled in seconds."""
    import inspect
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.ptxas_report import ptxas_usage
    from gradserve.kernels import triton_layered
    from gradserve.kernels.triton_common import ACTIVATION_CODES, LOSS_CODES

    kernel = triton_layered._loss_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    for loss, d_out in itertools.product(("mse", "cross_entropy"), (3, 128, 1000, 8192)):
        shape = triton_layered.loss_block_shape(d_out)
        constexprs = dict(OUTPUT_ACT=ACTIVATION_CODES["identity"], LOSS=LOSS_CODES[loss],
                          HAS_WEIGHTS=True, DP=shape.dp, BLOCK_N=shape.block_n)  # fmt: skip
        signature = {
            name: "constexpr" if name in constexprs
            else "*i64" if name == "t_ptr" and loss == "cross_entropy"
            else "*fp32" if name.endswith("_ptr")
            else "fp32" if name in ("slope", "delta", "scale")
            else "i32"
            for name in names
        }  # fmt: skip
        positions = {(names.index(k),): v for k, v in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=positions)
        start = time.perf_counter()
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=shape.num_warps))  # fmt: skip
        seconds = time.perf_counter() - start
        registers, spills, _ = ptxas_usage(compiled.asm["ptx"])
        print(f"loss kernel {loss}, {d_out} outputs at {shape}: {registers} registers, spill "
              f"stores / loads {spills} B, compiled in {seconds:.1f} s")  # fmt: skip
        assert int(spills.split(" / ")[0]) <= MAX_LOSS_SPILL_BYTES, (loss, d_out, spills)


if __name__ == "__main__":
    sys.exit(main())
