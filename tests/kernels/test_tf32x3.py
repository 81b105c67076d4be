"""float32 as three tf32 products (the triton engine's float32_matmul="tf32x3").

Each fp32 operand is split into two tf32 values, hi + lo, and a b is computed as
a_lo b_hi + a_hi b_lo + a_hi b_hi on the tensor cores: products of tf32 values are exact in
fp32, so the interpreter, which multiplies the split operands in fp32, computes what the
GPU does (up to the order of the fp32 sums). Checked here: the split itself bit for bit, a
single matmul against float64 (and plain tf32 against the same bound, so the check can
fail), and whole jobs against the float64 oracle at the float32 norm.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from gradserve import kernels
from gradserve.kernels import triton_engine
from gradserve.kernels.triton_common import PRECISION_CODES, TF32X3, matmul, split_tf32
from gradserve.kernels.triton_fused import FMA_K_CHUNK
from tests import per_sample
from tests.jobs import ensemble_job, random_job
from tests.kernels.test_privacy import grads_of, median_own_norm, private_job
from tests.kernels.test_tf32_rounding import reference
from tests.oracle import (
    assert_close_per_model,
    assert_matches_oracle,
    engine_tensors,
    oracle_for,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    hi, lo = split_tf32(tl.load(x_ptr + offs))
    tl.store(hi_ptr + offs, hi)
    tl.store(lo_ptr + offs, lo)


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, S: tl.constexpr, PRECISION: tl.constexpr):
    tile = tl.arange(0, S)[:, None] * S + tl.arange(0, S)[None, :]
    a, b = tl.load(a_ptr + tile), tl.load(b_ptr + tile)
    tl.store(c_ptr + tile, matmul(a, b, PRECISION, FMA_K_CHUNK))  # as the fused kernel does


def split(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = x.to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(x.numel() // 64,)](x, hi, lo, BLOCK=64)
    return hi.cpu().numpy(), lo.cpu().numpy()


def product(a: torch.Tensor, b: torch.Tensor, precision: int) -> torch.Tensor:
    c = torch.empty(a.shape[0], b.shape[1], device=DEVICE)
    _matmul_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c, S=a.shape[0], PRECISION=precision)
    return c.cpu()


def test_split_into_two_tf32_values_within_2_to_the_minus_22():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=gen) * torch.exp(torch.randn(4096, generator=gen) * 8)
    hi, lo = split(x)
    values = x.numpy()
    np.testing.assert_array_equal(hi, reference(values))  # hi: x rounded to the nearest tf32
    for part in (hi, lo):  # both are tf32 values: the 13 low mantissa bits are zero
        assert not np.any(part.view(np.uint32) & 0x1FFF)
    rest = (values.astype(np.float64) - hi - lo) / np.abs(values)
    assert np.abs(rest).max() <= 2.0**-22
    assert np.abs(lo).max() > 0  # the low part is real, not all zeros


@pytest.mark.parametrize("size", [16, 64])
def test_one_matmul_to_float32_accuracy_where_tf32_is_not(size):
    gen = torch.Generator().manual_seed(size)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    exact = a.double() @ b.double()

    def error(precision: int) -> float:
        return ((product(a, b, precision).double() - exact).norm() / exact.norm()).item()

    # fp32 products summed in fp32: ~1e-7; tf32 operands (unit roundoff 2**-11): ~1e-4
    assert error(TF32X3) < 1e-6 < 1e-5 < error(PRECISION_CODES["tf32"])
    assert error(TF32X3) < 4 * error(PRECISION_CODES["float32"]) + 1e-7


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy's inf - inf
def test_infinite_operands_give_infinities_not_nan():
    """inf splits into (inf, NaN); the small products are dropped where they are NaN, so
    a row with an infinity gives what IEEE float32 gives, not NaN everywhere."""
    a = torch.ones(16, 16)
    a[0, 0] = float("inf")
    b = torch.full((16, 16), 0.5)
    got = product(a, b, TF32X3)
    expected = a @ b
    torch.testing.assert_close(got, expected)  # row 0 all +inf, the rest 8.0
    assert torch.isinf(got[0]).all()


@pytest.mark.parametrize(
    "sizes, m, n, hidden, loss",
    [
        ((32, 64, 64, 64, 1), 3, 64, "relu", "mse"),  # the benchmark target's widths
        ((5, 13, 7, 3), 3, 37, "gelu", "cross_entropy"),  # odd widths
        ((5, 13, 7, 9), 3, 37, "gelu", "cross_entropy"),  # an output layer on the products
        ((17, 96, 96, 5), 2, 50, "tanh", "huber"),
        ((5, 150, 3), 2, 40, "silu", "mse"),  # a wide layer: the per-layer path
        ((3, 1), 1, 1, "tanh", "mse"),  # M = 1, N = 1
    ],
)
def test_jobs_within_the_float32_norm(sizes, m, n, hidden, loss):
    tensors = random_job(sizes, m, n, loss=loss, sample_weights=True, seed=n)
    job = ensemble_job(tensors, sizes, hidden=hidden, loss=loss)
    got = engine_tensors(triton_engine.run(job, DEVICE, float32_matmul="tf32x3"))
    assert_matches_oracle(got, oracle_for(sizes, tensors, hidden=hidden, loss=loss), "float32")


def test_identical_bits_on_repeated_runs():
    sizes = (5, 13, 7, 3)
    job = ensemble_job(random_job(sizes, 2, 37, seed=3), sizes, hidden="gelu")
    first, second = (triton_engine.run(job, DEVICE, float32_matmul="tf32x3") for _ in range(2))
    pairs = zip(
        first.weight_grads + first.bias_grads, second.weight_grads + second.bias_grads, strict=True
    )
    for a, b in pairs:
        assert torch.equal(a, b)


def test_only_float32_jobs_change_and_unknown_methods_are_refused():
    assert triton_engine.precision_code("float32", "tf32x3") == TF32X3
    assert triton_engine.precision_code("float32", "ieee") == PRECISION_CODES["float32"]
    assert triton_engine.FLOAT32_MATMUL in triton_engine.FLOAT32_MATMULS
    assert triton_engine.precision_code("bfloat16", "tf32x3") == PRECISION_CODES["bfloat16"]
    with pytest.raises(ValueError, match="float32_matmul"):
        triton_engine.precision_code("float32", "fast")


def test_per_sample_norms_and_clipping_within_the_float32_norm():
    """The fused kernel's norm pass and in-kernel clipping multiply through the same three
    products: against vmap(grad) per-sample gradients in float64."""
    sizes, hidden, n = (37, 5, 70, 3), "sigmoid", 37  # padded to 64, 16, 128, 16
    tensors = random_job(sizes, 3, n, sample_weights=True, seed=7)
    wide = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    ref = per_sample.per_sample_gradients(wide, sizes, hidden, "mse", "mean")
    job = ensemble_job(tensors, sizes, hidden=hidden)
    job.outputs = kernels.OutputRequest(True, True, False, False, True)
    got = triton_engine.run(job, DEVICE, float32_matmul="tf32x3").per_sample_grad_norm
    torch.testing.assert_close(got.double().cpu(), per_sample.norms(ref), rtol=1e-5, atol=1e-9)

    clip = median_own_norm(ref, n)  # about half of the samples clipped
    job = private_job(tensors, kernels.Privacy(clip), sizes, hidden=hidden)
    got = grads_of(triton_engine.run(job, DEVICE, float32_matmul="tf32x3"))
    for name, want in per_sample.clipped_sums(ref, clip, n).items():
        assert_close_per_model(name, got[name].cpu(), want, "float32")
