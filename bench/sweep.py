"""What the configuration sweeps (bench/fused_sweep.py, bench/layered_sweep.py) share: the
job they time, their options, compiling every configuration ahead in parallel, and the
timing of each configuration against the engine's own choice and torch eager, and the
table's ending and gradient check."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import triton
from triton.runtime.errors import OutOfResources

from bench.common import compile_in_parallel, share, write_lines
from gradserve import kernels
from gradserve.kernels.triton_fused import FaultingLaunch


def make_job(m, n, sizes, precision, device):
    """M relu networks of `sizes`, N per-model samples each, mse: the GPU benchmarks' job."""
    g = torch.Generator(device=device).manual_seed(0)
    weights, biases = [], []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        weights.append(torch.randn(m, b, a, device=device, generator=g) * a**-0.5)
        biases.append(torch.randn(m, b, device=device, generator=g) * 0.1)
    x = torch.randn(m, n, sizes[0], device=device, generator=g)
    y = torch.randn(m, n, sizes[-1], device=device, generator=g)
    return kernels.EnsembleJob(
        mlp=kernels.MLPSpec(tuple(sizes), kernels.Activation("relu")),
        loss=kernels.LossSpec("mse"),
        weights=weights, biases=biases, inputs=x, targets=y, precision=precision,
    )  # fmt: skip


def arguments() -> argparse.ArgumentParser:
    """A sweep's options: where its table goes, the CPU check, the compiling processes
    (and the hidden share of one of them)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument(
        "--compile-workers", type=int, default=None,
        help="processes compiling the kernels ahead of the timing run (default: one per "
        "CPU core up to 16 on a GPU, none on the CPU)",
    )  # fmt: skip
    parser.add_argument("--compile-share", default=None, help=argparse.SUPPRESS)
    return parser


def compile_ahead(script: str, args, runs: list, run_one, passed: list[str]) -> bool:
    """In a compiling child (--compile-share K/W): run its share of `runs` once with
    `run_one(run)` (a configuration too large for the GPU is compiled, then refused at
    launch, and one known to fault is refused: the timing run says so) and return True, for
    the child to stop there. Else start the children (one per CPU core up to 16 on a GPU,
    none on the CPU, unless --compile-workers says otherwise; `passed`: their other
    options) and return False."""
    if args.compile_share:
        for run in share(runs, args.compile_share):
            try:
                run_one(run)
            except (OutOfResources, FaultingLaunch):
                pass
        return True
    workers = args.compile_workers
    if workers is None:
        workers = 0 if args.cpu_check else min(16, os.cpu_count() or 1, len(runs))
    if workers:
        compile_in_parallel(script, workers, passed)
    return False


def median_ms(fn, device) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def largest_difference(a, b) -> float:
    """Largest |a - b| over all parameter gradients, relative to the largest |b|."""
    pairs = list(zip(a.weight_grads + a.bias_grads, b.weight_grads + b.bias_grads, strict=True))
    scale = max(float(y.abs().max()) for _, y in pairs)
    return max(float((x - y).abs().max()) for x, y in pairs) / scale


def time_configurations(
    label, configs, run, columns, chosen, reference, t_reference, t_eager, device, lines, out
):  # fmt: skip
    """A table row per configuration of `label`'s job: `run(config)` timed (median ms)
    against `reference` (the engine's own choice: its result and its time `t_reference`)
    and torch eager, with the largest gradient difference from the reference's; a
    configuration too large for the GPU, or known to fault there, gets a row that says so,
    and the sweep goes on.
    `columns(config)`: the row's configuration cells; `chosen`: the one marked as the
    engine's. Rows are written as they come, so a cut-off run keeps them. Returns the
    largest difference."""
    worst = 0.0
    for config in configs:
        try:
            result = run(config)
        except OutOfResources as error:
            lines.append(f"| {label} | {columns(config)} | does not fit: {error} | | | | |")
        except FaultingLaunch as error:
            lines.append(f"| {label} | {columns(config)} | not run: {error} | | | | |")
        else:
            diff = largest_difference(result, reference)
            worst = max(worst, diff)
            t = median_ms(lambda c=config: run(c), device)
            mark = "yes" if config == chosen else ""
            lines.append(
                f"| {label} | {columns(config)} | {t:.3f} | {t_reference / t:.2f}x "
                f"| {t_eager / t:.2f}x | {diff:.1e} | {mark} |"
            )
        print(lines[-1], flush=True)
        write_lines(out, lines)
    return worst


def finish(lines: list[str], out: str | None, legend: str, worst: float, what: str) -> None:
    """Write and print the sweep's table with its closing line, then fail if any variant's
    gradients differ from the reference one's by more than float32 rounding: each adds the
    same products in another order (bf16 operands round identically in each), so a large
    difference is a kernel bug."""
    lines += ["", legend]
    write_lines(out, lines)
    print("\n".join(lines))
    if worst > 1e-4:
        raise SystemExit(f"{what}'s gradients differ by {worst:.1e} (relative)")
