"""The CPU torch engine running a job whole against running it in blocks (of models, and
of samples where one model's activations exceed a block: torch_engine.block_shape), same
jobs, same run.

For each job: the median time of each side (one call of each in turn), and the memory one
call of each side takes beyond what the process held before it (peak resident memory of a
fresh process running that one call; the job's own tensors made before). The server's
allocator setting (server/memory.py) on both sides.
With --small, jobs of 4 to 8 MiB of activations, around the size from which the engine runs
jobs in blocks (torch_engine.CPU_BLOCKED_JOB_MIN_BYTES), whole against forced into blocks
(bench/results/cpu_blocks_small.md).
Usage: python bench/cpu_blocks.py [--repeats R] [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import interleaved_medians, run_isolated, write_table  # noqa: E402
from gradserve import kernels  # noqa: E402
from gradserve.kernels import torch_engine  # noqa: E402
from gradserve.server.memory import keep_freed_memory  # noqa: E402
from tests.process_memory import memory_bytes  # noqa: E402

SHAPES = [
    # (M, N, layer_sizes, hidden activation), by the bytes of their widest activations.
    (256, 64, (32, 64, 64, 1), "relu"),  # 4 MiB
    (64, 256, (64, 128, 128, 8), "relu"),  # 8 MiB
    (1024, 48, (24, 48, 48, 1), "relu"),  # 9 MiB
    (800, 100, (8, 32, 32, 2), "gelu"),  # 10 MiB
    (10, 10000, (8, 32, 1), "leaky_relu"),  # 12 MiB
    (96, 1024, (32, 32, 32, 1), "softplus"),  # 12 MiB
    (512, 128, (32, 64, 64, 1), "relu"),  # 16 MiB
    (2048, 64, (16, 32, 32, 1), "relu"),  # 16 MiB
    (32, 2048, (128, 128, 128, 1), "relu"),  # 32 MiB
    (16, 1024, (256, 512, 512, 10), "relu"),  # 32 MiB
    (96, 2048, (16, 64, 64, 4), "tanh"),  # 48 MiB
    (1024, 256, (32, 64, 64, 64, 1), "relu"),  # 64 MiB, bench/kernels_gpu.py's target
    (8, 8192, (256, 256, 1), "relu"),  # 64 MiB
    (200, 10000, (8, 16, 1), "tanh"),  # 122 MiB
    (64, 4096, (64, 128, 128, 8), "relu"),  # 128 MiB
    # Blocks of samples of one model
    (4, 65536, (32, 128, 128, 1), "relu"),  # 128 MiB
    (2, 1 << 19, (16, 32, 32, 1), "tanh"),  # 128 MiB
    (1, 1 << 20, (8, 64, 64, 1), "relu"),  # 256 MiB
    # Wide layers: blocks of samples at least as large as the model's parameters
    (1, 65536, (128, 2048, 1), "tanh"),  # 512 MiB, 1 MiB of parameters
    (1, 32768, (1024, 1024, 1), "relu"),  # 128 MiB, 4 MiB of parameters
    (2, 4096, (512, 4096, 4096, 8), "relu"),  # 128 MiB, 72 MiB of parameters
]

# Jobs of 4 to 8 MiB, around the size from which the engine runs jobs in blocks (--small).
SMALL_SHAPES = [
    (1024, 32, (16, 32, 32, 1), "relu"),  # 4 MiB
    (256, 64, (32, 64, 64, 1), "relu"),  # 4 MiB
    (400, 100, (8, 32, 32, 2), "gelu"),  # 5 MiB
    (64, 256, (64, 128, 128, 8), "relu"),  # 8 MiB
    (64, 256, (64, 128, 128, 8), "tanh"),  # 8 MiB
    (128, 256, (32, 64, 64, 1), "tanh"),  # 8 MiB
    (1, 65536, (16, 32, 32, 1), "tanh"),  # 8 MiB
    (16, 2048, (64, 64, 64, 64, 1), "silu"),  # 8 MiB
]

WHOLE = 1 << 62  # CPU_BLOCKED_JOB_MIN_BYTES that keeps every job whole


def make_job(m, n, sizes, hidden) -> kernels.EnsembleJob:
    gen = torch.Generator().manual_seed(0)
    pairs = list(zip(sizes, sizes[1:], strict=False))
    return kernels.EnsembleJob(
        mlp=kernels.MLPSpec(tuple(sizes), kernels.Activation(hidden)),
        loss=kernels.LossSpec("mse"),
        weights=[torch.randn(m, b, a, generator=gen) * a**-0.5 for a, b in pairs],
        biases=[torch.randn(m, b, generator=gen) * 0.1 for _, b in pairs],
        inputs=torch.randn(m, n, sizes[0], generator=gen),
        targets=torch.randn(m, n, sizes[-1], generator=gen),
    )


def one_call_memory(case: dict) -> None:
    """--one: run one call of one side in this fresh process; print the memory it took."""
    keep_freed_memory()
    job = make_job(*case["shape"])
    torch_engine.CPU_BLOCKED_JOB_MIN_BYTES = WHOLE if case["side"] == "whole" else case["bound"]
    torch_engine._prime_cpu_math()  # its tiny jobs' memory is not the job's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident memory (VmHWM) starts again from the resident now
    before = memory_bytes(os.getpid())
    torch_engine.run(job)
    print(json.dumps({"bytes": memory_bytes(os.getpid(), "VmHWM") - before}))


def memory_of(shape, side: str, bound: int) -> str:
    got, error = run_isolated(__file__, {"shape": shape, "side": side, "bound": bound})
    return f"{got['bytes'] / 2**20:.0f}" if got else f"failed: {error}"


def blocks_of(job: kernels.EnsembleJob, bound: int) -> str:
    shape = (job.num_models, job.num_samples, job.mlp.layer_sizes, job.precision)
    default, torch_engine.CPU_BLOCKED_JOB_MIN_BYTES = torch_engine.CPU_BLOCKED_JOB_MIN_BYTES, bound
    models, samples = torch_engine.block_shape(*shape)
    torch_engine.CPU_BLOCKED_JOB_MIN_BYTES = default
    if (models, samples) == shape[:2]:
        return "whole"
    if samples < job.num_samples:
        return f"{models} model, {samples} samples"
    return f"{models} model{'s' if models > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="jobs of 4-8 MiB, forced into blocks")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one_call_memory(json.loads(args.one))
    keep_freed_memory()  # as in the server
    default_bound = torch_engine.CPU_BLOCKED_JOB_MIN_BYTES
    bound = 0 if args.small else default_bound  # the blocks side's CPU_BLOCKED_JOB_MIN_BYTES
    rows = []
    for shape in SMALL_SHAPES if args.small else SHAPES:
        m, n, sizes, _ = shape
        job = make_job(*shape)

        def side(blocked_from, job=job):
            def call():
                torch_engine.CPU_BLOCKED_JOB_MIN_BYTES = blocked_from
                torch_engine.run(job)

            return call

        t = interleaved_medians({"whole": side(WHOLE), "blocks": side(bound)}, repeats=args.repeats)
        torch_engine.CPU_BLOCKED_JOB_MIN_BYTES = default_bound
        rows.append(
            [
                f"M={m} N={n} {list(sizes)} {shape[3]}",
                f"{m * n * max(sizes) * 4 / 2**20:.0f}",
                blocks_of(job, bound),
                f"{t['whole'] * 1e3:.1f}",
                f"{t['blocks'] * 1e3:.1f}",
                f"{t['whole'] / t['blocks']:.2f}x",
                memory_of(shape, "whole", bound),
                memory_of(shape, "blocks", bound),
            ]
        )
        print(rows[-1], flush=True)
    if args.small:
        rule = (
            f"every job forced into blocks of {torch_engine.CPU_BLOCK_BYTES >> 20} MiB (the engine "
            f"runs those of less than {default_bound >> 20} MiB of activations whole). Command: "
            "`python bench/cpu_blocks.py --small`."
        )
    else:
        rule = (
            f"torch_engine.block_shape (jobs of less than {default_bound >> 20} MiB of "
            f"activations run whole, others in blocks of "
            f"{torch_engine.CPU_BLOCK_BYTES >> 20} MiB); where both sides run the job whole, "
            "their ratio is the run's noise. Command: `python bench/cpu_blocks.py`."
        )
    write_table(
        "cpu_blocks_small.md" if args.small else "cpu_blocks.md",
        "CPU torch engine: jobs whole vs in blocks (mse, float32)",
        [
            "job",
            "widest activations MiB",
            "a block",
            "whole ms",
            "in blocks ms",
            "speed-up",
            "whole: memory MiB",
            "in blocks: memory MiB",
        ],  # fmt: skip
        rows,
        "Median wall time of loss + all parameter gradients, one call of each side in turn; "
        "memory: a fresh process's peak resident memory during one call beyond what it held "
        f"before. Blocks: {rule} CPU times are for comparison within this run only.",
    )


if __name__ == "__main__":
    main()
