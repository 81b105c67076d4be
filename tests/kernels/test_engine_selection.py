"""Which engine `auto` picks, and what a forced engine refuses (kernels.select_engine).
No GPU is needed: selection reads the device's type, not the device."""

import pytest
import torch

from gradserve.kernels import EngineUnavailable, select_engine

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_triton_on_a_gpu_and_torch_on_the_cpu():
    assert select_engine("auto", "float32", CUDA) == "triton"
    assert select_engine("auto", "float32", CPU) == "torch"
    assert select_engine("auto", "float64", CUDA) == "torch"  # not a triton precision


def test_auto_leaves_non_finite_tf32_jobs_to_torch():
    """The Triton kernels' tf32 operand rounding turns the GPU's canonical NaN into -0."""
    assert select_engine("auto", "tf32", CUDA, non_finite=True) == "torch"
    assert select_engine("auto", "tf32", CUDA) == "triton"
    assert select_engine("auto", "float16", CUDA, non_finite=True) == "triton"
    assert select_engine("triton", "tf32", CUDA, non_finite=True) == "triton"  # as asked


def test_per_sample_norms_of_wide_networks_leave_triton():
    assert select_engine("auto", "float32", CUDA, True, (8, 200, 1)) == "torch"
    assert select_engine("auto", "float32", CUDA, True, (8, 128, 1)) == "triton"
    with pytest.raises(EngineUnavailable, match="widths <= 128"):
        select_engine("triton", "float32", CUDA, True, (8, 200, 1))


def test_a_forced_engine_refuses_what_it_cannot_run():
    with pytest.raises(EngineUnavailable, match="float64"):
        select_engine("triton", "float64", CUDA)
    with pytest.raises(EngineUnavailable, match="not available"):
        select_engine("jax", "float32", CPU)
