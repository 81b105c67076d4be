"""Engine selection: which engine runs a job, on which device."""

from __future__ import annotations

import torch

from gradserve.kernels import torch_engine
from gradserve.kernels.spec import EnsembleJob, EnsembleResult
from gradserve.kernels.triton_engine import (
    FLOAT32_MATMUL,
    FUSED_MAX_WIDTH,
    MIN_TRITON,
    fits_int32_offsets,
    fused_max_layers,
)

# Under `auto`, IEEE float32 jobs with a layer wider than this run on the torch engine: on
# an H100 the Triton kernels (FMA units, no tensor cores) at best matched torch at widths
# of 128 ([64, 128, 128, 128, 8]: the per-layer path, which the Triton engine takes there,
# 3.168 ms against torch's 3.169; the fused kernel 3.4x torch's time) and took 1.5x its
# time at 1024 (per-layer), and matched it at 64 (bench/results/kernels_gpu_h100.md). Other
# precisions were as fast or faster on Triton.
AUTO_TRITON_MAX_FLOAT32_WIDTH = 64


# How the Triton engine multiplies float32 jobs (triton_engine.FLOAT32_MATMULS): the
# server's --float32-matmul, for every job of the process.
_float32_matmul = FLOAT32_MATMUL


def set_float32_matmul(method: str) -> None:
    """Make the Triton engine multiply float32 jobs by `method` from now on."""
    from gradserve.kernels import triton_engine

    triton_engine.precision_code("float32", method)  # refuses what no job could run
    global _float32_matmul
    _float32_matmul = method


def float32_matmul() -> str:
    """How the Triton engine multiplies float32 jobs now (set_float32_matmul)."""
    return _float32_matmul


class EngineUnavailable(Exception):
    """The requested engine cannot run this job here (maps to UNIMPLEMENTED)."""


def triton_available() -> bool:
    from gradserve.kernels import triton_engine

    return triton_engine.available()


def available_engines(device: torch.device) -> dict[str, tuple[str, ...]]:
    """Engine name -> precisions it runs on `device`."""
    engines = {"torch": ("float32", "tf32", "bfloat16", "float16", "float64")}
    if triton_available():
        from gradserve.kernels import triton_engine

        engines["triton"] = triton_engine.precisions()
    return engines


def engine_library(name: str) -> str:
    """The library engine `name` computes with and its version ("triton 3.6.0")."""
    import importlib

    return f"{name} {importlib.import_module(name).__version__}"


