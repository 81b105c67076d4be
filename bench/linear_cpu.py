"""The torch engine's linear layer (kernels/linear_layer.py) against autograd of one
baddbmm, its plain form, on the CPU, in one run.

linear_layer computes the weight gradient's sum over samples in chunks added in float64,
and bfloat16/float16 products as float32 products of the rounded operands. This times the
torch engine with it and with the plain form swapped in (torch.baddbmm in the job's dtype,
narrow for bfloat16/float16, its backward by autograd: what the engine had, and what a
PyTorch user writes), on the same jobs, and gives each one's largest gradient error against
the float64 oracle on the job.
Usage: python bench/linear_cpu.py [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import alternating_medians, plain_autograd_layers, write_table  # noqa: E402
from gradserve.kernels import torch_engine  # noqa: E402
from tests.jobs import ensemble_job, random_job  # noqa: E402
from tests.oracle import engine_tensors, oracle_for, relative_errors  # noqa: E402

JOBS = [
    # (M, N, layer sizes, precision): float32 at the benchmark target's widths and at 2
    # million samples (shared inputs), then the narrow precisions.
    (64, 1024, (32, 64, 64, 1), "float32"),
    (2, 1 << 21, (8, 32, 32, 1), "float32"),
    (64, 1024, (32, 64, 64, 1), "bfloat16"),
    (64, 1024, (32, 64, 64, 1), "float16"),
]


def gradient_error(job, tensors, sizes) -> float:
    got = engine_tensors(torch_engine.run(job, "cpu"))
    ref = oracle_for(sizes, tensors, hidden="tanh").by_name()
    return max(max(relative_errors(got[k], ref[k])) for k in ref if k.startswith("layers."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for m, n, sizes, precision in JOBS:
        tensors = random_job(sizes, m, n, shared_inputs=m * n > 1 << 20, seed=3)
        job = ensemble_job(tensors, sizes, hidden="tanh", precision=precision,
                           input_gradients=False, per_sample_losses=False,
                           forward_outputs=False)  # fmt: skip
        repeats = args.repeats if m * n <= 1 << 20 else max(2, args.repeats // 5)
        times = alternating_medians(
            lambda job=job: torch_engine.run(job, "cpu"),
            {"gradserve": contextlib.nullcontext, "plain": plain_autograd_layers},
            repeats=repeats, warmup=1,
        )  # fmt: skip
        error = gradient_error(job, tensors, sizes)
        with plain_autograd_layers():
            plain_error = gradient_error(job, tensors, sizes)
        rows.append([f"M={m} N={n} {list(sizes)} {precision}",
                     f"{times['gradserve'] * 1e3:.1f}", f"{times['plain'] * 1e3:.1f}",
                     f"{times['gradserve'] / times['plain']:.2f}x",
                     f"{error:.1e}", f"{plain_error:.1e}"])  # fmt: skip
    write_table(
        "linear_cpu.md",
        "Torch engine: its linear layer against autograd of one baddbmm, CPU",
        [
            "job (tanh, mse)",
            "ms, gradserve's layer",
            "ms, plain baddbmm",
            "time ratio",
            "gradient error, gradserve's",
            "gradient error, plain",
        ],  # fmt: skip
        rows,
        "Median wall time of the torch engine's loss + all parameter gradients with each "
        "layer (a ratio > 1: gradserve's is slower). Gradient error: the largest relative "
        "error of a parameter gradient tensor (a model's) against the float64 oracle. "
        "Command: `python bench/linear_cpu.py`. CPU times are for comparison within this run "
        "only.",
    )


if __name__ == "__main__":
    main()
