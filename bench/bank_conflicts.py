"""Shared-memory bank conflicts of the Gluon IEEE float32 kernels on sm_90a, no GPU needed.

The Gluon kernels (kernels/gluon_matmul.py, kernels/gluon_fused.py) say which thread holds
which element of every tensor, so they also decide which shared-memory banks a warp's
loads and stores hit: a quarter-warp's 16-byte accesses that share banks are served one
wavefront after another (an SM returns 128 bytes of shared memory a clock). This counts
them with Triton's own model, `gl.bank_conflicts` (the excess accesses per wavefront of the
ld.shared / st.shared instructions a register layout and a shared layout compile to),
compiling a probe per access for sm_90a, for every access of the kernels' product loops
and for the stores that feed them, in the layouts the launchers give them. gluon_cpu
ignores layouts, so only this sees them; tests/kernels/gluon_sm90_check.py holds the
conflict-free ones at 0. None of it is a time.

  env -u TRITON_INTERPRET python bench/bank_conflicts.py   (bench/results/bank_conflicts_sm90.md)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import write_table  # noqa: E402
from bench.compile_only import CompileOnlyDriver  # noqa: E402
from gradserve.kernels import gluon_fused, gluon_matmul  # noqa: E402

# Accesses with conflicts, left as they are: the fused kernel stores each block
# transposed (a_s, row c = column c over the samples) from the layout its product computed
# it in, whose quarter-warps hold 8 features of the same samples: 8 rows of a_s, multiples
# of 512 bytes apart, on the same banks. A layout conversion before the store
# (gl.convert_layout to lanes along the samples) compiled to stmatrix stores but grew the
# kernel at the target from 5112 SASS instructions to 7528 (triton 3.9; the forward
# products' FMAs in the PTX from 768 to 2560): not taken without a GPU to time it.
KNOWN = {"h stored transposed", "dz stored transposed"}


@gluon.jit
def _probe(REGISTERS: gl.constexpr, SHARED: gl.constexpr, SHAPE: gl.constexpr,
           TAG: gl.constexpr):  # fmt: skip
    """Prints the bank conflicts of moving SHAPE in the REGISTERS layout to or from shared
    memory in the SHARED layout, as it compiles (TAG makes each call compile anew)."""
    registers: gl.constexpr = gl.distributed_type(gl.float32, list(SHAPE), REGISTERS)
    shared: gl.constexpr = gl.shared_memory_descriptor_type(gl.float32, list(SHAPE), SHARED,
                                                            list(SHAPE))  # fmt: skip
    gl.static_print("bank conflicts", gl.bank_conflicts(registers, shared))


_TAGS = itertools.count()


def conflicts(registers, shape, order, warps: int) -> int:
    """gl.bank_conflicts for a [shape] access in `registers` to an unswizzled tile of that
    shape whose dimension order[0] is contiguous: the addresses of the kernels' tiles and of
    their row or column slices (contiguous, 16-byte aligned). It compiles with Triton's
    cache bypassed: a cached compile would print nothing."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), triton.knobs.compilation.scope():
        triton.knobs.compilation.always_compile = True
        _probe.warmup(REGISTERS=registers, SHARED=gl.SwizzledSharedLayout(1, 1, 1, order),
                      SHAPE=tuple(shape), TAG=next(_TAGS), num_warps=warps,
                      grid=(1,))  # fmt: skip
    return int(printed.getvalue().split("bank conflicts")[-1])


