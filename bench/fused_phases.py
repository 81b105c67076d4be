"""Where the fused kernel's time goes on a GPU: per-phase cycles and programs per SM.

Runs the benchmark target (M=1024, N=256, [32, 64, 64, 64, 1], relu, mse) per precision
with the kernel's profiling build (triton_fused.fused_mlp's `profile`: each program stamps
the SM cycle counter at the end of every phase of every block of samples, and its SM and
start/end time), next to the plain build's time in the same run. Reports, per phase, the
median cycles per block and its share; per program the SM it ran on, from which the
programs that actually shared an SM at once. The stamps cost a little time themselves
(the profiled/plain ratio says how much).

Both builds of every precision are compiled first, in parallel (bench.common.
compile_in_parallel), and the report is written after each precision.

Usage (GPU only; the timers are inline PTX): python bench/fused_phases.py [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import compile_in_parallel, precision_and_method, share, write_lines  # noqa: E402
from bench.sweep import make_job  # noqa: E402
from gradserve.kernels import triton_engine, triton_fused  # noqa: E402

TARGET = (1024, 256, (32, 64, 64, 64, 1))
# "float32 tf32x3": float32 jobs with the engine's float32_matmul="tf32x3".
PRECISIONS = ("tf32", "bfloat16", "float32", "float32 tf32x3")


def phase_names(num_layers: int) -> list[str]:
    """Names of the 2L + 3 phases between a block's 2L + 4 stamps (fused_mlp's layout)."""
    return (
        [f"forward layer {i}" for i in range(num_layers)]
        + ["loss (+ barrier)", "norm pass"]
        + [f"backward layer {i}" for i in reversed(range(num_layers))]
        + ["end barrier"]
    )


def phase_cycles(stamps: torch.Tensor, num_layers: int, blocks: int) -> list[float]:
    """Median cycles of each phase over every block of every program."""
    per_block = stamps[:, 3:].reshape(stamps.shape[0], blocks, 2 * num_layers + 4).double()
    durations = per_block.diff(dim=2).reshape(-1, 2 * num_layers + 3)
    return durations.median(dim=0).values.tolist()


def residency(stamps: torch.Tensor) -> tuple[int, float]:
    """(most programs running on one SM at once, their time-weighted mean over the busy
    time of each SM) from each program's SM and start/end nanoseconds."""
    by_sm: dict[int, list[tuple[int, int]]] = {}
    for sm, start, end in stamps[:, :3].tolist():
        by_sm.setdefault(sm, []).append((start, +1))
        by_sm[sm].append((end, -1))
    most, weighted, busy = 0, 0.0, 0.0
    for events in by_sm.values():
        events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same time
        running, last = 0, events[0][0]
        for time, change in events:
            if running:
                weighted += running * (time - last)
                busy += time - last
            running += change
            last = time
            most = max(most, running)
    return most, weighted / busy if busy else 0.0


def run_profiled(job, device, records: list, float32_matmul: str = "ieee") -> None:
    """The Triton engine on `job` with the profiling build; appends (config, stamps)."""
    original = triton_fused.fused_mlp
    triton_fused.fused_mlp = functools.partial(original, profile=records)
    try:
        triton_engine.run(job, device, float32_matmul=float32_matmul, path="fused")
    finally:
        triton_fused.fused_mlp = original


def main() -> None:
    import triton

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--compile-share", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda")
    m, n, sizes = TARGET
    builds = [(label, profiled) for label in PRECISIONS for profiled in (False, True)]
    if args.compile_share:  # a child of compile_in_parallel: run its share once, no timing
        for label, profiled in share(builds, args.compile_share):
            precision, method = precision_and_method(label)
            job = make_job(m, n, sizes, precision, device)
            if profiled:
                run_profiled(job, device, [], method)
            else:
                triton_engine.run(job, device, float32_matmul=method, path="fused")
        torch.cuda.synchronize()
        return
    compile_in_parallel(__file__, min(len(builds), os.cpu_count() or 1))
    num_layers = len(sizes) - 1
    names = phase_names(num_layers)
    lines = [
        f"# Fused kernel phases on {torch.cuda.get_device_name()}",
        "",
        f"M={m}, N={n}, layer sizes {list(sizes)}, relu, mse, parameter gradients; torch "
        f"{torch.__version__}, triton {triton.__version__}. Cycles: median per block of "
        "samples over every block of every program (SM cycle counter).",
        "",
    ]
    for label in PRECISIONS:
        precision, method = precision_and_method(label)
        job = make_job(m, n, sizes, precision, device)

        def plain_run(job=job, method=method):
            triton_engine.run(job, device, float32_matmul=method, path="fused")

        def profiled_run(job=job, method=method, records=None):
            run_profiled(job, device, [] if records is None else records, method)

        profiled_run()  # load both builds before timing
        plain_run()
        plain = triton.testing.do_bench(plain_run)
        profiled = triton.testing.do_bench(profiled_run)
        records: list = []
        profiled_run(records=records)
        torch.cuda.synchronize()
        config, stamps = records[0][0], records[0][1].cpu()
        cycles = phase_cycles(stamps, num_layers, config.blocks_per_split)
        most, mean = residency(stamps)
        total = sum(cycles)
        programs_ns = (stamps[:, 2] - stamps[:, 1]).double()
        # first program's start to last program's end: the fused kernel alone, without the
        # engine's allocations, launches and reductions around it
        span_ms = (stamps[:, 2].max() - stamps[:, 1].min()).item() / 1e6
        lines += [
            f"## {label}: {config}",
            "",
            f"Plain build {plain:.3f} ms, profiled {profiled:.3f} ms (engine call, median of "
            f"do_bench). Programs {stamps.shape[0]}, median program time "
            f"{programs_ns.median().item() / 1e3:.1f} us; programs sharing an SM at once: at "
            f"most {most}, time-weighted mean {mean:.2f}. Kernel span (first program start to "
            f"last program end) {span_ms:.3f} ms of the profiled call's {profiled:.3f}. Block "
            f"total {total:.0f} cycles.",
            "",
            "| phase | median cycles per block | share |",
            "|---|---|---|",
            *(
                f"| {name} | {c:.0f} | {c / total:.0%} |"
                for name, c in zip(names, cycles, strict=True)
            ),
            "",
        ]
        print("\n".join(lines[-len(names) - 6 :]), flush=True)
        write_lines(args.out, lines)  # after each precision: a cut-off run keeps what it measured
    lines.append("Command: `python bench/fused_phases.py`.")
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
