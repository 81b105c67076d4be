"""The fused kernel's IEEE float32 path stays in registers at width 128 (see
register_spills_check.py)."""

import pytest

from tests.kernels.uninterpreted import run_module


@pytest.mark.timeout(600)
def test_float32_at_width_128_compiles_without_heavy_spills():
    done = run_module("tests.kernels.register_spills_check")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "registers" in done.stdout
