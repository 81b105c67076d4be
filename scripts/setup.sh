#!/usr/bin/env bash
# Creates .venv with gradserve (server + dev extras) installed in editable mode.
# On a machine without an NVIDIA GPU it installs the CPU build of torch first, so the
# server extra's plain `torch` requirement is already met and no CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The CPU torch build this project is tested with; override for another release.
CPU_TORCH_SPEC=${GRADSERVE_CPU_TORCH_SPEC:-torch==2.13.0}
# With it, the Triton whose interpreter the tests run the kernels on: kernels/gluon_cpu.py
# uses the interpreter's internals, which a new release may change (on a GPU machine torch
# brings the Triton it was built with).
CPU_TRITON_SPEC=${GRADSERVE_CPU_TRITON_SPEC:-triton==3.9.0}
LINUX_X86="platform_system == 'Linux' and platform_machine == 'x86_64'"  # Triton's wheels

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    "${PIP[@]}" "$CPU_TORCH_SPEC" "$CPU_TRITON_SPEC; $LINUX_X86"
  fi
fi
"${PIP[@]}" -e '.[server,dev]'
.venv/bin/python -c "import gradserve.server, gradserve.client; print('gradserve installed in .venv')"
