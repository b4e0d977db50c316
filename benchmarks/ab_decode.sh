#!/usr/bin/env bash
# On the GPU machine: time the decode kernel of this tree against an older tree in the same call (same
# machine, same clocks), e.g. before and after a kernel change.
#
#   git archive REV -o .ab/old.tar            # here: the tree to compare against (.ab/ is git-ignored)
#   bash benchmarks/ab_decode.sh .ab/old.tar  # there (device tool: carry .ab and .whl); ~3 min on one H100
#
# Builds and tests this tree (benchmarks/gpu_kernels.sh), times its decode, then builds the old tree in
# /tmp/oscar-ab-old and times its decode with the same benchmark (the old tree's benchmarks/kernels.py),
# and prints old vs new per (shape, batch, context). Results: $OUT/new, $OUT/old (kernels-h100.json each).
# BUDGET (seconds per decode benchmark, default 130) bounds the call.
set -uo pipefail
old_tar="${1:?usage: bash benchmarks/ab_decode.sh OLD_TREE.tar}"
cd "$(dirname "$0")/.."
root=$(pwd)
out="${OUT:-/tmp/oscar-ab}"
budget="${BUDGET:-130}"
OUT="$out/new" bash benchmarks/gpu_kernels.sh -- --parts decode --no-sweep --time-budget "$budget" || exit 1
rm -rf /tmp/oscar-ab-old && mkdir -p /tmp/oscar-ab-old && tar -xf "$old_tar" -C /tmp/oscar-ab-old || exit 1
[ -d .whl ] && cp -r .whl /tmp/oscar-ab-old/
(cd /tmp/oscar-ab-old && OUT="$out/old" bash benchmarks/gpu_kernels.sh --skip-tests -- --parts decode --no-sweep \
  --time-budget "$budget") || exit 1
# Leave this tree installed again (the old build replaced the editable install).
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install -q --no-deps --no-build-isolation -e "$root" > "$out/reinstall.log" 2>&1
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
key = lambda r: (r["shape"], r["batch"], r["ctx"])
new = {key(r): r for r in json.load(open(out + "/new/kernels-h100.json"))["decode"]}
old = {key(r): r for r in json.load(open(out + "/old/kernels-h100.json"))["decode"]}
print("| shape | B | ctx | old us | new us | change | new TB/s |\n|---|---|---|---|---|---|---|")
for k in sorted(new.keys() & old.keys()):
    n, o = new[k]["oscar_ms"] * 1e3, old[k]["oscar_ms"] * 1e3
    print(f"| {k[0]} | {k[1]} | {k[2]} | {o:.1f} | {n:.1f} | {n / o - 1:+.1%} | {new[k]['oscar_tbps']:.2f} |")
PY
