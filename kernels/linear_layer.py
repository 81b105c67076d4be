"""The torch engine's linear layer: every model's W @ H_t + b at once, feature-major, with a
hand-written backward for two reasons (below).

Feature-major (weight first), so that the weight gradient dZ_t @ H_t^T comes out as a fresh
contiguous [M, d_out, d_in] tensor; with the sample-major X @ W^T it came out as a
transposed view whose copy to contiguous bytes took ~10% of serving a 64 MiB job.

A weight gradient is a sum over the N samples, dZ_t @ H_t^T. One GEMM with K = N adds
each output's N products one after another in float32 (MKL's sgemm here), so its error
grows as sqrt(N): relative to float64, about 5e-6 at N = 2^17, 1.6e-5 at 2^20 and 5.7e-5 at
4M samples (a [8, 32, 32, 1] tanh network; the bias gradients, torch sums, stay at 1e-7).
sum_over_samples() takes the samples SAMPLE_CHUNK at a time and adds the chunks' products
in float64, so the error stays that of one chunk whatever N is. The extra cost is one
float64 add of a weight-sized tensor per chunk, against the chunk's SAMPLE_CHUNK
multiply-adds per weight.

bfloat16 and float16 jobs multiply operands rounded to that dtype (weights and layer inputs,
and dLoss/dz in the backward pass) with float32 accumulation. On the CPU the rounded
operands are multiplied in float32, which is exactly that, with float32 results as the
Triton kernels give; with torch's own float16 GEMMs there a float16 job took 8.5 times as
long, and its bfloat16 GEMMs round their results to bfloat16 (bench/linear_cpu.py). On
CUDA the GEMMs run in the narrow dtype on the tensor cores (float32 accumulation; results
rounded to it). The bias is never rounded.
"""

from __future__ import annotations

import torch

# 4096 samples: a chunk's GEMM is still large enough to run at full speed, and its own
# error about 1e-6.
SAMPLE_CHUNK = 4096

NARROW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def sum_over_samples(dz_t: torch.Tensor, h_t: torch.Tensor) -> torch.Tensor:
    """sum over n of dz_t[m, :, n] h_t[m, :, n]^T: [M, d_out, N] x [M, d_in, N] ->
    [M, d_out, d_in] in float32 (float64 for float64 operands), from chunks of
    SAMPLE_CHUNK samples whose products are added in float64."""
    n = dz_t.shape[2]
    out_dtype = torch.promote_types(dz_t.dtype, torch.float32)
    if n <= SAMPLE_CHUNK:
        return torch.bmm(dz_t, h_t.transpose(1, 2)).to(out_dtype)
    m, d_out, d_in = dz_t.shape[0], dz_t.shape[1], h_t.shape[1]
    total = torch.zeros(m, d_out, d_in, dtype=torch.float64, device=dz_t.device)
    for start in range(0, n, SAMPLE_CHUNK):
        chunk = slice(start, start + SAMPLE_CHUNK)
        total += torch.bmm(dz_t[:, :, chunk], h_t[:, :, chunk].transpose(1, 2))
    return total.to(out_dtype)


def _operand(t: torch.Tensor, narrow: torch.dtype | None) -> torch.Tensor:
    """`t` as a GEMM operand: rounded to the narrow dtype, and on the CPU widened back to
    float32 (exact) to be multiplied there."""
    if narrow is None:
        return t
    t = t.to(narrow)
    return t.float() if t.device.type == "cpu" else t


def _outer_product(inner: int, t: torch.Tensor) -> bool:
    """Whether a product of inner dimension `inner` on t's device is better computed as a
    broadcast multiply: a product over one term is an outer product, exactly that multiply,
    and the CPU's batched GEMM took ~4x its time ([1024, 32, 1] x [1024, 1, 32]: 156 vs
    38 us). On CUDA the GEMM stays: a tf32 job's GEMMs round their operands to tf32."""
    return inner == 1 and t.device.type == "cpu"


class BatchedLinear(torch.autograd.Function):
    """h_t [M, d_in, N] -> weight @ h_t + bias [M, d_out, N] in h_t's dtype."""

    @staticmethod
    def forward(ctx, h_t, weight, bias, precision: str):
        narrow = NARROW_DTYPES.get(precision)
        ctx.narrow = narrow
        # The narrow copies are kept for the backward pass (half the bytes of float32 ones).
        saved = (h_t, weight) if narrow is None else (h_t.to(narrow), weight.to(narrow))
        ctx.save_for_backward(*saved)
        w_op, h_op = _operand(weight, narrow), _operand(h_t, narrow)
        if w_op.dtype == h_t.dtype:  # float32/float64 operands: the bias added in the GEMM
            if _outer_product(h_t.shape[1], h_t):  # one input feature
                return torch.addcmul(bias.unsqueeze(2), w_op, h_op)
            return torch.baddbmm(bias.unsqueeze(2), w_op, h_op)
        # A narrow GEMM (CUDA): the bias added in float32, as the kernels add it.
        return torch.bmm(w_op, h_op).to(h_t.dtype) + bias.unsqueeze(2)

    @staticmethod
    def backward(ctx, dz_t):
        h_t, weight = (_operand(t, ctx.narrow) for t in ctx.saved_tensors)
        dz_op = _operand(dz_t, ctx.narrow)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if _outer_product(dz_t.shape[1], dz_t):  # one output feature
                grad_h = (weight.transpose(1, 2) * dz_op).to(dz_t.dtype)
            else:
                grad_h = torch.bmm(weight.transpose(1, 2), dz_op).to(dz_t.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = sum_over_samples(dz_op, h_t).to(dz_t.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = dz_t.sum(dim=2)
        return grad_h, grad_w, grad_b, None
