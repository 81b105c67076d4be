"""The per-layer path's sums over the samples, split across programs or not.

A weight gradient's product (K = N samples) and a bias gradient's column sums have few
tiles when the models are few: kernels/triton_layered.py then splits the samples across
programs (split_length) and adds the partial sums in a fixed order. On a GPU this times the
Triton engine's per-layer path on jobs with few models and many samples with the split (as
the engine chooses it) and without (SPLIT_MIN_LENGTH beyond N), alternately, next to torch
eager batched autograd (plain autograd baddbmm layers, as bench/kernels_gpu.py's peer), and
gives each one's largest gradient error against the job in float64 (the torch engine on the
same GPU). The last row, the benchmark's width-1024 one, fills the GPU without a split: its
two columns run the same kernels.

  python bench/split_sums.py --out $OUT/split_sums.md

On the CPU (`--cpu`; the interpreter never splits, and took 4 minutes for one job of 2**14
samples) it models the accuracy side instead, in torch: one output unit's weight gradient
over 256 inputs, as the GEMM adds it (float32 products of 32 samples, added step by step to
a float32 running sum) in one range or in the ranges an H100 (132 SMs) takes for its four
tiles, the ranges' sums added in order, against the float64 sum. A model of the order of
the additions, not the kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import torch
import triton

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import (  # noqa: E402
    machine,
    markdown_table,
    plain_autograd_layers,
    write_lines,
    write_table,
)
from bench.sweep import make_job  # noqa: E402
from gradserve.kernels import torch_engine, triton_engine, triton_layered  # noqa: E402
from tests.kernels.gemm_checks import recorded_splits  # noqa: E402
from tests.oracle import relative_errors  # noqa: E402

# (M, N, layer sizes, precision, IEEE float32 GEMM): one or a few wide models with many
# samples, whose weight gradients have 1 to 16 tiles; the last, the benchmark's width-1024
# row, fills the GPU.
GPU_JOBS = [
    (1, 1 << 20, (3, 256, 256, 256, 1), "bfloat16", "ieee"),
    (1, 1 << 20, (3, 256, 256, 256, 1), "tf32", "ieee"),
    (1, 1 << 20, (3, 256, 256, 256, 1), "float32", "ieee"),
    (1, 1 << 20, (3, 256, 256, 256, 1), "float32", "gluon"),
    (4, 1 << 18, (16, 512, 512, 8), "tf32", "ieee"),
    (16, 1024, (1024, 1024, 1024, 1), "tf32", "ieee"),
]
MODEL_SAMPLES = [1 << 16, 1 << 18, 1 << 20, 1 << 22]


@contextlib.contextmanager
def unsplit():
    saved = triton_layered.SPLIT_MIN_LENGTH
    triton_layered.SPLIT_MIN_LENGTH = 1 << 62
    try:
        yield
    finally:
        triton_layered.SPLIT_MIN_LENGTH = saved


def gradient_error(result, reference) -> float:
    pairs = zip(result.weight_grads + result.bias_grads,
                reference.weight_grads + reference.bias_grads, strict=True)  # fmt: skip
    return max(max(relative_errors(got, ref.double())) for got, ref in pairs)


def float64_reference(job, device):
    """The job in float64 on the torch engine."""
    return torch_engine.run(dataclasses.replace(
        job, weights=[w.double() for w in job.weights], biases=[b.double() for b in job.biases],
        inputs=job.inputs.double(), targets=job.targets.double(), precision="float64",
    ), device)  # fmt: skip


def gpu_milliseconds(fn) -> float:
    """Median ms of `fn` on the GPU."""
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]


def timed_rows(out: str | None) -> None:
    rows = []
    header = ["job (relu, mse; per-layer path)", "ranges (most split sum)", "ms, split",
              "ms, unsplit", "unsplit / split", "eager / split", "gradient error, split",
              "gradient error, unsplit"]  # fmt: skip
    title = "Per-layer path: sums over the samples split across programs or not"
    card = f"{torch.cuda.get_device_name()}, triton {triton.__version__}, {machine()}"
    notes = (
        "Median ms (triton.testing.do_bench) of the job's loss and gradients, split, unsplit "
        "and torch eager batched autograd alternately, twice, averaged. Gradient error: the "
        "largest relative error of a parameter gradient tensor against the same job in "
        "float64 (torch engine, same GPU). Command: `python bench/split_sums.py --out "
        "$OUT/split_sums.md`."
    )
    for m, n, sizes, precision, float32_matmul in GPU_JOBS:
        job = make_job(m, n, sizes, precision, "cuda")
        options = dict(path="per_layer", float32_matmul=float32_matmul)
        run = lambda job=job, o=options: triton_engine.run(job, "cuda", **o)  # noqa: E731
        reference = float64_reference(job, "cuda")
        ranges = [1]
        with recorded_splits(ranges):
            split_error = gradient_error(run(), reference)
        with unsplit():
            unsplit_error = gradient_error(run(), reference)
        variants = {
            "split": (contextlib.nullcontext, run),
            "unsplit": (unsplit, run),
            "eager": (plain_autograd_layers, lambda job=job: torch_engine.run(job, "cuda")),
        }
        times = dict.fromkeys(variants, 0.0)
        for _ in range(2):  # alternately, averaged
            for name, (context, fn) in variants.items():
                with context():
                    times[name] += gpu_milliseconds(fn) / 2
        gemm = " (Gluon GEMM)" if float32_matmul == "gluon" else ""
        rows.append([f"M={m} N={n} {list(sizes)} {precision}{gemm}", max(ranges),
                     f"{times['split']:.3f}", f"{times['unsplit']:.3f}",
                     f"{times['unsplit'] / times['split']:.2f}x",
                     f"{times['eager'] / times['split']:.2f}x",
                     f"{split_error:.1e}", f"{unsplit_error:.1e}"])  # fmt: skip
        print(rows[-1], flush=True)
        write_lines(out, [f"# {title}", "", card, "", markdown_table(header, rows), "", notes])


def modelled_error(n: int, length: int, width: int = 256) -> float:
    """Relative error of one output unit's weight gradient over `width` inputs, summed as
    the GEMM sums it: 32-sample float32 products added in turn to a float32 running sum per
    range of `length` samples, the ranges' sums added in order."""
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, width, generator=g)
    dz = torch.randn(n, 1, generator=g) / n  # dLoss/dz of a mean loss
    exact = (dz.double() * h.double()).sum(0)
    steps = (dz * h).view(-1, 32, width).sum(1)  # [N / 32, width] float32
    total = torch.zeros(width)
    for start in range(0, n, length):
        running = torch.zeros(width)
        for step in steps[start // 32 : (start + length) // 32]:
            running += step
        total += running
    return ((total.double() - exact).norm() / exact.norm()).item()


def summation_model() -> None:
    rows = []
    for n in MODEL_SAMPLES:
        length = triton_layered.split_length(n, 4, 132)  # four tiles on an H100's 132 SMs
        rows.append([n, -(-n // length), f"{modelled_error(n, length):.1e}",
                     f"{modelled_error(n, n):.1e}"])  # fmt: skip
    write_table(
        "split_sums_model.md",
        "Per-layer path: the weight gradient's float32 sum over the samples, split or not "
        "(a model)",
        ["N", "ranges (split)", "relative error, split", "relative error, unsplit"],
        rows,
        "One output unit's weight gradient over 256 inputs (normal inputs and dLoss/dz), "
        "summed in torch in the order of the per-layer GEMM's additions: 32-sample float32 "
        "products added in turn to a float32 running sum, per range (split: the ranges "
        "triton_layered.split_length gives four tiles on 132 SMs; unsplit: one range), the "
        "ranges' sums added in order; against the float64 sum. A model of the additions' "
        "order, not a run of the kernel. Command: `python bench/split_sums.py --cpu`.",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu", action="store_true", help="the summation model only")
    args = parser.parse_args()
    if args.cpu:
        summation_model()
    else:
        timed_rows(args.out)


if __name__ == "__main__":
    main()
