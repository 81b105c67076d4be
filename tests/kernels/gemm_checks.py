"""Operands and the float32 error bound of the batched GEMM checks (tests/kernels/test_gluon.py
on the CPU, tests/kernels/test_gpu.py on a GPU), and a record of how the per-layer path
splits its sums over the samples (those tests, test_triton_engine.py's and
bench/split_sums.py)."""

import contextlib

import torch


@contextlib.contextmanager
def recorded_splits(ranges: list[int]):
    """Appends to `ranges`, for each per-layer sum over the samples split across programs
    (triton_layered.split_length) while in the block, how many ranges it took."""
    from gradserve.kernels import triton_layered

    sum_partials = triton_layered.sum_partials

    def recorded(partial, segments):
        ranges.append(partial.shape[1])
        return sum_partials(partial, segments)

    triton_layered.sum_partials = recorded
    try:
        yield ranges
    finally:
        triton_layered.sum_partials = sum_partials


def operands(p, k, q, batch, a_layout, b_layout, seed):
    """a [B, P, K] and b [B, K, Q] with the strides the per-layer path gives them: "rows"
    (K contiguous, as activations), "columns" (P contiguous, dZ^T), "shared" (one a for
    every batch, stride 0); b "rows" (Q contiguous, W) or "columns" (K contiguous, W^T)."""
    gen = torch.Generator().manual_seed(seed)
    if a_layout == "columns":
        a = torch.randn(batch, k, p, generator=gen).transpose(1, 2)
    else:
        a = torch.randn(1 if a_layout == "shared" else batch, p, k, generator=gen)
        a = a[0] if a_layout == "shared" else a
    if b_layout == "columns":
        b = torch.randn(batch, q, k, generator=gen).transpose(1, 2)
    else:
        b = torch.randn(batch, k, q, generator=gen)
    return a, b


def assert_within_fp32_bound(got, expected, scale):
    """Every output within float32's error bound for a K-long chain of FMAs: `scale` is
    K * sum_k |a_k b_k| per output (each FMA rounds once, by at most 2**-24 of a partial
    sum no larger than sum |a_k b_k|), plus 4 units of the value for an epilogue's own
    rounding."""
    eps = 2.0**-24
    bound = scale * eps + 4 * eps * expected.abs() + 1e-30
    err = (got.double() - expected).abs()
    assert torch.all(err <= bound), f"largest error / bound: {(err / bound).max():.3g}"
