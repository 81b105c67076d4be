"""kernels.compiled_kernels against Triton's real caches, on a machine without a GPU.

A stand-in driver (bench/compile_only.py) lets Triton's launcher compile kernels as for an
H100 without launching them, so its per-device caches of compiled kernels fill as on a GPU,
and its on-disk cache (a fresh directory here) as it would there. Run by
tests/kernels/test_compiled_kernels.py in a subprocess, because TRITON_INTERPRET (set by
the test suite) must be off when kernels are defined.

Usage: python -m tests.kernels.compiled_kernels_check
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "run with the interpreter off"

import torch  # noqa: E402
from triton.runtime import driver  # noqa: E402

from bench.compile_only import CompileOnlyDriver  # noqa: E402


def main() -> int:
    os.environ["TRITON_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="gradserve-triton-")
    driver.set_active(CompileOnlyDriver())
    from gradserve.kernels import (
        compiled_kernels,
        kernel_disk_cache,
        partial_sums,
        triton_fused,
        triton_layered,
    )

    assert kernel_disk_cache.cache_dir() == Path(cache)

    expected = [triton_fused._fused_mlp_kernel, partial_sums._sum_partials_kernel,
                triton_layered._batched_matmul_kernel]  # fmt: skip
    if importlib.util.find_spec("triton.experimental.gluon"):  # Triton 3.6 and later
        from gradserve.kernels import gluon_matmul

        expected.append(gluon_matmul._fp32_batched_matmul_kernel)
    kernels = compiled_kernels.engine_kernels()
    for kernel in expected:
        assert kernel in kernels, kernel
    partial, out = torch.zeros(4, 2, 64), torch.zeros(4, 64)

    def compile_with(block: int) -> Path:  # one specialisation per BLOCK; its disk entry
        compiled = partial_sums._sum_partials_kernel.run(
            partial, out, 2, 64, (64,), STARTS=(0,), BLOCK=block, grid=(4, 1), warmup=True
        )
        return kernel_disk_cache.entry_of(compiled)

    compiled_kernels.set_limit(2)
    seen, entry = [], {}
    for block in (256, 512, 1024, 256):
        entry[block] = compile_with(block)
        held = compiled_kernels.held()
        seen.append((held, compiled_kernels.enforce(), compiled_kernels.held()))
    # two kept; the third is one too many: all dropped; the first again: compiled anew
    expected = [(1, False, 1), (2, False, 2), (3, True, 0), (1, False, 1)]
    assert seen == expected, seen
    assert compiled_kernels.evictions() == 1
    print("compiled kernels stay within the limit:", seen)

    def on_disk() -> set[Path]:
        return {e.path for e in kernel_disk_cache.entries(Path(cache))}

    # 256 (held again, loaded from its entry) is given the oldest entry on disk: the
    # eviction must touch it, so that the two entries removed are 512's and 1024's.
    now = time.time()
    for age, block in ((300, 256), (200, 512), (100, 1024)):
        os.utime(entry[block], (now - age, now - age))
    for block in (2048, 4096):
        entry[block] = compile_with(block)
    assert compiled_kernels.held() == 3 and on_disk() == set(entry.values()), on_disk()
    kept = {entry[256], entry[2048], entry[4096]}
    budget = sum(kernel_disk_cache.size(e) for e in kept)
    compiled_kernels.set_disk_limit(budget, min_age_s=0)
    assert compiled_kernels.enforce()
    assert on_disk() == kept, (on_disk(), entry)
    assert compiled_kernels.disk_bytes() <= budget
    assert compile_with(512) == entry[512]  # removed: compiled again, into the same entry
    assert on_disk() == kept | {entry[512]}
    print("the disk cache stays within its budget:", budget, "bytes,", len(kept), "entries")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        if "TRITON_CACHE_DIR" in os.environ:
            shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
