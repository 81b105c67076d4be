"""Every fused-kernel block size and warp count against the float64 oracle on a GPU, each
configuration in its own process (so that one that faults, e.g. with an illegal memory
access, names itself and leaves the others running).

A job of each shape and precision runs with launch_config replaced by the configuration
(bench/fused_sweep.run_with), with input gradients, per-sample losses and sample weights,
and each output's largest per-model relative L2 error against tests.oracle is reported:
ok when it is within the precision's tolerance, WRONG when not, and the error when the
process fails; configurations that triton_fused.faults_on_gpu names are refused by the
engine ("refused"). Run by `bash bench/gpu_check.sh configs`:

  python bench/config_check.py --out $OUT/config_check.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from bench.common import run_isolated  # noqa: E402

# (layer sizes, M, N): the benchmark target's widths at a 64-sample job and a 256-sample
# one, and padded width 128.
SHAPES = (
    ((32, 64, 64, 64, 1), 3, 64),
    ((32, 64, 64, 64, 1), 5, 256),
    ((17, 96, 96, 5), 2, 100),
)
WARPS = (4, 8)
PRECISIONS = ("tf32", "bfloat16", "float32 tf32x3", "float32")


def check_one(sizes, m, n, label, block_n, warps) -> dict:
    """Run one configuration here and return its largest relative error per output."""
    import torch

    from bench.common import precision_and_method
    from bench.fused_sweep import run_with
    from tests.jobs import ensemble_job, random_job
    from tests.oracle import engine_tensors, oracle_for, relative_errors

    precision, method = precision_and_method(label)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the interpreter
    tensors = random_job(sizes, m, n, sample_weights=True)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    job = ensemble_job(tensors, sizes, precision=precision, hidden="gelu", loss="huber")
    got = engine_tensors(run_with(job, device, block_n, warps, float32_matmul=method))
    ref = oracle_for(sizes, {k: v.cpu() for k, v in tensors.items()}, hidden="gelu", loss="huber")
    return {name: max(relative_errors(got[name], value)) for name, value in ref.by_name().items()}


def run_child(case) -> tuple:
    errors, failure = run_isolated(__file__, case, timeout=240)
    return case, errors, failure


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--shapes", default=None,
        help='JSON list of [layer sizes, M, N], e.g. \'[[[16, 48, 48, 3], 5, 33]]\'',
    )  # fmt: skip
    parser.add_argument("--blocks", default="32,64,128", help="BLOCK_N values, comma-separated")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated, e.g. bfloat16,float16"
    )
    args = parser.parse_args()
    if args.one:
        sizes, m, n, label, block_n, warps = json.loads(args.one)
        print(json.dumps(check_one(tuple(sizes), m, n, label, block_n, warps)))
        return 0

    import torch

    from tests.oracle import TOLERANCE

    shapes = [(tuple(s), m, n) for s, m, n in json.loads(args.shapes)] if args.shapes else SHAPES
    cases = [
        (sizes, m, n, label, block_n, warps)
        for sizes, m, n in shapes
        for label in args.precisions.split(",")
        for block_n in map(int, args.blocks.split(","))
        for warps in WARPS
    ]
    lines = [
        f"# Fused kernel configurations against the float64 oracle on "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'the interpreter'}",
        "",
        "gelu, huber, sample weights, input gradients; largest per-model relative L2 error "
        "over the outputs (tf32 bound 2e-3, as tests/kernels/test_tf32_rounding.py).",
        "",
        "| layer sizes | M | N | precision | BLOCK_N | warps | verdict | worst output | error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bad = 0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        for case, errors, failure in pool.map(run_child, cases):
            sizes, m, n, label, block_n, warps = case
            head = f"| {list(sizes)} | {m} | {n} | {label} | {block_n} | {warps} |"
            if errors is None and "FaultingLaunch" in failure:
                row = f"{head} refused | | triton_fused.faults_on_gpu |"
            elif errors is None:
                row = f"{head} FAILED | | {failure} |"
                bad += 1
            else:
                tol = 2e-3 if label == "tf32" else TOLERANCE[label.split()[0]]
                name = max(errors, key=errors.get)
                verdict = "ok" if errors[name] <= tol else "WRONG"
                bad += verdict != "ok"
                row = f"{head} {verdict} | {name} | {errors[name]:.2e} |"
            lines.append(row)
            print(row, flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
    print(f"{bad} of {len(cases)} configurations failed or were wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
