"""Fused forward + loss + backward of an MLP ensemble in one Triton launch (widths <= 128).

Shapes (M models, N samples, L layers; each width d(i) padded to P(i), a power of two >= 16,
and DP = the largest P(i) is the storage stride):
  weights  [M, L, DP, DP]  zero-padded copy of the job's [M, d(i+1), d(i)] weights
  biases   [M, L, DP]
  inputs   [M, N, d0] or shared [N, d0] (read in place, stride 0 over M when shared)
  partial weight/bias gradients  [M, S, L, DP, DP] / [M, S, L, DP]
  scratch  [M, S, L, BLOCK_N, DP]  pre-activations of the block in flight

Layer i computes on [P(i+1), P(i)] tiles, not [DP, DP]: a network like [32, 64, 64, 64, 1]
multiplies 32-wide inputs and a 16-wide output layer, not four 64 x 64 layers. Only the
top-left [P(i+1), P(i)] corner of a layer's weight and gradient storage is read or written.

grid = (M, S): program (m, s) owns model m and the s-th slice of its samples. It walks its
slice BLOCK_N samples at a time: forward through all L layers (weights stay in L1/L2, the
block's pre-activations go to the program's own small scratch, which stays in L2), loss
and dLoss/dy in registers, then backward through the layers, accumulating the weight and
bias gradients of its slice in its own partial buffer. No float atomics: a second kernel
adds the S partials in a fixed order, so repeated runs give identical bits.

The zero padding is harmless: padded weight rows and columns are 0, so padded features
never reach a real one, and their gradients come out 0 and are sliced away (so is whatever
lies outside each layer's corner of the gradient buffers, which are never zeroed).

Torch twin: torch_engine.forward_loss (same math, autograd for the backward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gradserve.kernels.triton_common import (
    PRECISION_CODES,
    activate,
    activation_grad,
    cycle_counter,
    loss_block,
    matmul,
    nanosecond_timer,
    sm_id,
)


@triton.jit
def _block_tile(rows, WIDTH: tl.constexpr, DP: tl.constexpr):
    """Offsets of a [BLOCK_N, WIDTH] block stored with row stride DP."""
    return rows[:, None] * DP + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _weight_tile(OUT: tl.constexpr, IN: tl.constexpr, DP: tl.constexpr):
    """Offsets of the [OUT, IN] corner of a [DP, DP] weight."""
    return tl.arange(0, OUT)[:, None] * DP + tl.arange(0, IN)[None, :]


@triton.jit
def _layer_weight(w_model, layer: tl.constexpr, DP: tl.constexpr, WIDTHS: tl.constexpr):
    """The [P(layer+1), P(layer)] weight of `layer` (zero-padded, as stored)."""
    return tl.load(w_model + layer * DP * DP + _weight_tile(WIDTHS[layer + 1], WIDTHS[layer], DP))


@triton.jit
def _stamp(stamps, index, PROFILE: tl.constexpr):
    """Profiling builds only: record the cycle counter at one of a block's phase ends."""
    if PROFILE:
        tl.store(stamps + index, cycle_counter())


@triton.jit
def _pre_activation_grad(
    g, z_prog, rows, slope, layer: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
    DP: tl.constexpr, WIDTHS: tl.constexpr, HIDDEN_ACT: tl.constexpr, OUTPUT_ACT: tl.constexpr,
):  # fmt: skip
    """dLoss/dz of `layer` (from the scratch's pre-activation) given dLoss/d(its output)."""
    z = tl.load(z_prog + layer * BLOCK_N * DP + _block_tile(rows, WIDTHS[layer + 1], DP))
    if layer == L - 1:
        dz = g * activation_grad(z, OUTPUT_ACT, slope)
    else:
        dz = g * activation_grad(z, HIDDEN_ACT, slope)
    return dz


@triton.jit
def _layer_input(
    z_prog, x_block, x_mask, rows, slope, layer: tl.constexpr, BLOCK_N: tl.constexpr,
    DP: tl.constexpr, WIDTHS: tl.constexpr, HIDDEN_ACT: tl.constexpr,
):  # fmt: skip
    """The block's input to `layer`: its inputs, or the previous layer's activation."""
    if layer > 0:
        z = tl.load(z_prog + (layer - 1) * BLOCK_N * DP + _block_tile(rows, WIDTHS[layer], DP))
        h = activate(z, HIDDEN_ACT, slope)
    else:
        h = tl.load(x_block, mask=x_mask, other=0.0)
    return h


