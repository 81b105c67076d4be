#!/usr/bin/env bash
# The test command: lint, then the whole pytest suite (Triton kernels through the
# interpreter on machines without a GPU). Run through `make test`, which sets up first.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v npx >/dev/null || { echo "npx (Node.js) is needed for buf lint" >&2; exit 1; }
# Debian packages the tests use: a real nginx (grpc_pass) in front of replicas, and
# docker-compose to validate docker-compose.yml (no Docker engine needed for `config`).
missing=()
{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing+=(nginx)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v openssl >/dev/null || { echo "openssl is needed for the TLS tests" >&2; exit 1; }
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
