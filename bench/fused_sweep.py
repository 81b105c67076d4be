"""Launch-configuration sweep of the fused kernel at the benchmark target shape.

For each precision, times the Triton engine with every (BLOCK_N, num_warps, register
cap) in CONFIGS below in place of launch_config's choice, next to torch eager in the same
run, and checks that each configuration's gradients agree with the chosen one's (they
differ only in the order of float32 sums). bench/ptxas_report.py predicts the registers,
spills and programs per SM of these configurations without a GPU; this measures what they
cost. Run it on a GPU after bench/gpu_check.sh (89 configurations, less those
triton_fused.faults_on_gpu refuses; all are compiled first, by one process per CPU core up
to 16 into Triton's disk cache, then timed one after another; rows are written as they are
measured):

  python bench/fused_sweep.py --out $OUT/fused_sweep.md

On the CPU (TRITON_INTERPRET=1, a tiny shape) it only checks that every configuration
computes the same gradients: `python bench/fused_sweep.py --cpu-check`.
"""

from __future__ import annotations

import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench import sweep  # noqa: E402
from bench.common import plain_autograd_layers, precision_and_method  # noqa: E402
from gradserve.kernels import torch_engine, triton_engine, triton_fused  # noqa: E402

TARGET = (1024, 256, (32, 64, 64, 64, 1))  # M, N, layer sizes: the benchmark target
CPU_CHECK = (2, 37, (5, 13, 7, 3))
# (BLOCK_N, warps, register cap, resident, carry): every block size and warp count at
# ptxas' own register choice (255 at the target: one 8-warp program per SM), with the
# pre-activations in the scratch or in registers (LaunchConfig.resident) and then also the
# parameter gradients summed in registers (LaunchConfig.carry): fewer barriers and memory
# operations per block, more spills. And caps that let 2 to 4 programs share an SM at the
# price of some spills (bench/results/ptxas_sm90.md has their sizes).
KEPT = ((False, False), (True, False), (True, True))
CONFIGS = [
    *((block_n, warps, None, resident, carry)
      for resident, carry in KEPT for block_n in (32, 64, 128) for warps in (4, 8)),
    (32, 4, 128, False, False),
    (64, 4, 128, False, False),
    (64, 4, 168, False, False),
    (128, 8, 128, False, False),
]  # fmt: skip
# IEEE float32 is also timed at launch_config's own configuration with the K-chunks it had
# before they were 16 (LaunchConfig.fma_k_chunk; 16 spill less on sm_90:
# bench/results/ptxas_sm90.md), in a row of its own before the others.
OTHER_FMA_K_CHUNK = 32
# The targets' precisions first: if the device call runs out of time, their rows are in.
# "float32 tf32x3": float32 jobs with the engine's float32_matmul="tf32x3".
PRECISIONS = ("tf32", "float32 tf32x3", "bfloat16", "float32")


def with_config(
    block_n: int | None,
    warps: int | None,
    max_registers: int | None = None,
    resident: bool | None = None,
    carry: bool | None = None,
    fma_k_chunk: int | None = None,
):
    """launch_config with BLOCK_N, num_warps, the register cap, where the pre-activations
    and gradient sums stay and IEEE float32's K-chunks replaced (None for all but the cap:
    its own choice)."""
    chosen = triton_fused.launch_config

    def config(widths, n, m, device, precision):
        own = chosen(widths, n, m, device, precision)
        block = block_n or own.block_n
        return triton_fused.LaunchConfig(
            block, *triton_fused.sample_splits(n, block, m, device), warps or own.num_warps,
            max_registers, own.resident if resident is None else resident,
            own.carry if carry is None else carry, fma_k_chunk or own.fma_k_chunk,
        )  # fmt: skip

    return config


def run_with(
    job, device, block_n=None, warps=None, max_registers=None, resident=None, carry=None,
    float32_matmul="ieee", fma_k_chunk=None,
):  # fmt: skip
    original = triton_fused.launch_config
    triton_fused.launch_config = with_config(
        block_n, warps, max_registers, resident, carry, fma_k_chunk
    )
    try:
        return triton_engine.run(job, device, float32_matmul=float32_matmul, path="fused")
    finally:
        triton_fused.launch_config = original


