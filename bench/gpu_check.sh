#!/usr/bin/env bash
# One-call GPU check (see the README's Benchmarks section): versions, kernel benchmark,
# GPU-marked tests, and one job through a real server on the GPU. Writes under $OUT
# (default out/gpu): env.txt, gpu_tests.log, option_tests.log, kernels_gpu.md, server_job.txt,
# summary.txt.
# `bash bench/gpu_check.sh sweep` instead profiles the fused kernel's phases at the target
# shape (bench/fused_phases.py: $OUT/fused_phases.md) and times its launch configurations
# at the target shape (bench/fused_sweep.py, 22 configurations per precision, all compiled
# first in parallel; rows are written as measured, so a cut-off run keeps them):
# $OUT/fused_sweep.md. First it runs the tests that check the register-kept launch options
# against the default, each run twice bit for bit (register_options_tests.log).
# `bash bench/gpu_check.sh configs` checks a two-layer MLP's forward and backward alone, with
# the fused kernel's matmul pattern, at its block shapes (bench/chained_dot_check.py: is the
# 64-row, 8-warp fault Triton's?), then the fused kernel's block sizes and warp counts
# against the float64 oracle, one process each (bench/config_check.py:
# $OUT/config_check.md).
# `bash bench/gpu_check.sh configs --shapes JSON --blocks LIST --precisions LIST` checks
# only those (bench/config_check.py's options), without the two-layer MLP check, within
# $CONFIGS_TIMEOUT seconds (170). `bash bench/gpu_check.sh tests PYTEST_ARGS` runs only
# those GPU tests (gpu_tests.log) within $TESTS_TIMEOUT seconds (270).
# `bash bench/gpu_check.sh sweep tf32,bfloat16` times only those precisions'
# configurations and skips the phases. `bash bench/gpu_check.sh layered` times the per-layer
# path's GEMM tile shapes at width 1024 (bench/layered_sweep.py: $OUT/layered_sweep.md).
# `bash bench/gpu_check.sh splits` times the per-layer path's sums over the samples split
# across programs against unsplit (bench/split_sums.py: $OUT/split_sums.md) and runs their
# GPU tests.
# `bash bench/gpu_check.sh gluon` checks the float32 kernels (float32_matmul="gluon",
# kernels/gluon_*.py, and tl.dot's IEEE and three-tf32-product ones) against the oracle on
# the GPU and times the benchmark's float32 rows on tl.dot and on Gluon, and the target on
# each with the output layer as padded products instead of reductions ("float32 padded",
# "float32 gluon padded", "float32 tf32x3 padded") ($OUT/gluon_tests.log,
# $OUT/kernels_gpu_gluon.md; within 6 minutes by its steps' limits).
# `bash bench/gpu_check.sh fma` times IEEE float32 products in a chain of 64-wide layers,
# Triton's tl.dot against Gluon kernels with larger per-thread tiles (bench/fma_tiles.py:
# $OUT/fma_tiles.md).
# `bash bench/gpu_check.sh all [PRECISIONS]` runs the default check, then in the same call
# the two-layer MLP check and the fused kernel's launch configurations for PRECISIONS
# (default float32,bfloat16,float32-tf32x3: IEEE float32's launch configurations and
# K-chunks have never been timed on a GPU, bfloat16's were in part) in whatever is left of
# about 570 s: one device start for all three (8 files under $OUT).
# Python packages missing on the machine can be carried as wheels in .whl/.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gradserve-site .whl/*.whl
  export PYTHONPATH=/tmp/gradserve-site${PYTHONPATH:+:$PYTHONPATH}
