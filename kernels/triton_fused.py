"""Fused forward + loss + backward of an MLP ensemble in one Triton launch (widths <= 128).

Shapes (M models, N samples, L layers of widths d(i); inside the kernel each width is padded
to P(i), a power of two >= 16, and DP = the largest P(i)):
  weights  L tensors [M, d(i+1), d(i)], the job's own (read in place; bf16/fp16 for those
           precisions), biases L tensors [M, d(i+1)] fp32
  inputs   [M, N, d0] or shared [N, d0] (read in place, stride 0 over M when shared)
  partial gradients  [M, S, G]: per program, each layer's weight gradient [d(i+1), d(i)] and
           bias gradient [d(i+1)] at compile-time offsets (GradientLayout)
  scratch  [M, S, L, BLOCK_N, DP]  pre-activations of the block in flight

Layer i computes on [P(i+1), P(i)] tiles, not [DP, DP]: a network like [32, 64, 64, 64, 1]
multiplies 32-wide inputs and a 16-wide output layer, not four 64 x 64 layers. Tiles are
loaded with masks from the unpadded parameters, so the padding never exists in memory and
no padded copy of the parameters is made before a launch.

grid = (M, S): program (m, s) owns model m and the s-th slice of its samples. It walks its
slice BLOCK_N samples at a time: forward through all L layers (weights stay in L1/L2, the
block's pre-activations go to the program's own small scratch, which stays in L2), loss
and dLoss/dy in registers, then backward through the layers, accumulating the weight and
bias gradients of its slice in its own partial buffer. No float atomics: a second kernel
adds the S partials in a fixed order, so repeated runs give identical bits.

Two launch options (LaunchConfig) keep values in registers instead: `resident`, the
block's pre-activations (no scratch, no barrier between forward and backward), and
`carry`, the parameter gradients summed over the program's blocks (stored once at the
end instead of loaded and stored per block). Both add the same float32 values in the same
order (the same bits under the interpreter), except that Triton lays out the reductions
(tl.sum: the bias gradients over a block's samples, the per-sample norms) in registers as
it sees fit per configuration, and a layout sets the order of a reduction's additions: on
a GPU the configurations can differ in those sums' last bits (each is reproducible run to
run). They trade memory operations and barriers for registers (and spills).

The zero padding is harmless: padded weight rows and columns load as 0, so padded features
never reach a real one, and their gradients are masked off at the store.

In float32 an output layer of at most NARROW_OUTPUT units (a regression head: the benchmark
target's is one unit wide) skips the products that would pad it to 16 outputs: per unit, the
forward pass is a row reduction of h * w_j over the unit's inputs, dW_j a column reduction
of dz_j * h_in over the block's samples, the input gradient the sum of dz_j w_j in unit
order (fixed orders: the same bits every run), all in IEEE fp32 FMAs. The padded columns
stay 0, as the products give them. This holds for IEEE float32 (products on the FMA units)
and for float32 as three tf32 products (each padded product three MMAs and the operands'
splits); tf32, bfloat16 and float16 keep the products (one small MMA each).

Torch twin: torch_engine.forward_loss (same math, autograd for the backward).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gradserve.kernels.partial_sums import multiprocessors, sum_partials
from gradserve.kernels.triton_common import (
    LAUNCH_OPTIONS,
    PRECISION_CODES,
    TF32X3,
    activate,
    activation_grad,
    cycle_counter,
    loss_block,
    matmul,
    nanosecond_timer,
    sm_id,
    textbook_forms,
)

NEGATIVE_ZERO_BITS = tl.constexpr(-(2**31))  # -0.0 as an int32 bit pattern (0x80000000)
# IEEE float32 products on the FMA units in K-chunks of 16 (32 where K is 128): fewer
# register spills than chunks of 32 at every block size on sm_90 (triton_common._ieee_dot;
# bench/fused_sweep.py times both).
FMA_K_CHUNK = 16
# float32 output layers up to this many units run as reductions, not padded products (the
# module docstring); 0 turns them off (bench/kernels_gpu.py's "... padded" rows).
NARROW_OUTPUT = 4


@triton.jit
def _block_tile(rows, WIDTH: tl.constexpr, DP: tl.constexpr):
    """Offsets of a [BLOCK_N, WIDTH] block stored with row stride DP."""
    return rows[:, None] * DP + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _width(sizes, i: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """d(i): a compile-time constant where it equals its padded width P(i), else the
    launch's value (so that networks whose widths pad alike share one compiled kernel)."""
    if EXACT[i]:
        d = WIDTHS[i]
    else:
        d = sizes[i]
    return d