@triton.jit
def _fused_mlp_kernel(
    # pointers
    x_ptr,  # inputs, fp32, [M, N, d0] or [N, d0]
    w_ptr,  # padded weights, [M, L, DP, DP] (fp32, or the narrow operand dtype)
    b_ptr,  # padded biases, fp32, [M, L, DP]
    t_ptr,  # targets: fp32 [M|-, N, dL] or int [M|-, N]
    sw_ptr,  # sample weights, fp32 [M|-, N] (unused without HAS_WEIGHTS)
    dw_ptr,  # partial weight gradients, fp32 [M, S, L, DP, DP]
    db_ptr,  # partial bias gradients, fp32 [M, S, L, DP]
    dx_ptr,  # input gradients, fp32 [M, N, d0] (unused without WANT_DX)
    per_ptr,  # per-sample losses, fp32 [M, N]
    y_ptr,  # outputs, fp32 [M, N, dL] (unused without WANT_Y)
    z_ptr,  # scratch, fp32 [M, S, L, BLOCK_N, DP]
    norm_ptr,  # per-sample gradient norms, fp32 [M, N] (unused without NORMS)
    widths_ptr,  # int32 [L + 1]: layer_sizes (NORMS only)
    profile_ptr,  # int64 [M * S, 3 + blocks_per_split * (2L + 4)] (PROFILE only)
    # sizes
    N,
    d_in,  # d0
    d_out,  # dL
    S,  # sample splits per model (grid axis 1)
    blocks_per_split,
    # strides (elements); 0 on the model axis for shared tensors
    stride_xm,
    stride_xn,
    stride_tm,
    stride_tn,
    stride_swm,
    # scalars
    slope,  # leaky_relu negative slope
    delta,  # huber delta
    scale,  # 1 / count (mean) or 1 (sum)
    clip,  # DP clip norm (CLIP only)
    own_scale,  # N (mean) or 1 (sum): contribution norm -> own-loss norm (CLIP only)
    # meta
    L: tl.constexpr,
    DP: tl.constexpr,  # storage stride: the largest of WIDTHS
    WIDTHS: tl.constexpr,  # (P0, ..., PL): each layer width padded to a power of two >= 16
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
):
    m = tl.program_id(0)
    s = tl.program_id(1)
    rows = tl.arange(0, BLOCK_N)
    in_cols = tl.arange(0, WIDTHS[0])
    out_cols = tl.arange(0, WIDTHS[L])
    w_model = w_ptr + m * (L * DP * DP)
    b_model = b_ptr + m * (L * DP)
    program = m * S + s
    z_prog = z_ptr + program * (L * BLOCK_N * DP)
    dw_prog = dw_ptr + program * (L * DP * DP)
    db_prog = db_ptr + program * (L * DP)
    x_model = x_ptr + m * stride_xm
    profile = profile_ptr + program * (3 + blocks_per_split * (2 * L + 4))
    if PROFILE:
        tl.store(profile, sm_id().to(tl.int64))
        tl.store(profile + 1, nanosecond_timer())

    for blk in range(0, blocks_per_split):
        stamps = profile + 3 + blk * (2 * L + 4)
        _stamp(stamps, 0, PROFILE)
        rn = (s * blocks_per_split + blk) * BLOCK_N + rows
        rmask = rn < N
        x_offsets = rn[:, None] * stride_xn + in_cols[None, :]
        x_mask = rmask[:, None] & (in_cols[None, :] < d_in)
        h = tl.load(x_model + x_offsets, mask=x_mask, other=0.0)

        # forward: keep each layer's pre-activation in the scratch for the backward pass
        for layer in tl.static_range(L):
            w = _layer_weight(w_model, layer, DP, WIDTHS)
            b = tl.load(b_model + layer * DP + tl.arange(0, WIDTHS[layer + 1]))
            z = matmul(h, tl.trans(w), PRECISION) + b[None, :]
            tl.store(z_prog + layer * BLOCK_N * DP + _block_tile(rows, WIDTHS[layer + 1], DP), z)
            if layer == L - 1:
                h = activate(z, OUTPUT_ACT, slope)
            else:
                h = activate(z, HIDDEN_ACT, slope)
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
        tl.store(per_ptr + m * N + rn, per, mask=rmask)
        if WANT_Y:
            y_offsets = m * N * d_out + rn[:, None] * d_out + out_cols[None, :]
            tl.store(y_ptr + y_offsets, h, mask=rmask[:, None] & (out_cols[None, :] < d_out))
        tl.debug_barrier()  # scratch writes visible to every thread of the program
        _stamp(stamps, L + 1, PROFILE)

        if NORMS:
            # A first backward pass for each sample's gradient norm: a linear layer's weight
            # gradient of one sample is dz a^T, so its squared norm is |dz|^2 (|a|^2 + 1)
            # with the bias. Input gradients come from this pass (clipping leaves them be).
            gn = g
            sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            for layer in tl.static_range(L - 1, -1, -1):  # last layer first
                dz = _pre_activation_grad(
                    gn, z_prog, rows, slope, layer, L, BLOCK_N, DP, WIDTHS, HIDDEN_ACT, OUTPUT_ACT
                )  # fmt: skip
                h_in = _layer_input(
                    z_prog, x_model + x_offsets, x_mask, rows, slope, layer, BLOCK_N, DP, WIDTHS,
                    HIDDEN_ACT,
                )  # fmt: skip
                # padded input features may be non-zero (sigmoid(0)): count real ones only
                real = tl.arange(0, WIDTHS[layer]) < tl.load(widths_ptr + layer)
                h_in = tl.where(real[None, :], h_in, 0.0)
                sq += tl.sum(dz * dz, 1) * (tl.sum(h_in * h_in, 1) + 1.0)
                if layer > 0 or WANT_DX:
                    w = _layer_weight(w_model, layer, DP, WIDTHS)
                    gn = matmul(dz, w, PRECISION)
            if WANT_DX:
                dx_offsets = m * N * d_in + rn[:, None] * d_in + in_cols[None, :]
                tl.store(dx_ptr + dx_offsets, gn, mask=x_mask)
            norm = tl.sqrt(sq)
            tl.store(norm_ptr + m * N + rn, norm, mask=rmask)
            if CLIP:  # backprop is linear in dLoss/dy: scaling it scales the whole gradient
                factor = tl.minimum(clip / (norm * own_scale + 1e-6), 1.0)
                g = g * factor[:, None]
        _stamp(stamps, L + 2, PROFILE)

        # backward, last layer first
        if WANT_PARAM_GRADS or (WANT_DX and not NORMS):
            for layer in tl.static_range(L - 1, -1, -1):  # last layer first
                dz = _pre_activation_grad(
                    g, z_prog, rows, slope, layer, L, BLOCK_N, DP, WIDTHS, HIDDEN_ACT, OUTPUT_ACT
                )  # fmt: skip
                if WANT_PARAM_GRADS:
                    h_in = _layer_input(
                        z_prog, x_model + x_offsets, x_mask, rows, slope, layer, BLOCK_N, DP,
                        WIDTHS, HIDDEN_ACT,
                    )  # fmt: skip
                    corner = _weight_tile(WIDTHS[layer + 1], WIDTHS[layer], DP)
                    bias_cols = tl.arange(0, WIDTHS[layer + 1])
                    dw = matmul(tl.trans(dz), h_in, PRECISION)
                    db = tl.sum(dz, 0)
                    if blk > 0:  # fixed order: this program's blocks, one after another
                        dw += tl.load(dw_prog + layer * DP * DP + corner)
                        db += tl.load(db_prog + layer * DP + bias_cols)
                    tl.store(dw_prog + layer * DP * DP + corner, dw)
                    tl.store(db_prog + layer * DP + bias_cols, db)
                if layer > 0 or (WANT_DX and not NORMS):
                    w = _layer_weight(w_model, layer, DP, WIDTHS)
                    g = matmul(dz, w, PRECISION)
                _stamp(stamps, 2 * L + 2 - layer, PROFILE)
            if WANT_DX and not NORMS:
                dx_offsets = m * N * d_in + rn[:, None] * d_in + in_cols[None, :]
                tl.store(dx_ptr + dx_offsets, g, mask=x_mask)
        tl.debug_barrier()  # the next block overwrites the scratch
        _stamp(stamps, 2 * L + 3, PROFILE)
    if PROFILE:
        tl.store(profile + 2, nanosecond_timer())


