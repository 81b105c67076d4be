"""Shared helpers for the benchmarks: timing by median of repeats, result tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

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


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}"
    )


def write_table(name: str, title: str, header: list[str], rows: list[list], notes: str = ""):
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# {title}", "", f"Machine: {machine()}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, name), "w") as f:
        f.write(text)
    print(text)


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