fi
# Make the import names (gradserve.kernels -> kernels/, ...) resolve without installing.
pkg=/tmp/gradserve-src/gradserve
rm -rf /tmp/gradserve-src && mkdir -p "$pkg"
cp proto/gradserve/__init__.py "$pkg/"
ln -s "$PWD/proto/gradserve/v1" "$pkg/v1"
for part in kernels server client; do ln -s "$PWD/$part" "$pkg/$part"; done
export PYTHONPATH=/tmp/gradserve-src:$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  date -u
  nvidia-smi -L
  python3 -c "import torch, triton, grpc, google.protobuf as p; print('torch', torch.__version__, \
'cuda', torch.version.cuda, '| triton', triton.__version__, '| grpcio', grpc.__version__, \
'| protobuf', p.__version__); print(torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if [ "${1:-}" = configs ]; then
  if [ $# -eq 1 ]; then
    echo "== a two-layer MLP alone, forward and backward: 64 and 128 rows, 4 and 8 warps"
    timeout 120 python3 bench/chained_dot_check.py 2>&1 | tee "$OUT/chained_dot_check.md"
  fi
  echo "== fused kernel block sizes and warps against the oracle"
  timeout "${CONFIGS_TIMEOUT:-170}" python3 bench/config_check.py --out "$OUT/config_check.md" \
    "${@:2}" 2>&1 | tail -100
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = tests ]; then
  # `bash bench/gpu_check.sh tests PYTEST_ARGS`: only those GPU tests
  timeout "${TESTS_TIMEOUT:-270}" python3 -m pytest -v -p no:cacheprovider -n 16 "${@:2}" 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "FAILED|Error|passed|failed" | tail -40
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = gluon ]; then
  # float32 alone (150 s + 200 s at most): its kernels against the oracle on the hardware
  # (Gluon's, where a race between threads would show, and tl.dot's, IEEE and three tf32
  # products, with their narrow output layers as reductions), then the benchmark's float32
  # rows (IEEE on tl.dot and on Gluon, three tf32 products), with their PyTorch peers.
  echo "== the float32 kernels against the oracle on the GPU"
  timeout 150 python3 -m pytest -v -p no:cacheprovider -n 16 \
    -k "gluon or float32 or three_tf32 or deterministic" tests/kernels/test_gpu.py 2>&1 \
    | tee "$OUT/gluon_tests.log" | grep -E "FAILED|Error|passed|failed" | tail -20
  tests_status=${PIPESTATUS[0]}
  echo "== float32: IEEE on tl.dot and on Gluon, three tf32 products"
  timeout 200 python3 bench/kernels_gpu.py \
    --labels float32,float32-padded,float32-gluon,float32-gluon-padded,float32-tf32x3,float32-tf32x3-padded \
    --out "$OUT/kernels_gpu_gluon.md" 2>&1 | grep '^|'
  exit "$tests_status"
fi

if [ "${1:-}" = fma ]; then
  echo "== IEEE float32 products by outputs per thread: tl.dot against Gluon's tiles"
  timeout 240 python3 bench/fma_tiles.py --out "$OUT/fma_tiles.md" 2>&1 | tail -20
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = layered ]; then
  echo "== per-layer GEMM tile shapes at width 1024"
  timeout 300 python3 bench/layered_sweep.py --out "$OUT/layered_sweep.md" 2>&1 | tail -30
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = splits ]; then
  echo "== per-layer path: sums over the samples split across programs or not"
  timeout 300 python3 bench/split_sums.py --out "$OUT/split_sums.md" 2>&1 | tail -20
  echo "== GPU tests of the split sums"
  timeout 200 python3 -m pytest -q -p no:cacheprovider -k split_across_programs \
    tests/kernels/test_gpu.py 2>&1 | tail -15
  exit "${PIPESTATUS[0]}"
fi

if [ "${1:-}" = sweep ]; then
  # The launch options that keep values in registers drop barriers: on the hardware, check
  # that each gives the same bits run after run (a race would not) and the default's
  # results (random jobs, blocks of 16 samples).
  echo "== values kept in registers: reproducible, and the default's results"
  timeout 120 python3 -m pytest -q -p no:cacheprovider -n 16 -k "registers or same_bits" \
    tests/kernels/test_option_combinations.py tests/kernels/test_triton_engine.py 2>&1 \
    | tee "$OUT/register_options_tests.log" | tail -3
  if [ -n "${2:-}" ]; then
    echo "== fused kernel launch configurations: $2"
    timeout 400 python3 bench/fused_sweep.py --out "$OUT/fused_sweep.md" --precisions "$2" \
      2>&1 | tail -50
    exit "${PIPESTATUS[0]}"
  fi
  echo "== fused kernel phases"
  timeout 140 python3 bench/fused_phases.py --out "$OUT/fused_phases.md" 2>&1 | tail -75
  echo "== fused kernel launch configurations"
  timeout 400 python3 bench/fused_sweep.py --out "$OUT/fused_sweep.md" 2>&1 | tail -50
  exit "${PIPESTATUS[0]}"
