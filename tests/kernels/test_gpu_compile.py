"""Every Triton kernel compiles for an H100 (sm_90) here, GPU or not (see compile_for_gpu),
and every launch asks for fused multiply-adds whatever Triton's default (fp_fusion_check)."""

import importlib.util

import pytest

from tests.kernels.uninterpreted import run_module

pytest.importorskip("triton")


@pytest.mark.timeout(900)
def test_every_kernel_compiles_for_sm90():
    out = run_module("tests.kernels.compile_for_gpu", "90", timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "kernel specialisations for sm_90" in out.stdout


def test_every_launch_asks_for_fused_multiply_adds():
    """With Triton's default turned off, as 3.10 will, every kernel the engine launches
    still compiles with fused multiply-adds (see fp_fusion_check)."""
    done = run_module("tests.kernels.fp_fusion_check", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    gluon = importlib.util.find_spec("triton.experimental.gluon") is not None
    assert done.stdout.count("enable_fp_fusion=True") == 5 + 2 * gluon
