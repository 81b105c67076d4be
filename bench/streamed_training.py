"""Mini-batch training over a stream against the same steps as one job each, same run, same
server.

An ensemble of M models of [8, 16, 1] tanh networks trained by Adam over N=10000 shared
samples, a step on each micro-batch: one streamed job (micro_batch_samples=B,
steps=N/B), against what a caller does without it: N/B one-shot single-step jobs, each
sending the parameters and optimiser state the last one returned, and that micro-batch's
samples. Both give the same parameters (the largest difference is reported); the table
compares the client's wall time. One server process on loopback, torch engine.
Usage: python bench/streamed_training.py [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import write_table  # noqa: E402
from bench.streamed import LAYER_SIZES, SAMPLES, ensemble  # noqa: E402
from bench.transfer import gradserve_server  # noqa: E402
from gradserve.client import GradientClient  # noqa: E402

CASES = ((200, 1000), (200, 100), (2000, 1000))  # (models, micro-batch)
OPTIONS = dict(hidden_activation="tanh", optimizer="adam", learning_rate=0.01)


def streamed(client: GradientClient, params, x, y, micro: int) -> dict:
    steps = SAMPLES // micro
    return client.compute(
        params, x, y, micro_batch_samples=micro, steps=steps, **OPTIONS
    ).parameters


def chained(client: GradientClient, params, x, y, micro: int) -> dict:
    state = None
    for k, start in enumerate(range(0, SAMPLES, micro)):
        result = client.compute(
            params, x[start : start + micro], y[start : start + micro], steps=1, start_step=k,
            optimizer_state=state, return_optimizer_state=True, **OPTIONS,
        )  # fmt: skip
        params, state = result.parameters, result.optimizer_state
    return params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with gradserve_server() as (_, address), GradientClient(address) as client:
        for models, micro in CASES:
            params, x, y = ensemble(rng, False, models)
            times = {streamed: [], chained: []}
            ends = {}
            for _ in range(args.repeats + 1):  # the first round warms up
                for way in (streamed, chained):
                    began = time.perf_counter()
                    ends[way] = way(client, params, x, y, micro)
                    times[way].append(time.perf_counter() - began)
            apart = max(float(np.abs(ends[streamed][n] - ends[chained][n]).max()) for n in params)
            one, many = (statistics.median(times[w][1:]) for w in (streamed, chained))
            rows.append([models, micro, SAMPLES // micro, f"{one * 1e3:.1f}",
                         f"{many * 1e3:.1f}", f"{many / one:.2f}x", f"{apart:.1e}"])  # fmt: skip
    write_table(
        "streamed_training.md",
        f"A step per micro-batch: one streamed job vs one job per step, N={SAMPLES}, "
        f"{LAYER_SIZES} tanh, Adam (CPU)",
        [
            "M",
            "micro-batch",
            "steps",
            "streamed ms (median)",
            "one job per step ms (median)",
            "one job per step / streamed",
            "largest parameter difference",
        ],  # fmt: skip
        rows,
        f"Client wall time of the training, median of {args.repeats} after a warm-up round, "
        "one server process on loopback, torch engine; CPU times are for comparison within "
        "this run only. Command: `python bench/streamed_training.py`.",
    )


if __name__ == "__main__":
    main()
