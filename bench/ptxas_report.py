"""What the fused kernel compiles to on an H100 (sm_90a), from ptxas and the SASS, no GPU.

Triton lowers the kernel to PTX and a cubin here (as tests/kernels/compile_for_gpu.py
does); ptxas -v reports each specialisation's registers, spill bytes and stack frame, and
the disassembled cubin gives its instruction mix: the kernel body is fully unrolled over
the layers, so its static instruction count is about what one block of BLOCK_N samples
executes (with `carry`, it also counts the gradients' stores after the last block). Spills
to local memory are the first suspect when a configuration is slow on the GPU; the
instruction count says how much work a change saves per block, the barrier and shared
memory counts how much synchronisation and layout traffic. Rows cover the launch
configurations bench/fused_sweep.py times (BLOCK_N, warps, register cap, pre-activations
and gradient sums in memory or in registers) at the benchmark target [32, 64, 64, 64, 1],
per precision and, for the default memory placement, with the DP norm and clip passes,
plus the same kernel with every layer padded to the widest (64) for comparison. "Programs
per SM" is what registers and shared memory allow: a latency-bound kernel wants more than
one.
For kernels on the FMA units (IEEE float32) it also gives the bytes of shared memory each
thread loads per FMA: an H100 SM returns 128 bytes of shared memory a clock (a register
per thread of a warp) against 128 FMAs a clock, so above one byte per FMA shared memory
rather than the FMA units sets the pace, unless pairs of threads read the same address
(two values packed per register return). The same figures for the per-layer path's GEMMs
at the tiles a GPU gives them follow the table.
None of it predicts time: measure on a GPU before changing triton_fused.launch_config.
Usage: env -u TRITON_INTERPRET python bench/ptxas_report.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import markdown_table, precision_and_method, write_table  # noqa: E402
from bench.compile_only import CompileOnlyDriver  # noqa: E402
from bench.fused_sweep import CONFIGS, OTHER_FMA_K_CHUNK, run_with  # noqa: E402
from bench.sweep import make_job  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import triton_engine, triton_fused, triton_layered  # noqa: E402

KERNEL = triton_fused._fused_mlp_kernel
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET_SIZES = (32, 64, 64, 64, 1)
# Widths up to 128, the fused kernel's widest: at launch_config's choice only.
WIDE_SIZES = (64, 128, 128, 128, 8)
# Instruction classes counted in the SASS (opcode prefixes).
CLASSES = {
    "tensor-core MMA": ("HGMMA", "HMMA"),
    "global ld/st": ("LDG", "STG"),
    "local (spill) ld/st": ("LDL", "STL"),
    "shared ld/st": ("LDS", "STS"),
    "barriers": ("BAR",),
}


# What one thread block may use of an sm_90 SM's shared memory (227 KB), and its registers.
SM90_SHARED_BYTES = 232448
SM90_REGISTERS = 65536


def programs_per_sm(registers: int, warps: int, shared_bytes: int) -> int:
    """Programs an sm_90 SM holds by registers and shared memory."""
    by_registers = SM90_REGISTERS // (registers * 32 * warps)
    return min(by_registers, SM90_SHARED_BYTES // max(1, shared_bytes))


def compile_through_launcher(
    job, config: tuple, float32_matmul: str = "ieee", fma_k_chunk: int | None = None
):
    """The kernel the engine's launcher would run for `job` with this (BLOCK_N, warps,
    register cap, resident, carry) and IEEE float32 K-chunks (None: the kernel's own): the
    arguments' real specialisation (alignment, divisibility by 16), not a hand-made one."""
    compiled = []
    run = KERNEL.run

    def compile_only(*args, grid, warmup, **kwargs):
        compiled.append(run(*args, grid=grid, warmup=True, **kwargs))
        return compiled[-1]

    KERNEL.run = compile_only
    try:
        run_with(job, torch.device("cpu"), *config, float32_matmul=float32_matmul,
                 fma_k_chunk=fma_k_chunk)  # fmt: skip
    finally:
        del KERNEL.run
    return compiled[0]


def ptxas_usage(ptx: str) -> tuple[str, str, str]:
    """(registers, 'spill stores / loads', stack frame) from ptxas -v."""
    # The newest ptxas Triton ships (named -blackwell where it ships two) reads its PTX.
    ptxas = next(p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(f"{BIN}/{p}"))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([f"{BIN}/{ptxas}", "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out).group(1)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    frame = re.search(r"(\d+) bytes stack frame", out).group(1)
    return regs, f"{spills.group(1)} / {spills.group(2)}", frame


def sass_mix(cubin: bytes) -> collections.Counter:
    """Counts of the cubin's SASS opcodes with their modifiers ("LDS.128"; nvdisasm)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    ops = collections.Counter()
    for line in sass.splitlines():
        found = re.match(
            r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)",
            line,
        )
        if found:
            ops[found.group(1)] += 1
    return ops


def count(ops: collections.Counter, prefixes) -> int:
    """Instructions whose opcode (with modifiers) starts with one of `prefixes`."""
    return sum(n for op, n in ops.items() if op.startswith(tuple(prefixes)))


def shared_bytes_loaded(op: str) -> int:
    """Bytes one thread loads from shared memory with one `op`, 0 for other opcodes. LDSM
    (ldmatrix) loads 8x8 16-bit matrices, 4 bytes of each per thread."""
    parts = op.split(".")
    if parts[0] == "LDSM":
        return 4 * (int(parts[-1]) if parts[-1].isdigit() else 1)
    if parts[0] != "LDS":
        return 0
    widths = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
    return next((widths[m] for m in parts[1:] if m in widths), 4)


def shared_bytes_per_fma(ops: collections.Counter) -> str:
    """Shared-memory bytes a thread loads per FFMA, for kernels without tensor-core MMAs
    (blank for the others: their MMAs read shared memory themselves)."""
    ffma = count(ops, ("FFMA",))
    if not ffma or count(ops, CLASSES["tensor-core MMA"]):
        return ""
    return f"{sum(shared_bytes_loaded(op) * n for op, n in ops.items()) / ffma:.2f}"


def row(
    label, config, dp_pass: bool, uniform: bool, chosen, sizes=TARGET_SIZES, fma_k_chunk=None,
    padded_output: bool = False,
) -> list:  # fmt: skip
    """`label`: a precision, or "float32 tf32x3" (float32_matmul="tf32x3"); `config` and
    `chosen`: (BLOCK_N, warps, register cap, resident, carry); `fma_k_chunk`: IEEE float32's
    K-chunks in place of the kernel's own; `padded_output`: a narrow float32 output layer
    as the padded products (triton_fused.NARROW_OUTPUT 0), not reductions."""
    block_n, warps, cap, resident, carry = config
    precision, float32_matmul = precision_and_method(label)
    m, n = 4, 256  # M only sets the grid; N = 256 as in the benchmark
    job = make_job(m, n, sizes, precision, torch.device("cpu"))
    if dp_pass:
        job.privacy = kernels.Privacy(1.0)
    widths = triton_fused.padded_widths(sizes)
    if uniform:
        widths = (max(widths),) * len(widths)
    padded_widths, narrow = triton_fused.padded_widths, triton_fused.NARROW_OUTPUT
    triton_fused.padded_widths = lambda sizes: widths
    if padded_output:
        triton_fused.NARROW_OUTPUT = 0
    try:
        compiled = compile_through_launcher(job, config, float32_matmul, fma_k_chunk)
    finally:
        triton_fused.padded_widths, triton_fused.NARROW_OUTPUT = padded_widths, narrow
    regs, spills, frame = ptxas_usage(compiled.asm["ptx"])
    ops = sass_mix(compiled.asm["cubin"])
    counts = [count(ops, prefixes) for prefixes in CLASSES.values()]
    # Programs an SM holds by registers (64K per SM) and shared memory (227 KB per block).
    per_sm = programs_per_sm(int(regs), warps, compiled.metadata.shared)
    if fma_k_chunk:
        label = f"{label} K-chunks of {fma_k_chunk}"
    if padded_output:
        label = f"{label}, output layer padded"
    return [label, block_n, warps, cap or "", "registers" if resident else "scratch",
            "registers" if carry else "partials",
            "yes" if dp_pass else "", str(widths), regs, spills, frame,
            compiled.metadata.shared // 1024, per_sm,
            sum(ops.values()), *counts, shared_bytes_per_fma(ops),
            "yes" if tuple(config) == chosen and not (fma_k_chunk or padded_output)
            else ""]  # fmt: skip


def other_k_chunks(chosen, wide_chosen) -> list:
    """IEEE float32 at launch_config's choices for TARGET_SIZES and WIDE_SIZES with
    fused_sweep.OTHER_FMA_K_CHUNK in place of the kernel's K-chunks."""
    rows = []
    for sizes, config in ((TARGET_SIZES, chosen), (WIDE_SIZES, wide_chosen)):
        rows.append(row("float32", config, False, False, config, sizes, OTHER_FMA_K_CHUNK))
        print(rows[-1], flush=True)
    return rows


def layered_rows(sizes=WIDE_SIZES, n: int = 256) -> list:
    """The per-layer path's float32 GEMMs for `sizes` and N=`n`, compiled through its
    launcher at the tiles a GPU gives each product (triton_layered._tiles): a row per
    specialisation, with the product that first compiled it."""
    job = make_job(4, n, sizes, "float32", torch.device("cpu"))
    gemm = triton_layered._batched_matmul_kernel
    launched = [gemm, triton_layered._loss_kernel, triton_layered._column_sum_kernel]
    compiled = {}  # hash -> (launch options, (P, Q, K), compiled kernel)

    def compile_only(kernel):
        run = kernel.run

        def compile_kernel(*args, grid, warmup, **kwargs):
            binary = run(*args, grid=grid, warmup=True, **kwargs)
            if kernel is gemm:
                compiled.setdefault(binary.hash, (kwargs, args[5:8], binary))
            return binary

        return compile_kernel

    for kernel in launched:
        kernel.run = compile_only(kernel)
    tiles = triton_layered._tiles
    triton_layered._tiles = lambda p, q, device: tiles(p, q, torch.device("cuda"))
    try:
        triton_engine.run(job, torch.device("cpu"), path="per_layer")
    finally:
        triton_layered._tiles = tiles
        for kernel in launched:
            del kernel.run
    names = {0: "C = A @ B (dW, dX)", 1: "forward: + bias, act", 2: "dZ: * act'"}
    rows = []
    for options, (p, q, k), binary in compiled.values():
        regs, spills, _ = ptxas_usage(binary.asm["ptx"])
        ops = sass_mix(binary.asm["cubin"])
        rows.append([names[options["EPILOGUE"]], f"{p} x {q} x {k}",
                     f"{options['BLOCK_P']} x {options['BLOCK_Q']} x {options['BLOCK_K']}",
                     options["num_warps"], options.get("num_stages", ""), regs, spills,
                     count(ops, ("FFMA",)), shared_bytes_per_fma(ops)])  # fmt: skip
    return rows


def main() -> None:
    driver.set_active(CompileOnlyDriver())  # for this process: it compiles, never launches
    widths = triton_fused.padded_widths(TARGET_SIZES)
    uniform = (max(widths),) * len(widths)
    rows = []
    for label in ("float32", "float32 tf32x3", "tf32", "bfloat16"):
        code = triton_engine.precision_code(*precision_and_method(label))
        own = triton_fused.launch_config(widths, 256, 1024, torch.device("cpu"), code)
        # none of it depends on the device
        chosen = (own.block_n, own.num_warps, own.max_registers, own.resident, own.carry)
        for config in CONFIGS:
            # the DP norm and clip passes at the scratch configurations without a cap
            for dp_pass in (False, True) if config[2:] == (None, False, False) else (False,):
                rows.append(row(label, config, dp_pass, False, chosen))
                print(rows[-1], flush=True)
        rows.append(row(label, chosen, False, True, chosen))
        print(rows[-1], flush=True)
        wide = triton_fused.launch_config(
            triton_fused.padded_widths(WIDE_SIZES), 256, 1024, torch.device("cpu"), code
        )
        wide_chosen = (wide.block_n, wide.num_warps, wide.max_registers, wide.resident,
                       wide.carry)  # fmt: skip
        rows.append(row(label, wide_chosen, False, False, wide_chosen, WIDE_SIZES))
        print(rows[-1], flush=True)
        if label == "float32":  # both again with the K-chunks the kernel had before 16
            rows += other_k_chunks(chosen, wide_chosen)
        if label in ("float32", "float32 tf32x3"):  # the output layer as before reductions
            for dp_pass in (False, True):
                rows.append(row(label, chosen, dp_pass, False, chosen, padded_output=True))
                print(rows[-1], flush=True)
    write_table(
        "ptxas_sm90.md",
        "Fused kernel on sm_90a (H100): registers, spills and SASS from ptxas, no GPU needed",
        [
            "precision",
            "BLOCK_N",
            "warps",
            "register cap",
            "pre-activations",
            "gradient sums",
            "DP clip passes",
            "padded widths",
            "registers",
            "spill stores / loads (B)",
            "stack frame (B)",
            "shared memory (KB)",
            "programs per SM",
            "SASS instructions",
            *CLASSES,
            "shared B loaded per FMA",
            "launch_config's choice",
        ],  # fmt: skip
        rows,
        f"Network {list(TARGET_SIZES)}, N=256, per-model inputs, relu, mse, parameter "
        f"gradients, compiled through the engine's launcher (the arguments specialised as on "
        f"a GPU). Padded widths {widths} as the engine runs it; {uniform} (every layer padded "
        f"to the widest) for comparison; and {list(WIDE_SIZES)} (padded widths "
        f"{triton_fused.padded_widths(WIDE_SIZES)}) at launch_config's choice; for IEEE "
        f"float32 both launch choices again with K-chunks of {OTHER_FMA_K_CHUNK} (the "
        "kernel's before they were 16: LaunchConfig.fma_k_chunk); for float32 (IEEE and "
        "tf32x3) the launch choice again with its one-unit output layer as the products "
        'padded to 16 outputs ("output layer padded": triton_fused.NARROW_OUTPUT 0) '
        "instead of reductions. Triton "
        f"{triton.__version__}, sm_90a; ptxas -v of the PTX, nvdisasm of the cubin. "
        "Command: `env -u TRITON_INTERPRET python bench/ptxas_report.py`.\n\n"
        f"## The per-layer path's GEMMs, float32 (IEEE), {list(WIDE_SIZES)}, N=256\n\n"
        "Each specialisation the per-layer path compiles for that job, at the tiles a GPU "
        "gives it; the product (P x Q x K) that first compiled it; FFMA counted in the "
        "SASS (the K loop's body once, not per iteration).\n\n"
        + markdown_table(
            [
                "GEMM",
                "P x Q x K",
                "tile P x Q x K",
                "warps",
                "stages",
                "registers",
                "spill stores / loads (B)",
                "FFMA",
                "shared B loaded per FMA",
            ],
            layered_rows(),
        ),  # fmt: skip
    )


if __name__ == "__main__":
    main()
