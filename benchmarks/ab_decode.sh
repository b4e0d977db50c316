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
# BUDGET (seconds per benchmark run, default 130) bounds the call. PARTS (default decode) picks the
# benchmark parts both trees run: decode, step (store_and_decode, what the vLLM backend runs at small
# batch) and store are compared. SHAPES (default: the benchmark's, qwen3-8b,smollm2) its --shapes.
set -uo pipefail
old_tar="${1:?usage: bash benchmarks/ab_decode.sh OLD_TREE.tar}"
cd "$(dirname "$0")/.."
root=$(pwd)
out="${OUT:-/tmp/oscar-ab}"
budget="${BUDGET:-130}"
parts="${PARTS:-decode}"
shapes="${SHAPES:-qwen3-8b,smollm2}"
OUT="$out/new" bash benchmarks/gpu_kernels.sh -- --parts "$parts" --shapes "$shapes" --no-sweep --time-budget "$budget" || exit 1
rm -rf /tmp/oscar-ab-old && mkdir -p /tmp/oscar-ab-old && tar -xf "$old_tar" -C /tmp/oscar-ab-old || exit 1
[ -d .whl ] && cp -r .whl /tmp/oscar-ab-old/
(cd /tmp/oscar-ab-old && OUT="$out/old" bash benchmarks/gpu_kernels.sh --skip-tests -- --parts "$parts" \
  --shapes "$shapes" --no-sweep --time-budget "$budget") || exit 1
# Leave this tree installed again (the old build replaced the editable install).
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" \
  python3 -m pip install -q --no-deps --no-build-isolation -e "$root" > "$out/reinstall.log" 2>&1
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
res = {side: json.load(open(f"{out}/{side}/kernels-h100.json")) for side in ("new", "old")}
decode_key = ("shape", "batch", "ctx")
# (part, row key, field, scale to us): decode rows time oscar_ms; step rows the backend's small-batch op;
# store rows one store_kv call
for part, fields, field, to_us in (("decode", decode_key, "oscar_ms", 1e3),
                                   ("step", decode_key, "store_and_decode_us", 1.0),
                                   ("store", ("shape", "tokens", "levels", "window"), "us", 1.0)):
    key = lambda r: tuple(r[f] for f in fields)  # noqa: E731
    new = {key(r): r for r in res["new"].get(part, [])}
    old = {key(r): r for r in res["old"].get(part, [])}
    if not new.keys() & old.keys():
        continue
    print(f"\n{part} ({field})\n| {' | '.join(fields)} | old us | new us | change |\n|" + "---|" * (len(fields) + 3))
    for k in sorted(new.keys() & old.keys()):
        n, o = new[k][field] * to_us, old[k][field] * to_us
        print(f"| {' | '.join(map(str, k))} | {o:.1f} | {n:.1f} | {n / o - 1:+.1%} |")
PY
