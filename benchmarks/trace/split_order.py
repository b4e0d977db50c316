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

``--costs C1,C2,...`` times the decode instead at the split rule's count for each window-tile cost (the
patched launcher reads ``OSCAR_EXPERIMENT_WIN_TILE_COST``; 0 leaves the kernel's own
``DecodeTraits::kWinTileCost``, 100000000 puts every threshold out of reach: one window CTA per window tile
and the one-tile build, the kernel as it was before ``csrc/kernels/window_ctas.h``), at batches 1-16; with
``--step`` it times ``oscar::decode`` and ``oscar::store_and_decode``. Rows ``decode_steps.window_ctas_*``.
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
# --costs: the decode at the rule's split count per window-tile cost (csrc/kernels/window_ctas.h), at batches
# whose grid is resident at once, and two (SmolLM2 batch 16) whose grid is not.
COST_ENV = "OSCAR_EXPERIMENT_WIN_TILE_COST"
COST_CONFIGS = [("qwen3-8b", (1, 2, 4), (4096, 8192, 16384, 32768, 65536, 131072)),
                ("smollm2", (1, 4, 16), (4096, 16384, 32768, 131072))]


# --costs --step: oscar::decode and oscar::store_and_decode (the vLLM backend's op at small batch) per cost
STEP_CONFIGS = [("qwen3-8b", (1, 2, 4), (32768, 131072)), ("smollm2", (1, 8), (32768, 131072))]


def _use_cost(cost: int) -> None:
    """Point the patched launcher at a window-tile cost (0: the kernel's own DecodeTraits::kWinTileCost)."""
    if cost == 0:
        os.environ.pop(COST_ENV, None)
    else:
        os.environ[COST_ENV] = str(cost)


def sweep_costs(costs: list[int], step: bool = False) -> list[dict]:
    """Decode time per (configuration, cost); ``step``: oscar::decode and oscar::store_and_decode instead."""
    rows = []
    for shape, batches, ctxs in STEP_CONFIGS if step else COST_CONFIGS:
        hq, hkv, d = kb.SHAPES[shape]
        for batch in batches:
            for ctx in ctxs:
                if not step:  # step_config makes its own inputs
                    nb = kb.n_buffers(kb.oscar_bytes(batch, hq, hkv, d, ctx))
                    inp = kb.OscarInputs(batch, hq, hkv, d, ctx, nb)
                for cost in costs:
                    _use_cost(cost)
                    row = dict(shape=shape, batch=batch, ctx=ctx)
                    if step:
                        r = kb.step_config(shape, hq, hkv, d, batch, ctx)
                        row.update(splits=r["splits"], win_tile_cost=cost, decode_us=round(r["decode_us"], 2),
                                   store_and_decode_us=round(r["store_and_decode_us"], 2))
                    else:
                        ms, splits = kb.bench_oscar(inp, nb, rot_v=False)
                        row.update(splits=splits, win_tile_cost=cost, us=round(ms * 1e3, 2))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if not step:
                    del inp
                torch.cuda.empty_cache()
    _use_cost(0)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/split-order.json")
    ap.add_argument("--step", action="store_true", help="with --costs: time decode and store_and_decode")
    ap.add_argument("--costs", default="",
                    help="window-tile costs to sweep instead of the orders (0: the kernel's own)")
    args = ap.parse_args()
    if args.costs:
        costs = [int(c) for c in args.costs.split(",")]
        write_rows(args.out, sweep_costs(costs, args.step))
        return 0
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
