"""The torch engine's hand-written losses against torch's own, on the CPU, in one run.

kernels/functional.py computes bce_with_logits and cross_entropy in forms whose gradients
keep their digits where a prediction is confidently right (torch's cancel there). This
times the torch engine with them and with torch's F.binary_cross_entropy_with_logits and
F.cross_entropy swapped in, on the same jobs, and gives each one's gradient error against
the float64 oracle on a confidently right job (logits 8 and more on their targets' side).
Usage: python bench/losses_cpu.py [--repeats R]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import alternating_medians, write_table  # noqa: E402
from gradserve.kernels import functional, torch_engine  # noqa: E402
from tests.jobs import ensemble_job, random_job  # noqa: E402
from tests.oracle import engine_tensors, oracle_for, relative_errors  # noqa: E402

M, N = 64, 1024
JOBS = [("cross_entropy", 10), ("cross_entropy", 100), ("bce_with_logits", 1),
        ("bce_with_logits", 100)]  # fmt: skip


def torchs_losses():
    """functional's losses replaced by torch's own, as the torch engine had them."""

    def cross_entropy(y, targets):
        m, n, c = y.shape
        flat = F.cross_entropy(y.reshape(m * n, c), targets.reshape(-1), reduction="none")
        return flat.reshape(m, n)

    class Logistic:
        @staticmethod
        def apply(y, t):
            return F.binary_cross_entropy_with_logits(y, t, reduction="none")

    return mock.patch.multiple(functional, cross_entropy=cross_entropy, _LogisticLoss=Logistic)


def confident(loss: str, outputs: int):
    """A one-layer job whose logits are 8 or more on their targets' side."""
    sizes = (outputs, outputs)
    gen = torch.Generator().manual_seed(outputs)
    tensors = random_job(sizes, 4, 256, loss=loss, seed=outputs)
    tensors["layers.0.weight"] = torch.eye(outputs).expand(4, outputs, outputs).clone()
    tensors["layers.0.bias"] = torch.zeros(4, outputs)
    if loss == "cross_entropy":
        labels = torch.randint(0, outputs, (4, 256), generator=gen)
        tensors["inputs"] = F.one_hot(labels, outputs).float() * 8
        tensors["targets"] = labels
    else:
        sign = torch.randint(0, 2, (4, 256, outputs), generator=gen).float() * 2 - 1
        tensors["inputs"] = sign * (8 + torch.rand(4, 256, outputs, generator=gen) * 8)
        tensors["targets"] = (sign > 0).float()
    return sizes, tensors


def gradient_error(loss: str, outputs: int) -> float:
    sizes, tensors = confident(loss, outputs)
    options = dict(hidden="identity", loss=loss)
    got = engine_tensors(torch_engine.run(ensemble_job(tensors, sizes, **options), "cpu"))
    ref = oracle_for(sizes, tensors, **options).by_name()
    return max(max(relative_errors(got[k], ref[k])) for k in ref if k.endswith(".grad"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rows = []
    for loss, outputs in JOBS:
        sizes = (32, 64, 64, outputs)
        tensors = random_job(sizes, M, N, loss=loss, seed=1)
        job = ensemble_job(tensors, sizes, loss=loss, input_gradients=False,
                           per_sample_losses=False, forward_outputs=False)  # fmt: skip
        times = alternating_medians(
            lambda job=job: torch_engine.run(job, "cpu"),
            {"gradserve": contextlib.nullcontext, "torch": torchs_losses},
            repeats=args.repeats,
        )  # fmt: skip
        with torchs_losses():
            torch_error = gradient_error(loss, outputs)
        rows.append([f"{loss}, {outputs} outputs, M={M} N={N} {list(sizes)}",
                     f"{times['gradserve'] * 1e3:.1f}", f"{times['torch'] * 1e3:.1f}",
                     f"{times['gradserve'] / times['torch']:.2f}x",
                     f"{gradient_error(loss, outputs):.1e}", f"{torch_error:.1e}"])  # fmt: skip
    write_table(
        "losses_cpu.md",
        "Torch engine: its bce_with_logits and cross_entropy against torch's, CPU (float32)",
        [
            "job",
            "ms, gradserve's losses",
            "ms, torch's losses",
            "time ratio",
            "gradient error, gradserve's",
            "gradient error, torch's",
        ],  # fmt: skip
        rows,
        "Median wall time of the torch engine's loss + all parameter gradients with each pair "
        "of losses (a ratio > 1: gradserve's are slower). Gradient error: the largest relative "
        "error of a gradient tensor against the float64 oracle on a one-layer job of the same "
        "loss and outputs whose logits are 8 or more on their targets' side (M=4, N=256). "
        "Command: `python bench/losses_cpu.py`. CPU times are for comparison within this run "
        "only.",
    )


if __name__ == "__main__":
    main()
