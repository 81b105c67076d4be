"""The Gluon IEEE float32 kernels do on sm_90 what they are for, with the ptxas and nvdisasm
Triton ships, no GPU needed.

The GEMM (kernels/gluon_matmul.py): each thread loads at most one shared-memory byte per
FMA (8x8 outputs a thread; Triton's tl.dot GEMM loads 1.4 to 1.7), without register
spills, in the shared memory an SM has; compiled through its own launcher for the three
products of a 1024-wide layer (forward with its K-contiguous weights, dW with dZ^T's
P-contiguous rows, dZ), at both tile sizes; and one barrier a K step (its tiles in two
copies of shared memory).

The fused kernel (kernels/gluon_fused.py), through the engine at the benchmark target's
network and at odd widths, with and without input gradients: few register spills, few
barriers, and the shared memory of two programs an SM (whose registers let two run).

Both: their shared-memory accesses have no bank conflicts in the layouts the launchers
give them, the product loops' loads (the operands of every FMA) and the stores that feed
them, but for the fused kernel's first layer's block stored transposed into a_s padded for
wider layers (bench/bank_conflicts.py: Triton's own count, gl.bank_conflicts, for sm_90a,
and for the padded a_s, which Triton's count refuses, the script's model of it, which
must agree with Triton's on every unpadded store of a block; gluon_cpu ignores layouts, so
only this sees them).

Run by tests/kernels/test_sm90_resources.py in a subprocess, because TRITON_INTERPRET must
be off when kernels are defined.

Usage: python -m tests.kernels.gluon_sm90_check
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

from triton.runtime import driver  # noqa: E402

from bench.bank_conflicts import (  # noqa: E402
    BLOCK_SIZES,
    KNOWN,
    a_offset,
    fused_accesses,
    gemm_accesses,
    model_agreement,
    modelled,
)
from bench.compile_only import CompileOnlyDriver  # noqa: E402
from bench.gluon_report import HEADER, fused_rows, gemm_rows  # noqa: E402
from bench.ptxas_report import SM90_SHARED_BYTES  # noqa: E402
from gradserve.kernels import gluon_fused  # noqa: E402

# Spill stores per thread allowed in the fused kernel: at the target 0 B (triton 3.9 and
# 3.6); with every width padded (64, 16, 64, 16) 100 B (3.9) and 956 B (3.6), none of it in
# the products' loops.
MAX_FUSED_SPILL_BYTES = 1024
# Barriers (SASS BAR) allowed in the fused kernel: at the target 41 (triton 3.9) and 37
# (3.6), padded 34 and 30. Adding the weight-gradient groups' sums with gl.sum, across
# warps, put 189 more at the target (gluon_fused._weight_gradient).
MAX_FUSED_BARRIERS = 64
# Barriers in the GEMM: one before its K loop and one in each of the loop's two K steps
# (triton 3.6 and 3.9); with one copy of the tiles, 5. (Two copies as one indexed
# allocation put a second barrier back into each step on triton 3.6, whose barrier analysis
# takes a store into any part of an allocation for a hazard on all of it.)
GEMM_BARRIERS = 3


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    failures = []
    for kernel, access, _, conflicts in gemm_accesses() + fused_accesses():
        print(f"{kernel}, {access}: bank conflicts {conflicts}")
        if conflicts and access not in KNOWN:
            failures.append((kernel, access, conflicts))
    for block_n, width, order, triton_count, model_count in model_agreement():
        print(
            f"block {block_n} x {width} to order {order}: Triton {triton_count}, "
            f"model {model_count}"
        )
        if triton_count != model_count:
            failures.append(("model", block_n, width, order, triton_count, model_count))
    for block_n in BLOCK_SIZES:  # every block a 64-wide job can have
        stored = modelled(gluon_fused.block_layout(block_n, 64), [block_n, 64], 0,
                          a_offset(block_n, 64), gluon_fused.NUM_WARPS)  # fmt: skip
        print(f"{block_n} x 64 stored transposed into a_s padded: bank conflicts {stored}")
        if stored:
            failures.append(("a_s padded", block_n, stored))
    at = {name: HEADER.index(name) for name in HEADER}
    for row in gemm_rows() + fused_rows(with_triton=False):
        print(", ".join(f"{name} {row[i]}" for name, i in at.items()))
        spill_stores = int(row[at["spill stores / loads (B)"]].split(" / ")[0])
        shared_kb = row[at["shared memory (KB)"]]
        if row[0] == "Gluon GEMM":
            # the reason it exists: one byte per FMA, no spills
            if spill_stores or float(row[at["shared B loaded per FMA"]]) > 1.0:
                failures.append(row[:2])
            if shared_kb * 1024 > SM90_SHARED_BYTES or row[at["barriers"]] != GEMM_BARRIERS:
                failures.append(row[:2])
        # two programs an SM, as its registers allow
        elif spill_stores > MAX_FUSED_SPILL_BYTES or shared_kb * 1024 > SM90_SHARED_BYTES // 2:
            failures.append(row[:2])
        elif row[at["barriers"]] > MAX_FUSED_BARRIERS:
            failures.append(row[:2])
    assert not failures, failures
    return 0


if __name__ == "__main__":
    sys.exit(main())