@triton.jit
def _sum_partials_kernel(
    partial_ptr,  # [R, S, C] fp32
    out_ptr,  # [R, C] fp32
    S,
    C,
    BLOCK: tl.constexpr,
):
    """out[r] = sum over s of partial[r, s], s ascending: a fixed-order reduction."""
    # grid = (R, cdiv(C, BLOCK))
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(partial_ptr + (r * S + s) * C + offs, mask=mask, other=0.0)
    tl.store(out_ptr + r * C + offs, acc, mask=mask)


def sum_partials(partial: torch.Tensor) -> torch.Tensor:
    """[R, S, ...] -> [R, ...] summed over S in a fixed order (no atomics)."""
    r, s = partial.shape[:2]
    if s == 1:
        return partial[:, 0]
    flat = partial.reshape(r, s, -1)
    out = torch.empty(r, flat.shape[2], device=partial.device, dtype=torch.float32)
    block = 1024
    _sum_partials_kernel[(r, triton.cdiv(flat.shape[2], block))](
        flat, out, s, flat.shape[2], BLOCK=block
    )
    return out.reshape(r, *partial.shape[2:])


def padded_width(layer_sizes) -> int:
    """DP: the storage stride of weights, gradients and scratch (the widest padded layer)."""
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


def launch_config(dp: int, n: int, m: int, device: torch.device, precision: int) -> LaunchConfig:
    """How to launch a job.

    BLOCK_N: 128 samples per block up to DP=64, 32 at DP=128, keeping the [BLOCK_N, DP]
    fp32 blocks in registers; larger blocks mean fewer weight reloads and partial-gradient
    updates per sample. IEEE float32 multiplies on the FMA units, whose operands need more
    registers: at DP=64 it takes 64 samples per block, which on sm_90 issues as many
    instructions per sample as 128 with a quarter of the spill traffic, and with the DP
    norm pass half the instructions and 1/34 of the spill traffic per sample
    (bench/results/ptxas_sm90.md). S: enough programs to fill the GPU (4 per SM) when M
    alone does not; on the interpreter one split is enough. No register cap: at 255
    registers a program of 8 warps has an SM to itself; bench/fused_sweep.py measures the
    capped alternatives (more programs per SM, some spills) against this choice.
    """
    if dp == 128:
        block_n = 32
    elif dp == 64 and precision == PRECISION_CODES["float32"]:
        block_n = 64
    else:
        block_n = 128
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    num_warps = 4 if dp * block_n <= 32 * 64 else 8
    return LaunchConfig(block_n, *sample_splits(n, block_n, m, device), num_warps)


