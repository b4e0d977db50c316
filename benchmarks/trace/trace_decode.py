"""Where the time of one decode call goes: a %globaltimer trace of every CTA (GPU machine only).

The timestamps come from instrumentation that is not in the shipped kernel. It lives in
``decode-globaltimer.patch`` next to this file, and ``tests/kernels/test_trace_patch.py`` checks that the patch
still applies:

    git apply benchmarks/trace/decode-globaltimer.patch
    bash benchmarks/gpu_kernels.sh --skip-tests --skip-bench      # rebuild with the trace points
    python -m benchmarks.trace.trace_decode --out /tmp/trace.json
    git apply -R benchmarks/trace/decode-globaltimer.patch         # and rebuild before timing anything

With the patch, the op reads a device address from ``OSCAR_DECODE_TRACE_PTR`` and thread 0 of each CTA
writes 12 timestamps: rotate_q CTAs in rows 1..1023, decode CTAs from row 1024 in the INT2-first
numbering. Decode slots: 0 entry, 8 first copies issued, 1 after griddepcontrol.wait, 2 q_rot staged,
9 first stage (INT2) or window rows landed, 3 loop done, 4 partial written and counted, and for the
last CTA of a (b, kv head): 10 R_V copies issued, 11 merge loop done, 5 merge done, 6 R_V landed, 7 end.

``--fused`` traces ``oscar::store_and_decode`` (storing each sequence's newest token) next to
``oscar::decode`` at batch 1; there rotate_q also rotates the newest K/V rows (its extra CTAs are traced
like the q blocks), and the store kernel, which runs after the decode, is not traced.

One call is captured in a CUDA graph and replayed 7 times. Per configuration the script prints the
median over replays of summary times in microseconds after the first rotate_q CTA started, plus the
plain graph-replay time per call (``graph_us``, the benchmark's method with the trace points inside).

The first traces in docs/kernels.md and benchmarks/results/kernels-h100.json were taken on 2026-11-24
with an earlier form of this script and of trace_store.py (same slots, more summary fields). This form
ran on the H100 on 2026-11-24 (``decode_steps.trace_after_cuts_rows``), and with ``--fused`` the same
day (``decode_step.trace``, the store behind the decode; ``decode_step.earlier_runs.store_first_trace``
the design before); trace_store.py as committed has not run on the GPU. The rotate_q rows end at
FIRST_DECODE_ROW: beyond batch ~8 on the Qwen3-8B shape its CTAs (q and newest rows) would overrun them.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks import kernels as kb  # shapes, inputs and timing of the kernel benchmark
from benchmarks.trace import replay_traced, write_rows
from vllm_oscar import ops

CONFIGS = [("qwen3-8b", 1, 4096), ("qwen3-8b", 1, 32768), ("qwen3-8b", 1, 131072), ("qwen3-8b", 8, 32768),
           ("qwen3-8b", 64, 32768), ("smollm2", 1, 16384), ("smollm2", 64, 32768)]
SLOTS = 12
FIRST_DECODE_ROW = 1024


def summarize(t: torch.Tensor, n_int: int, n_dec: int) -> dict:
    """Summary times (us) of one traced call; ``t`` is the [rows, SLOTS] int64 timestamp table (ns)."""
    rq = t[1:FIRST_DECODE_ROW]
    rq = rq[rq[:, 0] > 0]
    dec = t[FIRST_DECODE_ROW:FIRST_DECODE_ROW + n_dec]
    t0 = rq[:, 0].min().item()

    def us(x):
        return round(float((x - t0) / 1e3), 2)

    int2, win = dec[:n_int], dec[n_int:]
    last = dec[dec[:, 7] > 0]
    r = {"rotate_q_end": us(rq[:, 1].max()), "entry_first": us(dec[:, 0].min()), "entry_last": us(dec[:, 0].max()),
         "wait_done_max": us(dec[:, 1].max()), "partial_med": us(dec[:, 4].median()),
         "partial_max": us(dec[:, 4].max())}
    for name, rows in (("int2", int2), ("win", win)):
        if len(rows):
            r.update({f"{name}_issued_max": us(rows[:, 8].max()), f"{name}_landed_max": us(rows[:, 9].max()),
                      f"{name}_loop_med": us(rows[:, 3].median()), f"{name}_loop_max": us(rows[:, 3].max())})
    r.update(last_partial_max=us(last[:, 4].max()), last_rv_issued_max=us(last[:, 10].max()),
             last_merge_loop_max=us(last[:, 11].max()), last_merge_max=us(last[:, 5].max()),
             last_rv_landed_max=us(last[:, 6].max()), end_max=us(last[:, 7].max()))
    return r


def trace_config(shape: str, batch: int, ctx: int, rot_v: bool, fused: bool = False) -> dict:
    """``fused``: trace ``ops.store_and_decode`` storing each sequence's newest token (the store kernel
    itself is not traced; the decode CTAs' entries and loops show what it delays)."""
    hq, hkv, d = kb.SHAPES[shape]
    nb = kb.n_buffers(kb.oscar_bytes(batch, hq, hkv, d, ctx))
    inp = kb.OscarInputs(batch, hq, hkv, d, ctx, nb)
    ws = ops.make_decode_workspace(batch, hq, hkv, d, ctx, sink=kb.SINK, recent=kb.RECENT)
    s_int = ws.num_splits
    s_win = ops._window_splits(d, kb.SINK, kb.RECENT, True)
    n_int, n_dec = s_int * hkv * batch, (s_int + s_win) * hkv * batch
    buf = torch.zeros((FIRST_DECODE_ROW + n_dec) * SLOTS, dtype=torch.int64, device="cuda")
    if fused:
        inp.add_newest_tokens()

        def call(i):
            inp.store_and_decode(ws, i, rot_v=rot_v)
    else:

        def call(i):
            inp.call(ws, i, rot_v=rot_v)

    for i in range(5):
        call(i % nb)
    torch.cuda.synchronize()
    med = replay_traced(lambda: call(0), "OSCAR_DECODE_TRACE_PTR", buf, SLOTS, lambda t: summarize(t, n_int, n_dec))
    fn = lambda i: call(i % nb)
    graph_us = kb.time_graph(fn, nb, kb.estimate_ms(fn)) * 1e3
    return dict(shape=shape, batch=batch, ctx=ctx, rot_v=rot_v, fused=fused, s_int=s_int, s_win=s_win,
                graph_us=round(graph_us, 2), **med)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/decode-trace.json")
    ap.add_argument("--fused", action="store_true",
                    help="batch-1 configs only, without R_V, oscar::decode and oscar::store_and_decode side by side")
    args = ap.parse_args()
    rows = []
    for shape, batch, ctx in CONFIGS:
        for rot_v in (True, False):
            if args.fused and (batch != 1 or rot_v):
                continue
            for fused in (False, True) if args.fused else (False,):
                rows.append(trace_config(shape, batch, ctx, rot_v, fused))
                print(json.dumps(rows[-1]), flush=True)
    write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