@triton.jit
def _weight_tile(sizes, layer: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """Offsets and mask of `layer`'s [P(layer+1), P(layer)] tile over its row-major
    [d(layer+1), d(layer)] weight (or weight gradient): the padding is the masked part."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    rows = tl.arange(0, WIDTHS[layer + 1])
    cols = tl.arange(0, WIDTHS[layer])
    offsets = rows[:, None] * d_in + cols[None, :]
    mask = (rows[:, None] < d_out) & (cols[None, :] < d_in)
    return offsets, mask


@triton.jit
def _padded_tile(base, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """The row-major [d(layer+1), d(layer)] matrix at `base` (a weight or its gradient),
    zero-padded to [P(layer+1), P(layer)]."""
    offsets, mask = _weight_tile(sizes, layer, WIDTHS, EXACT)
    if EXACT[layer] and EXACT[layer + 1]:
        tile = tl.load(base + offsets)  # no padding: no mask to compute
    else:  # padded lanes: 0, not whatever lies beyond the matrix
        tile = tl.load(base + offsets, mask=mask, other=0.0)
    return tile


@triton.jit
def _padded_vector(base, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """The [d(layer+1)] vector at `base` (a bias or its gradient), zero-padded to
    [P(layer+1)]."""
    cols = tl.arange(0, WIDTHS[layer + 1])
    return tl.load(base + cols, mask=cols < _width(sizes, layer + 1, WIDTHS, EXACT), other=0.0)


@triton.jit
def _layer_weight(w_ptrs, m, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """Model m's weight of `layer`, zero-padded to [P(layer+1), P(layer)]."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    return _padded_tile(w_ptrs[layer] + m * (d_out * d_in), sizes, layer, WIDTHS, EXACT)


@triton.jit
def _layer_bias(b_ptrs, m, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr, EXACT: tl.constexpr):
    """Model m's bias of `layer`, zero-padded to [P(layer+1)]."""
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    return _padded_vector(b_ptrs[layer] + m * d_out, sizes, layer, WIDTHS, EXACT)


@triton.jit
def _weight_row(w_ptrs, m, sizes, layer: tl.constexpr, row, WIDTHS: tl.constexpr,
                EXACT: tl.constexpr):  # fmt: skip
    """Row `row` of model m's weight of `layer` (output unit `row`'s weights), zero-padded
    to [P(layer)]."""
    d_in = _width(sizes, layer, WIDTHS, EXACT)
    d_out = _width(sizes, layer + 1, WIDTHS, EXACT)
    cols = tl.arange(0, WIDTHS[layer])
    at = w_ptrs[layer] + m * (d_out * d_in) + row * d_in + cols
    return tl.load(at, mask=cols < d_in, other=0.0)


@triton.jit
def _narrow_output(h, w_ptrs, m, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr,
                   EXACT: tl.constexpr, BLOCK_N: tl.constexpr, P_OUT: tl.constexpr):  # fmt: skip
    """h @ W^T of the output layer `layer` (at most NARROW_OUTPUT units): per unit, each
    sample's dot product of its inputs h [BLOCK_N, P(layer)] with the unit's weights, a row
    reduction; [BLOCK_N, P_OUT], zero past the last unit as the padded product gives it."""
    cols = tl.arange(0, P_OUT)
    z = tl.zeros([BLOCK_N, P_OUT], dtype=tl.float32)
    for j in range(0, _width(sizes, layer + 1, WIDTHS, EXACT)):
        w_j = _weight_row(w_ptrs, m, sizes, layer, j, WIDTHS, EXACT)
        z_j = tl.sum(h * w_j[None, :], 1)
        z = tl.where(cols[None, :] == j, z_j[:, None], z)
    return z


@triton.jit
def _output_unit_dz(dz, j, P_OUT: tl.constexpr):
    """Column j of the output layer's dz [BLOCK_N, P_OUT], as [BLOCK_N]."""
    cols = tl.arange(0, P_OUT)
    return tl.sum(tl.where(cols[None, :] == j, dz, 0.0), 1)


@triton.jit
def _narrow_weight_gradient(dz, h_in, d_out, P_IN: tl.constexpr, P_OUT: tl.constexpr):
    """The output layer's weight gradient dz^T @ h_in (as _narrow_output, d_out units):
    [P_OUT, P_IN], zero past row d_out; row j a column reduction over the block's samples
    of dz_j * h_in (h_in [BLOCK_N, P_IN], dz [BLOCK_N, P_OUT])."""
    rows = tl.arange(0, P_OUT)
    dw = tl.zeros([P_OUT, P_IN], dtype=tl.float32)
    for j in range(0, d_out):
        dz_j = _output_unit_dz(dz, j, P_OUT)
        dw_j = tl.sum(dz_j[:, None] * h_in, 0)
        dw = tl.where(rows[:, None] == j, dw_j[None, :], dw)
    return dw


@triton.jit
def _narrow_input_gradient(dz, w_ptrs, m, sizes, layer: tl.constexpr, WIDTHS: tl.constexpr,
                           EXACT: tl.constexpr, BLOCK_N: tl.constexpr, P_IN: tl.constexpr,
                           P_OUT: tl.constexpr):  # fmt: skip
    """dLoss/dh = dz @ W of the output layer `layer` (as _narrow_output): [BLOCK_N, P_IN],
    the sum of dz_j w_j in unit order."""
    g = tl.zeros([BLOCK_N, P_IN], dtype=tl.float32)
    for j in range(0, _width(sizes, layer + 1, WIDTHS, EXACT)):
        dz_j = _output_unit_dz(dz, j, P_OUT)
        w_j = _weight_row(w_ptrs, m, sizes, layer, j, WIDTHS, EXACT)
        g += dz_j[:, None] * w_j[None, :]
    return g


@triton.jit
def _layer_input_gradient(dz, w_ptrs, m, sizes, layer: tl.constexpr, L: tl.constexpr,
                          WIDTHS: tl.constexpr, EXACT: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr, FMA_K_CHUNK: tl.constexpr,
                          NARROW_OUT: tl.constexpr):  # fmt: skip
    """dLoss/d(the input of `layer`) = dz @ W: the product, or a narrow output layer's
    reductions."""
    if layer == L - 1 and NARROW_OUT:
        g = _narrow_input_gradient(dz, w_ptrs, m, sizes, layer, WIDTHS, EXACT, BLOCK_N,
                                   WIDTHS[layer], WIDTHS[L])  # fmt: skip
    else:
        w = _layer_weight(w_ptrs, m, sizes, layer, WIDTHS, EXACT)
        g = matmul(dz, w, PRECISION, FMA_K_CHUNK)
    return g


@triton.jit
def _replaced(values, index: tl.constexpr, value, COUNT: tl.constexpr):
    """The tuple `values` (of COUNT items) with the item at `index` replaced by `value`."""
    out = ()
    for i in tl.static_range(COUNT):
        if i == index:
            out = out + (value,)
        else:
            out = out + (values[i],)
    return out


@triton.jit
def _store_partial_grads(
    grad_prog, dw, db, sizes, layer: tl.constexpr, DW_AT: tl.constexpr, DB_AT: tl.constexpr,
    WIDTHS: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """Store `layer`'s weight and bias gradient tiles in the program's row of partial
    gradients, padding masked off."""
    corner, corner_mask = _weight_tile(sizes, layer, WIDTHS, EXACT)
    if EXACT[layer] and EXACT[layer + 1]:
        corner_mask = None  # no padding: no mask to compute
    tl.store(grad_prog + DW_AT[layer] + corner, dw, mask=corner_mask)
    cols = tl.arange(0, WIDTHS[layer + 1])
    bias_mask = cols < _width(sizes, layer + 1, WIDTHS, EXACT)
    tl.store(grad_prog + DB_AT[layer] + cols, db, mask=bias_mask)


@triton.jit
def _stamp(stamps, index, PROFILE: tl.constexpr):
    """Profiling builds only: record the cycle counter at one of a block's phase ends."""
    if PROFILE:
        tl.store(stamps + index, cycle_counter())


@triton.jit
def _saved_z(
    zs, z_prog, rows, layer: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
    WIDTHS: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """The block's pre-activation of `layer` as the forward pass left it: in registers
    (RESIDENT) or in the scratch."""
    if RESIDENT:
        z = zs[layer]
    else:
        z = tl.load(z_prog + layer * BLOCK_N * DP + _block_tile(rows, WIDTHS[layer + 1], DP))
    return z


@triton.jit
def _pre_activation_grad(
    g, zs, z_prog, rows, hidden_slope, output_slope, layer: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr, DP: tl.constexpr, WIDTHS: tl.constexpr, HIDDEN_ACT: tl.constexpr,
    OUTPUT_ACT: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """dLoss/dz of `layer` (from its saved pre-activation) given dLoss/d(its output)."""
    z = _saved_z(zs, z_prog, rows, layer, BLOCK_N, DP, WIDTHS, RESIDENT)
    if layer == L - 1:
        dz = g * activation_grad(z, OUTPUT_ACT, output_slope)
    else:
        dz = g * activation_grad(z, HIDDEN_ACT, hidden_slope)
    return dz


@triton.jit
def _layer_input(
    zs, z_prog, x_block, x_mask, rows, hidden_slope, layer: tl.constexpr, BLOCK_N: tl.constexpr,
    DP: tl.constexpr, WIDTHS: tl.constexpr, HIDDEN_ACT: tl.constexpr, RESIDENT: tl.constexpr,
):  # fmt: skip
    """The block's input to `layer`: its inputs, or the previous layer's activation."""
    if layer > 0:
        z = _saved_z(zs, z_prog, rows, layer - 1, BLOCK_N, DP, WIDTHS, RESIDENT)
        h = activate(z, HIDDEN_ACT, hidden_slope)
    else:
        h = tl.load(x_block, mask=x_mask, other=0.0)
    return h


@triton.jit
def _fused_mlp_kernel(
    # pointers (a tuple holds one pointer per layer)
    x_ptr,  # inputs, fp32, [M, N, d0] or [N, d0]
    w_ptrs,  # weights, L x [M, d(i+1), d(i)] (fp32, or the narrow operand dtype)
    b_ptrs,  # biases, L x fp32 [M, d(i+1)]
    t_ptr,  # targets: fp32 [M|-, N, dL] or int [M|-, N]
    sw_ptr,  # sample weights, fp32 [M|-, N] (unused without HAS_WEIGHTS)
    grad_ptr,  # partial gradients, fp32 [M, S, GRAD_ROW] (GradientLayout)
    dx_ptr,  # input gradients, fp32 [M, N, d0] (unused without WANT_DX)
    per_ptr,  # per-sample losses, fp32 [M, N]
    y_ptr,  # outputs, fp32 [M, N, dL] (unused without WANT_Y)
    z_ptr,  # scratch, fp32 [M, S, L, BLOCK_N, DP]
    norm_ptr,  # per-sample gradient norms, fp32 [M, N] (unused without NORMS)
    profile_ptr,  # int64 [M * S, 3 + blocks_per_split * (2L + 4)] (PROFILE only)
    # sizes
    sizes,  # (d0, ..., dL): the layer widths
    N,
    S,  # sample splits per model (grid axis 1)
    blocks_per_split,
    # strides (elements); 0 on the model axis for shared tensors
    stride_xm,
    stride_xn,
    stride_tm,
    stride_tn,
    stride_swm,
    # scalars
    hidden_slope,  # leaky_relu negative slope of the hidden layers
    output_slope,  # ... and of the output layer
    delta,  # huber delta
    scale,  # 1 / count (mean) or 1 (sum)
    clip,  # DP clip norm (CLIP only)
    own_scale,  # N (mean) or 1 (sum): contribution norm -> own-loss norm (CLIP only)
    # meta
    L: tl.constexpr,
    DP: tl.constexpr,  # the scratch's row stride: the largest of WIDTHS
    WIDTHS: tl.constexpr,  # (P0, ..., PL): each layer width padded to a power of two >= 16
    EXACT: tl.constexpr,  # per width: d(i) == P(i) (no padding, no masks)
    BIASED: tl.constexpr,  # per layer: it has a bias, which counts in per-sample norms
    DW_AT: tl.constexpr,  # GradientLayout: each layer's weight gradient in a program's row
    DB_AT: tl.constexpr,  # ... and its bias gradient
    GRAD_ROW: tl.constexpr,  # ... and the row's length
    BLOCK_N: tl.constexpr,
    HIDDEN_ACT: tl.constexpr,
    OUTPUT_ACT: tl.constexpr,
    LOSS: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    WANT_PARAM_GRADS: tl.constexpr,
    WANT_DX: tl.constexpr,
    WANT_Y: tl.constexpr,
    NORMS: tl.constexpr,  # per-sample gradient norms: a first backward pass
    CLIP: tl.constexpr,  # DP-SGD: scale each sample's gradient by its clip factor
    PROFILE: tl.constexpr,  # record phase timings (fused_mlp's `profile`)
    RESIDENT: tl.constexpr,  # pre-activations stay in registers, not in the scratch
    CARRY: tl.constexpr,  # parameter gradients summed in registers, stored once at the end
    FMA_K_CHUNK: tl.constexpr,  # IEEE float32 products' K-chunks (triton_common._ieee_dot)
    NARROW_OUT: tl.constexpr,  # the output layer runs as reductions (narrow_output)
):
    # 64-bit per-model offsets: a large ensemble's buffers can exceed 2**31 elements
    m = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    d_in = _width(sizes, 0, WIDTHS, EXACT)
    d_out = _width(sizes, L, WIDTHS, EXACT)
    rows = tl.arange(0, BLOCK_N)
    in_cols = tl.arange(0, WIDTHS[0])
    out_cols = tl.arange(0, WIDTHS[L])
    program = m * S + s
    z_prog = z_ptr + program * (L * BLOCK_N * DP)
    grad_prog = grad_ptr + program * GRAD_ROW
    # per-model base pointers (64-bit scalars), so per-element offsets stay 32-bit
    x_model = x_ptr + m * stride_xm
    per_model = per_ptr + m * N
    norm_model = norm_ptr + m * N
    y_model = y_ptr + m * N * d_out
    dx_model = dx_ptr + m * N * d_in
    profile = profile_ptr + program * (3 + blocks_per_split * (2 * L + 4))
    if PROFILE:
        tl.store(profile, sm_id().to(tl.int64))
        tl.store(profile + 1, nanosecond_timer())

    # CARRY: each layer's weight and bias gradient summed over the program's blocks, from
    # -0.0, the identity of float addition (+0.0 would turn a -0.0 sum into +0.0): the bits
    # of the partial-gradient row, which starts from the first block's sum. Written as its
    # bit pattern: Triton makes any constant equal to 0 a +0.0.
    dws = ()
    dbs = ()
    if CARRY:
        for layer in tl.static_range(L):
            dw0 = tl.full([WIDTHS[layer + 1], WIDTHS[layer]], NEGATIVE_ZERO_BITS, tl.int32)
            db0 = tl.full([WIDTHS[layer + 1]], NEGATIVE_ZERO_BITS, tl.int32)
            dws = dws + (dw0.to(tl.float32, bitcast=True),)
            dbs = dbs + (db0.to(tl.float32, bitcast=True),)

    for blk in range(0, blocks_per_split):
        stamps = profile + 3 + blk * (2 * L + 4)
        _stamp(stamps, 0, PROFILE)
        rn = (s * blocks_per_split + blk) * BLOCK_N + rows
        rmask = rn < N
        x_offsets = rn[:, None] * stride_xn + in_cols[None, :]
        x_mask = rmask[:, None] & (in_cols[None, :] < d_in)
        h = tl.load(x_model + x_offsets, mask=x_mask, other=0.0)

        # forward: keep each layer's pre-activation for the backward pass
        zs = ()
        for layer in tl.static_range(L):
            if layer == L - 1 and NARROW_OUT:
                b = _layer_bias(b_ptrs, m, sizes, layer, WIDTHS, EXACT)
                z = _narrow_output(h, w_ptrs, m, sizes, layer, WIDTHS, EXACT, BLOCK_N,
                                   WIDTHS[L]) + b[None, :]  # fmt: skip
            else:
                w = _layer_weight(w_ptrs, m, sizes, layer, WIDTHS, EXACT)
                b = _layer_bias(b_ptrs, m, sizes, layer, WIDTHS, EXACT)
                z = matmul(h, tl.trans(w), PRECISION, FMA_K_CHUNK) + b[None, :]
            if RESIDENT:
                zs = zs + (z,)
            else:
                z_tile = _block_tile(rows, WIDTHS[layer + 1], DP)
                tl.store(z_prog + layer * BLOCK_N * DP + z_tile, z)
            if layer == L - 1:
                h = activate(z, OUTPUT_ACT, output_slope)
            else:
                h = activate(z, HIDDEN_ACT, hidden_slope)
            _stamp(stamps, 1 + layer, PROFILE)

        per, g = loss_block(
            h,
            t_ptr + m * stride_tm,
            stride_tn,
            sw_ptr + m * stride_swm,
            rn,
            out_cols,
            N,
            d_out,
            scale,
            delta,
            LOSS,
            HAS_WEIGHTS,
        )
        tl.store(per_model + rn, per, mask=rmask)
        if WANT_Y:
            y_offsets = rn[:, None] * d_out + out_cols[None, :]
            tl.store(y_model + y_offsets, h, mask=rmask[:, None] & (out_cols[None, :] < d_out))
        if not RESIDENT:
            tl.debug_barrier()  # scratch writes visible to every thread of the program
        _stamp(stamps, L + 1, PROFILE)

        if NORMS:
            # A first backward pass for each sample's gradient norm: a linear layer's weight
            # gradient of one sample is dz a^T, so its squared norm is |dz|^2 |a|^2, and
            # |dz|^2 more with the bias (dz itself). Input gradients come from this pass
            # (clipping leaves them be).
            gn = g
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for layer in tl.static_range(L - 1, -1, -1):  # last layer first
                dz = _pre_activation_grad(
                    gn, zs, z_prog, rows, hidden_slope, output_slope, layer, L, BLOCK_N, DP,
                    WIDTHS, HIDDEN_ACT, OUTPUT_ACT, RESIDENT,
                )  # fmt: skip
                h_in = _layer_input(
                    zs, z_prog, x_model + x_offsets, x_mask, rows, hidden_slope, layer, BLOCK_N,
                    DP, WIDTHS, HIDDEN_ACT, RESIDENT,
                )  # fmt: skip
                if not EXACT[layer]:
                    # padded input features may be non-zero (sigmoid(0)): count real ones only
                    real = tl.arange(0, WIDTHS[layer]) < _width(sizes, layer, WIDTHS, EXACT)
                    h_in = tl.where(real[None, :], h_in, 0.0)
                if BIASED[layer]:
                    sq += tl.sum(dz * dz, 1) * (tl.sum(h_in * h_in, 1) + 1.0)
                else:
                    sq += tl.sum(dz * dz, 1) * tl.sum(h_in * h_in, 1)
                if layer > 0 or WANT_DX:
                    gn = _layer_input_gradient(dz, w_ptrs, m, sizes, layer, L, WIDTHS, EXACT,
                                               BLOCK_N, PRECISION, FMA_K_CHUNK,
                                               NARROW_OUT)  # fmt: skip
            if WANT_DX:
                dx_offsets = rn[:, None] * d_in + in_cols[None, :]
                tl.store(dx_model + dx_offsets, gn, mask=x_mask)
            norm = tl.sqrt(sq)
            tl.store(norm_model + rn, norm, mask=rmask)
            if CLIP:  # backprop is linear in dLoss/dy: scaling it scales the whole gradient
                factor = tl.minimum(clip / (norm * own_scale + 1e-6), 1.0)
                g = g * factor[:, None]
        _stamp(stamps, L + 2, PROFILE)

        # backward, last layer first
        if WANT_PARAM_GRADS or (WANT_DX and not NORMS):
            for layer in tl.static_range(L - 1, -1, -1):  # last layer first
                dz = _pre_activation_grad(
                    g, zs, z_prog, rows, hidden_slope, output_slope, layer, L, BLOCK_N, DP,
                    WIDTHS, HIDDEN_ACT, OUTPUT_ACT, RESIDENT,
                )  # fmt: skip
                if WANT_PARAM_GRADS:
                    h_in = _layer_input(
                        zs, z_prog, x_model + x_offsets, x_mask, rows, hidden_slope, layer,
                        BLOCK_N, DP, WIDTHS, HIDDEN_ACT, RESIDENT,
                    )  # fmt: skip
                    if layer == L - 1 and NARROW_OUT:
                        dw = _narrow_weight_gradient(dz, h_in, d_out, WIDTHS[layer],
                                                     WIDTHS[L])  # fmt: skip
                    else:
                        dw = matmul(tl.trans(dz), h_in, PRECISION, FMA_K_CHUNK)
                    db = tl.sum(dz, 0)
                    # fixed order: this program's blocks, one after another
                    if CARRY:
                        dws = _replaced(dws, layer, dws[layer] + dw, L)
                        dbs = _replaced(dbs, layer, dbs[layer] + db, L)
                    else:
                        if blk > 0:
                            dw += _padded_tile(grad_prog + DW_AT[layer], sizes, layer, WIDTHS,
                                               EXACT)  # fmt: skip
                            db += _padded_vector(grad_prog + DB_AT[layer], sizes, layer, WIDTHS,
                                                 EXACT)  # fmt: skip
                        _store_partial_grads(grad_prog, dw, db, sizes, layer, DW_AT, DB_AT,
                                             WIDTHS, EXACT)  # fmt: skip
                if layer > 0 or (WANT_DX and not NORMS):
                    g = _layer_input_gradient(dz, w_ptrs, m, sizes, layer, L, WIDTHS, EXACT,
                                              BLOCK_N, PRECISION, FMA_K_CHUNK,
                                              NARROW_OUT)  # fmt: skip
                _stamp(stamps, 2 * L + 2 - layer, PROFILE)
            if WANT_DX and not NORMS:
                dx_offsets = rn[:, None] * d_in + in_cols[None, :]
                tl.store(dx_model + dx_offsets, g, mask=x_mask)
        if not (RESIDENT and CARRY):
            # the next block overwrites the scratch or re-reads the partial gradients, which
            # other threads of the program may have written
            tl.debug_barrier()
        _stamp(stamps, 2 * L + 3, PROFILE)
    if CARRY:
        for layer in tl.static_range(L):
            _store_partial_grads(grad_prog, dws[layer], dbs[layer], sizes, layer, DW_AT, DB_AT,
                                 WIDTHS, EXACT)  # fmt: skip
    if PROFILE:
        tl.store(profile + 2, nanosecond_timer())


def padded_width(layer_sizes) -> int:
    """DP: the widest padded layer (the scratch's row stride)."""
    return max(padded_widths(layer_sizes))


def padded_widths(layer_sizes) -> tuple[int, ...]:
    """Each width padded to a power of two >= 16 (tl.dot's smallest operand side)."""
    return tuple(max(16, triton.next_power_of_2(d)) for d in layer_sizes)


class LaunchConfig(NamedTuple):
    block_n: int  # samples per block (BLOCK_N)
    splits: int  # programs per model (S, grid axis 1)
    blocks_per_split: int
    num_warps: int
    max_registers: int | None = None  # ptxas register cap (None: its own choice)
    resident: bool = False  # pre-activations kept in registers instead of the scratch
    carry: bool = False  # parameter gradients summed in registers over a program's blocks
    fma_k_chunk: int = FMA_K_CHUNK  # IEEE float32 products' K-chunks


class FaultingLaunch(ValueError):
    """A launch configuration known to compute wrong results or fault on a GPU."""


def faults_on_gpu(block_n: int, num_warps: int, precision: int) -> bool:
    """Tensor-core matmuls in 64-sample blocks with 8 warps: on an H100 with triton 3.6,
    tf32 and float32 as three tf32 products faulted (illegal memory accesses) at padded
    widths 64 and 128, and a tf32 job at width 64 that did not fault got input gradients
    113% off (bench/results/config_check_h100.md). bfloat16 ran there without a fault but
    its results were not checked: left out alike. IEEE float32 (FMA units) is correct there
    and is launch_config's choice at width 64. Other Triton users report the same signature
    on Hopper with Triton 3.4 to 3.7 (flash-linear-attention issues 640 and 984: matmuls of
    transposed matmul results in 64-row tiles, wrong or faulting by num_warps), and
    bench/chained_dot_check.py asks the GPU whether this kernel's pattern alone does it."""
    return block_n == 64 and num_warps == 8 and precision != PRECISION_CODES["float32"]


def wrong_on_gpu(widths: tuple[int, ...], block_n: int, precision: int) -> bool:
    """bfloat16 and float16 in blocks of 64 or 128 samples, in a network with a layer from
    padded width 16 to 64 (an input or hidden width of 16 or less next to one of 33-64): on
    an H100 with triton 3.6 that layer's weight gradient and the gradients below it came out
    100-190% off, with 4 warps and with 8, while 16- and 32-sample blocks were right in every
    network tried, as were the same blocks with input width 32 or hidden width 32
    (bench/results/config_check_h100_half.md). tf32 and float32 were right there."""
    half = precision in (PRECISION_CODES["bfloat16"], PRECISION_CODES["float16"])
    narrow_to_64 = any(a == 16 and b == 64 for a, b in itertools.pairwise(widths))
    return half and narrow_to_64 and block_n > 32


def launch_config(
    widths: tuple[int, ...], n: int, m: int, device: torch.device, precision: int
) -> LaunchConfig:
    """How to launch a job whose layer widths pad to `widths`.

    BLOCK_N: 128 samples per block up to DP=64, 32 at DP=128, keeping the [BLOCK_N, DP]
    fp32 blocks in registers; larger blocks mean fewer weight reloads and partial-gradient
    updates per sample. IEEE float32 multiplies on the FMA units, whose operands need more
    registers: at DP=64 it takes 64 samples per block, which on sm_90 issues about as many
    instructions per sample as 128 (168 against 161) and spills no registers (128: about
    0.5 KB per thread; bench/results/ptxas_sm90.md). tf32 at DP=64 also takes 64
    samples, with 4 warps: at the benchmark target 1.10x as fast as 128 with 8 warps on an
    H100 (bench/results/fused_sweep_h100.md). float32 as three tf32 products (TF32X3) multiplies
    on the tensor cores in 128-sample blocks: at 128 samples it issues the fewest
    instructions per sample of the blocks tried on sm_90 (74, against 124 at 64 and 121 at
    32; IEEE float32 at 64: 168), with the most spill traffic; bench/fused_sweep.py
    times them all. S: enough programs to fill the GPU (4 per SM) when M
    alone does not; on the interpreter one split is enough. No register cap: at 255
    registers a program of 8 warps has an SM to itself; bench/fused_sweep.py measures the
    capped alternatives (more programs per SM, some spills) against this choice, and the
    `resident` and `carry` options (off here: on sm_90 they cut a block's barriers and
    shared and global memory operations, and add spills; bench/results/ptxas_sm90.md).
    Configurations that fail on a GPU (faults_on_gpu, wrong_on_gpu) are never chosen.
    """
    dp = max(widths)
    if dp == 128:
        block_n = 32
    elif dp == 64 and precision in (PRECISION_CODES["float32"], PRECISION_CODES["tf32"]):
        block_n = 64
    else:
        block_n = 128
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    if wrong_on_gpu(widths, block_n, precision):
        block_n = 32
    num_warps = 4 if dp * block_n <= 32 * 64 else 8
    if faults_on_gpu(block_n, num_warps, precision):
        num_warps = 4
    return LaunchConfig(block_n, *sample_splits(n, block_n, m, device), num_warps)


def sample_splits(n: int, block_n: int, m: int, device: torch.device) -> tuple[int, int]:
    """(S, blocks_per_split): the N samples' blocks of BLOCK_N dealt to S programs per model."""
    blocks = triton.cdiv(n, block_n)
    want = max(1, triton.cdiv(4 * multiprocessors(device), m))
    per_split = triton.cdiv(blocks, min(blocks, want))
    return triton.cdiv(blocks, per_split), per_split


def narrow_output(d_out: int, precision: int) -> bool:
    """The kernel's NARROW_OUT: whether the output layer runs as reductions (float32, IEEE
    or as three tf32 products, at most NARROW_OUTPUT units) instead of the padded products.
    Compiled for sm_90a at the benchmark target in launch_config's blocks, the reductions
    issue fewer instructions a block, and with triton 3.6 (the GPU image's) spill no more
    (bench/results/ptxas_sm90.md); not yet timed on a GPU (bench/kernels_gpu.py's "padded"
    rows). A loop over the units, not the width itself, is compiled in: output widths 1 to
    NARROW_OUTPUT share one kernel."""
    return precision in (PRECISION_CODES["float32"], TF32X3) and d_out <= NARROW_OUTPUT


class GradientLayout(NamedTuple):
    """Where each layer's weight and bias gradient lie in a program's row of partial
    gradients. Laid out for the padded widths, `of(padded_widths(sizes))`: each layer gets
    room for its padded [P(i+1), P(i)] block and holds its [d(i+1), d(i)] gradient compactly
    at the start, so the offsets are compile-time constants shared by every network whose
    widths pad alike, and multiples of 16 elements (64 bytes): every block is as aligned as
    the buffer, for vector loads and stores."""

    weight_offsets: tuple[int, ...]
    bias_offsets: tuple[int, ...]
    row: int  # elements per program (a multiple of 16)

    @classmethod
    def of(cls, layer_sizes) -> GradientLayout:
        def aligned(count: int) -> int:
            return -(-count // 16) * 16

        weight_offsets, bias_offsets, at = [], [], 0
        for d_in, d_out in zip(layer_sizes[:-1], layer_sizes[1:], strict=True):
            weight_offsets.append(at)
            at += aligned(d_out * d_in)
            bias_offsets.append(at)
            at += aligned(d_out)
        return cls(tuple(weight_offsets), tuple(bias_offsets), at)


def fused_mlp(
    weights: list[torch.Tensor],  # L x [M, d(i+1), d(i)] fp32 (bf16/fp16 for those precisions)
    biases: list[torch.Tensor],  # L x [M, d(i+1)] fp32
    x: torch.Tensor,  # [M, N, d0] or [N, d0] fp32, last dim contiguous
    targets: torch.Tensor,  # [M|-, N, dL] fp32 or [M|-, N] int64
    sample_weights: torch.Tensor | None,  # [M|-, N] fp32
    *,
    hidden_act: int,
    output_act: int,
    hidden_slope: float,
    output_slope: float,
    loss: int,
    delta: float,
    scale: float,
    precision: int,
    want_param_grads: bool,
    want_dx: bool,
    want_y: bool,
    want_norms: bool = False,
    clip: float | None = None,
    own_scale: float = 1.0,
    biased: tuple[bool, ...] | None = None,
    profile: list | None = None,
):
    """Launcher: check -> allocate -> grid -> launch. Returns (weight gradients L x [M,
    d(i+1), d(i)], bias gradients L x [M, d(i+1)]) or (None, None), dx [M, N, d0] or None,
    per-sample losses [M, N], outputs [M, N, dL] or None, per-sample gradient norms [M, N]
    or None. The gradients are views of one buffer (contiguous per model).
    With `clip` (DP-SGD) the gradients are clipped sums (want_norms is implied).
    `biased`: per layer, whether it has a bias (default: all do); the norms leave out those
    that do not (their zero biases' gradients are computed and left for the caller to drop).

    `profile` (benchmarks only): a list to receive (LaunchConfig, stamps), the kernel then
    built with timers. stamps int64 [M * S, 3 + blocks_per_split * (2L + 4)]: per program
    its SM, start and end in GPU nanoseconds, then per block of samples the SM cycle
    counter at: 0 block start, 1..L after forward layer 0..L-1, L+1 after the loss, L+2
    after the norm pass, L+3..2L+2 after backward layer L-1..0, 2L+3 block end."""
    want_norms = want_norms or clip is not None
    num_layers = len(weights)
    m = weights[0].shape[0]
    n, d_in = x.shape[-2], x.shape[-1]
    sizes = (d_in, *(w.shape[1] for w in weights))
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        assert w.shape == (m, sizes[i + 1], sizes[i]) and w.is_contiguous(), i
        assert b.shape == (m, sizes[i + 1]) and b.is_contiguous() and b.dtype == torch.float32
    assert x.stride(-1) == 1 and targets.is_contiguous()
    widths = padded_widths(sizes)
    exact = tuple(d == p for d, p in zip(sizes, widths, strict=True))
    dp = max(widths)
    device = x.device
    config = launch_config(widths, n, m, device, precision)
    block_n, splits, per_split = config.block_n, config.splits, config.blocks_per_split
    if device.type == "cuda" and faults_on_gpu(block_n, config.num_warps, precision):
        raise FaultingLaunch(
            f"BLOCK_N={block_n} with {config.num_warps} warps faults in precision {precision}"
        )

    f32 = dict(device=device, dtype=torch.float32)
    unused = torch.empty(1, **f32)
    layout = GradientLayout.of(widths)
    partials = torch.empty(m, splits, layout.row, **f32) if want_param_grads else unused
    dx = torch.empty(m, n, d_in, **f32) if want_dx else unused
    per = torch.empty(m, n, **f32)
    d_out = sizes[-1]
    y = torch.empty(m, n, d_out, **f32) if want_y else unused
    scratch = unused if config.resident else torch.empty(m, splits, num_layers, block_n, dp, **f32)
    norms = torch.empty(m, n, **f32) if want_norms else unused
    stamps = unused
    if profile is not None:
        stamps = torch.zeros(m * splits, 3 + per_split * (2 * num_layers + 4),
                             device=device, dtype=torch.int64)  # fmt: skip
        profile.append((config, stamps))
    shared_x = x.dim() == 2
    shared_t = targets.dim() == (1 if loss == 4 else 2)
    sw = sample_weights if sample_weights is not None else unused
    shared_w = sample_weights is not None and sample_weights.dim() == 1

    _fused_mlp_kernel[(m, splits)](
        x, tuple(weights), tuple(biases), targets, sw, partials, dx, per, y, scratch, norms,
        stamps,
        sizes, n, splits, per_split,
        0 if shared_x else x.stride(0), x.stride(-2),
        0 if shared_t else targets.stride(0), targets.stride(-2 if loss != 4 else -1),
        0 if shared_w else n,
        hidden_slope, output_slope, delta, scale, clip or 0.0, own_scale,
        L=num_layers, DP=dp, WIDTHS=widths, EXACT=exact,
        BIASED=tuple(int(b) for b in biased) if biased else (1,) * num_layers,
        DW_AT=layout.weight_offsets,
        DB_AT=layout.bias_offsets, GRAD_ROW=layout.row, BLOCK_N=block_n,
        HIDDEN_ACT=textbook_forms(hidden_act, precision),
        OUTPUT_ACT=textbook_forms(output_act, precision), LOSS=loss, PRECISION=precision,
        HAS_WEIGHTS=sample_weights is not None, WANT_PARAM_GRADS=want_param_grads,
        WANT_DX=want_dx, WANT_Y=want_y, NORMS=want_norms, CLIP=clip is not None,
        PROFILE=profile is not None, RESIDENT=config.resident,
        CARRY=config.carry and want_param_grads, FMA_K_CHUNK=config.fma_k_chunk,
        NARROW_OUT=narrow_output(d_out, precision),
        num_warps=config.num_warps, maxnreg=config.max_registers,
        # No software pipelining of the loop over blocks: a program walks few blocks, and
        # with values carried across them (`carry`) the pipeliner's buffers took more
        # shared memory than an SM has (352 KB at tf32 128/8 on sm_90); without carry,
        # launch_config's choices compile to the same code either way (sm_90, triton 3.6).
        num_stages=1, **LAUNCH_OPTIONS,
    )  # fmt: skip
    grads = None, None
    if want_param_grads:
        shapes = list(zip(sizes[1:], sizes[:-1], strict=True))  # (d(i+1), d(i))
        weight_at = [(at, d1 * d0) for at, (d1, d0) in zip(layout.weight_offsets, shapes,
                                                           strict=True)]  # fmt: skip
        bias_at = [(at, d1) for at, (d1, _) in zip(layout.bias_offsets, shapes, strict=True)]
        summed = sum_partials(partials, weight_at + bias_at)  # [M, GRAD_ROW]
        grads = (
            [summed[:, at : at + count].view(m, *shape)
             for (at, count), shape in zip(weight_at, shapes, strict=True)],
            [summed[:, at : at + count] for at, count in bias_at],
        )  # fmt: skip
    return (
        grads,
        dx if want_dx else None,
        per,
        y if want_y else None,
        norms if want_norms else None,
    )
