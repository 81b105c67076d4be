"""Shared-memory bank conflicts of the Gluon IEEE float32 kernels on sm_90a, no GPU needed.

The Gluon kernels (kernels/gluon_matmul.py, kernels/gluon_fused.py) say which thread holds
which element of every tensor, so they also decide which shared-memory banks a warp's
loads and stores hit: a quarter-warp's 16-byte accesses that share banks are served one
wavefront after another (an SM returns 128 bytes of shared memory a clock). This counts
them with Triton's own model, `gl.bank_conflicts` (the excess accesses per wavefront of the
ld.shared / st.shared instructions a register layout and a shared layout compile to),
compiling a probe per access for sm_90a, for every access of the kernels' product loops
and for the stores that feed them, in the layouts the launchers give them. Triton's count
refuses padded shared layouts, which the fused kernel's a_s is (gluon_fused.a_padding), so
its stores are counted by this script's model of the same count (`modelled`), which
tests/kernels/gluon_sm90_check.py holds to Triton's on every unpadded store of a block.
gluon_cpu ignores layouts, so only this sees them; the check holds the conflict-free ones
at 0. None of it is a time.

  env -u TRITON_INTERPRET python bench/bank_conflicts.py   (bench/results/bank_conflicts_sm90.md)
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import os
import sys
from collections.abc import Callable

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import write_table  # noqa: E402
from bench.compile_only import CompileOnlyDriver  # noqa: E402
from gradserve.kernels import gluon_fused, gluon_matmul  # noqa: E402

# Accesses with conflicts, left as they are: the fused kernel's first layer stores its
# 32-wide input block transposed into a_s padded for the 64-wide layers (gluon_fused.a_padding:
# one padding for every layer, as a_s is one allocation and Triton refuses a view of it
# padded otherwise), 1 per wavefront where its own padding would give 0; once a block.
KNOWN = {"h stored transposed (first layer)"}
# The fused kernel's stores into its padded a_s, which `modelled` counts.
PADDED = {"h stored transposed", "h stored transposed (first layer)", "dz stored transposed"}
# The block sizes a fused launch can have (gluon_fused.fused_mlp: 16 to BLOCK_N samples).
BLOCK_SIZES = (16, 32, 64, 128)


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


def modelled(
    layout: gl.BlockedLayout,
    shape,
    contiguous: int,
    offset: Callable[[int, int], int],
    warps: int,
    widest: int = 4,
) -> int:
    """The same count for a [rows, cols] access in a 2-D BlockedLayout (order [1, 0]) to
    shared memory where element (r, c) is the 4-byte word offset(r, c), for the layouts
    Triton's count refuses (padded ones: "padded shared encoding has no linear layout").
    A thread accesses up to `widest` elements consecutive along `contiguous` at once (4:
    16 bytes); a warp's accesses of v words are served 32 / v lanes at a time (a
    quarter-warp for 16 bytes), each in as many wavefronts as the most distinct words on
    one bank (one word read by several lanes is one); the count is the most wavefronts any
    instruction takes beyond one, as gl.bank_conflicts' (test_sm90_resources: the two
    agree on every block layout and unpadded tile the fused kernel can have)."""
    spt, lanes, per_warp = layout.size_per_thread, layout.threads_per_warp, layout.warps_per_cta
    vector = min(widest, spt[contiguous])
    # a thread's registers repeat the layout's tile along each dimension it does not cover
    reps = [max(1, shape[d] // (spt[d] * lanes[d] * per_warp[d])) for d in (0, 1)]
    worst = 0
    for warp in range(warps):
        accesses = {}  # instruction -> lane -> words
        for lane in range(32):
            thread = [(warp // per_warp[1]) % per_warp[0] * lanes[0] + lane // lanes[1] % lanes[0],
                      warp % per_warp[1] * lanes[1] + lane % lanes[1]]  # fmt: skip
            for rep, inner in itertools.product(itertools.product(*map(range, reps)),
                                                itertools.product(*map(range, spt))):  # fmt: skip
                at = [(rep[d] * lanes[d] * per_warp[d] + thread[d]) * spt[d] + inner[d]
                      for d in (0, 1)]  # fmt: skip
                at = [at[d] % shape[d] for d in (0, 1)]  # a layout larger than the tile repeats
                instruction = (rep, inner[1 - contiguous], inner[contiguous] // vector)
                accesses.setdefault(instruction, {}).setdefault(lane, set()).add(offset(*at))
        for by_lane in accesses.values():
            for first in range(0, 32, 32 // vector):
                words = set().union(*(by_lane.get(lane, set())
                                      for lane in range(first, first + 32 // vector)))  # fmt: skip
                on_bank = collections.Counter(word % 32 for word in words)
                worst = max(worst, max(on_bank.values()) - 1)
    return worst


def a_offset(block_n: int, dp: int) -> Callable[[int, int], int]:
    """Where the fused kernel's a_s keeps element (sample n, feature c) of a block stored
    transposed: row c, padded every UNROLL rows (gluon_fused.a_shared_layout)."""
    pad, rows = gluon_fused.a_padding(block_n, dp), gluon_fused.UNROLL
    return lambda n, c: c * block_n + n + pad * (c // rows)


def model_agreement() -> list:
    """(block_n, width, tile order, Triton's count, the model's) for every block layout the
    fused kernel can have, stored to an unpadded tile along either dimension."""
    rows = []
    for block_n, width in itertools.product(BLOCK_SIZES, (16, 32, 64)):
        layout = gluon_fused.block_layout(block_n, width)
        for order, contiguous in (([0, 1], 0), ([1, 0], 1)):
            row_major = contiguous == 1
            offset = (lambda n, c, w=width: n * w + c) if row_major else (
                lambda n, c, b=block_n: c * b + n)  # fmt: skip
            rows.append((block_n, width, order,
                         conflicts(layout, [block_n, width], order, gluon_fused.NUM_WARPS),
                         modelled(layout, [block_n, width], contiguous, offset,
                                  gluon_fused.NUM_WARPS)))  # fmt: skip
    return rows


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
    block_n, warps, dp = gluon_fused.BLOCK_N, gluon_fused.NUM_WARPS, 64
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
            (name, "h stored transposed" + (" (first layer)" if d_in < dp else ""),
             "once a layer", modelled(inp, [block_n, d_in], 0, a_offset(block_n, dp), warps)),
            (name, "dz stored transposed", "once a layer",
             modelled(out, [block_n, d_out], 0, a_offset(block_n, dp), warps)),
            (name, "W^T stored", "once a layer", conflicts(w_t, [d_out, d_in], [0, 1], warps)),
            (name, "dz stored for dW", "once a layer",
             conflicts(out, [block_n, d_out], [1, 0], warps)),
        ]  # fmt: skip
        if d_in == d_out:  # h_s rows are 64 wide: a narrower h is a slice the count refuses
            rows.append((name, "h stored for dW", "once a layer",
                         conflicts(inp, [block_n, d_in], [1, 0], warps)))  # fmt: skip
    return rows


def _scalar_conflicts() -> int:
    """The padded a_s's count for a 64-wide block stored one float at a time."""
    block_n, dp = gluon_fused.BLOCK_N, 64
    return modelled(gluon_fused.block_layout(block_n, dp), [block_n, dp], 0,
                    a_offset(block_n, dp), gluon_fused.NUM_WARPS, widest=1)  # fmt: skip


