"""The fused kernel computes the same gradients at every launch configuration the GPU
sweep (bench/fused_sweep.py) may try, and the per-layer path at every tile shape its sweep
(bench/layered_sweep.py) may try, so their timings compare like with like; and the GPU
scripts' own code (the configuration checks, the kernel benchmark) runs under the
interpreter before a GPU call spends minutes on it."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interpreted_output(script: str, *options: str) -> list[str]:
    """The output lines of `bench/<script> <options>` under the interpreter, which must
    exit 0."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *options],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout.splitlines()


def cpu_check_output(script: str, *options: str) -> list[str]:
    """The output lines of `bench/<script> --cpu-check`, which exits 0 only if every
    configuration's gradients agree with the expected ones."""
    return interpreted_output(script, "--cpu-check", *options)


def test_every_swept_configuration_agrees_with_the_chosen_one():
    # two processes run the configurations ahead (on a GPU: compile them in parallel)
    lines = cpu_check_output("fused_sweep.py", "--compile-workers", "2")
    for label in ("float32", "float32 tf32x3"):  # IEEE FMAs, and three tf32 products
        rows = {line for line in lines if line.startswith(f"| {label} |")}
        assert len(rows) == 22 and sum(row.rstrip(" |").endswith("yes") for row in rows) == 1
    # IEEE float32 at its own configuration with the K-chunks it had before (32)
    assert len({line for line in lines if line.startswith("| float32 K-chunks of 32 |")}) == 1


def test_every_swept_tile_shape_of_the_per_layer_path_agrees_with_the_fixed_one():
    """The per-layer GEMM's tile shapes that bench/layered_sweep.py times compute the same
    gradients up to float32 rounding (K steps of 16 add the same products in another order),
    tl.dot's and the Gluon GEMM's."""
    lines = cpu_check_output("layered_sweep.py", "--compile-workers", "2")
    rows = {line for line in lines if line.startswith("| float32 |")}
    assert len(rows) == 17 and sum(row.rstrip(" |").endswith("yes") for row in rows) == 1
    assert sum(row.startswith("| float32 | gluon |") for row in rows) == 7
    assert any("| buffers 1 |" in row for row in rows)  # the Gluon GEMM with one copy
    assert any(" 16 | " in row and "0.0e+00" not in row for row in rows)  # K order mattered


def test_launch_config_never_picks_a_configuration_that_faults_on_a_gpu():
    """Tensor-core matmuls in 64-sample blocks with 8 warps faulted or gave wrong input
    gradients on an H100 (bench/results/config_check_h100.md): launch_config must not pick
    them for any width, sample count, ensemble size or precision."""
    import torch

    from gradserve.kernels import triton_fused
    from gradserve.kernels.triton_common import PRECISION_CODES, TF32X3

    codes = (*PRECISION_CODES.values(), TF32X3)
    for precision in codes:
        tensor_cores = precision != PRECISION_CODES["float32"]
        assert triton_fused.faults_on_gpu(64, 8, precision) == tensor_cores
        assert not triton_fused.faults_on_gpu(64, 4, precision)
        assert not triton_fused.faults_on_gpu(128, 8, precision)
        for widths in WIDTHS:
            for n in (1, 37, 64, 100, 256, 100_000):
                for m in (1, 3, 1024):
                    config = triton_fused.launch_config(
                        widths, n, m, torch.device("cpu"), precision
                    )
                    assert not triton_fused.faults_on_gpu(
                        config.block_n, config.num_warps, precision
                    ), (widths, n, m, precision, config)
                    assert not triton_fused.wrong_on_gpu(widths, config.block_n, precision), (
                        widths, n, m, precision, config,
                    )  # fmt: skip
    # tf32 at the benchmark target: 64 samples, 4 warps (1.10x as fast as 128/8 there).
    target = triton_fused.launch_config(
        (32, 64, 64, 64, 16), 256, 1024, torch.device("cpu"), PRECISION_CODES["tf32"]
    )
    assert (target.block_n, target.num_warps) == (64, 4)


# Padded widths: each largest width alone, and the layers from width 16 to 64 that gave
# wrong half-precision gradients in 64- and 128-sample blocks on an H100.
WIDTHS = (
    (16, 16, 16), (32, 32, 16), (32, 64, 64, 64, 16), (64, 128, 128, 16),
    (16, 64, 64, 16), (32, 64, 16, 64, 16), (16, 64, 128, 16), (16, 32, 32, 16),
)  # fmt: skip


