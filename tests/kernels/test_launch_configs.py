"""The fused kernel computes the same gradients at every launch configuration the GPU
sweep (bench/fused_sweep.py) may try, and the per-layer path at every tile shape its sweep
(bench/layered_sweep.py) may try, so their timings compare like with like."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_check_output(script: str) -> list[str]:
    """The output lines of `bench/<script> --cpu-check` under the interpreter, which exits 0
    only if every configuration's gradients agree with the engine's own choice's; two
    processes run the configurations ahead (on a GPU: compile them in parallel)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--cpu-check",
         "--compile-workers", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout.splitlines()


def test_every_swept_configuration_agrees_with_the_chosen_one():
    lines = cpu_check_output("fused_sweep.py")
    for label in ("float32", "float32 tf32x3"):  # IEEE FMAs, and three tf32 products
        rows = {line for line in lines if line.startswith(f"| {label} |")}
        assert len(rows) == 22 and sum(row.rstrip(" |").endswith("yes") for row in rows) == 1


def test_every_swept_tile_shape_of_the_per_layer_path_agrees_with_the_fixed_one():
    """The per-layer GEMM's tile shapes that bench/layered_sweep.py times compute the same
    gradients up to float32 rounding (K steps of 16 add the same products in another order)."""
    rows = {line for line in cpu_check_output("layered_sweep.py") if line.startswith("| float32 |")}
    assert len(rows) == 8 and sum(row.rstrip(" |").endswith("yes") for row in rows) == 1
    assert any(" 16 | " in row and "0.0e+00" not in row for row in rows)  # K order mattered