def _note(access: str) -> str:
    notes = []
    if access in PADDED:
        notes.append("into a_s padded (counted by `modelled`)")
    if access in KNOWN:
        notes.append("left (KNOWN in the script)")
    return "; ".join(notes)


def main() -> None:
    driver.set_active(CompileOnlyDriver())  # for this process: it compiles, never launches
    rows = [list(row) + [_note(row[1])] for row in gemm_accesses() + fused_accesses()]
    write_table(
        "bank_conflicts_sm90.md",
        "Shared-memory bank conflicts of the Gluon IEEE float32 kernels on sm_90a, no GPU needed",
        ["kernel", "access", "how often", "bank conflicts per wavefront", "note"],
        rows,
        f"Triton {triton.__version__}, sm_90a: gl.bank_conflicts, the excess accesses per "
        "wavefront (0: none; 7: eight threads of a quarter-warp on the same banks), in the "
        "layouts the launchers give the kernels (see the script's docstring); for the "
        "fused kernel's padded a_s, the script's model of the same count, which agrees "
        "with Triton's on every unpadded store of a block (test_sm90_resources). Before "
        "a_s was padded, the blocks stored transposed had 7 (64 wide) and 3 (32 wide). "
        "The counts are for 16-byte stores, as triton 3.9 compiles them; triton 3.6 (the "
        "GPU image's) stores into a padded layout one float at a time, leaving LLVM to merge "
        "them, which it does for the first run of a thread's columns only: the second "
        f"run's single-float stores have {_scalar_conflicts()} per wavefront each, 16 "
        "wavefronts where a 16-byte store takes 4 (32 unpadded). "
        "Command: `env -u TRITON_INTERPRET python bench/bank_conflicts.py`.",
    )


if __name__ == "__main__":
    main()
