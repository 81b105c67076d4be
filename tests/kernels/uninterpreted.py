"""Run a module of the test suite with Triton's interpreter off, in its own process.

The suite sets TRITON_INTERPRET=1 on machines without a GPU, and Triton reads it when
kernels are defined, so the checks that compile kernels for a GPU target run apart."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m module *args` from the repository root; its output, and no exception."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; silences its notice
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
