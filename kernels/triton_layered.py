"""Per-layer Triton path for MLP ensembles of any width (used when a layer is wider than
the fused kernel's 128): one batched GEMM launch per layer and direction, with the bias,
activation and activation-derivative work fused into the GEMM epilogues.

Forward, layer i:   Z_i = H_i @ W_i^T + b_i   (epilogue: store Z_i and H_{i+1} = act(Z_i))
Loss:               dZ_L = dLoss/dY * act_out'(Z_L)   (one kernel over [M, N, dL])
Backward, layer i:  dW_i = dZ_i^T @ H_i,  db_i = column sums of dZ_i,
                    dZ_{i-1} = (dZ_i @ W_i) * act'(Z_{i-1})   (epilogue)
Shapes: H_i [M, N, d_i] (H_0 may be shared: stride 0 over M), W_i [M, d_(i+1), d_i].
Every reduction loops in a fixed order, so results are bit-identical run to run.

Torch twin: torch_engine.forward_loss (same math, autograd for the backward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gradserve.kernels.gemm_common import batch_and_block, store_product
from gradserve.kernels.partial_sums import multiprocessors, sum_partials
from gradserve.kernels.triton_common import LAUNCH_OPTIONS, activation_grad, loss_block, matmul


@triton.jit
def _batched_matmul_kernel(
    a_ptr,  # [B, P, K] (any strides)
    b_ptr,  # [B, K, Q] (any strides)
    c_ptr,  # [B, P, Q] contiguous output
    bias_ptr,  # [B, Q] (EPILOGUE 1)
    aux_ptr,  # [B, P, Q] contiguous: act(out) output (EPILOGUE 1) or Z for act' (EPILOGUE 2)
    P,
    Q,
    K,
    k_per_split,  # K itself, or (EPILOGUE 0) the K-range of one split (grid axis 1)
    stride_ab,
    stride_ap,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bq,
    slope,
    # 0: C = A @ B;  1: C = A @ B + bias, aux = act(C);  2: C = (A @ B) * act'(aux)
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid = (B * cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q), S), a batch's tiles one after
    # another; split s adds the products of K-range [s * k_per_split, (s + 1) * k_per_split)
    # into C's rows of batch b * S + s (S = 1: C itself)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    batch, tile = batch_and_block(tl.cdiv(P, BLOCK_P) * tiles_q)
    if EPILOGUE == 0:  # (the epilogues' kernels, never split, compile as they did before)
        split = tl.program_id(1)
        k_start = split * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        out = batch * tl.num_programs(1) + split
    else:
        k_start = 0
        k_end = K
        out = batch
    tp = tile // tiles_q
    tq = tile % tiles_q
    rp = tp * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = tq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch * stride_ab + rp[:, None] * stride_ap
    b_base = b_ptr + batch * stride_bb + rq[None, :] * stride_bq
    acc = tl.zeros([BLOCK_P, BLOCK_Q], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + rk
        a = tl.load(
            a_base + kk[None, :] * stride_ak,
            mask=(rp[:, None] < P) & (kk[None, :] < k_end),
            other=0.0,
        )
        b = tl.load(
            b_base + kk[:, None] * stride_bk,
            mask=(kk[:, None] < k_end) & (rq[None, :] < Q),
            other=0.0,
        )
        acc += matmul(a, b, PRECISION, BLOCK_K)  # one chunk: the K-tile itself
    store_product(acc, rp, rq, P, Q, out, c_ptr, bias_ptr, aux_ptr, slope, EPILOGUE, ACT)


@triton.jit
def _loss_kernel(
    y_ptr,  # [M, N, dL] outputs after the output activation
    z_ptr,  # [M, N, dL] pre-activations of the last layer
    t_ptr,  # targets
    sw_ptr,  # sample weights
    dz_ptr,  # [M, N, dL] out: dLoss/dZ_L
    per_ptr,  # [M, N] out: per-sample losses
    N,
    d_out,
    stride_tm,
    stride_tn,
    stride_swm,
    slope,
    delta,
    scale,
    OUTPUT_ACT: tl.constexpr,
    LOSS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    DP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid = (M * cdiv(N, BLOCK_N),)
    m, block = batch_and_block(tl.cdiv(N, BLOCK_N))
    rn = block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, DP)
    mask = (rn[:, None] < N) & (cols[None, :] < d_out)
    model = m * N * d_out
    offsets = rn[:, None] * d_out + cols[None, :]
    y = tl.load(y_ptr + model + offsets, mask=mask, other=0.0)
    per, dy = loss_block(
        y,
        t_ptr + m * stride_tm,
        stride_tn,
        sw_ptr + m * stride_swm,
        rn,
        cols,
        N,
        d_out,
        scale,
        delta,
        LOSS,
        HAS_WEIGHTS,
    )
    z = tl.load(z_ptr + model + offsets, mask=mask, other=0.0)
    tl.store(dz_ptr + model + offsets, dy * activation_grad(z, OUTPUT_ACT, slope), mask=mask)
    tl.store(per_ptr + m * N + rn, per, mask=rn < N)


@triton.jit
def _column_sum_kernel(
    x_ptr,  # [B, R, C] contiguous
    out_ptr,  # [B, C]
    R,
    C,
    r_per_split,  # R itself, or the rows of one split (grid axis 1)
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid = (B * cdiv(C, BLOCK_C), S); rows are added block by block, in order; split s
    # adds rows [s * r_per_split, (s + 1) * r_per_split) into out's row b * S + s
    batch, columns = batch_and_block(tl.cdiv(C, BLOCK_C))
    split = tl.program_id(1)
    r_start = split * r_per_split
    r_end = tl.minimum(R, r_start + r_per_split)
    rc = columns * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    x_batch = x_ptr + batch * R * C
    for r0 in range(r_start, r_end, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        block = tl.load(
            x_batch + rr[:, None] * C + rc[None, :],
            mask=(rr[:, None] < r_end) & (rc[None, :] < C),
            other=0.0,
        )
        acc += tl.sum(block, 0)
    tl.store(out_ptr + (batch * tl.num_programs(1) + split) * C + rc, acc, mask=rc < C)


# 128x128 tiles with 8 warps and 3 pipeline stages keep a GPU's tensor cores busy on large
# products (bench/layered_sweep.py times the alternatives); 64x64 is enough for small ones
# and the interpreter.
LARGE_TILES = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=32, num_warps=8, num_stages=3)
SMALL_TILES = dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=32, num_warps=4)


# Kernels for IEEE float32 products (PRECISION 0), layered_mlp's `ieee_gemm`: "tl.dot",
# the kernel above (Triton gives a thread at most 4x4 outputs: 1.4 to 1.7 shared-memory
# bytes per FMA on sm_90, and 67% of torch's float32 matmul at width 1024 on an H100), or
# "gluon", the same GEMM with 8x8 outputs a thread (gluon_matmul.py: 1.00 byte per FMA, no
# spills), which triton_engine.run(..., float32_matmul="gluon") selects.
IEEE_GEMMS = ("tl.dot", "gluon")


# A weight gradient's product sums over the N samples (K = N), and a bias gradient's
# column sums over N rows. With few models and narrow layers their grids have few programs,
# each adding all N samples: one model with a [256, 256] layer is four 128x128 tiles, four
# programs that each loop over all of a million samples while a GPU of 132 SMs waits. Such
# sums are split: each program adds a range of at least SPLIT_MIN_LENGTH samples, as many
# ranges as take the grid to about SPLIT_PROGRAMS_PER_SM programs per SM, and the ranges'
# partial sums are then added in a fixed order (partial_sums.sum_partials): the same bits on
# every run on a device, as the fused kernel's sample splits give. Where the grid already
# has a program per SM, or N is small, nothing is split (nor on the interpreter, which has
# no SMs to fill). The tl.dot GEMM and the IEEE float32 one on Gluon split alike. Where
# split, each float32 running sum also adds fewer samples (its error grows with their
# count; torch_engine.SAMPLE_CHUNK bounds the torch engine's alike). Not yet timed on a
# GPU: bench/split_sums.py times split against unsplit.
SPLIT_MIN_LENGTH = 4096
SPLIT_PROGRAMS_PER_SM = 2


def split_length(length: int, programs: int, sms: int) -> int:
    """The samples (rows, K) each program of a grid of `programs` tiles adds, for a sum
    over `length` of them on a device of `sms` SMs: `length` itself (no split), or ranges
    of a multiple of 128 samples, at least SPLIT_MIN_LENGTH."""
    if programs >= sms:
        return length
    splits = min(triton.cdiv(SPLIT_PROGRAMS_PER_SM * sms, programs), length // SPLIT_MIN_LENGTH)
    if splits <= 1:
        return length
    return triton.cdiv(triton.cdiv(length, splits), 128) * 128


def takes_large_tiles(p: int, q: int) -> bool:
    """Whether a [P, Q] product is large enough for LARGE_TILES on a GPU."""
    return min(p, q) >= 128


def _tiles(p: int, q: int, device: torch.device) -> dict:
    """Tile sizes of a [P, Q] product. Fixed per shape (no autotuning), so results are the
    same bits in every process."""
    if device.type == "cuda" and takes_large_tiles(p, q):
        return dict(LARGE_TILES)
    return dict(SMALL_TILES)


def batched_matmul(
    a, b, *, bias=None, aux=None, epilogue=0, act=0, slope=0.0, precision=0, batch: int, out=None,
    ieee_gemm: str = "tl.dot",
):  # fmt: skip
    """Launcher: C[i] = a[i] @ b[i] (+ epilogue). a [B|-, P, K], b [B|-, K, Q] (stride 0 over
    a shared batch), C [B, P, Q] fp32 contiguous; IEEE float32 on the `ieee_gemm` kernel.
    A plain product (epilogue 0) whose grid leaves SMs idle splits K (split_length)."""
    p, k = a.shape[-2], a.shape[-1]
    q = b.shape[-1]
    assert b.shape[-2] == k, (a.shape, b.shape)
    c = out if out is not None else torch.empty(batch, p, q, device=a.device, dtype=torch.float32)
    gluon = precision == 0 and ieee_gemm == "gluon"
    if gluon:
        from gradserve.kernels import gluon_matmul  # Gluon: Triton 3.6 and later

        tiles = gluon_matmul.tiles_for(p, q, a.device)
    else:
        tiles = _tiles(p, q, a.device)
    programs = batch * triton.cdiv(p, tiles["BLOCK_P"]) * triton.cdiv(q, tiles["BLOCK_Q"])
    k_per_split = split_length(k, programs, multiprocessors(a.device)) if epilogue == 0 else k
    splits = triton.cdiv(k, k_per_split)
    partial = c if splits == 1 else c.new_empty(batch, splits, p, q)
    if gluon:
        gluon_matmul.launch(a, b, partial, bias, aux, batch, epilogue=epilogue, act=act,
                            slope=slope, tiles=tiles, k_per_split=k_per_split)  # fmt: skip
    else:
        _batched_matmul_kernel[(programs, splits)](
            a, b, partial, bias if bias is not None else c, aux if aux is not None else c,
            p, q, k, k_per_split,
            a.stride(0) if a.dim() == 3 else 0, a.stride(-2), a.stride(-1),
            b.stride(0) if b.dim() == 3 else 0, b.stride(-2), b.stride(-1),
            slope,
            EPILOGUE=epilogue, ACT=act, PRECISION=precision, **tiles, **LAUNCH_OPTIONS,
        )  # fmt: skip
    if splits > 1:
        c.view(batch, p * q).copy_(sum_partials(partial.view(batch, splits, p * q), [(0, p * q)]))
    return c


class LossBlockShape(NamedTuple):
    dp: int  # the output width padded to a power of two >= 16
    block_n: int  # samples per program
    num_warps: int


# Most elements of a loss kernel's [BLOCK_N, DP] tile, 16 a thread at 4 warps.
LOSS_TILE = 2048


def loss_block_shape(d_out: int) -> LossBlockShape:
    """The loss kernel's tile for `d_out` outputs: 32 samples a program while their rows
    fit LOSS_TILE elements, fewer (down to one) for wider outputs, and 8 warps for rows
    wider than 4096. A fixed 32 rows gave a 1024-wide output 8 to 27 KB of spills a thread
    and 8192 outputs a 4-minute compile (mse; cross-entropy over 10) on sm_90 with triton
    3.6; these tiles spill nothing there (tests/kernels/sm90_resources_check.py)."""
    dp = max(16, triton.next_power_of_2(d_out))
    block_n = max(1, min(32, LOSS_TILE // dp))
    return LossBlockShape(dp, block_n, 4 if dp * block_n <= 2 * LOSS_TILE else 8)


def column_sum(x: torch.Tensor) -> torch.Tensor:
    """[B, R, C] -> [B, C], rows added in a fixed order (split as split_length says)."""
    b, r, c = x.shape
    programs = b * triton.cdiv(c, 64)
    rows_per_split = split_length(r, programs, multiprocessors(x.device))
    splits = triton.cdiv(r, rows_per_split)
    out = torch.empty(b, splits, c, device=x.device, dtype=torch.float32)
    _column_sum_kernel[(programs, splits)](
        x, out, r, c, rows_per_split, BLOCK_R=32, BLOCK_C=64, **LAUNCH_OPTIONS
    )
    return sum_partials(out, [(0, c)])


def layered_mlp(
    weights,
    biases,
    x,
    targets,
    sample_weights,
    *,
    hidden_act,
    output_act,
    hidden_slope,
    output_slope,
    loss,
    delta,
    scale,
    precision,
    want_param_grads,
    want_dx,
    want_y,
    narrow: torch.dtype | None = None,
    ieee_gemm: str = "tl.dot",
):
    """Forward, loss and backward layer by layer. weights[i] [M, d(i+1), d(i)] fp32 (or
    `narrow`), biases[i] [M, d(i+1)] fp32, x [M, N, d0] or [N, d0] (fp32 or `narrow`).
    Returns (weight grads, bias grads) or (None, None), dx or None, per-sample losses
    [M, N], outputs or None.

    `narrow` (bf16/fp16 jobs): the matmul operands' dtype. The weights and inputs come in
    it, and the hidden activations are stored in it: they are matmul operands only, and
    would be rounded to it anyway, so the results are the same bits, with half the bytes
    loaded and the tensor cores' shared-memory operand read as loaded, not converted first.
    Pre-activations, outputs and dLoss/dZ stay fp32 (activation derivatives, the loss and
    the bias gradients' sums need them).

    `ieee_gemm`: the kernel of IEEE float32 products (IEEE_GEMMS)."""
    if ieee_gemm not in IEEE_GEMMS:
        raise ValueError(f"ieee_gemm must be one of {IEEE_GEMMS}, not {ieee_gemm!r}")
    gemm = dict(precision=precision, ieee_gemm=ieee_gemm)
    m = weights[0].shape[0]
    n = x.shape[-2]
    num_layers = len(weights)
    f32 = dict(device=x.device, dtype=torch.float32)
    hs, zs = [x], []
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        last = i == num_layers - 1
        act, slope = (output_act, output_slope) if last else (hidden_act, hidden_slope)
        z = torch.empty(m, n, w.shape[1], **f32)
        h_dtype = narrow if narrow is not None and not last else torch.float32
        h = torch.empty(m, n, w.shape[1], device=x.device, dtype=h_dtype)
        # W^T as a [K=d_in, Q=d_out] operand: strides of W swapped, no copy
        batched_matmul(
            hs[-1],
            w.transpose(1, 2),
            bias=b,
            aux=h,
            epilogue=1,
            act=act,
            slope=slope,
            **gemm,
            batch=m,
            out=z,
        )
        zs.append(z)
        hs.append(h)

    d_out = weights[-1].shape[1]
    dz = torch.empty(m, n, d_out, **f32)
    per = torch.empty(m, n, **f32)
    shared_t = targets.dim() == (1 if loss == 4 else 2)
    sw = sample_weights if sample_weights is not None else per
    shared_w = sample_weights is not None and sample_weights.dim() == 1
    shape = loss_block_shape(d_out)
    _loss_kernel[(m * triton.cdiv(n, shape.block_n),)](
        hs[-1], zs[-1], targets, sw, dz, per, n, d_out,
        0 if shared_t else targets.stride(0), targets.stride(-1 if loss == 4 else -2),
        0 if shared_w else n, output_slope, delta, scale,
        OUTPUT_ACT=output_act, LOSS=loss, HAS_WEIGHTS=sample_weights is not None,
        DP=shape.dp, BLOCK_N=shape.block_n, num_warps=shape.num_warps, **LAUNCH_OPTIONS,
    )  # fmt: skip

    dws, dbs, dx = [None] * num_layers, [None] * num_layers, None
    for i in reversed(range(num_layers)):
        if want_param_grads:
            # dW = dZ^T @ H: dZ^T as a [P=d_out, K=N] operand via swapped strides
            dws[i] = batched_matmul(dz.transpose(1, 2), hs[i], **gemm, batch=m)
            dbs[i] = column_sum(dz)
        if i > 0:
            dz = batched_matmul(
                dz,
                weights[i],
                aux=zs[i - 1],
                epilogue=2,
                act=hidden_act,
                slope=hidden_slope,
                **gemm,
                batch=m,
            )
        elif want_dx:
            dx = batched_matmul(dz, weights[0], **gemm, batch=m)
    grads = (dws, dbs) if want_param_grads else (None, None)
    return grads, dx, per, (hs[-1] if want_y else None)
