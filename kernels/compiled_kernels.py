"""A bound on the compiled Triton kernels this process keeps in memory.

Triton keeps every specialisation it compiles for the life of the process: a compiled
kernel holding its IR, PTX and cubin (1 to 6 MB of host memory for a fused MLP kernel) and
a module loaded on the GPU. The engine specialises its kernels per architecture (depth,
padded widths, activations, loss, precision, requested outputs), so a server fed ever-new
architectures would grow without bound. enforce() runs after every Triton job: when more
than the limit are held, all of them are forgotten, once the GPU has finished the work
already launched. Those still in use come back from Triton's on-disk cache at their next
launch: a cubin load, not a compile. Forgetting all rather than the least recently used
needs nothing of Triton's internals but its per-device dicts of compiled kernels, and a
workload of fewer specialisations than the limit never evicts.

Triton's on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache) is not bounded here.
"""

from __future__ import annotations

import sys

import torch

DEFAULT_LIMIT = 64
_limit = DEFAULT_LIMIT
_evictions = 0


def set_limit(limit: int) -> None:
    """Most compiled specialisations kept (the server's --max-compiled-kernels)."""
    global _limit
    if limit < 1:
        raise ValueError(f"the compiled-kernel limit must be >= 1, not {limit}")
    _limit = limit


def limit() -> int:
    return _limit


def evictions() -> int:
    """How many times every compiled kernel was forgotten."""
    return _evictions


# The Triton engine's kernel modules.
_MODULES = ("gradserve.kernels.triton_fused", "gradserve.kernels.triton_layered")


def engine_kernels() -> list:
    """The Triton engine's kernels: every JIT function of its kernel modules. A module not
    imported yet has compiled nothing (and is not imported here: Triton may be absent)."""
    modules = [sys.modules[name] for name in _MODULES if name in sys.modules]
    return [
        value
        for module in modules
        for value in list(vars(module).values())
        if hasattr(value, "device_caches")
    ]


def _compiled(kernel) -> list[dict]:
    """The kernel's dicts of compiled specialisations, one per device (Triton keeps them as
    the first item of JITFunction.device_caches[device]; the interpreter keeps none). A
    copy of the values: another thread may be reading them (metrics)."""
    caches = getattr(kernel, "device_caches", None)
    return [entry[0] for entry in list(caches.values())] if caches else []


def held(kernels=None) -> int:
    """Compiled specialisations held now."""
    kernels = engine_kernels() if kernels is None else kernels
    return sum(len(cache) for kernel in kernels for cache in _compiled(kernel))


def enforce(kernels=None) -> bool:
    """Forget every compiled kernel if more than the limit are held; True if it did."""
    global _evictions
    kernels = engine_kernels() if kernels is None else kernels
    if held(kernels) <= _limit:
        return False
    if torch.cuda.is_available():
        # Newer Triton releases unload a kernel's module when it is freed: let every
        # launch that uses one finish first.
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    for kernel in kernels:
        kernel.device_caches.clear()
    _evictions += 1
    return True
