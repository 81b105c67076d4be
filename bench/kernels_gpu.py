"""Kernel benchmark on a GPU: the Triton engine vs what a PyTorch user would write.

Peers, same inputs, same run: torch eager batched autograd (gradserve's torch engine with
each layer a plain autograd baddbmm, bench.common.plain_autograd_layers),
torch.func.vmap(grad(...)) over stacked parameters, and torch.compile of that vmap(grad).
Each computes the loss and every parameter gradient of every model. Times are medians of
triton.testing.do_bench; achieved TFLOP/s count 6 FLOPs per multiply-add per sample
(forward + both backward products) and are set against the card's measured matmul peak
for the precision; GB/s count the bytes that must cross HBM (inputs, targets, weights,
gradients) against the measured copy bandwidth.

The Triton kernels are compiled first, in parallel (one process per CPU core up to 16, into
Triton's disk cache), so the timed runs do not queue behind one compile after another.

Usage: python bench/kernels_gpu.py [--out FILE] [--no-compile] [--compile-workers W]
                                   [--labels float32,float32-gluon]
       TRITON_INTERPRET=1 python bench/kernels_gpu.py --cpu-check   (every row runs, on a
       few samples under the interpreter, and agrees with the torch engine; times mean nothing)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time

import torch
import triton
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import (  # noqa: E402
    compile_in_parallel,
    plain_autograd_layers,
    precision_and_method,
    share,
    write_lines,
)
from bench.sweep import make_job  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import gluon_fused, torch_engine, triton_engine, triton_fused  # noqa: E402

CASES = [
    # (M, N, layer_sizes, precision, compare with torch.compile, the engine's path).
    # "float32 tf32x3", "float32 gluon": a float32 job with the engine's float32_matmul
    # "tf32x3" or "gluon"; their peers are the float32 row's. "auto" is the path jobs take
    # (triton_engine.takes_fused: fused up to width 128, but per-layer for bfloat16 /
    # float16 / IEEE float32 wider than 64; per-layer beyond); "fused" and "per_layer" rows
    # force one on jobs both paths take, to see which is faster there (their peers are
    # timed once, with the first row of the job).
    # At padded width 128 the per-layer path was 2x (bfloat16) and 3.4x (float32) as fast
    # as the fused kernel on an H100, at one job size; tf32 there and small bfloat16 and
    # float32 jobs tell how far that holds.
    (1024, 256, (32, 64, 64, 64, 1), "float32", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 padded", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 tf32x3", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 tf32x3 padded", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 gluon", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 gluon padded", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "tf32", True, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "bfloat16", True, "auto"),
    (4096, 256, (16, 64, 64, 64, 1), "tf32", False, "auto"),
    (256, 1024, (64, 128, 128, 128, 8), "bfloat16", False, "fused"),
    (256, 1024, (64, 128, 128, 128, 8), "float32", False, "fused"),
    (8192, 64, (16, 32, 32, 1), "float32", False, "auto"),
    (16, 1024, (1024, 1024, 1024, 1), "float32", False, "auto"),
    (16, 1024, (1024, 1024, 1024, 1), "float32 gluon", False, "auto"),
    (16, 1024, (1024, 1024, 1024, 1), "float32 tf32x3", False, "auto"),
    (16, 1024, (1024, 1024, 1024, 1), "bfloat16", False, "auto"),
    (1024, 256, (32, 64, 64, 64, 1), "float32", True, "per_layer"),
    (256, 1024, (64, 128, 128, 128, 8), "float32", False, "per_layer"),
    (256, 1024, (64, 128, 128, 128, 8), "bfloat16", False, "per_layer"),
    (256, 1024, (64, 128, 128, 128, 8), "tf32", False, "auto"),
    (256, 1024, (64, 128, 128, 128, 8), "tf32", False, "per_layer"),
    (64, 64, (64, 128, 128, 128, 8), "bfloat16", False, "fused"),
    (64, 64, (64, 128, 128, 128, 8), "bfloat16", False, "per_layer"),
    (64, 64, (64, 128, 128, 128, 8), "float32", False, "fused"),
    (64, 64, (64, 128, 128, 128, 8), "float32", False, "per_layer"),
    # "float32 gluon" (here, and early at the target and width 1024 for their targets):
    # IEEE float32 on the Gluon kernels (float32_matmul="gluon": up to 8x8 outputs a
    # thread), fused up to width 64, per-layer where float32 takes that path.
    (256, 1024, (64, 128, 128, 128, 8), "float32 gluon", False, "per_layer"),
    (1024, 256, (32, 64, 64, 64, 1), "float32 gluon", True, "per_layer"),
    (8192, 64, (16, 32, 32, 1), "float32 gluon", False, "auto"),
]
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# "... padded": float32 on the fused kernel (IEEE or three tf32 products on tl.dot, IEEE on
# Gluon) with the output layer computed as the products padded to 16 outputs
# (triton_fused.NARROW_OUTPUT and gluon_fused.NARROW_OUTPUT 0), to time what the
# reductions that replace them save.
PADDED = " padded"


@contextlib.contextmanager
def row_engine(label: str):
    """(the job's precision, its float32 method) for a row label, with the fused kernels'
    narrow-output reductions off for the whole block where the label says "padded"."""
    precision, method = precision_and_method(label.removesuffix(PADDED))
    saved = triton_fused.NARROW_OUTPUT, gluon_fused.NARROW_OUTPUT
    if label.endswith(PADDED):
        triton_fused.NARROW_OUTPUT = gluon_fused.NARROW_OUTPUT = 0
    try:
        yield precision, method
    finally:
        triton_fused.NARROW_OUTPUT, gluon_fused.NARROW_OUTPUT = saved


DEVICE = "cuda"  # "cpu" for --cpu-check


def bench(fn) -> float:
    if DEVICE == "cpu":  # the check runs each row once: one call's ms
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]  # median ms


def measured_peaks() -> dict[str, float]:
    """Dense matmul TFLOP/s per precision and device copy GB/s, measured on this card."""
    n = 8192
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    peaks = {}
    for precision in ("float32", "tf32", "bfloat16"):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        x, y = (a.bfloat16(), b.bfloat16()) if precision == "bfloat16" else (a, b)
        ms = bench(lambda x=x, y=y: x @ y)
        peaks[precision] = 2 * n**3 / ms / 1e9
    torch.backends.cuda.matmul.allow_tf32 = False
    peaks["float16"] = peaks["bfloat16"]
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    peaks["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    return peaks


def vmap_grad_fn(sizes, precision):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    base = nn.Sequential(*layers).to(DEVICE)

    def loss_fn(params, x, y):
        return nn.functional.mse_loss(functional_call(base, params, (x,)), y)

    g = vmap(grad(loss_fn))

    def run(params, x, y):
        if precision in AUTOCAST:
            with torch.autocast(DEVICE, dtype=AUTOCAST[precision]):
                return g(params, x, y)
        return g(params, x, y)

    return run


def peer_times(job, sizes, precision, with_compile: bool) -> tuple[float, float, float]:
    """Median ms of torch eager, vmap(grad) and torch.compile(vmap(grad)) (nan if not
    asked) on the job."""
    with plain_autograd_layers():
        t_eager = bench(lambda: torch_engine.run(job, DEVICE))
    params = {}
    for i in range(len(sizes) - 1):
        params[f"{2 * i}.weight"] = job.weights[i]
        params[f"{2 * i}.bias"] = job.biases[i]
    fn = vmap_grad_fn(sizes, precision)
    t_vmap = bench(lambda: fn(params, job.inputs, job.targets))
    t_compile = float("nan")
    if with_compile:
        compiled = torch.compile(fn)
        compiled(params, job.inputs, job.targets)  # compile outside the timing
        t_compile = bench(lambda: compiled(params, job.inputs, job.targets))
    return t_eager, t_vmap, t_compile


def cpu_check() -> None:
    """Every row's Triton run on a few samples under the interpreter (wide layers cut to 130,
    still the per-layer path), against the torch engine, and its eager and vmap(grad)
    peers: the script's own code checked before a GPU call spends minutes on it. bfloat16
    rows are left out (the interpreter cannot compute bfloat16 dots)."""
    global DEVICE
    DEVICE = "cpu"
    for m, n, sizes, label, _, path in CASES:
        with row_engine(label) as (precision, method):
            if precision not in triton_engine.precisions():
                continue
            sizes = tuple(130 if w > triton_engine.FUSED_MAX_WIDTH else w for w in sizes)
            job = make_job(min(m, 2), min(n, 5), sizes, precision, DEVICE)
            got = triton_engine.run(job, DEVICE, float32_matmul=method, path=path)
        want = torch_engine.run(job, DEVICE)
        peer_times(job, sizes, precision, with_compile=False)  # the peers' code runs too
        pairs = zip(got.weight_grads + [got.loss], want.weight_grads + [want.loss], strict=True)
        error = max(((a - b).norm() / b.norm()).item() for a, b in pairs)
        # a smoke check of the script (the oracle tests check the engine): tf32 rows differ
        # from the torch engine's float32 by tf32 rounding, which on these relu networks of
        # 5 samples reached 4.6e-2 ([32, 128, 128, 8]; the fused and per-layer paths, each
        # rounding its operands, agreed with each other to 1e-4 there)
        verdict = "ok" if error < (5e-2 if precision == "tf32" else 1e-5) else "WRONG"
        fused = triton_engine.takes_fused(precision, sizes, False, path, method)
        fused = "fused" if fused else "per-layer"
        print(f"| {label} | {list(sizes)} | {fused} | {verdict} | {error:.1e} |", flush=True)
        if verdict != "ok":
            raise SystemExit(f"{label} {sizes} {path}: relative error {error:.1e}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels_gpu.md")
    )
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--compile-workers", type=int, default=min(16, os.cpu_count() or 1),
        help="processes compiling the Triton kernels ahead of the timing run",
    )  # fmt: skip
    parser.add_argument("--compile-share", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-check", action="store_true")
    parser.add_argument(
        "--labels", default="",
        help="only the rows of these precision labels, comma-separated, '-' for ' ' "
        "(float32,float32-gluon: IEEE float32 on tl.dot and on Gluon)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.cpu_check:
        cpu_check()
        return
    labels = {label.replace("-", " ") for label in args.labels.split(",") if label}
    cases = [case for case in CASES if not labels or case[3] in labels]
    if args.compile_share:  # a child of compile_in_parallel: run its share once, no timing
        for m, n, sizes, label, _, path in share(cases, args.compile_share):
            with row_engine(label) as (precision, method):
                job = make_job(m, n, sizes, precision, DEVICE)
                triton_engine.run(job, DEVICE, float32_matmul=method, path=path)
        torch.cuda.synchronize()
        return
    if args.compile_workers:
        passed = ("--labels", args.labels) if args.labels else ()
        compile_in_parallel(__file__, min(args.compile_workers, len(cases)), passed)
    card = torch.cuda.get_device_name()
    peaks = measured_peaks()
    lines = [
        f"# Triton engine vs PyTorch peers on {card}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}. Measured peaks: "
        + ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in peaks.items() if k != "copy_gbps")
        + f", copy {peaks['copy_gbps']:.0f} GB/s. Loss: mse, hidden relu. "
        "Times: median ms of triton.testing.do_bench.",
        "",
        "| M | N | layer sizes | precision | path | triton ms | eager ms | vmap(grad) ms "
        "| compile(vmap(grad)) ms | vs eager | vs vmap | vs compile | TFLOP/s (% peak) "
        "| GB/s (% copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peers = {}  # (M, N, sizes, precision) -> the PyTorch peers' times
    for m, n, sizes, label, with_compile, path in cases:
        with row_engine(label) as (precision, method):
            job = make_job(m, n, sizes, precision, DEVICE)
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            fused = triton_engine.takes_fused(precision, sizes, False, path, method)
            t_triton = bench(
                functools.partial(triton_engine.run, job, DEVICE, float32_matmul=method, path=path)
            )
        key = (m, n, sizes, precision)
        if key not in peers:
            peers[key] = peer_times(job, sizes, precision, with_compile and not args.no_compile)
        t_eager, t_vmap, t_compile = peers[key]
        torch.backends.cuda.matmul.allow_tf32 = False
        flops = kernels.flops(job.mlp, m, n)
        tflops = flops / t_triton / 1e9
        param_bytes = (
            sum(w.numel() + b.numel() for w, b in zip(job.weights, job.biases, strict=True)) * 4
        )
        moved = (job.inputs.numel() + job.targets.numel()) * 4 + 2 * param_bytes
        gbps = moved / t_triton / 1e6
        lines.append(
            f"| {m} | {n} | {list(sizes)} | {label} | {'fused' if fused else 'per-layer'} "
            f"| {t_triton:.3f} | {t_eager:.3f} "
            f"| {t_vmap:.3f} | {t_compile:.3f} | {t_eager / t_triton:.2f}x "
            f"| {t_vmap / t_triton:.2f}x | {t_compile / t_triton:.2f}x "
            f"| {tflops:.1f} ({100 * tflops / peaks[precision]:.0f}%) "
            f"| {gbps:.0f} ({100 * gbps / peaks['copy_gbps']:.0f}%) |"
        )
        print(lines[-1], flush=True)
        write_lines(args.out, lines)  # row by row: a run cut off by its time limit keeps its rows
    print("\n".join(lines))


if __name__ == "__main__":
    main()
