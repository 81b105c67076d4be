"""Triton building blocks shared by the fused and the per-layer paths: activations and
their derivatives, the loss of a block of samples and its gradient, a matmul that
honours the job's precision, and the GPU timers of profiling builds (bench/ only).

Each math helper mirrors a torch function in kernels/functional.py (the reference the
tests compare against); codes below are the constexpr selectors passed to the kernels.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from gradserve.kernels.precision_codes import PRECISION_CODES, TF32X3

ACTIVATION_CODES = {
    "identity": 0,
    "relu": 1,
    "leaky_relu": 2,
    "tanh": 3,
    "sigmoid": 4,
    "gelu": 5,
    "silu": 6,
    "softplus": 7,
}
# tanh and softplus in their textbook forms, 2 sigmoid(2z) - 1 and log(1 + e^-|z|) (+ relu):
# cheaper than the exact ones, _tanh and _log1p (on sm_90a, triton 3.6, the fused kernel of
# a bfloat16 [32, 64, 64, 64, 1] network has 31% fewer instructions with tanh, 21% with
# softplus), exact to float32 only where |z| is near 1 (tanh keeps 3 digits at 1e-3,
# softplus 3 at -8 and none at -15). The fused kernel takes them for tf32, bfloat16 and
# float16 products (textbook_forms), whose rounding of each operand (2^-11 to 2^-9) is
# larger than that error but at pre-activations that small or that negative.
TEXTBOOK_TANH = 8
TEXTBOOK_SOFTPLUS = 9
LOSS_CODES = {"mse": 0, "l1": 1, "huber": 2, "bce_with_logits": 3, "cross_entropy": 4}
# Options every launch passes. Fused multiply-adds (a * b + c, one rounding) asked for
# explicitly: Triton has fused them by default, and says from 3.9 that the default turns off
# in 3.10, which would change the kernels' last bits and speed with nothing here changing.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
# Kernels run under Triton's interpreter (read, as Triton reads it, when kernels are defined).
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def textbook_forms(activation: int, precision: int) -> int:
    """The activation code a fused kernel of `precision` computes `activation` with: tanh
    and softplus in their textbook forms where the products round operands to tf32 or
    coarser, else the code itself."""
    if precision in (PRECISION_CODES["float32"], TF32X3):
        return activation
    textbook = {ACTIVATION_CODES["tanh"]: TEXTBOOK_TANH,
                ACTIVATION_CODES["softplus"]: TEXTBOOK_SOFTPLUS}  # fmt: skip
    return textbook.get(activation, activation)


# Globals read inside @triton.jit functions must be constexpr.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    """tanh to float32's accuracy at every z, as torch.tanh: Eigen's 13/6-degree rational
    interpolant (z P(z^2) / Q(z^2), within a couple of ulp on [-9, 9], +-1 beyond), without
    an exp, in 8 more instructions than 2 sigmoid(2z) - 1 (TEXTBOOK_TANH), which cancels
    where |z| is small (at 1e-3 it kept 3 of float32's 7 digits, and the next layer's weight
    gradient was 1.5e-4 off)."""
    x = tl.clamp(z, -9.0, 9.0, propagate_nan=tl.PropagateNan.ALL)
    x2 = x * x
    p = -2.76076847742355e-16 * x2 + 2.00018790482477e-13
    p = p * x2 - 8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = 1.19825839466702e-06 * x2 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return x * p / q


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate where u is small, as torch's log1p: log(1 + u) alone
    loses the digits of u below 1's last place (softplus(-15) was 0; at -8 it kept 3
    digits). Goldberg's form: w = 1 + u rounds, log(w) * u / (w - 1) divides that rounding
    back out (tl.log is libdevice's logf on GPUs, accurate near 1)."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    """activate() of functional.py, on an fp32 block."""
    if ACT == 1:
        # NaN stays NaN, as in torch (the GPU's plain max would return 0; free on sm_90)
        out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        out = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        out = _tanh(z)
    elif ACT == 4:
        out = _sigmoid(z)
    elif ACT == 5:
        out = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT2))
    elif ACT == 6:
        out = z * _sigmoid(z)
    elif ACT == 7:
        # torch's Softplus (beta 1, threshold 20), in the overflow-free form.
        out = tl.where(z > 20.0, z, tl.maximum(z, 0.0) + _log1p(tl.exp(-tl.abs(z))))
    elif ACT == 8:
        out = 2.0 * _sigmoid(2.0 * z) - 1.0  # TEXTBOOK_TANH
    elif ACT == 9:  # TEXTBOOK_SOFTPLUS
        out = tl.where(z > 20.0, z, tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))))
    else:
        out = z
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr, slope):
    """d activate(z) / dz, matching torch autograd's choice at the kinks (relu'(0) = 0)."""
    if ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(z > 0, 1.0, slope)
    elif ACT == 3:
        t = _tanh(z)
        d = 1.0 - t * t
    elif ACT == 4:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    elif ACT == 5:
        d = 0.5 * (1.0 + tl.erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == 6:
        s = _sigmoid(z)
        d = s + z * s * (1.0 - s)
    elif ACT == 7 or ACT == 9:
        d = tl.where(z > 20.0, 1.0, _sigmoid(z))
    elif ACT == 8:
        t = 2.0 * _sigmoid(2.0 * z) - 1.0
        d = 1.0 - t * t
    else:
        d = z * 0.0 + 1.0
    return d


@triton.jit
def cycle_counter():
    """The SM's cycle counter (%clock64): GPU only, for profiling builds of a kernel."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def nanosecond_timer():
    """The GPU's global nanosecond timer (%globaltimer), comparable across SMs."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def sm_id():
    """The SM running this program (%smid)."""
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def round_to_tf32(x):
    """fp32 -> the nearest tf32 (10-bit mantissa; ties away from zero, as PTX's
    cvt.rna.tf32.f32), still held as fp32. Tensor cores read only an fp32 operand's top 19
    bits, i.e. truncate: a bias of about 2**-11 per operand that adds up coherently in every
    dot product, 2.5e-3 to 3.3e-3 relative error in 4-layer networks' gradients on an H100
    (reproduced exactly under the interpreter by truncating the operands). Rounded first,
    their weight and input gradients stay within 1e-3 (tests/kernels/test_tf32_rounding.py).
    Two integer operations per element (PTX's own cvt.rna compiled to more SASS); a tf32
    matmul's operands take tf32_operand, the same rounding in one, and this exact form is
    for values also used as numbers (split_tf32).
    Adding half of the dropped bits' range to the bit pattern carries into the mantissa
    exactly when the dropped part is >= half a tf32 step (past the largest tf32 it carries
    into the exponent: infinity, as cvt.rna gives). NaNs stay NaN unless their top 11
    mantissa bits are all set: the GPU's canonical NaN (0x7FFFFFFF) carries into the sign
    bit and becomes -0 (numpy's and x86's NaNs do not)."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def tf32_operand(x):
    """x as a tf32 tensor-core operand, rounded to the nearest tf32 as round_to_tf32 rounds
    it, in one integer operation per element instead of two: half a tf32 step is added to
    the bit pattern and the tensor cores, which read only the top 19 bits, drop the rest
    (CUTLASS's round_half_ulp_truncate). The interpreter multiplies its operands in full,
    so there the dropped bits are cleared here. Not idempotent on the GPU: only for values
    going straight into a tf32 tl.dot (tests/kernels/test_tf32_rounding.py checks such
    products bit for bit against round_to_tf32's)."""
    bits = x.to(tl.uint32, bitcast=True) + 0x1000
    if INTERPRETED:
        bits = bits & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split_tf32(x):
    """fp32 -> (hi, lo), both tf32 values, with hi + lo within 2**-22 of x (relative): hi is x
    rounded to tf32, lo the rest rounded to tf32 (x - hi is exact and has at most 13
    significant bits, lo keeps 11 of them). Products of tf32 values are exact in fp32, so
    a_hi b_hi + a_hi b_lo + a_lo b_hi is a b to about 2**-21: fp32 accuracy from three
    tensor-core products (the 3xTF32 of CUTLASS; Triton's input_precision="tf32x3" splits
    alike, but the interpreter ignores input precisions, and this split it runs as the
    GPU does)."""
    hi = round_to_tf32(x)
    return hi, round_to_tf32(x - hi)


@triton.jit
def _k_halves(a, b):
    """a [M, K] and b [K, N] cut along K into halves: a0, a1, b0, b1."""
    M: tl.constexpr = a.shape[0]
    K: tl.constexpr = a.shape[1]
    N: tl.constexpr = b.shape[1]
    a0, a1 = tl.split(tl.permute(tl.reshape(a, [M, 2, K // 2]), [0, 2, 1]))
    b0, b1 = tl.split(tl.permute(tl.reshape(b, [2, K // 2, N]), [1, 2, 0]))
    return a0, a1, b0, b1


@triton.jit
def _ieee_dot(a, b, K_CHUNK: tl.constexpr):
    """a @ b on the FMA units, in K-chunks of K_CHUNK (16 or 32), at most four. Triton
    keeps a chunk's operands in registers while it multiplies them: with a whole 128-long K
    in one dot, ptxas gave the fused kernel 32 registers and ~55 KB of spills per thread
    (over half its instructions local loads and stores); chunks of at most 32 keep 255
    registers and under 1.5 KB of spills (tests/kernels/sm90_resources_check.py). The
    fused kernel's chunks of 16 (32 where K is 128) spill less again, at every block size
    and warp count (none at its launch at the benchmark target, was 208 B; 164 B at width
    128, was 376 B); the per-layer GEMM's 32-long K-tiles spill more in chunks of 16
    (bench/results/ptxas_sm90.md)."""
    K: tl.constexpr = a.shape[1]
    if K >= 4 * K_CHUNK:
        a0, a1, b0, b1 = _k_halves(a, b)
        a00, a01, b00, b01 = _k_halves(a0, b0)
        a10, a11, b10, b11 = _k_halves(a1, b1)
        out = tl.dot(a00, b00, input_precision="ieee")
        out = tl.dot(a01, b01, out, input_precision="ieee")
        out = tl.dot(a10, b10, out, input_precision="ieee")
        out = tl.dot(a11, b11, out, input_precision="ieee")
    elif K >= 2 * K_CHUNK:
        a0, a1, b0, b1 = _k_halves(a, b)
        out = tl.dot(a0, b0, input_precision="ieee")
        out = tl.dot(a1, b1, out, input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def matmul(a, b, PRECISION: tl.constexpr, FMA_K_CHUNK: tl.constexpr):
    """a @ b with fp32 accumulation; operands rounded to tf32 or narrowed to bf16/fp16 when
    asked, or float32 as three tf32 products (TF32X3). IEEE float32 multiplies on the FMA
    units in K-chunks of FMA_K_CHUNK (_ieee_dot)."""
    if PRECISION == 1:
        out = tl.dot(tf32_operand(a), tf32_operand(b), input_precision="tf32")
    elif PRECISION == 4:
        a_hi, a_lo = split_tf32(a)
        b_hi, b_lo = split_tf32(b)
        # small terms first (lo * lo, below 2**-22 of a b, is left out)
        out = tl.dot(a_lo, b_hi, input_precision="tf32")
        out = tl.dot(a_hi, b_lo, out, input_precision="tf32")
        # Non-finite operands make the small terms NaN (inf - inf); drop them so that
        # hi * hi alone carries an infinity, as the IEEE product would (a NaN operand still
        # gives NaN through it).
        out = tl.where(out == out, out, 0.0)
        out = tl.dot(a_hi, b_hi, out, input_precision="tf32")
    elif PRECISION == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    elif PRECISION == 3:
        out = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        out = _ieee_dot(a, b, FMA_K_CHUNK)
    return out


@triton.jit
def loss_block(
    y,  # [BLOCK_N, DP] fp32 network outputs (after the output activation)
    t_ptr,  # targets of this model: float [N, dL] rows, or int class indices [N]
    stride_tn,  # elements between consecutive samples' targets
    w_ptr,  # sample weights of this model [N] (ignored unless HAS_WEIGHTS)
    rn,  # [BLOCK_N] sample indices of the block
    cols,  # [DP] output-feature indices
    N,
    d_out,  # real output width dL
    scale,  # 1 / count for mean reduction, 1 for sum
    delta,  # huber delta
    LOSS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    """Per-sample losses [BLOCK_N] and dLoss/dy [BLOCK_N, DP] of one block of samples:
    per_sample_loss() and reduce_loss() of functional.py, differentiated by hand."""
    rmask = rn < N
    cmask = cols < d_out
    valid = rmask[:, None] & cmask[None, :]
    if LOSS == 4:
        target = tl.load(t_ptr + rn * stride_tn, mask=rmask, other=0)
        logits = tl.where(cmask[None, :], y, float("-inf"))
        peak = tl.max(logits, 1)
        e = tl.exp(logits - peak[:, None])
        total = tl.sum(e, 1)
        onehot = cols[None, :] == target[:, None]
        # The target's share e_t and the others': where the target is (within log 2 of) the
        # peak, the loss is log1p(others / e_t) and its gradient there -others / total, not
        # log(total) and e_t / total - 1, which cancel where the target is confidently
        # right (a margin of 8: 3 to 4 digits left in float32, as in torch's cross_entropy)
        e_t = tl.sum(tl.where(onehot, e, 0.0), 1)
        others = tl.sum(tl.where(onehot, 0.0, e), 1)
        near = e_t >= 0.5
        per = tl.where(
            near,
            _log1p(others / tl.where(near, e_t, 1.0)),
            peak + tl.log(total) - tl.sum(tl.where(onehot, y, 0.0), 1),
        )
        dy = tl.where(onehot, -others[:, None], e) / total[:, None]
    else:
        t = tl.load(t_ptr + rn[:, None] * stride_tn + cols[None, :], mask=valid, other=0.0)
        r = y - t.to(tl.float32)
        if LOSS == 0:
            elem = r * r
            dy = 2.0 * r
        elif LOSS == 1:
            elem = tl.abs(r)
            dy = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
        elif LOSS == 2:
            small = tl.abs(r) < delta
            elem = tl.where(small, 0.5 * r * r, delta * (tl.abs(r) - 0.5 * delta))
            dy = tl.where(small, r, delta * tl.where(r > 0, 1.0, -1.0))
        else:
            # the loss with log1p, and its derivative sigmoid(y) - t as s - t where y <= 0
            # and (1 - t) - s where y > 0 (s = sigmoid(-|y|)): torch's sigmoid(y) - t
            # cancels where the logit is confident and right (y = 8, t = 1: 3 digits left)
            t32 = t.to(tl.float32)
            e = tl.exp(-tl.abs(y))
            s = e / (1.0 + e)
            elem = tl.maximum(y, 0.0) - y * t32 + _log1p(e)
            dy = tl.where(y > 0, (1.0 - t32) - s, s - t32)
        per = tl.sum(tl.where(valid, elem, 0.0), 1)
    if HAS_WEIGHTS:
        weight = tl.load(w_ptr + rn, mask=rmask, other=0.0).to(tl.float32)
    else:
        weight = tl.where(rmask, 1.0, 0.0)
    per = tl.where(rmask, per * weight, 0.0)
    dy = tl.where(valid, dy * (weight * scale)[:, None], 0.0)
    return per, dy
