"""The torch engine's compute time inside a server against the same engine in this process,
same job, same run (CPU).

The server reports each job's compute seconds (its engine launch, JobSummary); here the
same EnsembleJob runs through kernels.run in this process. A ratio near 1 means the server
adds nothing to the engine's own time; memory the server's allocator settings make the
engine fault in afresh for every tensor shows as a ratio above 1 (server/memory.py). Also
reported: the server's resident memory right after the jobs and once it has been idle.
With --compare-ceiling BYTES a second server, started with --heap-ceiling-bytes BYTES, runs
the same jobs in the same run (its compute time against the default server's).
Usage: python bench/server_compute.py [--repeats R] [--compare-ceiling BYTES]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import median_seconds, numpy_ensemble, write_table  # noqa: E402
from bench.transfer import gradserve_server  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402
from gradserve.server.service import RELEASE_MEMORY_AFTER_IDLE_S  # noqa: E402
from tests.process_memory import memory_bytes  # noqa: E402

SHAPES = [
    # (M, N, layer_sizes): bench/engine_cpu.py's jobs, then one of 64 MiB activations.
    (256, 64, (32, 64, 64, 1)),
    (1024, 32, (16, 32, 32, 1)),
    (64, 256, (64, 128, 128, 8)),
    (64, 4096, (32, 64, 64, 1)),
]


def in_process_job(params: dict, x: np.ndarray, y: np.ndarray) -> kernels.EnsembleJob:
    layers = len(params) // 2
    sizes = [x.shape[-1]] + [params[f"layers.{i}.weight"].shape[1] for i in range(layers)]
    return kernels.EnsembleJob(
        mlp=kernels.MLPSpec(tuple(sizes), kernels.Activation("relu")),
        loss=kernels.LossSpec("mse"),
        weights=[torch.from_numpy(params[f"layers.{i}.weight"]) for i in range(layers)],
        biases=[torch.from_numpy(params[f"layers.{i}.bias"]) for i in range(layers)],
        inputs=torch.from_numpy(x),
        targets=torch.from_numpy(y),
    )


def served_seconds(client: GradientClient, params: dict, x, y, repeats: int) -> float:
    """The median of the server's reported compute seconds over `repeats` jobs."""
    served = []
    for k in range(repeats + 3):
        result = client.compute(params, x, y, loss="mse")
        if k >= 3:  # the first ones warm up, as median_seconds' do
            served.append(result.summary["compute_seconds"])
    return statistics.median(served)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compare-ceiling", type=int, metavar="BYTES")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with contextlib.ExitStack() as stack:
        server, address = stack.enter_context(gradserve_server("--device", "cpu"))
        client = stack.enter_context(GradientClient(address, timeout=300))
        other = None
        if args.compare_ceiling is not None:
            flags = ("--device", "cpu", "--heap-ceiling-bytes", str(args.compare_ceiling))
            _, other_address = stack.enter_context(gradserve_server(*flags))
            other = stack.enter_context(GradientClient(other_address, timeout=300))
        for m, n, sizes in SHAPES:
            params, x, y = numpy_ensemble(rng, m, n, sizes)
            job = in_process_job(params, x, y)
            local = median_seconds(
                lambda job=job: kernels.run(job, "torch", torch.device("cpu")),
                repeats=args.repeats,
            )
            remote = served_seconds(client, params, x, y, args.repeats)
            busy = memory_bytes(server.pid)
            time.sleep(RELEASE_MEMORY_AFTER_IDLE_S + 1.0)
            idle = memory_bytes(server.pid)
            row = [
                f"M={m} N={n} {list(sizes)}", f"{local * 1e3:.2f}", f"{remote * 1e3:.2f}",
                f"{remote / local:.2f}x", busy >> 20, idle >> 20,
            ]  # fmt: skip
            if other is not None:
                compared = served_seconds(other, params, x, y, args.repeats)
                row += [f"{compared * 1e3:.2f}", f"{compared / remote:.2f}x"]
            rows.append(row)
    header = [
        "job",
        "in-process ms",
        "server ms",
        "server / in-process",
        "server RSS MiB after the jobs",
        f"after {RELEASE_MEMORY_AFTER_IDLE_S + 1.0:g} s idle",
    ]
    command = "python bench/server_compute.py"
    name = "server_compute.md"
    if args.compare_ceiling is not None:
        ceiling = f"{args.compare_ceiling / (1 << 20):g} MiB"
        header += [f"server ms, {ceiling} heap ceiling", f"{ceiling} / default"]
        command += f" --compare-ceiling {args.compare_ceiling}"
        name = "server_compute_ceiling.md"
    write_table(
        name,
        "Torch engine: compute time in a server vs in-process, same jobs (relu, mse, float32, CPU)",
        header,
        rows,
        f"Medians of {args.repeats} jobs each way, after three warm-ups; the server's time is "
        "its reported compute seconds (one job per launch). CPU times are for comparison "
        f"within this run only. Command: `{command}`.",
    )


if __name__ == "__main__":
    main()
