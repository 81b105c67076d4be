"""The fused forward + loss + backward for IEEE float32 as a Gluon kernel: triton_fused's
kernel with every product computed by threads that each hold up to an 8x8 block of
outputs (Triton's tl.dot gives a thread at most 4x4, and so loads twice the shared memory
per FMA: 2.19 bytes at the fused kernel's launch on sm_90, where an SM returns 128 bytes a
clock against 128 FMAs; bench/results/fma_tiles_sm90.md).

Same job, arguments and results as triton_fused._fused_mlp_kernel in IEEE float32, for the
jobs without per-sample norms or clipping (those stay on the Triton kernel) and padded
widths up to 64. grid = (M, S); program (m, s) walks its slice of samples BLOCK_N at a
time, keeps each layer's pre-activations in its scratch for the backward pass and adds its
blocks' parameter gradients to its own row of partial gradients, which
partial_sums.sum_partials adds in a fixed order: repeated runs give identical bits.

Each product is a sum of rank-1 updates read from shared memory:
- forward z = h @ W^T and backward g = dz @ W: a block of BLOCK_N samples' outputs,
  [BLOCK_N, Q], each step adding column k of the block (stored transposed, `a_s`, so that
  a thread's samples are contiguous) times row k of W^T or W (`w_s`);
- dW = dz^T @ h: the [Q, K] gradient reduces over the block's samples, whose 64 x 64
  outputs at 8x8 a thread occupy only 64 threads: the program's threads form G groups
  (GROUPS), group g adds samples g, g + G, g + 2G, ... ([G, Q, K] sums), and the G sums
  are added at the end, through shared memory, in group order (the same bits every run).
An output layer of at most NARROW_OUTPUT units (a regression head: the benchmark target's
is one unit wide) skips these products, which would pad it to 16 outputs: per unit, the
forward pass is a row reduction over its inputs, dW a column reduction over the block's
samples (fixed orders too), the input gradient an outer product.
Shared memory: a_s (a block transposed; where blocks are 64 wide, padded every 4 rows so
that storing one transposed has no bank conflicts: `a_padding`), w_s (for dW the same
memory holds the layer's input row-major, h_s, then the groups' sums) and dz_s, 97 KB at
128 samples and width 64: two programs of 4 warps fit an SM, as their registers (231 at
the target, triton 3.6) do (bench/results/gluon_sm90.md). Layouts are computed by the
launcher per width (`block_layout`, `gradient_layout`, `weight_layout`; a thread's 8
columns as two runs of 4, so that the products' shared-memory loads have no bank
conflicts). A thread reads back from the scratch only what it stored there (same layout
both ways), so the scratch needs no barrier; shared memory does, around each product's
stores.

Under TRITON_INTERPRET=1 the launcher runs it with gluon_cpu.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from gradserve.kernels import gluon_cpu, partial_sums, triton_fused
from gradserve.kernels.gluon_matmul import _sync_threads, operand_load
from gradserve.kernels.triton_common import LAUNCH_OPTIONS, activate, activation_grad, loss_block
from gradserve.kernels.triton_engine import interpreted
from gradserve.kernels.triton_fused import _width  # d(i): a constant where unpadded

# Widest padded layer it takes: the products' operands for 64-wide layers in blocks of 128
# samples fit 4 warps at 8x8 outputs a thread.
MAX_WIDTH = 64
BLOCK_N = 128
NUM_WARPS = 4
UNROLL = 4  # rank-1 updates per loop iteration, a_s rows between paddings (a_padding)
# Output layers this narrow skip the padded products (the layer is padded to 16 outputs,
# whose forward product gives each thread 2x8 outputs: 2.5 bytes of shared memory per FMA):
# each output unit is a row reduction forward and a column reduction and an outer product
# backward, about 3 x 64 FMAs a thread at the benchmark target against 3 x 1024 for the
# padded products, 9% of its block's FMAs (a static count: not timed).
NARROW_OUTPUT = 4
ROW_MAJOR = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
ROW_MAJOR_3D = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))


# A view of shared memory as buffers to index at run time (shared_memory_descriptor.index
# takes the first dimension of an allocation whose layout covers the others): `_reinterpret`
# in triton 3.6, `reinterpret` from 3.7.
if hasattr(gl.shared_memory_descriptor, "reinterpret"):

    @gluon.jit
    def _as_buffers(smem, shape: gl.constexpr, layout: gl.constexpr):
        return smem.reinterpret(gl.float32, shape, layout)

else:

    @gluon.jit
    def _as_buffers(smem, shape: gl.constexpr, layout: gl.constexpr):
        return smem._reinterpret(gl.float32, shape, layout)


@gluon.jit
def _weight_offsets(sizes, layer: gl.constexpr, WIDTHS: gl.constexpr, EXACT: gl.constexpr,
                    LAYOUT: gl.constexpr):  # fmt: skip
    """Offsets and mask of `layer`'s [P(layer+1), P(layer)] tile over a row-major
    [d(layer+1), d(layer)] weight or weight gradient, in LAYOUT."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    rows = gl.arange(0, WIDTHS[layer + 1], layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, WIDTHS[layer], layout=gl.SliceLayout(0, LAYOUT))
    offsets = rows[:, None] * d_in + cols[None, :]
    mask = (rows[:, None] < d_out) & (cols[None, :] < d_in)
    return offsets, mask


