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

Triton's on-disk cache is bounded too (kernels.kernel_disk_cache): at each eviction the
entries of the kernels being dropped are marked as used, then the least recently used
entries are removed until the cache fits its byte budget. The server also prunes it once
at start, for what earlier runs left.
"""

from __future__ import annotations

import sys

import torch

from gradserve.kernels import kernel_disk_cache

DEFAULT_LIMIT = 64
DEFAULT_DISK_BYTES = 1 << 30
_limit = DEFAULT_LIMIT
_disk_limit = DEFAULT_DISK_BYTES
_disk_min_age_s = kernel_disk_cache.MIN_AGE_S
_evictions = 0
_disk_bytes = 0  # the on-disk cache's size at its last prune


def set_limit(limit: int) -> None:
    """Most compiled specialisations kept (the server's --max-compiled-kernels)."""
    global _limit
    if limit < 1:
        raise ValueError(f"the compiled-kernel limit must be >= 1, not {limit}")
    _limit = limit


def limit() -> int:
    return _limit


def set_disk_limit(max_bytes: int, min_age_s: float = kernel_disk_cache.MIN_AGE_S) -> None:
    """Most bytes of Triton's on-disk cache kept at a prune (the server's
    --max-kernel-cache-bytes); entries younger than `min_age_s` are always kept."""
    global _disk_limit, _disk_min_age_s
    if max_bytes < 0:
        raise ValueError(f"the kernel cache budget must be >= 0 bytes, not {max_bytes}")
    _disk_limit, _disk_min_age_s = max_bytes, min_age_s


def disk_bytes() -> int:
    """Bytes in Triton's on-disk cache when it was last pruned."""
    return _disk_bytes


def prune_disk() -> kernel_disk_cache.Pruned | None:
    """Bring Triton's on-disk cache within its budget (None without Triton)."""
    global _disk_bytes
    root = kernel_disk_cache.cache_dir()
    if root is None:
        return None
    pruned = kernel_disk_cache.prune(root, _disk_limit, min_age_s=_disk_min_age_s)
    _disk_bytes = pruned.bytes_after
    return pruned


def evictions() -> int:
    """How many times every compiled kernel was forgotten."""
    return _evictions


# The Triton engine's kernel modules (gluon_*: Gluon kernels, cached alike).
_MODULES = (
    "gradserve.kernels.partial_sums",
    "gradserve.kernels.triton_fused",
    "gradserve.kernels.triton_layered",
    "gradserve.kernels.gluon_fused",
    "gradserve.kernels.gluon_matmul",
)


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
    # The kernels in use now are the last whose disk entries a prune removes.
    kernel_disk_cache.touch(
        entry
        for kernel in kernels
        for cache in _compiled(kernel)
        for compiled in list(cache.values())
        if (entry := kernel_disk_cache.entry_of(compiled)) is not None
    )
    for kernel in kernels:
        kernel.device_caches.clear()
    _evictions += 1
    prune_disk()
    return True
