"""Work on a reduction split across programs, and the fixed-order sum of their partials.

A sum over the N samples (a weight or bias gradient) done by one program per output tile
leaves most of a GPU idle when there are few tiles: the fused kernel deals each model's
samples to several programs (triton_fused.sample_splits) and the per-layer path splits the
sample dimension of its weight-gradient products and bias sums (triton_layered). Each
program writes its partial sum; sum_partials adds them in a fixed order (no float atomics),
so repeated runs on a device give identical bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradserve.kernels.triton_common import LAUNCH_OPTIONS


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere: Triton's interpreter runs
    the programs one after another, so there are none to keep busy."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _sum_partials_kernel(
    partial_ptr,  # [R, S, C] fp32
    out_ptr,  # [R, C] fp32
    S,
    C,
    lengths,  # each segment's length (elements)
    STARTS: tl.constexpr,  # each segment's first column
    BLOCK: tl.constexpr,
):
    """out[r, c] = sum over s of partial[r, s, c], s ascending (a fixed-order reduction),
    for the columns c in the segments [STARTS[i], STARTS[i] + lengths[i]); the columns
    between them are neither read (programs never write them) nor written."""
    # grid = (R, cdiv(C, BLOCK))
    r = tl.program_id(0).to(tl.int64)  # 64-bit row bases, as the fused kernel's
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < 0  # all False
    for i in tl.static_range(len(STARTS)):
        mask = mask | ((offs >= STARTS[i]) & (offs < STARTS[i] + lengths[i]))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(partial_ptr + (r * S + s) * C + offs, mask=mask, other=0.0)
    tl.store(out_ptr + r * C + offs, acc, mask=mask)


def sum_partials(partial: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """[R, S, C] -> [R, C] summed over S in a fixed order (no atomics), over the columns of
    the (start, length) `segments` only: the other columns of the result are left unset."""
    r, s, c = partial.shape
    if s == 1:
        return partial[:, 0]
    out = torch.empty(r, c, device=partial.device, dtype=torch.float32)
    starts, lengths = zip(*segments, strict=True)
    assert all(0 <= start and start + length <= c for start, length in segments), segments
    block = 1024
    _sum_partials_kernel[(r, triton.cdiv(c, block))](
        partial, out, s, c, lengths, STARTS=starts, BLOCK=block, **LAUNCH_OPTIONS
    )
    return out