@gluon.jit
def _layer_weight(w_ptrs, m, sizes, layer: gl.constexpr, WIDTHS: gl.constexpr,
                  EXACT: gl.constexpr, LAYOUT: gl.constexpr):  # fmt: skip
    """Model m's weight of `layer`, zero-padded to [P(layer+1), P(layer)], in LAYOUT."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    offsets, mask = _weight_offsets(sizes, layer, WIDTHS, EXACT, LAYOUT)
    return gl.load(w_ptrs[layer] + m * (d_out * d_in) + offsets, mask=mask, other=0.0)


@gluon.jit
def _weight_row(w_ptrs, m, sizes, layer: gl.constexpr, row, WIDTHS: gl.constexpr,
                EXACT: gl.constexpr, LAYOUT: gl.constexpr):  # fmt: skip
    """Row `row` of model m's weight of `layer` (output unit `row`'s weights), zero-padded
    to [P(layer)], in LAYOUT."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    cols = gl.arange(0, WIDTHS[layer], layout=LAYOUT)
    at = w_ptrs[layer] + m * (d_out * d_in) + row * d_in + cols
    return gl.load(at, mask=cols < d_in, other=0.0)


@gluon.jit
def _layer_bias(b_ptrs, m, sizes, layer: gl.constexpr, WIDTHS: gl.constexpr, EXACT: gl.constexpr,
                LAYOUT: gl.constexpr):  # fmt: skip
    """Model m's bias of `layer`, zero-padded to [P(layer+1)], in LAYOUT."""
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    cols = gl.arange(0, WIDTHS[layer + 1], layout=LAYOUT)
    return gl.load(b_ptrs[layer] + m * d_out + cols, mask=cols < d_out, other=0.0)


@gluon.jit
def _input_offsets(stride_xn, row0, N, sizes, WIDTHS: gl.constexpr, EXACT: gl.constexpr,
                   BLOCK_N: gl.constexpr, LAYOUT: gl.constexpr):  # fmt: skip
    """Offsets (rows of stride_xn) and mask of the block's [BLOCK_N, P0] inputs."""
    rows = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, WIDTHS[0], layout=gl.SliceLayout(0, LAYOUT))
    mask = (rows[:, None] < N) & (cols[None, :] < _width(sizes, 0, WIDTHS, EXACT))
    return rows[:, None] * stride_xn + cols[None, :], mask


@gluon.jit
def _input_block(x_ptr, m, stride_xm, stride_xn, row0, N, sizes, WIDTHS: gl.constexpr,
                 EXACT: gl.constexpr, BLOCK_N: gl.constexpr, LAYOUT: gl.constexpr):  # fmt: skip
    """The block's inputs, zero-padded to [BLOCK_N, P0] (reloaded for layer 0's dW rather
    than kept in registers through the whole block)."""
    offsets, mask = _input_offsets(stride_xn, row0, N, sizes, WIDTHS, EXACT, BLOCK_N, LAYOUT)
    return gl.load(x_ptr + m * stride_xm + offsets, mask=mask, other=0.0)


@gluon.jit
def _store_input_gradient(dx_ptr, dx, m, row0, N, sizes, WIDTHS: gl.constexpr,
                          EXACT: gl.constexpr, BLOCK_N: gl.constexpr,
                          LAYOUT: gl.constexpr):  # fmt: skip
    """The block's input gradients [BLOCK_N, P0] to dx, padding masked off."""
    d_in = _width(sizes, 0, WIDTHS, EXACT)
    offsets, mask = _input_offsets(d_in, row0, N, sizes, WIDTHS, EXACT, BLOCK_N, LAYOUT)
    gl.store(dx_ptr + m * N * d_in + offsets, dx, mask=mask)


@gluon.jit
def _scratch_block(z_prog, layer: gl.constexpr, WIDTHS: gl.constexpr, BLOCK_N: gl.constexpr,
                   DP: gl.constexpr, LAYOUT: gl.constexpr):  # fmt: skip
    """Pointers to `layer`'s [BLOCK_N, P(layer+1)] pre-activations in the scratch, in
    LAYOUT (stored and loaded in the same one: each thread reads back what it wrote)."""
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, WIDTHS[layer + 1], layout=gl.SliceLayout(0, LAYOUT))
    return z_prog + layer * BLOCK_N * DP + rows[:, None] * DP + cols[None, :]


