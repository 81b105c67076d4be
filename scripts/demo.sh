#!/usr/bin/env bash
# The main job on the embedded default: start a CPU server on a free port, write the sample
# jobs, run them through the client, print the results, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
results=out/demo  # job files and results stay here for a look afterwards
mkdir -p "$results"
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

.venv/bin/gradserve-server --port 0 --port-file "$work/port" --device cpu \
  --log-level WARNING &
server_pid=$!
for _ in $(seq 300); do  # wait for the port file, then for the server to answer
  [ -s "$work/port" ] && break
  kill -0 "$server_pid" || { echo "server failed to start" >&2; exit 1; }
  sleep 0.1
done
address="127.0.0.1:$(cat "$work/port")"
.venv/bin/gradserve-client --address "$address" --timeout 30 health

.venv/bin/gradserve-client example "$results" >/dev/null
echo
echo "== the textbook 2-2-1 network (sigmoid, mse) on XOR =="
.venv/bin/gradserve-client --address "$address" compute "$results/notebook-2-2-1.safetensors" \
  "$results/notebook-grads.safetensors"
echo
echo "== an ensemble of 64 [16, 32, 32, 1] tanh networks =="
.venv/bin/gradserve-client --address "$address" compute \
  "$results/ensemble-64x16-32-32-1.safetensors" "$results/ensemble-grads.safetensors"
