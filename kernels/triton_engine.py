"""Fused Triton engine (placeholder until the kernels land): reports itself unavailable."""

PRECISIONS: tuple[str, ...] = ()


def available() -> bool:
    return False


def run(job, device):  # pragma: no cover - never selected while unavailable
    raise NotImplementedError("the Triton engine is not available in this build")
