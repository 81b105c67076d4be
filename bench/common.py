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
