"""The per-layer path's batched GEMM in IEEE float32 as a Gluon kernel: each thread
computes an 8x8 block of outputs, where Triton's tl.dot gives a thread at most 4x4.

Why: on the FMA units a product's speed is set by the shared memory each FMA needs. A
thread with an r x c block of outputs loads r + c operands per r * c FMAs: 4x4 costs 2
bytes per FMA, 8x8 one, and an H100 SM returns 128 bytes of shared memory a clock against
128 FMAs (bench/results/fma_tiles_sm90.md). Gluon (triton.experimental.gluon, in the same
wheel as Triton) lets the kernel say which outputs each thread holds.

Same interface as triton_layered._batched_matmul_kernel with PRECISION 0, and its results
up to float32 rounding: C = A @ B with the same epilogues (gemm_common.store_product),
every output accumulated with FMAs in K order (tl.dot's adds per-tile sums instead), so
results are bit-identical run to run. The K loop per tile: each of BLOCK_K steps adds the
outer product of a column of A and a row of B from the tiles in shared memory (A
column-major, so a thread's 8 rows of a column are contiguous, B row-major), while the
next tiles' global loads are in flight; those then go from registers into the other copy
of the tiles, and one barrier a K step lets every thread on (shared memory double-buffered
as in CUTLASS's SIMT GEMMs; `buffers=1` keeps one copy, two barriers a step, which
bench/layered_sweep.py times against).

Under TRITON_INTERPRET=1 the launcher runs it with gluon_cpu (Triton's interpreter has no
Gluon).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from gradserve.kernels import gluon_cpu
from gradserve.kernels.gemm_common import batch_and_block, store_product
from gradserve.kernels.triton_common import LAUNCH_OPTIONS
from gradserve.kernels.triton_engine import interpreted

# Gluon's CTA barrier is thread_barrier in triton 3.6 and barrier from 3.7.
if hasattr(gl, "barrier"):

    @gluon.jit
    def _sync_threads():
        gl.barrier()

else:

    @gluon.jit
    def _sync_threads():
        gl.thread_barrier()


@gluon.jit
def _k_step(acc, a_s, b_s, a_next_s, b_next_s, a_ptrs, b_ptrs, a_rows, b_cols, ak, bk, k1, K,
            stride_ak, stride_bk, ACC: gl.constexpr, BLOCK_K: gl.constexpr,
            BUFFERS: gl.constexpr):  # fmt: skip
    """One K step: acc plus the products of the tiles in a_s and b_s, and the tiles from
    K offset k1 on stored into a_next_s and b_next_s (the same memory with one copy)."""
    # The next tiles' loads go out before this tile's FMAs, which hide their latency (past
    # the end of K they are masked off: no memory is read).
    a_next = gl.load(a_ptrs + k1 * stride_ak, mask=a_rows & (k1 + ak[None, :] < K), other=0.0)
    b_next = gl.load(b_ptrs + k1 * stride_bk, mask=(k1 + bk[:, None] < K) & b_cols, other=0.0)
    for k in gl.static_range(BLOCK_K):
        acc += a_s.slice(k, 1, dim=1).load(ACC) * b_s.slice(k, 1, dim=0).load(ACC)
    if BUFFERS == 1:
        _sync_threads()  # every thread is done with the tiles about to be overwritten
    a_next_s.store(a_next)
    b_next_s.store(b_next)
    _sync_threads()  # the next tiles are in
    return acc


@gluon.jit
def _fp32_batched_matmul_kernel(
    a_ptr,  # [B, P, K] (any strides)
    b_ptr,  # [B, K, Q] (any strides)
    c_ptr,  # [B, P, Q] contiguous output
    bias_ptr,  # [B, Q] (EPILOGUE 1)
    aux_ptr,  # [B, P, Q] contiguous (store_product)
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
    EPILOGUE: gl.constexpr,
    ACT: gl.constexpr,
    BLOCK_P: gl.constexpr,
    BLOCK_Q: gl.constexpr,
    BLOCK_K: gl.constexpr,
    ACC: gl.constexpr,  # the accumulator's layout: 8x8 outputs a thread
    A_LOAD: gl.constexpr,  # layouts the operand tiles are loaded in, for their strides
    B_LOAD: gl.constexpr,  # and the tiles' (operand_load)
    BUFFERS: gl.constexpr,  # shared-memory copies of the operand tiles: 1 or 2
):
    # grid = (B * cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q), S), a batch's tiles one after
    # another; split s adds the products of K-range [s * k_per_split, (s + 1) * k_per_split)
    # into C's rows of batch b * S + s (S = 1: C itself), as triton_layered's kernel
    tiles_q = gl.cdiv(Q, BLOCK_Q)
    batch, tile = batch_and_block(gl.cdiv(P, BLOCK_P) * tiles_q)
    if EPILOGUE == 0:  # (the epilogues' kernels, never split, compile as they did before)
        split = gl.program_id(1)
        k_start = split * k_per_split
        k_len = gl.minimum(K - k_start, k_per_split)  # this split's K, from k_start on
        out = batch * gl.num_programs(1) + split
    else:
        k_start = 0
        k_len = K
        out = batch
    tp = tile // tiles_q
    tq = tile % tiles_q

    ap = tp * BLOCK_P + gl.arange(0, BLOCK_P, layout=gl.SliceLayout(1, A_LOAD))
    ak = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, A_LOAD))
    bk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, B_LOAD))
    bq = tq * BLOCK_Q + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, B_LOAD))
    a_ptrs = a_ptr + batch * stride_ab + ap[:, None] * stride_ap + ak[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + bk[:, None] * stride_bk + bq[None, :] * stride_bq
    if EPILOGUE == 0:
        a_ptrs += k_start * stride_ak
        b_ptrs += k_start * stride_bk
    a_rows = ap[:, None] < P
    b_cols = bq[None, :] < Q

    # A column-major (order [0, 1]): column k of the tile is contiguous, and a thread's 8
    # rows of it are two 16-byte loads. B row-major: likewise a thread's 8 columns of row k.
    # With two copies of each, a K step's FMAs read one while the next tiles are stored
    # into the other, one barrier a step where one copy needs two. Separate allocations
    # rather than one indexed: the compiler's barrier analysis (triton 3.6) takes a store
    # into any part of an allocation for a hazard on all of it and would put the second
    # barrier back.
    a_s0 = gl.allocate_shared_memory(
        gl.float32, [BLOCK_P, BLOCK_K], gl.SwizzledSharedLayout(1, 1, 1, [0, 1])
    )
    b_s0 = gl.allocate_shared_memory(
        gl.float32, [BLOCK_K, BLOCK_Q], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    if BUFFERS == 2:
        a_s1 = gl.allocate_shared_memory(
            gl.float32, [BLOCK_P, BLOCK_K], gl.SwizzledSharedLayout(1, 1, 1, [0, 1])
        )
        b_s1 = gl.allocate_shared_memory(
            gl.float32, [BLOCK_K, BLOCK_Q], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        )
    else:
        a_s1 = a_s0
        b_s1 = b_s0
    a_s0.store(gl.load(a_ptrs, mask=a_rows & (ak[None, :] < k_len), other=0.0))
    b_s0.store(gl.load(b_ptrs, mask=(bk[:, None] < k_len) & b_cols, other=0.0))
    _sync_threads()  # the first tiles are in
    acc = gl.zeros([BLOCK_P, BLOCK_Q], gl.float32, ACC)
    # Two K steps an iteration, so that each copy has a fixed role in each.
    for k0 in range(0, k_len, 2 * BLOCK_K):
        acc = _k_step(acc, a_s0, b_s0, a_s1, b_s1, a_ptrs, b_ptrs, a_rows, b_cols, ak, bk,
                      k0 + BLOCK_K, k_len, stride_ak, stride_bk, ACC, BLOCK_K,
                      BUFFERS)  # fmt: skip
        if k0 + BLOCK_K < k_len:
            acc = _k_step(acc, a_s1, b_s1, a_s0, b_s0, a_ptrs, b_ptrs, a_rows, b_cols, ak, bk,
                          k0 + 2 * BLOCK_K, k_len, stride_ak, stride_bk, ACC, BLOCK_K,
                          BUFFERS)  # fmt: skip

    rp = tp * BLOCK_P + gl.arange(0, BLOCK_P, layout=gl.SliceLayout(1, ACC))
    rq = tq * BLOCK_Q + gl.arange(0, BLOCK_Q, layout=gl.SliceLayout(0, ACC))
    store_product(acc, rp, rq, P, Q, out, c_ptr, bias_ptr, aux_ptr, slope, EPILOGUE, ACT)


def _accumulator(block_p: int, block_q: int, warps: int) -> gl.BlockedLayout:
    """8x8 outputs a thread, a warp's 32 threads as 4 x 8 (32 x 64 outputs), the warps
    stacked along P and then Q so that they cover [block_p, block_q] exactly. A thread's 8
    columns are two runs of 4, half the tile apart: the 8 threads of a quarter-warp then
    load 128 contiguous bytes of a B row, one 16-byte load each, where 8 contiguous
    columns a thread put two of them on the same banks (Triton's gl.bank_conflicts: 1 per
    wavefront, against 0)."""
    warps_q = block_q // 64
    warps_p = warps // warps_q
    assert warps_p * 32 == block_p and warps_q * 64 == block_q, (block_p, block_q, warps)
    return gl.BlockedLayout([8, 4], [4, 8], [warps_p, warps_q], [1, 0])


def operand_load(rows: int, cols: int, warps: int, contiguous: int,
                  tile_contiguous: int) -> gl.BlockedLayout:  # fmt: skip
    """A layout for loading a [rows, cols] operand tile whose dimension `contiguous` is
    contiguous in memory, to store it into shared memory whose dimension `tile_contiguous`
    is: 4 consecutive elements a thread along `contiguous` (one 16-byte load where
    aligned). A warp's lanes go along the dimension contiguous in shared memory: where the
    two agree, the loads are coalesced and so are the stores; where they differ (a product's
    operand loaded along K, stored transposed), 32 lanes along the tile's contiguous
    dimension store each element as one 128-byte row of it, where lanes along K would put
    4 of a quarter-warp's threads on each bank (Triton's gl.bank_conflicts: 3 per
    wavefront, against 0); the global loads then take 16 bytes of 32 rows each, and the
    other 16 bytes of those 32-byte sectors are the next lanes' along K."""
    shape = (rows, cols)
    size = [1, 1]
    size[contiguous] = 4
    along = tile_contiguous
    tiles = [shape[d] // size[d] for d in range(2)]
    threads, warps_per = [1, 1], [1, 1]
    threads[along] = min(32, max(1, tiles[along]))
    threads[1 - along] = 32 // threads[along]
    warps_per[along] = min(warps, max(1, tiles[along] // threads[along]))
    warps_per[1 - along] = warps // warps_per[along]
    return gl.BlockedLayout(size, threads, warps_per, [contiguous, 1 - contiguous])


# 128 x 128 tiles of 8 warps for large products (each warp 32 x 64 outputs; 128-142
# registers on sm_90: one program an SM above 128, two at 128, as ptxas gives dW, and on
# triton 3.6 the forward product, with 12 B spilled around its K loop;
# bench/layered_sweep.py also times a 128-register cap), 64 x 64 of 2 warps for small ones;
# K in steps of 16, the tiles in two copies (32 KB of shared memory for the large tiles;
# bench/results/gluon_sm90.md).
LARGE_TILES = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_K=16, num_warps=8, buffers=2)
SMALL_TILES = dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_K=16, num_warps=2, buffers=2)


def launch(a, b, c, bias, aux, batch: int, *, epilogue: int, act: int, slope: float,
           tiles: dict, k_per_split: int | None = None) -> None:  # fmt: skip
    """C[i] = a[i] @ b[i] (+ epilogue), as triton_layered.batched_matmul describes, on the
    Gluon kernel. a [B|-, P, K], b [B|-, K, Q] fp32, any strides (stride 0 over a shared
    batch); c [B, P, Q] fp32 contiguous, or for a plain product (epilogue 0) split into
    K-ranges of `k_per_split`, [B, S, P, Q]: each range's product, for the caller to add."""
    p, k = a.shape[-2], a.shape[-1]
    k_per_split = k_per_split or k
    assert epilogue == 0 or k_per_split == k, "only a plain product splits"
    q = b.shape[-1]
    bp, bq, bk, warps = tiles["BLOCK_P"], tiles["BLOCK_Q"], tiles["BLOCK_K"], tiles["num_warps"]
    strides_a = (a.stride(0) if a.dim() == 3 else 0, a.stride(-2), a.stride(-1))
    strides_b = (b.stride(0) if b.dim() == 3 else 0, b.stride(-2), b.stride(-1))
    layouts = dict(
        ACC=_accumulator(bp, bq, warps),
        A_LOAD=operand_load(bp, bk, warps, 1 if strides_a[2] == 1 else 0, tile_contiguous=0),
        B_LOAD=operand_load(bk, bq, warps, 1 if strides_b[2] == 1 else 0, tile_contiguous=1),
    )
    grid = (batch * triton.cdiv(p, bp) * triton.cdiv(q, bq), triton.cdiv(k, k_per_split))
    args = (a, b, c, bias if bias is not None else c, aux if aux is not None else c,
            p, q, k, k_per_split, *strides_a, *strides_b, slope)  # fmt: skip
    meta = dict(EPILOGUE=epilogue, ACT=act, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_K=bk,
                BUFFERS=tiles.get("buffers", 2), **layouts)  # fmt: skip
    if interpreted():
        gluon_cpu.run(_fp32_batched_matmul_kernel, grid, *args, **meta)
    else:
        options = {key: tiles[key] for key in ("num_warps", "maxnreg") if key in tiles}
        _fp32_batched_matmul_kernel[grid](*args, **meta, **options, **LAUNCH_OPTIONS)


def tiles_for(p: int, q: int, device: torch.device) -> dict:
    """The tiles of a [P, Q] product: large ones where both sides fill them on a GPU."""
    if device.type == "cuda" and min(p, q) >= 128:
        return dict(LARGE_TILES)
    return dict(SMALL_TILES)
