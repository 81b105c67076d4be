#!/usr/bin/env bash
# The test command: lint, then the whole pytest suite (Triton kernels through the
# interpreter on machines without a GPU). Run through `make test`, which sets up first.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v npx >/dev/null || { echo "npx (Node.js) is needed for buf lint" >&2; exit 1; }
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
