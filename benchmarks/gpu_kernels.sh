#!/usr/bin/env bash
# On the GPU machine: build vllm_oscar._C, run the GPU kernel tests, run the kernel benchmark.
# Logs and results go to $OUT (default /tmp/oscar-kernels): env.log, build.log, tests.log,
# sanitizer.log, bench.log, kernels-h100.json.
#
#   bash benchmarks/gpu_kernels.sh [--skip-tests] [--skip-bench] [--sanitize] [-- BENCH_ARGS...]
#
# Sized for one 10-minute device call: build ~50-75 s, sanitizer subset (limit SANITIZE_TIMEOUT=240), tests ~60-90 s (limit
# TEST_TIMEOUT=200), benchmark ~2 min (BENCH_TIMEOUT=260, default --time-budget 190).
#
# Optional inputs carried next to the tree (ignored by git):
#   .whl/      pytest (+ pluggy, iniconfig), setuptools, wheel wheels, installed when missing
#   .fa3/fa3.so.xz   vLLM 0.26's _vllm_fa3_C.abi3.so (xz), the FA3 baseline when vLLM is not installed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/oscar-kernels}"
mkdir -p "$OUT"
run_tests=1 run_bench=1 sanitize=0 bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --skip-tests) run_tests=0 ;;
    --skip-bench) run_bench=0 ;;
    --sanitize) sanitize=1 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ ${#bench_args[@]} -eq 0 ] && bench_args=(--time-budget 190)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

{ nvidia-smi; "$PY" -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda)"; nvcc --version; } \
  > "$OUT/env.log" 2>&1
missing=""
for m in pytest setuptools wheel; do "$PY" -c "import $m" 2>/dev/null || missing="$missing $m"; done
if [ -n "$missing" ] && [ -d .whl ]; then
  stamp "installing from .whl:$missing"
  "$PY" -m pip install -q --no-index --no-deps --find-links .whl pytest pluggy iniconfig setuptools wheel >> "$OUT/env.log" 2>&1
fi
if ! "$PY" -c "import vllm" 2>/dev/null && [ -f .fa3/fa3.so.xz ]; then
  "$PY" -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.fa3/fa3.so.xz'), open('/tmp/_vllm_fa3_C.abi3.so', 'wb'))"
  export OSCAR_FA3_SO=/tmp/_vllm_fa3_C.abi3.so
fi

stamp "building (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a})"
t0=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  stamp "BUILD FAILED"
  exit 1
fi
stamp "built in $(( $(date +%s) - t0 )) s"
"$PY" -c "import vllm_oscar.ops as o; assert o.kernels_available(), o.kernels_unavailable_reason(); print('kernels loaded')"

status=0
if [ "$sanitize" = 1 ]; then
  # The decode cases cover a split's boundary and whole stages, block sizes 16, 32 and 128, no window, and
  # store_and_decode (the store kernel's PDL gate, the decode's waits) with and without a window, the
  # u8-params variants of decode, store_and_decode, store and gather, 512-token recent windows (5
  # window splits of 128 rows), and window CTAs that take several window tiles (decode, store_and_decode).
  stamp "compute-sanitizer memcheck on store/decode/gather tests"
  timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -x -p no:cacheprovider \
    "tests/kernels/test_decode.py::test_decode_matches_reference[ctx64-65-smallwin-g4]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[seq0]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[nowindow-g4]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[b7-ctx33000-g8-bs128-norotv]" \
    "tests/kernels/test_decode.py::test_store_and_decode_equals_store_then_decode[b7-nowindow-g4]" \
    "tests/kernels/test_decode.py::test_store_and_decode_equals_store_then_decode[seq0-d64]" \
    "tests/kernels/test_store.py::test_store_bit_exact" \
    "tests/kernels/test_gather.py::test_gather_prefix_opcheck" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[u8-ctx64-65-smallwin-g4]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[u8-r512-g3-d64]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[r512-g4]" \
    "tests/kernels/test_decode.py::test_store_and_decode_equals_store_then_decode[u8-b7-nowindow-g4]" \
    "tests/kernels/test_store.py::test_store_u8_params_bit_exact[d64-bs16-bfloat16-T300-mse-identity-win1]" \
    "tests/kernels/test_gather.py::test_gather_prefix_bit_exact[128-16-16-True-u8]" \
    "tests/kernels/test_decode.py::test_decode_matches_reference[winpasses-r512-g4]" \
    "tests/kernels/test_decode.py::test_store_and_decode_equals_store_then_decode[b4-ctx33000-g4-winpasses]" \
    > "$OUT/sanitizer.log" 2>&1
  stamp "sanitizer exit $? (log: sanitizer.log)"
  grep -E "ERROR SUMMARY|Invalid|passed|failed" "$OUT/sanitizer.log" | tail -5
fi
if [ "$run_tests" = 1 ]; then
  stamp "GPU kernel tests"
  timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest tests/kernels -v -p no:cacheprovider --durations=15 \
    > "$OUT/tests.log" 2>&1
  status=$?
  stamp "tests exit $status"
  grep -cE " PASSED" "$OUT/tests.log" | sed "s/^/passed: /"; grep -E " (FAILED|ERROR)" "$OUT/tests.log" | head -30
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -40
  tail -3 "$OUT/tests.log"
fi
if [ "$run_bench" = 1 ]; then
  stamp "benchmark"
  timeout "${BENCH_TIMEOUT:-260}" "$PY" benchmarks/kernels.py --out "$OUT/kernels-h100.json" "${bench_args[@]}" \
    > "$OUT/bench.log" 2>&1
  stamp "benchmark exit $?"
  sed -n '/== decode/,$p' "$OUT/bench.log"
  grep -iE "error|Traceback" "$OUT/bench.log" | head -10
fi
exit $status