@gluon.jit
def _row_product(a_rows, w_s, K: gl.constexpr, Q: gl.constexpr, LAYOUT: gl.constexpr,
                 COLUMN: gl.constexpr, BLOCK_N: gl.constexpr, DP: gl.constexpr,
                 UNROLL: gl.constexpr):  # fmt: skip
    """[BLOCK_N, Q] = A @ B for A^T in a_s (row k: column k of A, over the samples; a_rows:
    its rows UNROLL at a time, the padding's period) and B in w_s (row k of B), K rank-1
    updates, in LAYOUT. A row is loaded as [1, BLOCK_N, 1] in COLUMN, LAYOUT with a leading
    dimension of 1 (a buffer's row is a slice there; index() would need a per-row layout),
    and taken to LAYOUT, which moves no data."""
    rows = _as_buffers(w_s, [DP, 1, DP], ROW_MAJOR)
    acc = gl.zeros([BLOCK_N, Q], gl.float32, LAYOUT)
    for k0 in range(0, K, UNROLL):
        a_quad = a_rows.index(k0 // UNROLL)
        for j in gl.static_range(UNROLL):
            column = gl.sum(a_quad.slice(j, 1).load(COLUMN), 0)  # [BLOCK_N, 1]
            column = gl.convert_layout(column, LAYOUT)
            row = rows.index(k0 + j).slice(0, Q, dim=1).load(LAYOUT)  # [1, Q]
            acc += column * row
    return acc


@gluon.jit
def _weight_gradient(dz_s, h_s, K: gl.constexpr, Q: gl.constexpr, G: gl.constexpr,
                     LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr, BLOCK_N: gl.constexpr,
                     DP: gl.constexpr):  # fmt: skip
    """[Q, K] = dz^T @ h over the block's samples, dz and h row-major in dz_s and h_s, in
    OUT_LAYOUT: G groups of threads each sum every G-th sample ([G, Q, K] in LAYOUT), then
    the groups' sums are added in group order, through h_s (free once the sums are made;
    the launcher keeps G * Q * K within it). Not gl.sum over the groups: across warps the
    compiler reduces through a 2 KB scratch, a [2, 64, 64] sum in 32 rounds of two barriers
    (at the benchmark target on sm_90a, triton 3.9: 189 of the kernel's 230 barriers).
    Adding the sums here instead took the kernel at the target from 6808 SASS instructions
    to 5200, 255 registers and 12 B of spills to 211 and none, 112 KB of shared memory to
    81 (triton 3.6, bench/results/gluon_sm90.md)."""
    # [j, g]: sample j * G + g
    dz_g = _as_buffers(dz_s, [BLOCK_N // G, G, DP], ROW_MAJOR)
    h_g = _as_buffers(h_s, [BLOCK_N // G, G, DP], ROW_MAJOR)
    acc = gl.zeros([G, Q, K], gl.float32, LAYOUT)
    for j in range(BLOCK_N // G):
        dz = dz_g.index(j).slice(0, Q, dim=1).load(gl.SliceLayout(2, LAYOUT))
        h = h_g.index(j).slice(0, K, dim=1).load(gl.SliceLayout(1, LAYOUT))
        acc += dz[:, :, None] * h[:, None, :]
    if G == 1:
        dw = gl.convert_layout(gl.sum(acc, 0), OUT_LAYOUT)
    else:
        # h_s as [Q, K] buffers, viewed whole (to store the [G, Q, K] sums) and by buffer
        sums_shape: gl.constexpr = [BLOCK_N * DP // (Q * K), Q, K]
        sums = _as_buffers(h_s, sums_shape, ROW_MAJOR_3D)
        buffers = _as_buffers(h_s, sums_shape, ROW_MAJOR)
        _sync_threads()  # every thread is done reading h_s
        sums.slice(0, G).store(acc)
        _sync_threads()
        dw = buffers.index(0).load(OUT_LAYOUT)
        for g in gl.static_range(1, G):
            dw += buffers.index(g).load(OUT_LAYOUT)
    return dw


@gluon.jit
def _narrow_output(h, w_ptrs, m, sizes, layer: gl.constexpr, WIDTHS: gl.constexpr,
                   EXACT: gl.constexpr, BLOCK_N: gl.constexpr, P_OUT: gl.constexpr,
                   IN_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr):  # fmt: skip
    """h @ W^T of the output layer `layer` (at most NARROW_OUTPUT units): per unit, each
    sample's dot product of its inputs h [BLOCK_N, P(layer)] (IN_LAYOUT) with the unit's
    weights, a row reduction; returned as [BLOCK_N, P_OUT] in OUT_LAYOUT, zero past the
    last unit, as the padded product gives it."""
    cols = gl.arange(0, P_OUT, layout=gl.SliceLayout(0, OUT_LAYOUT))
    z = gl.zeros([BLOCK_N, P_OUT], gl.float32, OUT_LAYOUT)
    for j in range(0, _width(sizes, layer + 1, WIDTHS, EXACT)):
        w_j = _weight_row(w_ptrs, m, sizes, layer, j, WIDTHS, EXACT, gl.SliceLayout(0, IN_LAYOUT))
        z_j = gl.convert_layout(gl.sum(h * w_j[None, :], 1), gl.SliceLayout(1, OUT_LAYOUT))
        z = gl.where(cols[None, :] == j, z_j[:, None], z)
    return z


@gluon.jit
def _output_unit_dz(dz, j, P_OUT: gl.constexpr, OUT_LAYOUT: gl.constexpr,
                    IN_LAYOUT: gl.constexpr):  # fmt: skip
    """Column j of dz [BLOCK_N, P_OUT] (OUT_LAYOUT), as [BLOCK_N] in IN_LAYOUT's rows."""
    cols = gl.arange(0, P_OUT, layout=gl.SliceLayout(0, OUT_LAYOUT))
    dz_j = gl.sum(gl.where(cols[None, :] == j, dz, 0.0), 1)
    return gl.convert_layout(dz_j, gl.SliceLayout(1, IN_LAYOUT))


@gluon.jit
def _narrow_weight_gradient(dz, h_in, d_out, P_IN: gl.constexpr, P_OUT: gl.constexpr,
                            IN_LAYOUT: gl.constexpr, OUT_LAYOUT: gl.constexpr,
                            DW_LAYOUT: gl.constexpr):  # fmt: skip
    """The output layer's weight gradient dz^T @ h_in (as _narrow_output, d_out units),
    [P_OUT, P_IN] in DW_LAYOUT, zero past row d_out: row j is a column reduction over the
    block's samples of dz_j * h_in (h_in [BLOCK_N, P_IN] in IN_LAYOUT, dz [BLOCK_N, P_OUT]
    in OUT_LAYOUT)."""
    rows = gl.arange(0, P_OUT, layout=gl.SliceLayout(1, DW_LAYOUT))
    dw = gl.zeros([P_OUT, P_IN], gl.float32, DW_LAYOUT)
    for j in range(0, d_out):
        dz_j = _output_unit_dz(dz, j, P_OUT, OUT_LAYOUT, IN_LAYOUT)
        dw_j = gl.convert_layout(gl.sum(dz_j[:, None] * h_in, 0), gl.SliceLayout(0, DW_LAYOUT))
        dw = gl.where(rows[:, None] == j, dw_j[None, :], dw)
    return dw


@gluon.jit
def _narrow_input_gradient(dz, w_ptrs, m, sizes, layer: gl.constexpr, WIDTHS: gl.constexpr,
                           EXACT: gl.constexpr, BLOCK_N: gl.constexpr, P_IN: gl.constexpr,
                           P_OUT: gl.constexpr, IN_LAYOUT: gl.constexpr,
                           OUT_LAYOUT: gl.constexpr):  # fmt: skip
    """dLoss/dh = dz @ W of the output layer `layer` (as _narrow_output): [BLOCK_N, P_IN]
    in IN_LAYOUT, the sum of dz_j w_j in unit order."""
    g = gl.zeros([BLOCK_N, P_IN], gl.float32, IN_LAYOUT)
    for j in range(0, _width(sizes, layer + 1, WIDTHS, EXACT)):
        dz_j = _output_unit_dz(dz, j, P_OUT, OUT_LAYOUT, IN_LAYOUT)
        w_j = _weight_row(w_ptrs, m, sizes, layer, j, WIDTHS, EXACT, gl.SliceLayout(0, IN_LAYOUT))
        g += dz_j[:, None] * w_j[None, :]
    return g


@gluon.jit
def _add_to_partials(grad_prog, dw, db, first, sizes, layer: gl.constexpr, DW_AT: gl.constexpr,
                     DB_AT: gl.constexpr, WIDTHS: gl.constexpr, EXACT: gl.constexpr,
                     DW_LAYOUT: gl.constexpr, DB_LAYOUT: gl.constexpr):  # fmt: skip
    """This block's weight and bias gradient of `layer` added to the program's row of
    partial gradients (stored as they are for its first block), padding masked off."""
    dw = gl.convert_layout(dw, DW_LAYOUT)
    offsets, mask = _weight_offsets(sizes, layer, WIDTHS, EXACT, DW_LAYOUT)
    cols = gl.arange(0, WIDTHS[layer + 1], layout=DB_LAYOUT)
    bias_mask = cols < _width(sizes, layer + 1, WIDTHS, EXACT)
    dw_at = grad_prog + DW_AT[layer] + offsets
    db_at = grad_prog + DB_AT[layer] + cols
    if not first:  # fixed order: the program's blocks one after another
        dw += gl.load(dw_at, mask=mask, other=0.0)
        db += gl.load(db_at, mask=bias_mask, other=0.0)
    gl.store(dw_at, dw, mask=mask)
    gl.store(db_at, db, mask=bias_mask)


@gluon.jit
def _fused_fp32_kernel(
    x_ptr,  # inputs, fp32, [M, N, d0] or [N, d0]
    w_ptrs,  # weights, L x fp32 [M, d(i+1), d(i)]
    b_ptrs,  # biases, L x fp32 [M, d(i+1)]
    t_ptr,  # targets: fp32 [M|-, N, dL] or int [M|-, N]
    sw_ptr,  # sample weights, fp32 [M|-, N] (unused without HAS_WEIGHTS)
    grad_ptr,  # partial gradients, fp32 [M, S, GRAD_ROW] (triton_fused.GradientLayout)
    dx_ptr,  # input gradients, fp32 [M, N, d0] (unused without WANT_DX)
    per_ptr,  # per-sample losses, fp32 [M, N]
    y_ptr,  # outputs, fp32 [M, N, dL] (unused without WANT_Y)
    z_ptr,  # scratch, fp32 [M, S, L, BLOCK_N, DP]
    sizes,  # (d0, ..., dL)
    N,
    S,
    blocks_per_split,
    stride_xm,
    stride_xn,
    stride_tm,
    stride_tn,
    stride_swm,
    hidden_slope,
    output_slope,
    delta,
    scale,
    L: gl.constexpr,
    DP: gl.constexpr,
    WIDTHS: gl.constexpr,  # (P0, ..., PL), powers of two from 16 to MAX_WIDTH
    EXACT: gl.constexpr,
    DW_AT: gl.constexpr,
    DB_AT: gl.constexpr,
    GRAD_ROW: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HIDDEN_ACT: gl.constexpr,
    OUTPUT_ACT: gl.constexpr,
    LOSS: gl.constexpr,
    HAS_WEIGHTS: gl.constexpr,
    WANT_PARAM_GRADS: gl.constexpr,
    WANT_DX: gl.constexpr,
    WANT_Y: gl.constexpr,
    BLOCKS: gl.constexpr,  # per width i: the layout of a [BLOCK_N, P(i)] block
    COLUMNS: gl.constexpr,  # per width i: BLOCKS[i] for a row of a_s ([1, BLOCK_N, 1])
    A_SHARED: gl.constexpr,  # a_s's layout (padded every UNROLL rows) and as UNROLL-row
    A_ROWS: gl.constexpr,  # buffers
    W_H_ROWS: gl.constexpr,  # rows of the memory w_s and h_s share: max(DP, BLOCK_N)
    GRADS: gl.constexpr,  # per layer: the layout of its [G, P(i+1), P(i)] gradient sums
    GROUPS: gl.constexpr,  # per layer: G
    WEIGHTS: gl.constexpr,  # per layer: the layout its [P(i+1), P(i)] weight is loaded and
    # its gradient added to the partials in (spread over every thread, 4 elements at a time)
    WEIGHTS_T: gl.constexpr,  # per layer: the layout its weight is loaded in to be stored
    # transposed (the forward product's W^T)
    UNROLL: gl.constexpr,
    NARROW_OUT: gl.constexpr,  # the output layer runs as reductions (at most NARROW_OUTPUT)
):
    m = gl.program_id(0).to(gl.int64)  # 64-bit per-model offsets, as triton_fused's
    s = gl.program_id(1)
    d_out = _width(sizes, L, WIDTHS, EXACT)
    program = m * S + s
    z_prog = z_ptr + program * (L * BLOCK_N * DP)
    grad_prog = grad_ptr + program * GRAD_ROW

    # a_s: a block transposed (row c: column c of the block, over its samples), padded
    # every UNROLL rows so that the stores that transpose a block have no bank conflicts
    # (a_shared_layout); w_s: W^T or W, row-major; h_s: a layer's input row-major, for dW,
    # then the groups' sums, in w_s's memory (dW does not use w_s); dz_s: dz row-major, for
    # dW.
    a_s = gl.allocate_shared_memory(gl.float32, [DP, BLOCK_N], A_SHARED)
    a_rows = _as_buffers(a_s, [DP // UNROLL, UNROLL, BLOCK_N, 1], A_ROWS)
    w_h = gl.allocate_shared_memory(gl.float32, [W_H_ROWS, DP], ROW_MAJOR)
    w_s = w_h.slice(0, DP)
    h_s = w_h.slice(0, BLOCK_N)
    dz_s = gl.allocate_shared_memory(gl.float32, [BLOCK_N, DP], ROW_MAJOR)

    for blk in range(0, blocks_per_split):
        row0 = (s * blocks_per_split + blk) * BLOCK_N
        h = _input_block(x_ptr, m, stride_xm, stride_xn, row0, N, sizes, WIDTHS, EXACT,
                         BLOCK_N, gl.constexpr(BLOCKS[0]))  # fmt: skip

        # forward: each layer's pre-activation to the scratch for the backward pass
        for layer in gl.static_range(L):
            if layer == L - 1 and NARROW_OUT:
                z = _narrow_output(h, w_ptrs, m, sizes, layer, WIDTHS, EXACT, BLOCK_N,
                                   WIDTHS[L], gl.constexpr(BLOCKS[layer]),
                                   gl.constexpr(BLOCKS[L]))  # fmt: skip
            else:
                w = _layer_weight(w_ptrs, m, sizes, layer, WIDTHS, EXACT,
                                  gl.constexpr(WEIGHTS_T[layer]))  # fmt: skip
                _sync_threads()  # every thread is done with the previous product's operands
                a_s.slice(0, WIDTHS[layer]).permute((1, 0)).store(h)
                w_t = w_s.slice(0, WIDTHS[layer]).slice(0, WIDTHS[layer + 1], dim=1)
                w_t.permute((1, 0)).store(w)
                _sync_threads()
                z = _row_product(a_rows, w_s, WIDTHS[layer], WIDTHS[layer + 1],
                                 gl.constexpr(BLOCKS[layer + 1]),
                                 gl.constexpr(COLUMNS[layer + 1]), BLOCK_N, DP,
                                 UNROLL)  # fmt: skip
            z += _layer_bias(b_ptrs, m, sizes, layer, WIDTHS, EXACT,
                             gl.SliceLayout(0, BLOCKS[layer + 1]))[None, :]  # fmt: skip
            gl.store(_scratch_block(z_prog, layer, WIDTHS, BLOCK_N, DP,
                                    gl.constexpr(BLOCKS[layer + 1])), z)  # fmt: skip
            if layer == L - 1:
                h = activate(z, OUTPUT_ACT, output_slope)
            else:
                h = activate(z, HIDDEN_ACT, hidden_slope)

        rn = row0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, BLOCKS[L]))
        out_cols = gl.arange(0, WIDTHS[L], layout=gl.SliceLayout(0, BLOCKS[L]))
        per, g = loss_block(h, t_ptr + m * stride_tm, stride_tn, sw_ptr + m * stride_swm, rn,
                            out_cols, N, d_out, scale, delta, LOSS, HAS_WEIGHTS)  # fmt: skip
        gl.store(per_ptr + m * N + rn, per, mask=rn < N)
        if WANT_Y:
            y_offsets = rn[:, None] * d_out + out_cols[None, :]
            y_mask = (rn[:, None] < N) & (out_cols[None, :] < d_out)
            gl.store(y_ptr + m * N * d_out + y_offsets, h, mask=y_mask)

        # backward, last layer first
        if WANT_PARAM_GRADS or WANT_DX:
            for layer in gl.static_range(L - 1, -1, -1):
                z = gl.load(_scratch_block(z_prog, layer, WIDTHS, BLOCK_N, DP,
                                           gl.constexpr(BLOCKS[layer + 1])))  # fmt: skip
                if layer == L - 1:
                    dz = g * activation_grad(z, OUTPUT_ACT, output_slope)
                else:
                    dz = g * activation_grad(z, HIDDEN_ACT, hidden_slope)
                if WANT_PARAM_GRADS:
                    db = gl.sum(dz, 0)
                    if layer > 0:
                        z_in = gl.load(_scratch_block(z_prog, layer - 1, WIDTHS, BLOCK_N, DP,
                                                      gl.constexpr(BLOCKS[layer])))  # fmt: skip
                        h_in = activate(z_in, HIDDEN_ACT, hidden_slope)
                    else:
                        h_in = _input_block(x_ptr, m, stride_xm, stride_xn, row0, N, sizes,
                                            WIDTHS, EXACT, BLOCK_N,
                                            gl.constexpr(BLOCKS[0]))  # fmt: skip
                    if layer == L - 1 and NARROW_OUT:
                        dw = _narrow_weight_gradient(dz, h_in, d_out, WIDTHS[layer],
                                                     WIDTHS[L], gl.constexpr(BLOCKS[layer]),
                                                     gl.constexpr(BLOCKS[L]),
                                                     gl.constexpr(WEIGHTS[layer]))  # fmt: skip
                    else:
                        _sync_threads()
                        dz_s.slice(0, WIDTHS[layer + 1], dim=1).store(dz)
                        h_s.slice(0, WIDTHS[layer], dim=1).store(h_in)
                        _sync_threads()
                        dw = _weight_gradient(dz_s, h_s, WIDTHS[layer], WIDTHS[layer + 1],
                                              GROUPS[layer], gl.constexpr(GRADS[layer]),
                                              gl.constexpr(WEIGHTS[layer]), BLOCK_N,
                                              DP)  # fmt: skip
                    _add_to_partials(grad_prog, dw, db, blk == 0, sizes, layer, DW_AT, DB_AT,
                                     WIDTHS, EXACT, gl.constexpr(WEIGHTS[layer]),
                                     gl.SliceLayout(0, BLOCKS[layer + 1]))  # fmt: skip
                    if layer < L - 1 or not NARROW_OUT:
                        # dz back from dz_s, as this thread stored it (registers are dearer)
                        dz = dz_s.slice(0, WIDTHS[layer + 1], dim=1).load(BLOCKS[layer + 1])
                if layer == L - 1 and NARROW_OUT and (layer > 0 or WANT_DX):
                    g = _narrow_input_gradient(dz, w_ptrs, m, sizes, layer, WIDTHS, EXACT,
                                               BLOCK_N, WIDTHS[layer], WIDTHS[L],
                                               gl.constexpr(BLOCKS[layer]),
                                               gl.constexpr(BLOCKS[L]))  # fmt: skip
                elif layer > 0 or WANT_DX:
                    w = _layer_weight(w_ptrs, m, sizes, layer, WIDTHS, EXACT,
                                      gl.constexpr(WEIGHTS[layer]))  # fmt: skip
                    _sync_threads()
                    a_s.slice(0, WIDTHS[layer + 1]).permute((1, 0)).store(dz)
                    w_s.slice(0, WIDTHS[layer + 1]).slice(0, WIDTHS[layer], dim=1).store(w)
                    _sync_threads()
                    g = _row_product(a_rows, w_s, WIDTHS[layer + 1], WIDTHS[layer],
                                     gl.constexpr(BLOCKS[layer]), gl.constexpr(COLUMNS[layer]),
                                     BLOCK_N, DP, UNROLL)  # fmt: skip
            if WANT_DX:
                _store_input_gradient(dx_ptr, g, m, row0, N, sizes, WIDTHS, EXACT, BLOCK_N,
                                      gl.constexpr(BLOCKS[0]))  # fmt: skip


def _blocked(shape, per_thread, warps: int) -> gl.BlockedLayout:
    """A blocked layout of `shape` with `per_thread` elements a thread: a warp's lanes along
    the last dimensions first, its warps along the first. Along the last dimension a
    thread's elements are runs of at most 4, a layout's width apart (8 as two runs of 4):
    a quarter-warp's threads then load or store 16 contiguous bytes each, 128 together,
    from a row-major tile in shared memory without bank conflicts, where runs of 8 put
    two threads of each quarter-warp on the same banks (Triton's gl.bank_conflicts: 1 per
    wavefront, against 0)."""
    tiles = [s // t for s, t in zip(shape, per_thread, strict=True)]
    lanes, left = [1] * len(shape), 32
    for d in reversed(range(len(shape))):
        lanes[d] = min(left, tiles[d])
        left //= lanes[d]
    lanes[0] *= left  # more lanes than tiles: they repeat the first dimension's
    warps_per, left = [1] * len(shape), warps
    for d in range(len(shape)):
        warps_per[d] = min(left, max(1, tiles[d] // lanes[d]))
        left //= warps_per[d]
    warps_per[0] *= left
    order = list(reversed(range(len(shape))))
    runs = [*per_thread[:-1], min(4, per_thread[-1])]
    return gl.BlockedLayout(runs, lanes, warps_per, order)


def _tile(rows: int, cols: int, threads: int) -> list[int]:
    """Outputs a thread for a [rows, cols] product: 8x8 where that leaves no thread idle,
    else fewer rows, then fewer columns, until every thread has some."""
    tile = [min(8, rows), min(8, cols)]
    while (rows // tile[0]) * (cols // tile[1]) < threads and tile != [1, 1]:
        tile[0 if tile[0] > 1 else 1] //= 2
    return tile


def block_layout(block_n: int, width: int, warps: int = NUM_WARPS) -> gl.BlockedLayout:
    """The layout of a [block_n, width] block of samples' values (a product's outputs)."""
    return _blocked([block_n, width], _tile(block_n, width, 32 * warps), warps)


def column_layout(block: gl.BlockedLayout) -> gl.BlockedLayout:
    """`block` (a [block_n, width] block's layout) with a leading dimension of 1: the layout
    a row of a_s is loaded in ([1, block_n, 1]), as the block's column k."""
    return gl.BlockedLayout([1, *block.size_per_thread], [1, *block.threads_per_warp],
                            [1, *block.warps_per_cta], [2, 1, 0])  # fmt: skip


def a_padding(block_n: int, width: int, warps: int = NUM_WARPS) -> int:
    """Floats of padding after every UNROLL rows of a_s (UNROLL = 4, a run of a thread's
    columns), for blocks of `width` to be stored transposed without bank conflicts. A
    block's threads hold runs of 4 columns, a warp's first lanes along the columns
    (block_layout), so unpadded each quarter-warp's stores go to rows 4 apart, 4 x block_n
    floats: on the same banks (Triton's gl.bank_conflicts at 128 samples and width 64: 7
    per wavefront, 8-way). Padded by 32 / (lanes along the columns) floats, lane l's row
    starts l x that many banks further: those lanes spread over the 32 banks, the lanes
    along the samples (consecutive samples) fill the gaps between them.
    Only where 8 lanes are along the columns (64 wide), the 8-way case: narrower blocks
    stay unpadded (2- or 4-way), because triton 3.6 stores into a padded layout one float
    at a time, leaving it to LLVM to merge them, and their addresses then cost registers
    (at [5, 16, 3], 128 samples: 159 -> 177, two programs an SM instead of three; at the
    target 231 either way). 0: unpadded."""
    lanes = block_layout(block_n, width, warps).threads_per_warp[1]
    return 32 // lanes if lanes == 8 else 0


def _a_layout(block_n: int, dp: int, shape: list):
    """a_s's memory viewed as `shape`, row-major, padded after every UNROLL rows of a_s by
    a_padding for the widest layer (unpadded where that is 0)."""
    pad, order = a_padding(block_n, dp), list(reversed(range(len(shape))))
    if not pad:
        return gl.SwizzledSharedLayout(1, 1, 1, order)
    return gl.PaddedSharedLayout.with_identity_for([[UNROLL * block_n, pad]], shape, order)


def a_shared_layout(block_n: int, dp: int):
    """a_s's layout: [dp, block_n]."""
    return _a_layout(block_n, dp, [dp, block_n])


def a_rows_layout(block_n: int, dp: int):
    """a_s as [dp / UNROLL] buffers of UNROLL rows ([UNROLL, block_n, 1] each; the padding
    follows each buffer, as in a_shared_layout)."""
    return _a_layout(block_n, dp, [UNROLL, block_n, 1])


def gradient_layout(d_out: int, d_in: int, block_n: int, capacity: int,
                    warps: int = NUM_WARPS):  # fmt: skip
    """(G, the layout of [G, d_out, d_in] weight-gradient sums): d_out x d_in outputs at
    up to 8x8 a thread, in as many groups of threads as the rest of the threads make and
    as many [d_out, d_in] sums as `capacity` floats hold (the shared memory they are added
    in; with fewer groups, smaller tiles keep every thread busy)."""
    threads = 32 * warps
    tile = _tile(d_out, d_in, 1)
    groups = max(1, min(block_n, threads // ((d_out // tile[0]) * (d_in // tile[1]))))
    groups = 1 << int(math.log2(min(groups, max(1, capacity // (d_out * d_in)))))
    tile = _tile(d_out, d_in, threads // groups)
    return groups, _blocked([groups, d_out, d_in], [1, *tile], warps)


def weight_layout(d_out: int, d_in: int, warps: int = NUM_WARPS) -> gl.BlockedLayout:
    """The layout of a [d_out, d_in] weight tile as loaded from memory and of its gradient
    as added to the partials: 4 consecutive elements a thread (one 16-byte access), every
    thread busy. (The gradient sums' own layout gives each thread a whole 8x8 block once
    per group of threads: 64 values, their offsets and masks, in registers at once.)"""
    return _blocked([d_out, d_in], [1, 4], warps)


def transposed_weight_layout(d_out: int, d_in: int, warps: int = NUM_WARPS) -> gl.BlockedLayout:
    """The layout a [d_out, d_in] weight tile is loaded in to be stored transposed (W^T in
    w_s, row k the weights from input k): as the GEMM loads an operand it stores transposed
    (gluon_matmul.operand_load: 4 consecutive elements of a row a thread, a warp's lanes
    along d_out), so that a warp stores each of its elements as consecutive floats of a row
    of W^T; weight_layout's lanes along d_in put each quarter-warp's stores on one bank
    (Triton's gl.bank_conflicts at 64 x 64: 15 per wavefront, against 0). Where d_out leaves
    lanes or warps over for d_in than it has, weight_layout's."""
    layout = operand_load(d_out, d_in, warps, contiguous=1, tile_contiguous=0)
    if 4 * layout.threads_per_warp[1] * layout.warps_per_cta[1] > d_in:
        return weight_layout(d_out, d_in, warps)
    return layout


def takes(layer_sizes, norms_needed: bool) -> bool:
    """Whether an IEEE float32 fused job can run on this kernel: no per-sample norms (the
    Triton kernel computes them), padded widths up to MAX_WIDTH."""
    return not norms_needed and max(triton_fused.padded_widths(layer_sizes)) <= MAX_WIDTH


def fused_mlp(weights, biases, x, targets, sample_weights, *, hidden_act, output_act,
              hidden_slope, output_slope, loss, delta, scale, want_param_grads, want_dx,
              want_y):  # fmt: skip
    """Launcher, as triton_fused.fused_mlp for IEEE float32 without norms: returns (weight
    gradients, bias gradients) or (None, None), dx or None, per-sample losses, outputs or
    None."""
    num_layers = len(weights)
    m = weights[0].shape[0]
    n, d_in = x.shape[-2], x.shape[-1]
    sizes = (d_in, *(w.shape[1] for w in weights))
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        assert w.shape == (m, sizes[i + 1], sizes[i]) and w.is_contiguous(), i
        assert w.dtype == torch.float32 and b.dtype == torch.float32 and b.is_contiguous()
    assert x.stride(-1) == 1 and targets.is_contiguous()
    widths = triton_fused.padded_widths(sizes)
    assert max(widths) <= MAX_WIDTH, widths
    exact = tuple(d == p for d, p in zip(sizes, widths, strict=True))
    dp = max(widths)
    device = x.device
    block_n = min(BLOCK_N, max(16, triton.next_power_of_2(n)))
    splits, per_split = triton_fused.sample_splits(n, block_n, m, device)

    f32 = dict(device=device, dtype=torch.float32)
    unused = torch.empty(1, **f32)
    layout = triton_fused.GradientLayout.of(widths)
    partials = torch.empty(m, splits, layout.row, **f32) if want_param_grads else unused
    dx = torch.empty(m, n, d_in, **f32) if want_dx else unused
    per = torch.empty(m, n, **f32)
    d_out = sizes[-1]
    y = torch.empty(m, n, d_out, **f32) if want_y else unused
    scratch = torch.empty(m, splits, num_layers, block_n, dp, **f32)
    shared_x = x.dim() == 2
    shared_t = targets.dim() == (1 if loss == 4 else 2)
    sw = sample_weights if sample_weights is not None else unused
    shared_w = sample_weights is not None and sample_weights.dim() == 1
    gradients = [
        gradient_layout(widths[i + 1], widths[i], block_n, dp * block_n) for i in range(num_layers)
    ]

    args = (
        x, tuple(weights), tuple(biases), targets, sw, partials, dx, per, y, scratch,
        sizes, n, splits, per_split,
        0 if shared_x else x.stride(0), x.stride(-2),
        0 if shared_t else targets.stride(0), targets.stride(-2 if loss != 4 else -1),
        0 if shared_w else n,
        hidden_slope, output_slope, delta, scale,
    )  # fmt: skip
    meta = dict(
        L=num_layers, DP=dp, WIDTHS=widths, EXACT=exact, DW_AT=layout.weight_offsets,
        DB_AT=layout.bias_offsets, GRAD_ROW=layout.row, BLOCK_N=block_n,
        HIDDEN_ACT=hidden_act, OUTPUT_ACT=output_act, LOSS=loss,
        HAS_WEIGHTS=sample_weights is not None, WANT_PARAM_GRADS=want_param_grads,
        WANT_DX=want_dx, WANT_Y=want_y,
        BLOCKS=tuple(block_layout(block_n, p) for p in widths),
        COLUMNS=tuple(column_layout(block_layout(block_n, p)) for p in widths),
        A_SHARED=a_shared_layout(block_n, dp), A_ROWS=a_rows_layout(block_n, dp),
        W_H_ROWS=max(dp, block_n),
        GRADS=tuple(g[1] for g in gradients), GROUPS=tuple(g[0] for g in gradients),
        WEIGHTS=tuple(weight_layout(widths[i + 1], widths[i]) for i in range(num_layers)),
        WEIGHTS_T=tuple(transposed_weight_layout(widths[i + 1], widths[i])
                        for i in range(num_layers)),  # fmt: skip
        UNROLL=UNROLL, NARROW_OUT=d_out <= NARROW_OUTPUT,
    )  # fmt: skip
    grid = (m, splits)
    if interpreted():
        gluon_cpu.run(_fused_fp32_kernel, grid, *args, **meta)
    else:
        _fused_fp32_kernel[grid](*args, **meta, num_warps=NUM_WARPS, num_stages=1,
                                 **LAUNCH_OPTIONS)  # fmt: skip
    grads = None, None
    if want_param_grads:
        shapes = list(zip(sizes[1:], sizes[:-1], strict=True))
        weight_at = [(at, d1 * d0) for at, (d1, d0) in zip(layout.weight_offsets, shapes,
                                                           strict=True)]  # fmt: skip
        bias_at = [(at, d1) for at, (d1, _) in zip(layout.bias_offsets, shapes, strict=True)]
        summed = partial_sums.sum_partials(partials, weight_at + bias_at)
        grads = (
            [summed[:, at : at + count].view(m, *shape)
             for (at, count), shape in zip(weight_at, shapes, strict=True)],
            [summed[:, at : at + count] for at, count in bias_at],
        )  # fmt: skip
    return grads, dx if want_dx else None, per, y if want_y else None
