"""Engine selection: which engine runs a job, on which device."""

from __future__ import annotations

import torch

from gradserve.kernels import torch_engine
from gradserve.kernels.spec import EnsembleJob, EnsembleResult


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


def select_engine(
    backend: str, job_precision: str, device: torch.device, per_sample_norms: bool = False
) -> str:
    """Resolve `auto | torch | triton` to an engine name, or raise EngineUnavailable."""
    engines = available_engines(device)
    if per_sample_norms:  # the torch engine alone computes per-sample gradient norms
        if backend == "triton":
            raise EngineUnavailable("per-sample gradient norms need the torch engine")
        backend = "torch" if backend == "auto" else backend
    if backend == "auto":
        triton_ok = "triton" in engines and job_precision in engines["triton"]
        return "triton" if triton_ok and device.type == "cuda" else "torch"
    if backend not in engines:
        raise EngineUnavailable(f"engine {backend!r} is not available on this server")
    if job_precision not in engines[backend]:
        raise EngineUnavailable(f"engine {backend!r} does not run precision {job_precision!r}")
    return backend


def run(job: EnsembleJob, engine: str, device: torch.device) -> EnsembleResult:
    if engine == "torch":
        return torch_engine.run(job, device)
    if engine == "triton":
        from gradserve.kernels import triton_engine

        return triton_engine.run(job, device)
    raise EngineUnavailable(f"unknown engine {engine!r}")
