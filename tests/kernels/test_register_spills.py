"""The fused kernel's IEEE float32 path stays in registers at width 128 (see
register_spills_check.py)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(600)
def test_float32_at_width_128_compiles_without_heavy_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its notice
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.register_spills_check"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "registers" in done.stdout
