"""Is the 64-sample, 8-warp fault the fused kernel's or Triton's? A minimal kernel with the
fused kernel's forward shape: two chained tensor-core matmuls (the first's result, through
an activation, is the second's register operand), a column sum of the hidden block (as the
bias gradient's tl.sum), and a masked store, at 64 and 128 rows with 4 and 8 warps, in
tf32 and bf16, against torch in float64.

On an H100 with triton 3.6 the fused kernel computed wrong input gradients or faulted at
64 rows with 8 warps in the tensor-core precisions (bench/results/config_check_h100.md);
its sm_90 TTGIR has the chained matmuls there as wgmma on 64-row tiles with warpsPerCTA
[8, 1], two warpgroups along M of a 64-row tile. A WRONG or faulting row here says Triton;
all ok says the fused kernel's own code. Each configuration runs in its own process, so a
fault names itself; each row also says the wgmma layouts found in the TTGIR.

  python bench/chained_dot_check.py          (GPU; `bash bench/gpu_check.sh configs`)
  TRITON_INTERPRET=1 python bench/chained_dot_check.py --cpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import run_isolated  # noqa: E402

ROWS = (64, 128)
WARPS = (4, 8)
PRECISIONS = ("tf32", "bfloat16")
WIDTH = 64


@triton.jit
def _chained_dot_kernel(x_ptr, w1_ptr, w2_ptr, out_ptr, colsum_ptr, n, ROWS: tl.constexpr,
                        D: tl.constexpr, BF16: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    mask = rows[:, None] < n
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    w1 = tl.load(w1_ptr + cols[:, None] * D + cols[None, :])
    w2 = tl.load(w2_ptr + cols[:, None] * D + cols[None, :])
    if BF16:
        h = tl.dot(x.to(tl.bfloat16), w1.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        h = tl.dot(x, w1, input_precision="tf32")
    h = tl.where(mask, tl.maximum(h, 0.0), 0.0)
    tl.store(colsum_ptr + tl.program_id(0) * D + cols, tl.sum(h, 0))
    if BF16:
        out = tl.dot(h.to(tl.bfloat16), w2.to(tl.bfloat16), out_dtype=tl.float32)
    else:  # h truncated to tf32 here, as the tensor cores would (the interpreter does not)
        h = (h.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        out = tl.dot(h, w2, input_precision="tf32")
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out, mask=mask)


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """The top 19 bits, as the tensor cores read an fp32 operand."""
    return t.view(torch.int32).bitwise_and(-8192).view(torch.float32)


def check_one(rows: int, warps: int, precision: str, n: int) -> dict:
    """Run one configuration and return its largest relative errors and wgmma layouts."""
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    g = torch.Generator().manual_seed(rows + warps)
    shapes = ((n, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH))
    # Operands exactly representable in the precision: only the sums' order differs.
    narrow = to_bf16 if precision == "bfloat16" else to_tf32
    x, w1, w2 = (narrow(torch.randn(shape, generator=g)) for shape in shapes)
    blocks = triton.cdiv(n, rows)
    out = torch.full((n, WIDTH), float("nan"), device=device)
    colsum = torch.full((blocks, WIDTH), float("nan"), device=device)
    compiled = _chained_dot_kernel[(blocks,)](
        x.to(device), w1.to(device), w2.to(device), out, colsum, n, ROWS=rows, D=WIDTH,
        BF16=precision == "bfloat16", num_warps=warps,
    )  # fmt: skip
    h = (x.double() @ w1.double()).clamp_min(0)
    ref_out = narrow(h.float()).double() @ w2.double()  # the kernel narrows h alike
    ref_sum = torch.nn.functional.pad(h, (0, 0, 0, blocks * rows - n))
    ref_sum = ref_sum.view(blocks, rows, WIDTH).sum(1)
    layouts = []
    if device == "cuda":
        ttgir = compiled.asm["ttgir"]
        wgmma = r"^#(mma\d*) = #ttg.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = (\[\d+, \d+\])"
        warps_of = dict(re.findall(wgmma, ttgir, re.M))
        dots = r"(?:warp_group_dot|tt.dot) .* -> tensor<(\d+)x(\d+)xf32, #(mma\d*)>"
        layouts = [f"{r}x{c} {warps_of.get(m, 'mma v2')}" for r, c, m in re.findall(dots, ttgir)]
    return {
        "out": ((out.cpu().double() - ref_out).norm() / ref_out.norm()).item(),
        "colsum": ((colsum.cpu().double() - ref_sum).norm() / ref_sum.norm()).item(),
        "layouts": layouts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = 100 if args.cpu_check else 1000  # not a multiple of the rows: masked last block
    if args.one:
        print(json.dumps(check_one(*json.loads(args.one), n)))
        return
    print(
        "| rows | warps | precision | verdict | out rel. error | column-sum rel. error "
        "| matmul layouts |"
    )
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for precision in PRECISIONS if not args.cpu_check else ("tf32",):
        for rows in ROWS:
            for warps in WARPS:
                r, error = run_isolated(__file__, [rows, warps, precision])
                if r is None:
                    print(f"| {rows} | {warps} | {precision} | FAILED | | | {error[-200:]} |")
                    bad += 1
                    continue
                # Exact operands: float32 sums in another order, and a rare tie rounding
                # h otherwise (bf16); a misplaced row or column is off by O(1).
                ok = r["out"] < 1e-3 and r["colsum"] < 1e-5
                bad += not ok
                print(f"| {rows} | {warps} | {precision} | {'ok' if ok else 'WRONG'} "
                      f"| {r['out']:.1e} | {r['colsum']:.1e} | {', '.join(r['layouts'])} |",
                      flush=True)  # fmt: skip
    if bad:
        raise SystemExit(f"{bad} configurations failed or were wrong")


if __name__ == "__main__":
    main()