def test_half_precision_layers_from_width_16_to_64_take_32_sample_blocks():
    """bfloat16 / float16 networks with a layer from padded width 16 to 64 got weight and
    input gradients 100-190% off in 64- and 128-sample blocks on an H100, and right in
    32-sample blocks (bench/results/config_check_h100_half.md); the other networks and
    precisions keep their blocks."""
    import torch

    from gradserve.kernels import triton_fused
    from gradserve.kernels.triton_common import PRECISION_CODES

    cpu = torch.device("cpu")
    for name in ("bfloat16", "float16"):
        code = PRECISION_CODES[name]
        for widths in ((16, 64, 64, 16), (32, 64, 16, 64, 16)):
            for n in (33, 64, 256, 100_000):
                assert triton_fused.launch_config(widths, n, 8, cpu, code).block_n == 32
        assert triton_fused.launch_config((16, 32, 32, 16), 256, 8, cpu, code).block_n == 128
        assert triton_fused.launch_config((32, 64, 64, 16), 256, 8, cpu, code).block_n == 128
    tf32 = triton_fused.launch_config((16, 64, 64, 16), 256, 8, cpu, PRECISION_CODES["tf32"])
    assert tf32.block_n == 64


def test_configuration_check_runs_under_the_interpreter():
    """bench/config_check.py, which found the wrong half-precision blocks on a GPU, with the
    options that narrow it to a few shapes, blocks and precisions."""
    shapes = "[[[16, 48, 48, 3], 2, 33], [[5, 13, 7, 3], 1, 1]]"
    lines = interpreted_output(
        "config_check.py", "--shapes", shapes, "--blocks", "16,32",
        "--precisions", "float32,tf32", "--workers", "2",
    )  # fmt: skip
    rows = [line for line in lines if line.startswith("| [")]
    assert len(rows) == 2 * 2 * 2 * 2 and all(" | ok | " in row for row in rows), rows


def test_chained_matmul_check_runs_under_the_interpreter():
    """bench/chained_dot_check.py, which asks the GPU whether the 64-row, 8-warp fault is
    Triton's, gets every configuration's forward and backward right where layouts do not
    exist."""
    lines = cpu_check_output("chained_dot_check.py")
    assert sum(" | ok |" in line for line in lines) == 12
    assert sum("dw1" in line and "dx" in line for line in lines) == 8
    assert sum(line.startswith("| backward | 16 |") for line in lines) == 4  # inputs 16 wide


def test_kernel_benchmark_runs_every_row_under_the_interpreter():
    """bench/kernels_gpu.py, the script each GPU call spends minutes on: every row but the
    bfloat16 ones (which the interpreter cannot compute) runs on a few samples, its
    forced per-layer rows included, and agrees with the torch engine."""
    from bench import kernels_gpu

    lines = cpu_check_output("kernels_gpu.py")
    rows = [case for case in kernels_gpu.CASES if not case[3].startswith("bfloat16")]
    assert sum(" | ok | " in line for line in lines) == len(rows)
    assert sum("| per-layer | ok |" in line for line in lines) == sum(
        max(case[2]) > 128 or case[5] == "per_layer" for case in rows
    )


def test_fma_tile_benchmark_checks_its_rows_on_the_cpu():
    """bench/fma_tiles.py, which times IEEE float32 products by outputs per thread on a
    GPU: its inputs, float64 reference and check hold for the fused kernel's own product
    at every block shape it times, and for its Gluon kernels (through gluon_cpu)."""
    lines = cpu_check_output("fma_tiles.py")
    assert sum(line.startswith("| tl.dot |") and "(right)" in line for line in lines) == 4
    assert sum(line.startswith("| gluon |") and "(right)" in line for line in lines) == 6


def test_gpu_check_asks_for_rows_and_tests_that_exist():
    """bench/gpu_check.sh names benchmark rows (--labels) and GPU tests (-k) by text, which
    only a GPU call would find misspelt: every label is a row of bench/kernels_gpu.py, and
    the float32 check's selection holds the Gluon kernels' tests and tl.dot's float32
    ones at the benchmark target (its narrow output layer's reductions)."""
    import re

    from bench import kernels_gpu

    with open(os.path.join(ROOT, "bench", "gpu_check.sh")) as f:
        script = f.read()
    labels = [label for found in re.findall(r"--labels ([\w,-]+)", script)
              for label in found.split(",")]  # fmt: skip
    assert labels
    rows = {case[3] for case in kernels_gpu.CASES}
    assert {label.replace("-", " ") for label in labels} <= rows
    (selection,) = re.findall(r'-k "([^"]+)" tests/kernels/test_gpu.py', script)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-k", selection, os.path.join(ROOT, "tests", "kernels", "test_gpu.py")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]
    chosen = done.stdout
    assert "test_fused_float32_on_the_gluon_kernel" in chosen
    assert "test_triton_engine_every_precision[24-256-sizes0-float32]" in chosen
    assert "test_triton_float32_as_three_tf32_products[24-256-sizes0]" in chosen
    assert "bfloat16" not in chosen  # the other precisions are the full check's
