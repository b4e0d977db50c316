"""Where the time of one small store_kv call goes: a %globaltimer trace of every CTA (GPU machine only).

Like trace_decode.py, with ``store-globaltimer.patch`` (checked by ``tests/kernels/test_trace_patch.py``):

    git apply benchmarks/trace/store-globaltimer.patch
    bash benchmarks/gpu_kernels.sh --skip-tests --skip-bench      # rebuild with the trace points
    python -m benchmarks.trace.trace_store
    git apply -R benchmarks/trace/store-globaltimer.patch          # and rebuild before timing anything

The patched op reads a device address from ``OSCAR_STORE_TRACE_PTR``; thread 0 of CTA (x, y) writes row
2x + y: 0 entry, 1 rows staged, 2 rotation landed in shared memory, 3 rotated, 4 candidate grids done
(team mode), 5 (scale, offset) chosen, 6 end. One call per configuration is captured in a CUDA graph and
replayed 7 times; printed: the latest CTA's time of each step in microseconds after the first CTA entered
(medians over replays), the CTA count, and the graph-replay time per call (``graph_us``). The timer
ticks in 0.256 us steps on the H100, and the compiler may move a timer read past nearby arithmetic.
"""

from __future__ import annotations

import json

import torch

from benchmarks import kernels as kb
from benchmarks.trace import replay_traced
from vllm_oscar import ops
from vllm_oscar.layout import Int2PageLayout

SLOTS = 8
STEPS = {"staged": 1, "r_landed": 2, "rotated": 3, "params": 5, "end": 6}


def summarize(t: torch.Tensor) -> dict:
    """CTA count and the latest CTA's time (us) of each step after the first CTA entered; ``t`` is the
    [rows, SLOTS] timestamp table (ns), unused rows zero."""
    t = t[t[:, 0] > 0]
    t0 = t[:, 0].min()
    return {"ctas": len(t), **{k: round(float((t[:, s].max() - t0) / 1e3), 2) for k, s in STEPS.items()}}


def trace_store(shape: str, tokens: int, levels: str, clip: tuple[float, float]) -> dict:
    _, hkv, d = kb.SHAPES[shape]
    layout = Int2PageLayout(d, 16, hkv)
    nb = -(-tokens // 16) + 1
    keys = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    vals = torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(layout.cache_shape(nb), dtype=torch.uint8, device="cuda")
    win = torch.zeros(nb, 2, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(nb * 16, device="cuda")[:tokens]
    rk, rv = kb.random_rotation(d), kb.random_rotation(d)

    def call():
        ops.store_kv(keys, vals, cache, slots, rk, rv, k_clip_ratio=clip[0], v_clip_ratio=clip[1],
                     window_cache=win, window_slot_mapping=slots, levels=levels)

    buf = torch.zeros(4096 * SLOTS, dtype=torch.int64, device="cuda")
    med = replay_traced(call, "OSCAR_STORE_TRACE_PTR", buf, SLOTS, summarize)
    graph_us = kb.time_graph(lambda i: call(), 1, kb.estimate_ms(lambda i: call())) * 1e3
    return {"shape": shape, "tokens": tokens, "levels": levels, "graph_us": round(graph_us, 2), **med}


def main() -> int:
    for shape in kb.SHAPES:
        for tokens in (1, 16):
            for levels, clip in (("minmax", (0.96, 0.92)), ("mse", (0.0, 0.0))):
                print(json.dumps(trace_store(shape, tokens, levels, clip)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
