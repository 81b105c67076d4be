"""Every Triton kernel compiles for an H100 (sm_90) here, GPU or not (see compile_for_gpu)."""

import pytest

from tests.kernels.uninterpreted import run_module

pytest.importorskip("triton")


@pytest.mark.timeout(900)
def test_every_kernel_compiles_for_sm90():
    out = run_module("tests.kernels.compile_for_gpu", "90", timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "kernel specialisations for sm_90" in out.stdout