fi

# The benchmark first: its table (written row by row) is what the targets need, so a call
# cut short keeps it. With every step but the server job (seconds when it works) at its
# limit: about 560 s; the benchmark took about 130 s and the tests 140 s on an H100.
echo "== kernel benchmark"
timeout 220 python3 bench/kernels_gpu.py --out "$OUT/kernels_gpu.md" 2>&1 | tail -3

echo "== GPU tests"
# test_gpu.py is all GPU-marked; test_tf32_rounding.py and test_tf32x3.py check tf32
# rounding and the three-product float32 on the hardware, test_non_finite.py NaN handling,
# test_layers_without_bias.py zero biases on the GPU's kernels, test_activation_accuracy.py
# the activations and losses far from 1 (with the GPU's approximate exp and division).
# -v logs each test as it ends, so a run cut off by the time limit still says which passed.
timeout 270 python3 -m pytest -v -p no:cacheprovider -n 16 tests/kernels/test_gpu.py \
  tests/kernels/test_tf32_rounding.py tests/kernels/test_tf32x3.py \
  tests/kernels/test_non_finite.py tests/kernels/test_layers_without_bias.py \
  tests/kernels/test_activation_accuracy.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -15
tests_status=${PIPESTATUS[0]}
# Random option combinations (odd widths, shared and per-model tensors, slopes, outputs)
# against the oracle on the GPU's kernels: one compile per seed, so kept to its own minute.
timeout 60 python3 -m pytest -q -p no:cacheprovider -n 16 -k "not registers" \
  tests/kernels/test_option_combinations.py 2>&1 | tee "$OUT/option_tests.log" | tail -3

echo "== one job through a real server on the GPU"
rm -f /tmp/gradserve.port
python3 -m gradserve.server --port 0 --port-file /tmp/gradserve.port --device cuda \
  --log-level WARNING &
server=$!
for _ in $(seq 200); do [ -s /tmp/gradserve.port ] && break; sleep 0.1; done
address=127.0.0.1:$(cat /tmp/gradserve.port)
{
  python3 -m gradserve.client --address "$address" --timeout 60 info
  python3 -m gradserve.client example /tmp/gradserve-jobs >/dev/null
  python3 -m gradserve.client --address "$address" --timeout 120 compute \
    /tmp/gradserve-jobs/ensemble-64x16-32-32-1.safetensors --json
} 2>&1 | tee "$OUT/server_job.txt" | tail -2
kill "$server"; wait "$server" 2>/dev/null

{
  echo "GPU check $(date -u +%F) on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
  echo "tests: $(tail -1 "$OUT/gpu_tests.log") (exit $tests_status)"
  echo "option combinations: $(tail -1 "$OUT/option_tests.log")"
  echo "server job engine: $(grep -o '"engine": "[a-z]*"' "$OUT/server_job.txt")"
  cat "$OUT/kernels_gpu.md" 2>/dev/null | grep '^|'
} | tee "$OUT/summary.txt"

# `all`: each step gets what is left of 570 s (the device call's limit is 600), at most its own.
if [ "${1:-}" = all ] && [ $((570 - SECONDS)) -gt 30 ]; then
  left=$((570 - SECONDS < 120 ? 570 - SECONDS : 120))
  echo "== a two-layer MLP alone, forward and backward: 64 and 128 rows, 4 and 8 warps"
  if timeout "$left" python3 bench/chained_dot_check.py > "$OUT/chained_dot_check.md" 2>&1; then
    echo "all ok"
  else  # wrong or faulting rows, or the script's own failure
    grep -E 'WRONG|FAILED' "$OUT/chained_dot_check.md"
    tail -3 "$OUT/chained_dot_check.md"
  fi
  left=$((570 - SECONDS))
  if [ "$left" -gt 60 ]; then
    echo "== fused kernel launch configurations: ${2:-float32,bfloat16,float32-tf32x3} (${left} s)"
    timeout "$left" python3 bench/fused_sweep.py --out "$OUT/fused_sweep.md" \
      --precisions "${2:-float32,bfloat16,float32-tf32x3}" 2>&1 | grep '^|' | tail -50
  fi
fi
