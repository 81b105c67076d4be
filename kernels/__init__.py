"""Compute engines for MLP-ensemble loss and gradients. No gRPC or protobuf here."""

from gradserve.kernels.engines import (
    EngineUnavailable,
    available_engines,
    engine_library,
    run,
    select_engine,
    warm_up,
)
from gradserve.kernels.spec import (
    ACTIVATIONS,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    REDUCTIONS,
    Activation,
    EnsembleJob,
    EnsembleResult,
    LossSpec,
    MLPSpec,
    Optimizer,
    OutputRequest,
    Privacy,
    flops,
)

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "PRECISIONS",
    "REDUCTIONS",
    "Activation",
    "EngineUnavailable",
    "EnsembleJob",
    "EnsembleResult",
    "LossSpec",
    "MLPSpec",
    "OPTIMIZERS",
    "Optimizer",
    "OutputRequest",
    "Privacy",
    "available_engines",
    "engine_library",
    "flops",
    "run",
    "select_engine",
    "warm_up",
]
