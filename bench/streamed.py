"""Streamed jobs (micro_batch_samples) against the same job sent whole, same run, same server.

An ensemble of M=200 [8, 16, 1] tanh networks over N=10000 samples, shared inputs and per-model
inputs, with and without per-sample losses, streamed in micro-batches of 1000, 100 and 10
samples through a real server on loopback (a separate process, the torch engine on the CPU).
Small micro-batches make many small chunks: each of a per-model tensor's micro-batches is M
runs of rows (a chunk per model), and so is each micro-batch of per-sample results. What a
streamed job costs beyond the whole one is reported per micro-batch.
Usage: python bench/streamed.py [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from bench.transfer import gradserve_server  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402

MODELS, SAMPLES, LAYER_SIZES = 200, 10_000, [8, 16, 1]
MICRO_BATCHES = (1000, 100, 10)


def ensemble(
    rng: np.random.Generator, per_model: bool, models: int = MODELS
) -> tuple[dict, np.ndarray, np.ndarray]:
    """`models` [8, 16, 1] networks and SAMPLES samples, shared or per model."""
    params = {}
    for i, (d_in, d_out) in enumerate(zip(LAYER_SIZES, LAYER_SIZES[1:], strict=False)):
        params[f"layers.{i}.weight"] = rng.standard_normal((models, d_out, d_in), np.float32)
        params[f"layers.{i}.bias"] = rng.standard_normal((models, d_out), np.float32)
    lead = (models, SAMPLES) if per_model else (SAMPLES,)
    x = rng.standard_normal((*lead, LAYER_SIZES[0]), np.float32)
    y = rng.standard_normal((*lead, LAYER_SIZES[-1]), np.float32)
    return params, x, y


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with gradserve_server() as (_, address):
        with GradientClient(address) as client:
            for per_model in (False, True):
                params, x, y = ensemble(rng, per_model)
                for per_sample_losses in (False, True):
                    options = dict(hidden_activation="tanh", per_sample_losses=per_sample_losses)

                    def seconds(micro: int, job=(params, x, y), options=options) -> float:
                        times = []
                        for _ in range(args.repeats):
                            began = time.perf_counter()
                            client.compute(*job, micro_batch_samples=micro, **options)
                            times.append(time.perf_counter() - began)
                        return statistics.median(times)

                    seconds(0)  # warm-up
                    whole = seconds(0)
                    inputs = "per model" if per_model else "shared"
                    psl = "yes" if per_sample_losses else "no"
                    rows.append([inputs, psl, "whole", f"{whole * 1e3:.1f}", "1.00x", ""])
                    for micro in MICRO_BATCHES:
                        streamed = seconds(micro)
                        beyond = (streamed - whole) / (SAMPLES // micro) * 1e3
                        rows.append([inputs, psl, micro, f"{streamed * 1e3:.1f}",
                                     f"{streamed / whole:.2f}x", f"{beyond:.3f}"])  # fmt: skip
    write_table(
        "streamed.md",
        f"Streamed jobs vs whole ones: M={MODELS}, N={SAMPLES}, {LAYER_SIZES} tanh, mse (CPU)",
        [
            "inputs",
            "per-sample losses",
            "micro-batch",
            "ms (median)",
            "vs whole",
            "ms per micro-batch beyond whole",
        ],  # fmt: skip
        rows,
        f"Client wall time of `GradientClient.compute`, median of {args.repeats}, one server "
        "process on loopback, torch engine; CPU times are for comparison within this run "
        "only. Command: `python bench/streamed.py`.",
    )


if __name__ == "__main__":
    main()
