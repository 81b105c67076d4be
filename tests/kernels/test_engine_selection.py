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


def test_auto_leaves_wide_float32_jobs_to_torch():
    """IEEE float32 on the Triton kernels' FMA units lost to torch's GEMMs at widths 128 and
    1024 on an H100 (bench/results/kernels_gpu_h100.md); other precisions did not."""
    assert select_engine("auto", "float32", CUDA, layer_sizes=(32, 64, 64, 64, 1)) == "triton"
    assert select_engine("auto", "float32", CUDA, layer_sizes=(64, 65, 8)) == "torch"
    assert select_engine("auto", "float32", CUDA, layer_sizes=(1024, 1024, 1)) == "torch"
    for precision in ("tf32", "float16"):  # (bfloat16 too, where Triton is compiled)
        assert select_engine("auto", precision, CUDA, layer_sizes=(64, 128, 8)) == "triton"
        assert select_engine("auto", precision, CUDA, layer_sizes=(1024, 1024, 1)) == "triton"
    assert select_engine("triton", "float32", CUDA, layer_sizes=(64, 128, 8)) == "triton"


def test_deep_networks_leave_the_fused_kernel_under_auto():
    """The fused kernel's compile time grows faster than the depth (minutes at 32 to 64
    layers): deeper networks take the per-layer GEMMs, or torch for IEEE float32 (which lost
    to torch on the per-layer path) and for per-sample norms (the fused kernel's alone)."""
    from gradserve.kernels import triton_engine

    def sizes(layers):
        return (8,) + (32,) * (layers - 1) + (1,)

    for precision in ("tf32", "bfloat16", "float16"):
        assert triton_engine.takes_fused(precision, sizes(16), False)
        assert not triton_engine.takes_fused(precision, sizes(17), False)
        assert triton_engine.takes_fused(precision, sizes(17), True)  # norms: fused only
        assert triton_engine.takes_fused(precision, sizes(17), False, path="fused")
        assert select_engine("auto", precision, CUDA, True, sizes(17)) == "torch"
        if precision != "bfloat16":  # (a Triton precision where Triton is compiled)
            assert select_engine("auto", precision, CUDA, layer_sizes=sizes(40)) == "triton"
            assert select_engine("triton", precision, CUDA, True, sizes(17)) == "triton"
    assert triton_engine.takes_fused("float32", sizes(8), False)
    assert not triton_engine.takes_fused("float32", sizes(9), False)
    assert triton_engine.takes_fused("float32", sizes(16), False, float32_matmul="tf32x3")
    assert select_engine("auto", "float32", CUDA, layer_sizes=sizes(8)) == "triton"
    assert select_engine("auto", "float32", CUDA, layer_sizes=sizes(9)) == "torch"
    assert select_engine("triton", "float32", CUDA, layer_sizes=sizes(9)) == "triton"


def test_per_sample_norms_of_wide_networks_leave_triton():
    assert select_engine("auto", "tf32", CUDA, True, (8, 200, 1)) == "torch"
    assert select_engine("auto", "tf32", CUDA, True, (8, 128, 1)) == "triton"
    with pytest.raises(EngineUnavailable, match="widths <= 128"):
        select_engine("triton", "float32", CUDA, True, (8, 200, 1))


def test_a_forced_engine_refuses_what_it_cannot_run(monkeypatch):
    with pytest.raises(EngineUnavailable, match="float64"):
        select_engine("triton", "float64", CUDA)
    with pytest.raises(EngineUnavailable, match="not available"):
        select_engine("jax", "float32", CPU)
    # a server without Triton (the test run interprets it): the message says what it has
    from gradserve.kernels import engines

    monkeypatch.setattr(engines, "triton_available", lambda: False)
    with pytest.raises(EngineUnavailable, match=r"device cpu; it has torch; .* needs CUDA"):
        select_engine("triton", "float32", CPU)


@pytest.mark.parametrize("version, runs", [("3.1.0", False), ("3.5.1", False), ("3.6.0", True),
                                           ("3.10.0", True), ("4.0.0+git1a2b", True)])  # fmt: skip
def test_a_triton_older_than_the_kernels_need_leaves_every_job_to_torch(monkeypatch, version, runs):
    """The kernels need triton 3.6 or newer (tuples of pointers as kernel arguments: 3.1's
    interpreter failed on the fused kernel). An older one is no engine: `auto` takes torch,
    and a job that asks for triton is told why."""
    import triton

    from gradserve.kernels import triton_engine

    monkeypatch.setattr(triton, "__version__", version)
    assert triton_engine.available() is runs
    assert select_engine("auto", "float32", CUDA) == ("triton" if runs else "torch")
    if not runs:
        with pytest.raises(EngineUnavailable, match="needs CUDA and Triton 3.6 or newer"):
            select_engine("triton", "float32", CUDA)
        # what a GPU server's start-up warning says
        expected = f"Triton {version} is older than the 3.6 its kernels need"
        assert triton_engine.why_unavailable() == expected


def test_models_beyond_32_bit_offsets_leave_triton():
    """The Triton kernels index within a model in 32 bits (across models in 64): a model's
    [N, d] activations or [d(i+1), d(i)] weights of 2**31 elements or more go to torch."""
    below, at = (2**31 - 1) // 128, 2**31 // 128  # samples with a widest layer of 128
    assert (
        select_engine("auto", "tf32", CUDA, layer_sizes=(8, 128, 1), samples_at_once=below)
        == "triton"
    )
    assert (
        select_engine("auto", "tf32", CUDA, layer_sizes=(8, 128, 1), samples_at_once=at) == "torch"
    )
    assert (
        select_engine("auto", "tf32", CUDA, layer_sizes=(8, 2**16, 2**15), samples_at_once=1)
        == "torch"
    )
    with pytest.raises(EngineUnavailable, match="2\\*\\*31"):
        select_engine("triton", "float32", CUDA, layer_sizes=(8, 128, 1), samples_at_once=at)


def test_triton_engine_refuses_a_model_beyond_32_bit_offsets():
    """Run directly (as a library), the engine refuses before it allocates anything: the
    inputs here are one float broadcast to [2**24, 128] (no memory behind them)."""
    from gradserve.kernels import triton_engine
    from gradserve.kernels.spec import Activation, EnsembleJob, LossSpec, MLPSpec

    n, sizes = 2**24, (128, 4, 1)
    job = EnsembleJob(
        mlp=MLPSpec(sizes, Activation("relu"), Activation("identity")),
        loss=LossSpec(),
        weights=[torch.randn(1, 4, 128), torch.randn(1, 1, 4)],
        biases=[torch.randn(1, 4), torch.randn(1, 1)],
        inputs=torch.randn(1).expand(n, 128),
        targets=torch.randn(1).expand(n, 1),
    )
    assert job.num_samples == n
    with pytest.raises(ValueError, match="2\\*\\*31"):
        triton_engine.run(job, "cpu")
