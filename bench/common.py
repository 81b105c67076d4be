"""Shared helpers for the benchmarks: timing by median of repeats, result tables."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def median_seconds(fn, *, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, *, repeats: int = 20, warmup: int = 3) -> dict:
    """Median seconds of each of `fns` (name -> callable), timed one call of each in turn,
    so that a slow phase of a shared machine hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def alternating_medians(fn, variants: dict, *, repeats: int, warmup: int = 3) -> dict:
    """Median seconds of `fn` under each of `variants` (name -> a context manager factory),
    timed twice in alternation and averaged, so that a slow phase of a shared machine hits
    every variant alike."""
    times = dict.fromkeys(variants, 0.0)
    for _ in range(2):
        for name, context in variants.items():
            with context():
                times[name] += median_seconds(fn, repeats=repeats, warmup=warmup) / 2
    return times


def run_isolated(script: str, case, timeout: float = 300) -> tuple[dict | None, str]:
    """Run `script --one <case as JSON>` in its own process (CUDA_LAUNCH_BLOCKING=1, so a
    fault names the launch that made it) and return (the JSON object it printed last, "")
    or (None, the end of its error output) when it failed."""
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    try:
        done = subprocess.run(
            [sys.executable, script, "--one", json.dumps(case)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, "timed out"
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line), ""
    tail = [line for line in done.stderr.splitlines() if line.strip()][-3:]
    return None, " / ".join(tail)[-300:]


def compile_in_parallel(script: str, workers: int, args=()) -> None:
    """Run `script *args --compile-share K/W` for every K < W at once and wait for all.
    Each runs its share of the benchmark's kernels once (see `share`), so Triton's on-disk
    cache holds all of them and the timing run that follows loads each in a moment instead
    of compiling them one after another (seconds each, one CPU core at a time)."""
    procs = [
        subprocess.Popen([sys.executable, script, *args, "--compile-share", f"{k}/{workers}"])
        for k in range(workers)
    ]
    failed = [p.args for p in procs if p.wait() != 0]
    if failed:  # the timing run still compiles whatever is missing, only more slowly
        print(f"compiling ahead failed in {len(failed)} of {workers} processes: {failed}")


def share(items: list, spec: str) -> list:
    """The K-th of W interleaved shares of `items`, for spec "K/W"."""
    k, w = (int(part) for part in spec.split("/"))
    return items[k::w]


def precision_and_method(label: str) -> tuple[str, str]:
    """A benchmark row's precision label -> (the job's precision, its float32 method):
    "float32 tf32x3" -> ("float32", "tf32x3"), "float32 gluon" -> ("float32", "gluon"),
    "tf32" -> ("tf32", "ieee")."""
    precision, _, method = label.partition(" ")
    return precision, method or "ieee"


def write_lines(path: str | None, lines: list[str]) -> None:
    """Write a report (nothing without a path); benchmarks call it after every row, so a
    run cut off by its time limit keeps what it measured."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_table(name: str, title: str, header: list[str], rows: list[list], notes: str = ""):
    for row in rows:
        if len(row) != len(header):  # a cell under the wrong heading reads as a wrong number
            raise ValueError(f"{name}: {len(row)} cells under {len(header)} headings: {row}")
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# {title}", "", f"Machine: {machine()}", "", markdown_table(header, rows)]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, name), "w") as f:
        f.write(text)
    print(text)


@contextlib.contextmanager
def plain_autograd_layers():
    """The torch engine with each layer one torch.baddbmm in the job's dtype (narrow for
    bfloat16/float16), differentiated by autograd, as a PyTorch user writes it, in place
    of kernels/linear_layer.py's hand-written backward: the GPU benchmarks' "torch eager
    batched autograd" peer (what the torch engine computed before that layer) and
    bench/linear_cpu.py's comparison."""
    from unittest import mock

    import torch

    from gradserve.kernels import torch_engine
    from gradserve.kernels.linear_layer import NARROW_DTYPES

    class PlainLinear:
        @staticmethod
        def apply(h_t, weight, bias, precision):
            narrow = NARROW_DTYPES.get(precision)
            if narrow is None:
                return torch.baddbmm(bias.unsqueeze(2), weight, h_t)
            out = torch.baddbmm(bias.to(narrow).unsqueeze(2), weight.to(narrow), h_t.to(narrow))
            return out.to(h_t.dtype)

    with mock.patch.object(torch_engine, "BatchedLinear", PlainLinear):
        yield


def make_nets(m: int, sizes, activation=None) -> list:
    """m nn.Sequential MLPs of the given widths (seeded), `activation` (a module class,
    default ReLU) between the linear layers."""
    import torch
    from torch import nn

    activation = activation or nn.ReLU
    torch.manual_seed(0)
    nets = []
    for _ in range(m):
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        nets.append(nn.Sequential(*layers))
    return nets


def numpy_ensemble(
    rng: np.random.Generator, m: int, n: int, sizes
) -> tuple[dict, np.ndarray, np.ndarray]:
    """An ensemble job as numpy arrays: M networks of `sizes` (weights scaled by 1/d_in),
    per-model inputs [M, N, d0] and targets [M, N, dL], all standard normal."""
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        params[f"layers.{i}.weight"] = rng.standard_normal((m, d_out, d_in), np.float32) / d_in
        params[f"layers.{i}.bias"] = rng.standard_normal((m, d_out), np.float32)
    x = rng.standard_normal((m, n, sizes[0]), np.float32)
    y = rng.standard_normal((m, n, sizes[-1]), np.float32)
    return params, x, y
