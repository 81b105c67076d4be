"""What the per-layer path's batched GEMM kernels share (triton_layered's, on tl.dot, and
gluon_matmul's IEEE float32 one, with its own per-thread tiles): which batch and tile a
program computes, and the epilogue that stores the tile."""

from __future__ import annotations

import triton
import triton.language as tl

from gradserve.kernels.triton_common import activate, activation_grad


@triton.jit
def batch_and_block(blocks_per_batch):
    """(batch, block within it) of this program, on a one-axis grid of B * blocks_per_batch
    programs: a batch's blocks run one after another, and the grid's first axis takes up to
    2**31 - 1 programs where the others stop at 65535 (a large N's blocks would not fit).
    The batch comes as int64: the ensemble's buffers can exceed 2**31 elements, so their
    per-batch bases are 64-bit while offsets within a batch stay 32-bit (a model's own
    tensors stay below 2**31 elements: triton_engine.fits_int32_offsets)."""
    program = tl.program_id(0)
    return (program // blocks_per_batch).to(tl.int64), program % blocks_per_batch


@triton.jit
def store_product(
    acc,  # [BLOCK_P, BLOCK_Q] fp32: this tile of A @ B
    rp,  # [BLOCK_P] its rows
    rq,  # [BLOCK_Q] its columns
    P,
    Q,
    batch,
    c_ptr,  # [B, P, Q] contiguous output
    bias_ptr,  # [B, Q] (EPILOGUE 1)
    aux_ptr,  # [B, P, Q] contiguous: act(out) output (EPILOGUE 1) or Z for act' (EPILOGUE 2)
    slope,
    # 0: C = A @ B;  1: C = A @ B + bias, aux = act(C);  2: C = (A @ B) * act'(aux)
    EPILOGUE: tl.constexpr,
    ACT: tl.constexpr,
):
    """The GEMM epilogue: bias and activation (forward) or the activation's derivative
    (backward) applied to the tile, and the tile stored."""
    out_mask = (rp[:, None] < P) & (rq[None, :] < Q)
    out_offsets = rp[:, None] * Q + rq[None, :]
    aux_batch = aux_ptr + batch * P * Q
    if EPILOGUE == 1:
        bias = tl.load(bias_ptr + batch * Q + rq, mask=rq < Q, other=0.0)
        acc = acc + bias[None, :]
        tl.store(aux_batch + out_offsets, activate(acc, ACT, slope), mask=out_mask)
    elif EPILOGUE == 2:
        z = tl.load(aux_batch + out_offsets, mask=out_mask, other=0.0)
        acc = acc * activation_grad(z, ACT, slope)
    tl.store(c_ptr + batch * P * Q + out_offsets, acc, mask=out_mask)