def main():
    parser = sweep.arguments()
    parser.add_argument(
        "--precisions", default=None,
        help=f"comma-separated rows to time (default: {','.join(PRECISIONS)}; "
        "'float32 tf32x3' is written float32-tf32x3)",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu_check else "cuda")
    m, n, sizes = CPU_CHECK if args.cpu_check else TARGET
    precisions = ("float32", "float32 tf32x3") if args.cpu_check else PRECISIONS
    if args.precisions:
        precisions = tuple(p.replace("-", " ") for p in args.precisions.split(","))
        unknown = set(precisions) - set(PRECISIONS)
        if unknown:
            parser.error(f"unknown precisions {sorted(unknown)}: choose from {PRECISIONS}")

    def compile_one(run):
        label, config, fma_k_chunk = run
        precision, method = precision_and_method(label)
        run_with(sweep.make_job(m, n, sizes, precision, device), device,
                 *config or (None,) * 5, float32_matmul=method,
                 fma_k_chunk=fma_k_chunk)  # fmt: skip

    passed = ["--cpu-check"] if args.cpu_check else []
    if args.precisions:
        passed += ["--precisions", args.precisions]
    runs = [(label, config, None) for label in precisions for config in [(), *CONFIGS]]
    if "float32" in precisions:
        runs.append(("float32", (), OTHER_FMA_K_CHUNK))
    if sweep.compile_ahead(__file__, args, runs, compile_one, passed):
        return
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (interpreter)"
    lines = [
        f"# Fused kernel launch configurations on {card}",
        "",
        f"M={m}, N={n}, layer sizes {list(sizes)} (padded widths "
        f"{triton_fused.padded_widths(sizes)}), relu, mse; torch "
        f"{torch.__version__}, triton {triton.__version__}. Times: median ms"
        + (" of triton.testing.do_bench." if device.type == "cuda" else " (interpreter)."),
        "",
        "| precision | BLOCK_N | warps | register cap | pre-activations | gradient sums "
        "| triton ms | vs chosen | vs eager | max grad difference vs chosen "
        "| launch_config's choice |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def columns(config):
        block_n, warps, cap, resident, carry = config
        kept = "registers" if resident else "scratch"
        sums = "registers" if carry else "partials"
        return f"{block_n} | {warps} | {cap or ''} | {kept} | {sums}"

    worst = 0.0
    for label in precisions:
        precision, method = precision_and_method(label)
        job = sweep.make_job(m, n, sizes, precision, device)
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        own = triton_fused.launch_config(
            triton_fused.padded_widths(sizes),
            n,
            m,
            device,
            triton_engine.precision_code(precision, method),
        )
        own_config = (own.block_n, own.num_warps, own.max_registers, own.resident, own.carry)
        chosen = run_with(job, device, float32_matmul=method)
        t_chosen = sweep.median_ms(
            lambda job=job, f=method: run_with(job, device, float32_matmul=f), device
        )
        with plain_autograd_layers():
            t_eager = sweep.median_ms(lambda job=job: torch_engine.run(job, device), device)
        if label == "float32":  # first, so that a run cut short still has it
            worst = max(worst, sweep.time_configurations(
                f"float32 K-chunks of {OTHER_FMA_K_CHUNK}", [own_config],
                lambda config, job=job: run_with(job, device, *config,
                                                 fma_k_chunk=OTHER_FMA_K_CHUNK),
                columns, None, chosen, t_chosen, t_eager, device, lines, args.out,
            ))  # fmt: skip
        worst = max(worst, sweep.time_configurations(
            label, CONFIGS,
            lambda config, job=job, f=method: run_with(job, device, *config, float32_matmul=f),
            columns, own_config, chosen, t_chosen, t_eager, device, lines, args.out,
        ))  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = False
    legend = (
        "'vs chosen' > 1: faster than launch_config's choice. Command: "
        "`python bench/fused_sweep.py`."
    )
    sweep.finish(lines, args.out, legend, worst, "a configuration")


if __name__ == "__main__":
    main()
