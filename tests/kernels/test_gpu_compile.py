"""Every Triton kernel compiles for an H100 (sm_90) here, GPU or not (see compile_for_gpu)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.timeout(900)
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its notice
    out = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_gpu", "90"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "kernel specialisations for sm_90" in out.stdout