def sample_splits(n: int, block_n: int, m: int, device: torch.device) -> tuple[int, int]:
    """(S, blocks_per_split): the N samples' blocks of BLOCK_N dealt to S programs per model."""
    blocks = triton.cdiv(n, block_n)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, triton.cdiv(4 * sms, m))
    else:
        want = 1
    per_split = triton.cdiv(blocks, min(blocks, want))
    return triton.cdiv(blocks, per_split), per_split


def fused_mlp(
    weights_padded: torch.Tensor,  # [M, L, DP, DP] fp32 (bf16/fp16 for those precisions)
    biases_padded: torch.Tensor,  # [M, L, DP] fp32
    x: torch.Tensor,  # [M, N, d0] or [N, d0] fp32, last dim contiguous
    targets: torch.Tensor,  # [M|-, N, dL] fp32 or [M|-, N] int64
    sample_weights: torch.Tensor | None,  # [M|-, N] fp32
    *,
    d_out: int,
    hidden_act: int,
    output_act: int,
    slope: float,
    loss: int,
    delta: float,
    scale: float,
    precision: int,
    want_param_grads: bool,
    want_dx: bool,
    want_y: bool,
    layer_sizes,
    want_norms: bool = False,
    clip: float | None = None,
    own_scale: float = 1.0,
    profile: list | None = None,
):
    """Launcher: check -> allocate -> grid -> launch. Returns padded gradients
    ([M, L, DP, DP], [M, L, DP], meaningful only in each layer's [d(i+1), d(i)] corner) or
    (None, None), dx [M, N, d0] or None, per-sample losses [M, N], outputs [M, N, dL] or
    None, per-sample gradient norms [M, N] or None.
    With `clip` (DP-SGD) the gradients are clipped sums (want_norms is implied).

    `profile` (benchmarks only): a list to receive (LaunchConfig, stamps), the kernel then
    built with timers. stamps int64 [M * S, 3 + blocks_per_split * (2L + 4)]: per program
    its SM, start and end in GPU nanoseconds, then per block of samples the SM cycle
    counter at: 0 block start, 1..L after forward layer 0..L-1, L+1 after the loss, L+2
    after the norm pass, L+3..2L+2 after backward layer L-1..0, 2L+3 block end."""
    want_norms = want_norms or clip is not None
    m, num_layers, dp, _ = weights_padded.shape
    n, d_in = x.shape[-2], x.shape[-1]
    widths = padded_widths(layer_sizes)
    assert len(widths) == num_layers + 1 and max(widths) == dp and widths[0] >= d_in
    assert weights_padded.is_contiguous() and x.stride(-1) == 1 and targets.is_contiguous()
    device = x.device
    config = launch_config(dp, n, m, device, precision)
    block_n, splits, per_split = config.block_n, config.splits, config.blocks_per_split

    f32 = dict(device=device, dtype=torch.float32)
    if want_param_grads:
        dw = torch.empty(m, splits, num_layers, dp, dp, **f32)
        db = torch.empty(m, splits, num_layers, dp, **f32)
    else:
        dw = db = torch.empty(1, **f32)
    dx = torch.empty(m, n, d_in, **f32) if want_dx else torch.empty(1, **f32)
    per = torch.empty(m, n, **f32)
    y = torch.empty(m, n, d_out, **f32) if want_y else torch.empty(1, **f32)
    scratch = torch.empty(m, splits, num_layers, block_n, dp, **f32)
    norms = torch.empty(m, n, **f32) if want_norms else torch.empty(1, **f32)
    stamps = per  # unused unless profiling
    if profile is not None:
        stamps = torch.zeros(m * splits, 3 + per_split * (2 * num_layers + 4),
                             device=device, dtype=torch.int64)  # fmt: skip
        profile.append((config, stamps))
    # the norm pass's mask of real features (a host-to-device copy: only when needed)
    real_widths = torch.tensor(layer_sizes, device=device, dtype=torch.int32) if want_norms else per
    shared_x = x.dim() == 2
    shared_t = targets.dim() == (1 if loss == 4 else 2)
    sw = sample_weights if sample_weights is not None else per
    shared_w = sample_weights is not None and sample_weights.dim() == 1

    _fused_mlp_kernel[(m, splits)](
        x, weights_padded, biases_padded, targets, sw, dw, db, dx, per, y, scratch, norms,
        real_widths, stamps,
        n, d_in, d_out, splits, per_split,
        0 if shared_x else x.stride(0), x.stride(-2),
        0 if shared_t else targets.stride(0), targets.stride(-2 if loss != 4 else -1),
        0 if shared_w else n,
        slope, delta, scale, clip or 0.0, own_scale,
        L=num_layers, DP=dp, WIDTHS=widths, BLOCK_N=block_n, HIDDEN_ACT=hidden_act,
        OUTPUT_ACT=output_act, LOSS=loss, PRECISION=precision,
        HAS_WEIGHTS=sample_weights is not None, WANT_PARAM_GRADS=want_param_grads,
        WANT_DX=want_dx, WANT_Y=want_y, NORMS=want_norms, CLIP=clip is not None,
        PROFILE=profile is not None,
        num_warps=config.num_warps, maxnreg=config.max_registers,
    )  # fmt: skip
    grads = (sum_partials(dw), sum_partials(db)) if want_param_grads else (None, None)
    return (
        grads,
        dx if want_dx else None,
        per,
        y if want_y else None,
        norms if want_norms else None,
    )