def select_engine(
    backend: str,
    job_precision: str,
    device: torch.device,
    per_sample_norms: bool = False,
    layer_sizes=(),
    non_finite: bool = False,
    samples_at_once: int = 0,
) -> str:
    """Resolve `auto | torch | triton` to an engine name, or raise EngineUnavailable.
    `auto` runs Triton on CUDA except where torch was measured faster (IEEE float32 jobs
    wider than AUTO_TRITON_MAX_FLOAT32_WIDTH, or deeper than the fused kernel takes under
    auto, triton_engine.fused_max_layers: on the per-layer GEMMs) or Triton cannot run the
    job as asked.
    `per_sample_norms`: the job needs them (as outputs, or to clip gradients); the Triton
    engine computes them in its fused kernel, for widths up to 128. `non_finite`: the job
    accepts NaN and Inf inputs; `auto` then leaves tf32 jobs to torch, whose tf32 keeps NaN
    where the Triton kernels' operand rounding turns the GPU's NaN into -0
    (triton_common.round_to_tf32). `samples_at_once`: the samples one launch computes (N,
    or a streamed job's micro-batch); with `layer_sizes`, it decides whether the Triton
    kernels' 32-bit offsets within a model suffice (triton_engine.fits_int32_offsets)."""
    engines = available_engines(device)
    if backend == "auto" and non_finite and job_precision == "tf32":
        return "torch"
    # deeper than the fused kernel takes under auto (its compile time grows with the depth)
    deep = bool(layer_sizes) and len(layer_sizes) - 1 > fused_max_layers(
        job_precision, _float32_matmul
    )
    if (
        backend == "auto"
        and job_precision == "float32"
        and layer_sizes
        and (max(layer_sizes) > AUTO_TRITON_MAX_FLOAT32_WIDTH or deep)
    ):
        return "torch"
    if per_sample_norms and layer_sizes and max(layer_sizes) > FUSED_MAX_WIDTH:
        if backend == "triton":
            raise EngineUnavailable(
                "per-sample gradient norms and DP clipping on the triton engine need widths "
                f"<= {FUSED_MAX_WIDTH}; use the torch engine"
            )
        backend = "torch" if backend == "auto" else backend
    if backend == "auto" and per_sample_norms and deep:
        return "torch"  # the fused kernel alone computes norms: a long compile
    if samples_at_once and layer_sizes and not fits_int32_offsets(samples_at_once, layer_sizes):
        if backend == "triton":
            raise EngineUnavailable(
                "the triton engine needs each model's tensors below 2**31 elements (samples "
                "x widest layer, and each weight); use the torch engine or fewer samples"
            )
        backend = "torch" if backend == "auto" else backend
    if backend == "auto":
        triton_ok = "triton" in engines and job_precision in engines["triton"]
        return "triton" if triton_ok and device.type == "cuda" else "torch"
    if backend not in engines:
        raise EngineUnavailable(
            f"engine {backend!r} is not available on this server (device {device.type}; "
            f"it has {', '.join(sorted(engines))}; the triton engine needs CUDA and Triton "
            f"{'.'.join(map(str, MIN_TRITON))} or newer)"
        )
    if job_precision not in engines[backend]:
        raise EngineUnavailable(f"engine {backend!r} does not run precision {job_precision!r}")
    return backend


def warm_up(device: torch.device) -> None:
    """Run one tiny job on the calling thread before the first real job: loads every
    engine's libraries, starts the thread's intra-op pool and (through the torch engine)
    makes the first call of each CPU math function on one thread, which torch's threads
    cannot safely make together (torch_engine._prime_cpu_math: the cause of a fresh
    server's occasional half-batch of gradients off by ~1e-3)."""
    from gradserve.kernels.spec import Activation, LossSpec, MLPSpec

    gen = torch.Generator().manual_seed(0)
    sizes = (3, 5, 2)
    shapes = list(zip(sizes[1:], sizes, strict=False))
    job = EnsembleJob(
        mlp=MLPSpec(sizes, Activation("tanh"), Activation("identity")),
        loss=LossSpec(),
        weights=[torch.randn(2, *shape, generator=gen) for shape in shapes],
        biases=[torch.randn(2, b, generator=gen) for b in sizes[1:]],
        inputs=torch.randn(4, sizes[0], generator=gen),
        targets=torch.randn(4, sizes[-1], generator=gen),
    )
    run(job, "torch", device)
    available_engines(device)


def run(job: EnsembleJob, engine: str, device: torch.device) -> EnsembleResult:
    result = _run(job, engine, device)
    if job.optimizer is None and result.bias_grads is not None:
        # The zero bias of a layer without one gets a zero gradient: nothing to return,
        # and optimiser steps (which run this per step) leave it at zero.
        for i in job.mlp.layers_without_bias:
            result.bias_grads[i] = torch.zeros_like(result.bias_grads[i])
    return result


def _run(job: EnsembleJob, engine: str, device: torch.device) -> EnsembleResult:
    if job.optimizer is not None:
        from gradserve.kernels import optimizers

        result = optimizers.train(job, lambda step: run(step, engine, device), device)
        result.engine = engine
        return result
    if engine == "torch":
        return torch_engine.run(job, device)
    if engine == "triton":
        from gradserve.kernels import compiled_kernels, triton_engine

        result = triton_engine.run(job, device, float32_matmul=_float32_matmul)
        compiled_kernels.enforce()  # the process keeps a bounded number of compiled kernels
        return result
    raise EngineUnavailable(f"unknown engine {engine!r}")
