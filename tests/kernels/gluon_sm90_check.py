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

Both: the shared-memory loads in their product loops, the operands of every FMA, and the
GEMM's transposing tile stores have no bank conflicts in the layouts the launchers give
them (Triton's own count, gl.bank_conflicts, for sm_90a; gluon_cpu ignores layouts, so
only this sees them). Run by
tests/kernels/test_sm90_resources.py in a subprocess, because TRITON_INTERPRET must be off
when kernels are defined.

Usage: python -m tests.kernels.gluon_sm90_check
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402
from bench.gluon_report import HEADER, fused_rows, gemm_rows  # noqa: E402
from bench.ptxas_report import SM90_SHARED_BYTES  # noqa: E402
from gradserve.kernels import gluon_fused, gluon_matmul  # noqa: E402

# Spill stores per thread allowed in the fused kernel: at the target 0 B (triton 3.9 and
# 3.6); with every width padded (64, 16, 64, 16) 96 B (3.9) and 992 B (3.6), none of it in
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


@gluon.jit
def _bank_conflicts(REGISTERS: gl.constexpr, SHARED: gl.constexpr, SHAPE: gl.constexpr,
                    TAG: gl.constexpr):  # fmt: skip
    """Prints the bank conflicts per wavefront of loading SHAPE in the REGISTERS layout
    from shared memory in the SHARED layout, as it compiles (TAG makes each call compile
    anew in a process; `_conflicts` bypasses the compiler's cache on disk)."""
    registers: gl.constexpr = gl.distributed_type(gl.float32, list(SHAPE), REGISTERS)
    shared: gl.constexpr = gl.shared_memory_descriptor_type(gl.float32, list(SHAPE), SHARED,
                                                            list(SHAPE))  # fmt: skip
    gl.static_print("bank conflicts", gl.bank_conflicts(registers, shared))


def _conflicts(registers, shape, order, warps: int) -> int:
    """gl.bank_conflicts for a [shape] load in `registers` from an unswizzled tile of that
    shape whose dimension order[0] is contiguous: the addresses of a row or column slice of
    the kernels' tiles (their slices are contiguous, 16-byte aligned)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), triton.knobs.compilation.scope():
        triton.knobs.compilation.always_compile = True
        _bank_conflicts.warmup(REGISTERS=registers, SHARED=gl.SwizzledSharedLayout(1, 1, 1, order),
                               SHAPE=tuple(shape), TAG=next(_TAGS), num_warps=warps,
                               grid=(1,))  # fmt: skip
    return int(printed.getvalue().split("bank conflicts")[-1])


_TAGS = itertools.count()


def product_load_conflicts() -> list:
    """(kernel, operand, bank conflicts) of each product loop's shared-memory loads: the
    GEMM's A columns (column-major tiles) and B rows at both tile sizes, and the stores of
    its tiles where they are transposed (operands loaded along K); the fused kernel's
    block columns (a block transposed) and weight rows, the stores of W^T they are read
    from, and its weight gradients' dz and h rows, at the benchmark target's widths and 128
    samples."""
    rows = []
    for tiles in (gluon_matmul.LARGE_TILES, gluon_matmul.SMALL_TILES):
        bp, bq, bk, warps = (tiles[key] for key in ("BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps"))
        acc = gluon_matmul._accumulator(bp, bq, warps)
        rows.append((f"GEMM {bp}x{bq}", "A column", _conflicts(acc, [bp, 1], [0, 1], warps)))
        rows.append((f"GEMM {bp}x{bq}", "B row", _conflicts(acc, [1, bq], [1, 0], warps)))
        # the tiles stored transposed: the forward product's A and B, loaded along K
        a_load = gluon_matmul._operand_load(bp, bk, warps, 1, tile_contiguous=0)
        b_load = gluon_matmul._operand_load(bk, bq, warps, 0, tile_contiguous=1)
        rows.append(
            (f"GEMM {bp}x{bq}", "A tile store", _conflicts(a_load, [bp, bk], [0, 1], warps))
        )
        rows.append(
            (f"GEMM {bp}x{bq}", "B tile store", _conflicts(b_load, [bk, bq], [1, 0], warps))
        )
    block_n, warps = gluon_fused.BLOCK_N, gluon_fused.NUM_WARPS
    for d_in, d_out in [(32, 64), (64, 64)]:
        name = f"fused {d_in}->{d_out}"
        out = gluon_fused.block_layout(block_n, d_out)
        inp = gluon_fused.block_layout(block_n, d_in)
        rows.append((name, "block column", _conflicts(out, [block_n, 1], [0, 1], warps)))
        rows.append((name, "weight row", _conflicts(out, [1, d_out], [1, 0], warps)))
        rows.append((name, "weight row (backward)", _conflicts(inp, [1, d_in], [1, 0], warps)))
        w_t = gluon_fused.transposed_weight_layout(d_out, d_in, warps)
        rows.append((name, "W^T store", _conflicts(w_t, [d_out, d_in], [0, 1], warps)))
        groups, grads = gluon_fused.gradient_layout(d_out, d_in, block_n, 64 * block_n, warps)
        dz, h = gl.SliceLayout(2, grads), gl.SliceLayout(1, grads)
        rows.append((name, "dW dz row", _conflicts(dz, [groups, d_out], [1, 0], warps)))
        rows.append((name, "dW h row", _conflicts(h, [groups, d_in], [1, 0], warps)))
    return rows


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    failures = []
    for kernel, operand, conflicts in product_load_conflicts():
        print(f"{kernel}, {operand}: bank conflicts {conflicts}")
        if conflicts:
            failures.append((kernel, operand, conflicts))
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
