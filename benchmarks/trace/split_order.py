"""Batch-1 decode time per INT2 split count and CTA order (GPU machine only).

The order override is not in the shipped kernel: it lives in ``win-first-override.patch`` next to this
file (``tests/kernels/test_trace_patch.py`` checks that it still applies and compiles):

    git apply benchmarks/trace/win-first-override.patch
    bash benchmarks/gpu_kernels.sh --skip-tests --skip-bench      # rebuild with the override
    python -m benchmarks.trace.split_order --out /tmp/split-order.json
    git apply -R benchmarks/trace/win-first-override.patch        # and rebuild before timing anything

For each shape, context and split count it times the decode (no R_V, as the vLLM plugin runs it) with
the benchmark's inputs and method (``benchmarks.kernels.bench_oscar``) three ways: ``auto`` (the
launcher's rule: window CTAs first only when the whole grid is resident), ``1`` (window CTAs first) and
``0`` (INT2 CTAs first), set through ``OSCAR_EXPERIMENT_WIN_FIRST``, which the patched launcher reads
at every launch. Rows ``decode_steps.batch1_split_order_rows`` of benchmarks/results/kernels-h100.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks import kernels as kb
from benchmarks.trace import write_rows

# (shape, contexts, split counts around decode_num_splits' batch-1 choice: 30 and 85)
CONFIGS = [("qwen3-8b", (8192, 32768, 65536, 131072), (24, 28, 30, 31, 32, 33, 34, 36, 40)),
           ("smollm2", (32768, 131072), (64, 80, 85, 88, 90, 96))]
ORDERS = ("auto", "1", "0")
ENV = "OSCAR_EXPERIMENT_WIN_FIRST"  # read by the patched launcher only (not a shipped toggle)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/split-order.json")
    args = ap.parse_args()
    rows = []
    for shape, ctxs, splits in CONFIGS:
        hq, hkv, d = kb.SHAPES[shape]
        for ctx in ctxs:
            nb = kb.n_buffers(kb.oscar_bytes(1, hq, hkv, d, ctx))
            inp = kb.OscarInputs(1, hq, hkv, d, ctx, nb)
            for s in splits:
                for order in ORDERS:
                    if order == "auto":
                        os.environ.pop(ENV, None)
                    else:
                        os.environ[ENV] = order
                    ms, _ = kb.bench_oscar(inp, nb, rot_v=False, num_splits=s)
                    rows.append(dict(shape=shape, ctx=ctx, splits=s, win_first=order, us=round(ms * 1e3, 2)))
                    print(json.dumps(rows[-1]), flush=True)
            del inp
            torch.cuda.empty_cache()
    os.environ.pop(ENV, None)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
