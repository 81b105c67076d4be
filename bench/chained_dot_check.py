"""Is the 64-sample, 8-warp fault the fused kernel's or Triton's? A minimal two-layer MLP
with the fused kernel's matmul pattern, at 64 and 128 rows with 4 and 8 warps, in tf32 and
bf16, against torch in float64. Two parts, each configuration in its own process so a
fault names itself:

- forward: two chained tensor-core matmuls (the first's result, through a relu, is the
  second's register operand), a column sum of the hidden block (as the bias gradient's
  tl.sum) and a masked store;
- backward: the forward, then its backward as the fused kernel writes it: each weight
  gradient is a matmul of a *transposed* pre-activation gradient (itself a matmul's result,
  still in the tensor cores' accumulator layout) with the layer's input, and the input
  gradient chains through both weights.

On an H100 with triton 3.6 the fused kernel computed wrong input gradients or faulted at
64 rows with 8 warps in the tensor-core precisions (bench/results/config_check_h100.md);
its sm_90 TTGIR has the chained matmuls there as wgmma on 64-row tiles with warpsPerCTA
[8, 1], two warpgroups along M of a 64-row tile. flash-linear-attention reports the same
signature with Triton 3.4 to 3.7 on Hopper (fla-org/flash-linear-attention#640, #984): a
transposed wgmma accumulator fed to tl.dot in 64-row tiles gave wrong gradients, or
illegal memory accesses, depending on num_warps. A WRONG or FAILED row here says Triton;
all ok says the fused kernel's own code. Each row also lists the matmuls' layouts found
in the TTGIR (wgmma tiles with their warpsPerCTA, or mma v2).

The backward also runs with inputs 16 wide (the first weight [64, 16]): in bfloat16 and
float16 the fused kernel got that layer's weight gradient and the input gradients 100-190%
off on an H100 in 64- and 128-row blocks, and right at input width 32
(bench/results/config_check_h100_half.md, triton_fused.wrong_on_gpu).

  python bench/chained_dot_check.py          (GPU; `bash bench/gpu_check.sh configs`)
  TRITON_INTERPRET=1 python bench/chained_dot_check.py --cpu-check
  env -u TRITON_INTERPRET python bench/chained_dot_check.py --static   (layouts, no GPU)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import run_isolated  # noqa: E402

ROWS = (64, 128)
WARPS = (4, 8)
PRECISIONS = ("tf32", "bfloat16")
PARTS = ("forward", "backward")
WIDTH = 64  # the hidden width
NARROW_INPUT = 16  # the input width of the backward's extra cases
# Processes at once: each is mostly CUDA start-up and one compile, the GPU work tiny.
WORKERS = min(8, os.cpu_count() or 1)


@triton.jit
def _tf32(a):
    """An fp32 matmul operand truncated to tf32, as the tensor cores read it (the
    interpreter would not)."""
    return (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, BF16: tl.constexpr):
    if BF16:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        out = tl.dot(_tf32(a), _tf32(b), input_precision="tf32")
    return out


@triton.jit
def _two_layer_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, colsum_ptr, dw1_ptr, dw2_ptr, dx_ptr, n,
                      ROWS: tl.constexpr, D_IN: tl.constexpr, D: tl.constexpr,
                      BF16: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    block = tl.program_id(0)
    rows = block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    in_cols = tl.arange(0, D_IN)
    mask = rows[:, None] < n
    tile = rows[:, None] * D + cols[None, :]
    in_tile = rows[:, None] * D_IN + in_cols[None, :]
    square = cols[:, None] * D + cols[None, :]
    first = cols[:, None] * D_IN + in_cols[None, :]
    x = tl.load(x_ptr + in_tile, mask=mask, other=0.0)
    w1 = tl.load(w1_ptr + first)  # [out, in], as the fused kernel's weights
    w2 = tl.load(w2_ptr + square)
    # forward: z = h @ w^T, the second matmul's left operand the first's result
    z1 = _mm(x, tl.trans(w1), BF16)
    h = tl.where(mask, tl.maximum(z1, 0.0), 0.0)
    tl.store(colsum_ptr + block * D + cols, tl.sum(h, 0))
    z2 = _mm(h, tl.trans(w2), BF16)
    tl.store(out_ptr + tile, z2, mask=mask)
    if BACKWARD:  # loss sum(z2^2)/2: dLoss/dz2 = z2 on the real rows
        g2 = tl.where(mask, z2, 0.0)
        tl.store(dw2_ptr + block * D * D + square, _mm(tl.trans(g2), h, BF16))
        g1 = tl.where(z1 > 0.0, _mm(g2, w2, BF16), 0.0)
        tl.store(dw1_ptr + block * D * D_IN + first, _mm(tl.trans(g1), x, BF16))
        tl.store(dx_ptr + in_tile, _mm(g1, w1, BF16), mask=mask)


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.float().bfloat16().double()


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """The top 19 bits of the fp32 value, as the tensor cores read an fp32 operand."""
    return t.float().view(torch.int32).bitwise_and(-8192).view(torch.float32).double()


def reference(x, w1, w2, n: int, rows: int, narrow) -> dict[str, torch.Tensor]:
    """The kernel's outputs in float64, each matmul operand narrowed as the kernel narrows
    it: only the order of float32 sums differs, and an intermediate within float32 rounding
    of a tf32/bf16 boundary may narrow the other way (a relative error about 1e-5 in all)."""
    blocks = triton.cdiv(n, rows)

    def per_block(a, b):  # sum over each block's rows of a^T b: [blocks, D, D]
        pad = blocks * rows - n
        a, b = (torch.nn.functional.pad(t, (0, 0, 0, pad)).view(blocks, rows, -1) for t in (a, b))
        return narrow(a).transpose(1, 2) @ narrow(b)

    z1 = x @ w1.T
    h = z1.clamp_min(0)
    z2 = narrow(h) @ w2.T
    g1 = (narrow(z2) @ w2) * (z1 > 0)
    col = torch.nn.functional.pad(h, (0, 0, 0, blocks * rows - n)).view(blocks, rows, -1)
    return {
        "out": z2,
        "colsum": col.sum(1),
        "dw2": per_block(z2, h),
        "dw1": per_block(g1, x),
        "dx": narrow(g1) @ w1,
    }


def check_one(rows: int, warps: int, precision: str, part: str, d_in: int, n: int) -> dict:
    """Run one configuration: each output's relative L2 error and the matmuls' layouts."""
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    g = torch.Generator().manual_seed(rows + warps)
    narrow = to_bf16 if precision == "bfloat16" else to_tf32
    # Loaded operands exactly representable in the precision; scaled to keep values O(1).
    x = narrow(torch.randn(n, d_in, generator=g))
    w1 = narrow(torch.randn(WIDTH, d_in, generator=g) / d_in**0.5)
    w2 = narrow(torch.randn(WIDTH, WIDTH, generator=g) / WIDTH**0.5)
    blocks = triton.cdiv(n, rows)
    outputs = {
        "out": torch.full((n, WIDTH), float("nan"), device=device),
        "colsum": torch.full((blocks, WIDTH), float("nan"), device=device),
        "dw1": torch.full((blocks, WIDTH, d_in), float("nan"), device=device),
        "dw2": torch.full((blocks, WIDTH, WIDTH), float("nan"), device=device),
        "dx": torch.full((n, d_in), float("nan"), device=device),
    }
    backward = part == "backward"
    compiled = _two_layer_kernel[(blocks,)](
        *(t.float().to(device) for t in (x, w1, w2)), *outputs.values(), n, ROWS=rows,
        D_IN=d_in, D=WIDTH, BF16=precision == "bfloat16", BACKWARD=backward, num_warps=warps,
    )  # fmt: skip
    expected = reference(x, w1, w2, n, rows, narrow)
    checked = ("out", "colsum", "dw2", "dw1", "dx") if backward else ("out", "colsum")
    errors = {}
    for name in checked:
        got, want = outputs[name].cpu().double(), expected[name]
        errors[name] = ((got - want).norm() / want.norm()).item()
    layouts = matmul_layouts(compiled.asm["ttgir"]) if device == "cuda" else []
    return {"errors": errors, "layouts": layouts}


def matmul_layouts(ttgir: str) -> list[str]:
    """Each matmul's result tile and layout in a kernel's TTGIR, in program order: wgmma
    (Hopper) with its warpsPerCTA, or mma v2."""
    wgmma = r"^#(mma\d*) = #ttg.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = (\[\d+, \d+\])"
    warps_of = dict(re.findall(wgmma, ttgir, re.M))
    dots = r"(?:warp_group_dot|tt.dot) .* -> tensor<(\d+)x(\d+)xf32, #(mma\d*)>"
    return [f"{r}x{c} {warps_of.get(m, 'mma v2')}" for r, c, m in re.findall(dots, ttgir)]


def operand_swizzles(ttgir: str) -> list[str]:
    """The shared-memory layouts of a kernel's wgmma operands in its TTGIR: swizzle width,
    element bits, and "T" where transposed. Of the cases here, only 16-bit operands of 16
    columns get 32-byte swizzling (bfloat16 with inputs 16 wide), the configuration the
    fused kernel computed wrongly on an H100 in 64- and 128-row blocks."""
    found = re.findall(
        r"= #ttg\.nvmma_shared<\{swizzlingByteWidth = (\d+), transposed = (\w+), "
        r"elementBitWidth = (\d+)\}>", ttgir,
    )  # fmt: skip
    return sorted({f"{w}B/{bits}b{' T' if t == 'true' else ''}" for w, t, bits in found})


def static_layouts(n: int) -> None:
    """Compile every backward case for sm_90a without a GPU (bench/compile_only.py) and print
    its matmuls' layouts and its operands' shared-memory swizzles: what the GPU run's last
    column will say, ahead of it."""
    from triton.runtime import driver

    from bench.compile_only import CompileOnlyDriver

    driver.set_active(CompileOnlyDriver())
    print(f"triton {triton.__version__}, sm_90a, forward and backward")
    print("| input width | rows | warps | precision | matmul layouts | operand swizzles |")
    print("|---|---|---|---|---|---|")
    for d_in, precision, rows, warps in itertools.product(
        (WIDTH, NARROW_INPUT), PRECISIONS, ROWS, WARPS
    ):
        blocks = triton.cdiv(n, rows)
        shapes = [(n, d_in), (WIDTH, d_in), (WIDTH, WIDTH), (n, WIDTH), (blocks, WIDTH),
                  (blocks, WIDTH, d_in), (blocks, WIDTH, WIDTH), (n, d_in)]  # fmt: skip
        compiled = _two_layer_kernel.run(
            *(torch.empty(shape) for shape in shapes), n, grid=(blocks,), warmup=True,
            ROWS=rows, D_IN=d_in, D=WIDTH, BF16=precision == "bfloat16", BACKWARD=True,
            num_warps=warps,
        )  # fmt: skip
        ttgir = compiled.asm["ttgir"]
        layouts = ", ".join(matmul_layouts(ttgir))
        swizzles = ", ".join(operand_swizzles(ttgir))
        print(f"| {d_in} | {rows} | {warps} | {precision} | {layouts} | {swizzles} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--static", action="store_true", help="layouts for sm_90a, no GPU")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = 100 if args.cpu_check else 1000  # not a multiple of the rows: masked last block
    if args.static:
        static_layouts(n)
        return
    if args.one:
        print(json.dumps(check_one(*json.loads(args.one), n)))
        return
    precisions = PRECISIONS if not args.cpu_check else ("tf32",)
    cases = [[r, w, p, part, WIDTH] for part in PARTS for p in precisions for r in ROWS
             for w in WARPS]  # fmt: skip
    cases += [[r, w, p, "backward", NARROW_INPUT] for p in precisions for r in ROWS for w in WARPS]
    print("| part | input width | rows | warps | precision | verdict | relative errors "
          "| matmul layouts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    bad = 0
    with ThreadPoolExecutor(WORKERS) as pool:
        # results in case order, each printed as soon as it and those before it are in
        for (rows, warps, precision, part, d_in), (r, error) in zip(
            cases, pool.map(lambda case: run_isolated(__file__, case), cases), strict=True
        ):
            row = f"| {part} | {d_in} | {rows} | {warps} | {precision}"
            if r is None:
                print(f"{row} | FAILED | | {error[-200:]} |", flush=True)
                bad += 1
                continue
            # Exact operands: float32 sums in another order, and the odd intermediate
            # narrowed the other way (about 1e-5); a misplaced row or column is off by O(1).
            errors = r["errors"]
            ok = all(e < (1e-5 if name == "colsum" else 1e-3) for name, e in errors.items())
            bad += not ok
            listed = ", ".join(f"{name} {e:.1e}" for name, e in errors.items())
            print(f"{row} | {'ok' if ok else 'WRONG'} | {listed} | {', '.join(r['layouts'])} |",
                  flush=True)  # fmt: skip
    if bad:
        raise SystemExit(f"{bad} configurations failed or were wrong")


if __name__ == "__main__":
    main()
