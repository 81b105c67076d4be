"""Registers and spills of the fused kernel for an H100 (sm_90a), from ptxas, with no GPU.

Triton lowers the kernel to PTX here (as tests/kernels/compile_for_gpu.py does) and the
ptxas Triton ships reports each specialisation's registers, spill bytes and stack frame.
Spills to local memory are the first suspect when a configuration is slow on the GPU; this
table says which launch configurations (BLOCK_N, warps) keep the benchmark target shape
[32, 64, 64, 64, 1] (padded width 64) in registers, per precision and with the DP norm
and clip passes. It predicts nothing about time: measure on a GPU before changing
triton_fused.launch_config.
Usage: env -u TRITON_INTERPRET python bench/ptxas_report.py
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.common import write_table  # noqa: E402
from gradserve.kernels import triton_fused  # noqa: E402
from gradserve.kernels.triton_common import ACTIVATION_CODES as ACT  # noqa: E402
from gradserve.kernels.triton_common import LOSS_CODES as LOSS  # noqa: E402
from gradserve.kernels.triton_common import PRECISION_CODES as PREC  # noqa: E402
from tests.kernels.compile_for_gpu import FLOAT_ARGS  # noqa: E402

KERNEL = triton_fused._fused_mlp_kernel
PTXAS = os.path.join(
    os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell"
)  # fmt: skip  (the ptxas whose PTX version matches)


def ptxas_report(meta: dict, warps: int, weight_type: str) -> tuple[str, str, str]:
    names = list(inspect.signature(KERNEL.fn).parameters)
    signature = {}
    for name in names:
        if name in meta:
            signature[name] = "constexpr"
        elif name == "w_ptr":
            signature[name] = weight_type
        elif name == "widths_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(fn=KERNEL, signature=signature,
                       constexprs={(names.index(k),): v for k, v in meta.items()})  # fmt: skip
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    frame = re.search(r"(\d+) bytes stack frame", out).group(1)
    return regs, f"{spills.group(1)} / {spills.group(2)}", frame


def main() -> None:
    dp, n = 64, 1024
    chosen_block, _, _, chosen_warps = triton_fused.launch_config(dp, n, 1024, _FakeDevice())
    base = dict(L=4, DP=dp, HIDDEN_ACT=ACT["relu"], OUTPUT_ACT=ACT["identity"], LOSS=LOSS["mse"],
                HAS_WEIGHTS=False, WANT_PARAM_GRADS=True, WANT_DX=False, WANT_Y=False)  # fmt: skip
    rows = []
    for precision, weights in (("float32", "*fp32"), ("tf32", "*fp32"), ("bfloat16", "*bf16")):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for dp_pass in (False, True):
                    meta = dict(base, PRECISION=PREC[precision], BLOCK_N=block_n, NORMS=dp_pass,
                                CLIP=dp_pass)  # fmt: skip
                    regs, spills, frame = ptxas_report(meta, warps, weights)
                    used = "yes" if (block_n, warps) == (chosen_block, chosen_warps) else ""
                    rows.append([precision, block_n, warps, "yes" if dp_pass else "", regs,
                                 spills, frame, used])  # fmt: skip
                    print(rows[-1], flush=True)
    write_table(
        "ptxas_sm90.md",
        "Fused kernel on sm_90a (H100): registers and spills from ptxas, no GPU needed",
        [
            "precision",
            "BLOCK_N",
            "warps",
            "DP clip passes",
            "registers",
            "spill stores / loads (B)",
            "stack frame (B)",
            "launch_config's choice",
        ],  # fmt: skip
        rows,
        "Shape: 4 layers padded to width 64 (the [32, 64, 64, 64, 1] benchmark target), relu, "
        "mse, parameter gradients. Compiled by Triton "
        f"{triton.__version__} for sm_90; ptxas -v of the PTX. Command: "
        "`env -u TRITON_INTERPRET python bench/ptxas_report.py`.",
    )


class _FakeDevice:
    """launch_config's CPU branch picks one sample split; BLOCK_N and warps do not depend
    on the device."""

    type = "cpu"


if __name__ == "__main__":
    main()