def gemm_accesses() -> list:
    """(kernel, access, how often, conflicts) of the GEMM at both tile sizes: its product
    loop's A columns (column-major tiles) and B rows, and the stores of its tiles where they
    are transposed (the forward product's operands, loaded along K)."""
    rows = []
    for tiles in (gluon_matmul.LARGE_TILES, gluon_matmul.SMALL_TILES):
        bp, bq, bk, warps = (tiles[key] for key in ("BLOCK_P", "BLOCK_Q", "BLOCK_K", "num_warps"))
        name = f"GEMM {bp} x {bq} x {bk}"
        acc = gluon_matmul._accumulator(bp, bq, warps)
        a_load = gluon_matmul.operand_load(bp, bk, warps, 1, tile_contiguous=0)
        b_load = gluon_matmul.operand_load(bk, bq, warps, 0, tile_contiguous=1)
        rows += [
            (name, "A column", "every rank-1 update", conflicts(acc, [bp, 1], [0, 1], warps)),
            (name, "B row", "every rank-1 update", conflicts(acc, [1, bq], [1, 0], warps)),
            (name, "A tile stored transposed", "every K step",
             conflicts(a_load, [bp, bk], [0, 1], warps)),
            (name, "B tile stored transposed", "every K step",
             conflicts(b_load, [bk, bq], [1, 0], warps)),
        ]  # fmt: skip
    return rows


def fused_accesses() -> list:
    """(kernel, access, how often, conflicts) of the fused kernel at the benchmark target's
    widths (32 -> 64, 64 -> 64) and 128 samples: its products' block columns and weight
    rows, the stores that feed them (the block and W^T transposed), and the weight
    gradients' stores and dz and h rows."""
    block_n, warps = gluon_fused.BLOCK_N, gluon_fused.NUM_WARPS
    rows = []
    for d_in, d_out in [(32, 64), (64, 64)]:
        name = f"fused {d_in} -> {d_out}"
        out = gluon_fused.block_layout(block_n, d_out)
        inp = gluon_fused.block_layout(block_n, d_in)
        w_t = gluon_fused.transposed_weight_layout(d_out, d_in, warps)
        groups, grads = gluon_fused.gradient_layout(d_out, d_in, block_n, 64 * block_n, warps)
        dz, h = gl.SliceLayout(2, grads), gl.SliceLayout(1, grads)
        rows += [
            (name, "block column", "every rank-1 update",
             conflicts(out, [block_n, 1], [0, 1], warps)),
            (name, "weight row", "every rank-1 update", conflicts(out, [1, d_out], [1, 0], warps)),
            (name, "weight row (backward)", "every rank-1 update",
             conflicts(inp, [1, d_in], [1, 0], warps)),
            (name, "dW dz row", "every sample", conflicts(dz, [groups, d_out], [1, 0], warps)),
            (name, "dW h row", "every sample", conflicts(h, [groups, d_in], [1, 0], warps)),
            (name, "h stored transposed", "once a layer",
             conflicts(inp, [block_n, d_in], [0, 1], warps)),
            (name, "dz stored transposed", "once a layer",
             conflicts(out, [block_n, d_out], [0, 1], warps)),
            (name, "W^T stored", "once a layer", conflicts(w_t, [d_out, d_in], [0, 1], warps)),
            (name, "dz stored for dW", "once a layer",
             conflicts(out, [block_n, d_out], [1, 0], warps)),
        ]  # fmt: skip
        if d_in == d_out:  # h_s rows are 64 wide: a narrower h is a slice the count refuses
            rows.append((name, "h stored for dW", "once a layer",
                         conflicts(inp, [block_n, d_in], [1, 0], warps)))  # fmt: skip
    return rows


def main() -> None:
    driver.set_active(CompileOnlyDriver())  # for this process: it compiles, never launches
    rows = [list(row) + ["left (KNOWN in the script)" if row[1] in KNOWN else ""]
            for row in gemm_accesses() + fused_accesses()]  # fmt: skip
    write_table(
        "bank_conflicts_sm90.md",
        "Shared-memory bank conflicts of the Gluon IEEE float32 kernels on sm_90a, no GPU needed",
        ["kernel", "access", "how often", "bank conflicts per wavefront", "note"],
        rows,
        f"Triton {triton.__version__}, sm_90a: gl.bank_conflicts, the excess accesses per "
        "wavefront (0: none; 7: eight threads of a quarter-warp on the same banks), in the "
        "layouts the launchers give the kernels (see the script's docstring). Command: "
        "`env -u TRITON_INTERPRET python bench/bank_conflicts.py`.",
    )


if __name__ == "__main__":
    main()
