"""How long the fused kernel takes to compile for an H100 (sm_90a) as networks deepen, no
GPU needed.

The fused kernel's body is unrolled over the layers, so a new architecture's first job
compiles a kernel whose size grows with the depth, and its compile time faster than that.
This compiles it through the engine's launcher (at launch_config's choice), as a GPU
server would on its first job of the architecture, for [32, 64, ..., 64, 1] networks of
growing depth, and reports the time and ptxas' registers and spills. The compile runs on
the server's host CPU: times here are this machine's, for comparison within the run.
triton_engine.fused_max_layers() takes deeper networks to the per-layer GEMMs under auto,
which compile once per precision and epilogue whatever the depth.

  env -u TRITON_INTERPRET python bench/compile_depth.py    (bench/results/compile_depth_sm90.md)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.common import write_table  # noqa: E402
from bench.compile_only import CompileOnlyDriver  # noqa: E402

DEPTHS = {"float32": (4, 8, 12, 16), "tf32": (8, 16), "bfloat16": (8, 16, 32, 64)}


def auto_runs(precision: str, sizes) -> str:
    """Where a GPU server (one with Triton: this machine has no GPU to run it on) runs the
    network under `auto`, without per-sample norms."""
    from gradserve.kernels import engines, triton_engine

    with mock.patch.object(engines, "triton_available", lambda: True):
        engine = engines.select_engine("auto", precision, torch.device("cuda"), layer_sizes=sizes)
    if engine == "torch":
        return "torch engine"
    return "fused kernel" if triton_engine.takes_fused(precision, sizes, False) else "per-layer"


def main() -> None:
    # A fresh cache: every kernel compiles, none is loaded from an earlier run.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradserve-compile-depth-")
    driver.set_active(CompileOnlyDriver())
    from bench import ptxas_report, sweep
    from gradserve.kernels import triton_engine, triton_fused

    rows = []
    cpu = torch.device("cpu")
    for precision, depths in DEPTHS.items():
        for layers in depths:
            sizes = (32,) + (64,) * (layers - 1) + (1,)
            code = triton_engine.precision_code(precision)
            config = triton_fused.launch_config(
                triton_fused.padded_widths(sizes), 256, 4, cpu, code
            )
            chosen = (config.block_n, config.num_warps, None, config.resident, config.carry)
            job = sweep.make_job(4, 256, sizes, precision, cpu)
            start = time.perf_counter()
            compiled = ptxas_report.compile_through_launcher(job, chosen)
            seconds = time.perf_counter() - start
            registers, spills, _ = ptxas_report.ptxas_usage(compiled.asm["ptx"])
            shape = f"{config.block_n} / {config.num_warps}"
            runs = auto_runs(precision, sizes)
            rows.append([precision, layers, shape, f"{seconds:.1f}", registers, spills, runs])
            print(rows[-1], flush=True)
    write_table(
        "compile_depth_sm90.md",
        f"Fused kernel compile time by depth, sm_90a (triton {triton.__version__})",
        [
            "precision",
            "layers",
            "BLOCK_N / warps",
            "compile s",
            "registers",
            "spill stores / loads B",
            "auto runs it on",
        ],  # fmt: skip
        rows,
        "Networks [32, 64, ..., 64, 1], relu, mse, the launcher's configuration; one compile "
        "each, into a fresh Triton cache (bench/compile_only.py). Command: `env -u "
        "TRITON_INTERPRET python bench/compile_depth.py`. CPU times: for comparison within "
        "this run only.",
    )


if __name__ == "__main__":
    main()
