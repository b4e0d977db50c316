"""Benchmark the OSCAR CUDA kernels against FlashAttention-3 BF16 decode; one command on an H100:

    python benchmarks/kernels.py [--quick] [--out benchmarks/results/kernels-h100.json]

Prints tables and writes JSON. Every time is the median over CUDA-graph replays of back-to-back calls
(``time_graph``), divided by the calls per graph; when one call's cache is smaller than about 3x L2,
consecutive calls rotate among several cache copies so that the numbers are HBM, not L2, numbers.

Effective bandwidth = the fewest bytes the call must move / time: for OSCAR the INT2 rows of the
middle ((seq_len - sink - recent) * 72 bytes per kv head at d=128, 40 at d=64), the BF16 window rows
(sink + recent) and q/out; for FA3 the BF16 K/V rows. FA3 comes from vLLM 0.26
(``vllm.vllm_flash_attn.flash_attn_varlen_func``, fa_version=3, paged, block size 16) or, without vLLM,
from its ``_vllm_fa3_C`` library given by ``OSCAR_FA3_SO``. OSCAR's INT2 pages hold 128 tokens, what the
vLLM backend allocates (``--int2-block-size``); its BF16 window pages, like FA3's, hold 16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

from vllm_oscar import ops
from vllm_oscar.layout import INT2_BLOCK_MULTIPLIER, Int2PageLayout

# (query heads, KV heads, head_dim). The default run times the first two; --shapes picks others, e.g. the
# head_dim-256 global layers of Gemma 3 12B (16 query / 8 KV heads).
ALL_SHAPES = {"qwen3-8b": (32, 8, 128), "smollm2": (9, 3, 64), "gemma3-12b": (16, 8, 256)}
DEFAULT_SHAPES = ("qwen3-8b", "smollm2")
SHAPES = {k: ALL_SHAPES[k] for k in DEFAULT_SHAPES}
BATCHES = (1, 8, 64, 256)
CONTEXTS = (4096, 16384, 32768, 65536, 131072)
SINK, RECENT = 64, 256
VLLM_BLOCK_SIZE = 16  # vLLM's default block size: FA3's pages and OSCAR's window pages
# OSCAR's INT2 pages as the vLLM backend allocates them (attention/specs.py): 8 x 16 = 128 tokens.
# --int2-block-size changes it (the kernel takes any multiple of 16).
INT2_BLOCK_SIZE = INT2_BLOCK_MULTIPLIER * VLLM_BLOCK_SIZE
L2_BYTES = 50 * 2**20
INT2_LIMIT = 24 * 2**30  # cache bytes per config (80 GB card; FA3's BF16 cache is 7x larger)
BF16_LIMIT = 36 * 2**30


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


def time_graph(fn, n_bufs: int, est_ms: float, reps: int = 7) -> float:
    """Median milliseconds per call of ``fn(i)`` (i = call index) over replays of a captured graph."""
    calls = max(n_bufs, min(96, max(3, int(40.0 / max(est_ms, 1e-3)))))
    calls = -(-calls // n_bufs) * n_bufs
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_bufs):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n_bufs)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return statistics.median(times)


def time_eager(fn, n_bufs: int, reps: int = 20) -> float:
    for i in range(n_bufs):
        fn(i)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(reps):
        fn(i % n_bufs)
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def estimate_ms(fn) -> float:
    fn(0)
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn(0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_graph(lambda i: dst.copy_(src), 1, 1.0)
    return 2 * n / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------------------
# FA3
# --------------------------------------------------------------------------------------------------


def load_fa3():
    """``(fn(q, k_cache, v_cache, cu_q, seq_lens, max_k, block_table, scale, out), source)`` or (None, why)."""
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

        def fa3(q, kc, vc, cu_q, lens, max_k, bt, scale, out):
            return flash_attn_varlen_func(q, kc, vc, 1, cu_q, max_k, seqused_k=lens, softmax_scale=scale,
                                          causal=True, block_table=bt, out=out, fa_version=3)

        return fa3, "vllm.vllm_flash_attn.flash_attn_varlen_func(fa_version=3)"
    except Exception as exc:  # noqa: BLE001
        why = f"vllm not importable ({type(exc).__name__}: {exc})"
    so = os.environ.get("OSCAR_FA3_SO")
    if not so or not os.path.exists(so):
        return None, why + "; OSCAR_FA3_SO not set"
    torch.ops.load_library(so)
    print("FA3 schema:", torch.ops._vllm_fa3_C.fwd.default._schema, flush=True)

    def fa3(q, kc, vc, cu_q, lens, max_k, bt, scale, out):
        # positional arguments of _vllm_fa3_C::fwd in vLLM 0.26 (see its flash_attn_interface.py)
        return torch.ops._vllm_fa3_C.fwd(
            q, kc, vc, None, None, None, out, cu_q, None, None, None, lens, 1, max_k, bt, None, None,
            None, None, None, None, None, None, scale, True, -1, -1, 0.0, True, None, 0, None, 0, None, 1, 0, None,
        )

    return fa3, f"_vllm_fa3_C from {so} (vLLM 0.26 wheel), called directly"


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def random_int2_cache(layout: Int2PageLayout, num_blocks: int) -> torch.Tensor:
    cache = torch.empty(layout.cache_shape(num_blocks), dtype=torch.uint8, device="cuda").random_()
    if layout.params == "u8":  # any two bytes are a finite (scale, offset)
        return cache
    for off in (layout.k_params_offset, layout.v_params_offset):
        p = cache[..., off : off + layout.block_size * 4].view(torch.float16).view(num_blocks, -1, layout.block_size, 2)
        p[..., 0].uniform_(0.02, 0.2)
        p[..., 1].uniform_(-0.4, -0.1)
    return cache


def scattered_block_table(batch: int, blocks_per_seq: int, num_blocks: int) -> torch.Tensor:
    return torch.randperm(num_blocks, device="cuda")[: batch * blocks_per_seq].view(batch, blocks_per_seq).int()


def random_rotation(d: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float().contiguous().cuda()  # QR returns column-major Q


def oscar_bytes(batch, hq, hkv, d, ctx, window=True, params="fp16"):
    layout = Int2PageLayout(d, 16, hkv, params=params)
    n_win = min(ctx, SINK + RECENT) if window else 0
    return batch * ((ctx - n_win) * layout.page_bytes // 16 + n_win * hkv * 4 * d + 4 * hq * d)


def bf16_bytes(batch, hq, hkv, d, ctx):
    return batch * (ctx * hkv * 4 * d + 4 * hq * d)


class OscarInputs:
    """``n_bufs`` independent caches (INT2 + window) for one (shape, batch, context)."""

    def __init__(self, batch, hq, hkv, d, ctx, n_bufs, bs=None, wbs=VLLM_BLOCK_SIZE, params="fp16"):
        bs = INT2_BLOCK_SIZE if bs is None else bs
        self.layout = Int2PageLayout(d, bs, hkv, params=params)
        bps = -(-ctx // bs)
        nb = batch * bps
        self.caches = [random_int2_cache(self.layout, nb) for _ in range(n_bufs)]
        self.tables = [scattered_block_table(batch, bps, nb) for _ in range(n_bufs)]
        # window blocks only for the sink and recent positions; other entries point at block 0
        wbps = -(-ctx // wbs)
        pos_blocks = sorted({j // wbs for j in range(min(SINK, ctx))} | {j // wbs for j in range(max(ctx - RECENT, 0), ctx)})
        nwb = batch * len(pos_blocks) + 1
        self.windows, self.wtables = [], []
        for _ in range(n_bufs):
            self.windows.append(torch.randn(nwb, 2, wbs, hkv, d, device="cuda", dtype=torch.bfloat16))
            wt = torch.zeros(batch, wbps, dtype=torch.int32, device="cuda")
            ids = torch.randperm(nwb - 1, device="cuda")[: batch * len(pos_blocks)].view(batch, -1).int() + 1
            wt[:, torch.tensor(pos_blocks, device="cuda")] = ids
            self.wtables.append(wt)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.q = [torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
        self.out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        self.rk, self.rv = random_rotation(d), random_rotation(d)
        self.dims = (batch, hq, hkv, d, ctx)

    def add_newest_tokens(self):
        """K/V rows of each sequence's newest token (position ctx - 1) and their INT2 and window slots,
        per cache copy: what a decode step stores (:meth:`store`, :meth:`store_and_decode`)."""
        batch, _, hkv, d, ctx = self.dims
        b_idx = torch.arange(batch, device="cuda")
        bs, wbs = self.layout.block_size, self.windows[0].shape[2]
        self.slots = [t[b_idx, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs for t in self.tables]
        self.wslots = [t[b_idx, (ctx - 1) // wbs].long() * wbs + (ctx - 1) % wbs for t in self.wtables]
        self.keys = [torch.randn(batch, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in self.caches]
        self.vals = [torch.randn(batch, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in self.caches]

    def store(self, i):
        """oscar::store_kv of the newest tokens (MSE grid), as the vLLM backend stores a decode step."""
        ops.store_kv(self.keys[i], self.vals[i], self.caches[i], self.slots[i], self.rk, self.rv, k_clip_ratio=0.0,
                     v_clip_ratio=0.0, window_cache=self.windows[i], window_slot_mapping=self.wslots[i],
                     levels="mse", params=self.layout.params)

    def store_and_decode(self, ws, i, *, rot_v=True):
        """:meth:`store` and :meth:`call` as one oscar::store_and_decode."""
        return ops.store_and_decode(
            self.q[i], self.keys[i], self.vals[i], self.caches[i], self.slots[i], self.tables[i], self.seq_lens, ws,
            window_cache=self.windows[i], window_slot_mapping=self.wslots[i], window_block_table=self.wtables[i],
            rotation_k=self.rk, rotation_v=self.rv, rotate_output=rot_v, k_clip_ratio=0.0, v_clip_ratio=0.0,
            levels="mse", params=self.layout.params, sink=SINK, recent=RECENT, scale=self.dims[3] ** -0.5,
            out=self.out)

    def call(self, ws, i, *, window=True, rot_v=True):
        return ops.decode(
            self.q[i], self.caches[i], self.tables[i], self.seq_lens, ws,
            window_cache=self.windows[i] if window else None, window_block_table=self.wtables[i] if window else None,
            rotation_k=self.rk, rotation_v=self.rv if rot_v else None, sink=SINK, recent=RECENT,
            scale=self.dims[3] ** -0.5, out=self.out, params=self.layout.params,
        )


def bench_oscar(inp: OscarInputs, n_bufs, *, window=True, rot_v=True, num_splits=None):
    batch, hq, hkv, d, ctx = inp.dims
    ws = ops.make_decode_workspace(batch, hq, hkv, d, ctx, sink=SINK, recent=RECENT, window=window,
                                   num_splits=num_splits)
    fn = lambda i: inp.call(ws, i, window=window, rot_v=rot_v)
    ms = time_graph(fn, n_bufs, estimate_ms(fn))
    return ms, ws.num_splits


def bench_fa3(fa3, batch, hq, hkv, d, ctx, n_bufs, bs=16):
    bps = -(-ctx // bs)
    nb = batch * bps
    kcs = [torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
    vcs = [torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
    bts = [scattered_block_table(batch, bps, nb) for _ in range(n_bufs)]
    qs = [torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    fn = lambda i: fa3(qs[i], kcs[i], vcs[i], cu_q, lens, ctx, bts[i], d**-0.5, out)
    try:
        ms = time_graph(fn, n_bufs, estimate_ms(fn))
    except Exception as exc:  # noqa: BLE001
        print(f"  FA3 graph capture failed ({exc}); timing eagerly", flush=True)
        ms = time_eager(fn, n_bufs)
    return ms


def n_buffers(bytes_per_call: int) -> int:
    return max(1, min(32, math.ceil(3 * L2_BYTES / max(bytes_per_call, 1))))


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


class Budget:
    """Stops starting new measurements once the time budget is spent (partial results still land)."""

    def __init__(self, seconds: float, save):
        self.deadline = time.time() + seconds
        self.save = save

    def left(self) -> bool:
        return time.time() < self.deadline


def run_decode(fa3, quick: bool, budget: Budget, rows: list):
    for shape, (hq, hkv, d) in SHAPES.items():
        for batch in BATCHES if not quick else (1, 64):
            for ctx in CONTEXTS if not quick else (4096, 32768):
                if not budget.left():
                    print(f"time budget spent: skipping {shape} B={batch} ctx={ctx}", flush=True)
                    continue
                try:
                    row = decode_config(fa3, shape, hq, hkv, d, batch, ctx)
                except Exception as exc:  # noqa: BLE001  (record and go on: one run must yield a table)
                    row = dict(shape=shape, batch=batch, ctx=ctx, error=f"{type(exc).__name__}: {exc}"[:300])
                    torch.cuda.empty_cache()
                if row is not None:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    budget.save()
    return rows


def decode_config(fa3, shape, hq, hkv, d, batch, ctx):
    """One row of the decode table: OSCAR (full, and ablations at some sizes) next to FA3."""
    ob = oscar_bytes(batch, hq, hkv, d, ctx)
    int2_cache = batch * -(-ctx // INT2_BLOCK_SIZE) * Int2PageLayout(d, INT2_BLOCK_SIZE, hkv).page_bytes
    if int2_cache > INT2_LIMIT:
        return None
    nb = n_buffers(ob)
    torch.cuda.empty_cache()
    inp = OscarInputs(batch, hq, hkv, d, ctx, nb)
    ms, splits = bench_oscar(inp, nb)
    row = dict(shape=shape, batch=batch, ctx=ctx, hq=hq, hkv=hkv, d=d, splits=splits, buffers=nb,
               oscar_ms=ms, oscar_bytes=ob, oscar_tbps=ob / (ms * 1e-3) / 1e12)
    if batch in (1, 8, 64) and ctx in (4096, 32768, 131072):
        ms_nov, _ = bench_oscar(inp, nb, rot_v=False)
        ms_now, _ = bench_oscar(inp, nb, window=False, rot_v=False)
        row.update(oscar_no_rotv_ms=ms_nov, oscar_no_window_no_rotv_ms=ms_now,
                   oscar_no_window_tbps=oscar_bytes(batch, hq, hkv, d, ctx, window=False)
                   / (ms_now * 1e-3) / 1e12)
    del inp
    torch.cuda.empty_cache()
    fb = bf16_bytes(batch, hq, hkv, d, ctx)
    if fa3 is not None and fb <= BF16_LIMIT:
        fms = bench_fa3(fa3, batch, hq, hkv, d, ctx, n_buffers(fb))
        row.update(fa3_ms=fms, fa3_tbps=fb / (fms * 1e-3) / 1e12, speedup=fms / ms)
    torch.cuda.empty_cache()
    return row


# (shape, batch, context, split counts): batch 1 (many splits), and the medium batches where the
# split heuristic decides between one and two waves of CTAs (decode_num_splits).
SPLIT_SWEEP = (
    ("qwen3-8b", 1, 32768, (4, 8, 11, 16, 24, 33, 48, 64, 96)),
    ("qwen3-8b", 1, 131072, (4, 8, 11, 16, 24, 33, 48, 64, 96)),
    ("qwen3-8b", 8, 32768, (2, 3, 4, 5, 6, 8, 11)),
    ("qwen3-8b", 8, 131072, (2, 3, 4, 5, 6, 8)),
    ("qwen3-8b", 16, 32768, (1, 2, 3, 4)),
    ("qwen3-8b", 32, 32768, (1, 2, 3)),
    ("qwen3-8b", 1, 65536, (16, 24, 30, 33, 40, 48)),
    ("smollm2", 1, 4096, (4, 8, 11, 15)),
    ("smollm2", 1, 16384, (16, 24, 33, 48, 63)),
    ("smollm2", 1, 32768, (4, 8, 11, 16, 24, 33, 48, 64, 96)),
    ("smollm2", 1, 131072, (24, 33, 48, 64, 85)),
    ("smollm2", 8, 32768, (4, 6, 8, 11, 16)),
    ("smollm2", 64, 32768, (1, 2, 3, 4)),
    # --shapes gemma3-12b: head_dim 256, one CTA per SM
    ("gemma3-12b", 1, 4096, (4, 8, 11, 13, 16, 20, 24, 28)),
    ("gemma3-12b", 1, 8192, (8, 11, 13, 16)),
    ("gemma3-12b", 1, 16384, (8, 11, 13, 16)),
    ("gemma3-12b", 1, 32768, (8, 11, 13, 16, 20, 24, 28, 33)),
    ("gemma3-12b", 2, 4096, (3, 4, 6, 8)),
    ("gemma3-12b", 2, 16384, (3, 4, 6, 8)),
    ("gemma3-12b", 2, 32768, (3, 4, 6, 8)),
    ("gemma3-12b", 1, 131072, (11, 13, 16, 20, 24, 28, 33)),
    ("gemma3-12b", 8, 32768, (1, 2, 3, 4, 6)),
    ("gemma3-12b", 64, 32768, (1, 2)),
)


def run_split_sweep(quick: bool, budget: Budget):
    """Decode time per split count (no R_V, as the vLLM plugin runs it), next to the default's choice."""
    rows = []
    for shape, batch, ctx, splits in SPLIT_SWEEP:
        if shape not in SHAPES or (quick and ctx > 32768) or not budget.left():
            continue
        hq, hkv, d = SHAPES[shape]
        nb = n_buffers(oscar_bytes(batch, hq, hkv, d, ctx))
        inp = OscarInputs(batch, hq, hkv, d, ctx, nb)
        default = ops.decode_num_splits(batch, hq, hkv, d, ctx, sink=SINK, recent=RECENT)
        for s in sorted(set(splits) | {default}):
            ms, _ = bench_oscar(inp, nb, rot_v=False, num_splits=s)
            rows.append(dict(shape=shape, batch=batch, ctx=ctx, splits=s, default=s == default, oscar_ms=ms,
                             tbps=oscar_bytes(batch, hq, hkv, d, ctx) / (ms * 1e-3) / 1e12))
            print(json.dumps(rows[-1]), flush=True)
        del inp
        torch.cuda.empty_cache()
    return rows


def run_store(quick: bool):
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        # 16 tokens: the last team-mode count of the Qwen3-8B shape (128 rows); 32: plain mode (csrc/store.cu).
        for tokens in (1, 16, 32, 64, 256, 8192) if not quick else (1, 8192):
            layout = Int2PageLayout(d, 16, hkv)
            nb = -(-tokens // 16) + 1
            n_bufs = 8
            keys = [torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
            vals = [torch.randn(tokens, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(n_bufs)]
            caches = [torch.zeros(layout.cache_shape(nb), dtype=torch.uint8, device="cuda") for _ in range(n_bufs)]
            win = torch.zeros(nb, 2, 16, hkv, d, device="cuda", dtype=torch.bfloat16)
            slots = torch.randperm(nb * 16, device="cuda")[:tokens]
            rk, rv = random_rotation(d), random_rotation(d)
            # The paper's grid (clip + min-max) and the default MSE-fitted grid (no clip, ALS fit per row).
            for levels, clip in (("minmax", (0.96, 0.92)), ("mse", (0.0, 0.0))):
                for with_win in (False, True):

                    def fn(i, keys=keys, vals=vals, caches=caches, slots=slots, rk=rk, rv=rv, win=win, ww=with_win,
                           levels=levels, clip=clip):
                        ops.store_kv(keys[i], vals[i], caches[i], slots, rk, rv, k_clip_ratio=clip[0],
                                     v_clip_ratio=clip[1], window_cache=win if ww else None,
                                     window_slot_mapping=slots if ww else None, levels=levels)

                    ms = time_graph(fn, n_bufs, estimate_ms(fn))
                    moved = tokens * hkv * (2 * 2 * d + layout.token_bytes_per_head + (4 * d if with_win else 0))
                    rows.append(dict(shape=shape, tokens=tokens, levels=levels, window=with_win, us=ms * 1e3,
                                     mtok_per_s=tokens / (ms * 1e-3) / 1e6, gbps=moved / (ms * 1e-3) / 1e9))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def run_step(quick: bool, budget: Budget):
    """One decode step's cache work (no R_V, MSE grid, each sequence's newest token stored):
    oscar::store_kv then oscar::decode, against oscar::store_and_decode, where the store runs beside
    the decode. ``overlap``: what the vLLM backend runs (ops.store_overlaps_decode). The decode alone is
    the floor."""
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        for batch in (1, 8, 64) if not quick else (1,):
            for ctx in (4096, 32768, 131072) if not quick else (32768,):
                if not budget.left():
                    continue
                rows.append(step_config(shape, hq, hkv, d, batch, ctx))
                print(json.dumps(rows[-1]), flush=True)
                budget.save()
                torch.cuda.empty_cache()
    return rows


# Batches 80 and 88: what CUDA graphs pad the full-KV run's 78 (fp16) and 83 (u8) 32K requests to.
PARAMS_CONFIGS = {"qwen3-8b": ((1, 32768), (1, 131072), (8, 32768), (64, 32768), (64, 131072), (80, 32768),
                               (88, 32768)),
                  "smollm2": ((1, 32768), (64, 32768))}


def run_params(quick: bool, budget: Budget):
    """Decode (no R_V, with the window) over caches with fp16 and with u8 (scale, offset) pairs: 68 instead
    of 72 bytes per token and KV head at d=128, 36 instead of 40 at d=64, for a few more instructions per
    row (the u8 decode), and the store of one token per sequence (MSE grid) into each. The two formats
    alternate twice per configuration; each keeps its faster run."""
    rows = []
    for shape, configs in PARAMS_CONFIGS.items():
        if shape not in SHAPES:
            continue
        hq, hkv, d = SHAPES[shape]
        for batch, ctx in configs[:1] if quick else configs:
            if not budget.left():
                continue
            ws = ops.make_decode_workspace(batch, hq, hkv, d, ctx, sink=SINK, recent=RECENT)
            us = {"fp16": float("inf"), "u8": float("inf")}
            store_us = dict(us)
            for _ in range(2):
                for params in ("fp16", "u8"):
                    nb = n_buffers(oscar_bytes(batch, hq, hkv, d, ctx, params=params))
                    inp = OscarInputs(batch, hq, hkv, d, ctx, nb, params=params)
                    inp.add_newest_tokens()
                    fn = lambda i, inp=inp, ws=ws: inp.call(ws, i, rot_v=False)
                    us[params] = min(us[params], time_graph(fn, nb, estimate_ms(fn)) * 1e3)
                    st = lambda i, inp=inp: inp.store(i)
                    store_us[params] = min(store_us[params], time_graph(st, nb, estimate_ms(st)) * 1e3)
                    del inp
                    torch.cuda.empty_cache()
            row = dict(shape=shape, batch=batch, ctx=ctx, splits=ws.num_splits, fp16_us=us["fp16"], u8_us=us["u8"],
                       speedup=us["fp16"] / us["u8"], fp16_store_us=store_us["fp16"], u8_store_us=store_us["u8"])
            for params, t_us in us.items():
                row[f"{params}_tbps"] = oscar_bytes(batch, hq, hkv, d, ctx, params=params) / (t_us * 1e-6) / 1e12
            rows.append(row)
            print(json.dumps(row), flush=True)
            budget.save()
    return rows


def step_config(shape, hq, hkv, d, batch, ctx, num_splits=None):
    """decode, store then decode, and store_and_decode at one configuration (``num_splits`` None: the rule's)."""
    nb = n_buffers(oscar_bytes(batch, hq, hkv, d, ctx))
    inp = OscarInputs(batch, hq, hkv, d, ctx, nb)
    inp.add_newest_tokens()
    ws = ops.make_decode_workspace(batch, hq, hkv, d, ctx, sink=SINK, recent=RECENT, num_splits=num_splits)

    def decode(i):
        inp.call(ws, i, rot_v=False)

    def store_then_decode(i):
        inp.store(i)
        decode(i)

    def store_and_decode(i):
        inp.store_and_decode(ws, i, rot_v=False)

    us = {fn.__name__: time_graph(fn, nb, estimate_ms(fn)) * 1e3
          for fn in (decode, store_then_decode, store_and_decode)}
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return dict(shape=shape, batch=batch, ctx=ctx, splits=ws.num_splits,
                overlap=ops.store_overlaps_decode(batch, hkv, ws.num_splits, sms, head_dim=d, num_q_heads=hq),
                decode_us=us["decode"],
                store_then_decode_us=us["store_then_decode"], store_and_decode_us=us["store_and_decode"],
                saved_us=us["store_then_decode"] - us["store_and_decode"])


def run_gather():
    rows = []
    for shape, (hq, hkv, d) in SHAPES.items():
        for n_seq, plen in ((1, 32768), (8, 4096)):
            layout = Int2PageLayout(d, 16, hkv)
            bps = -(-plen // 16)
            cache = random_int2_cache(layout, n_seq * bps)
            bt = scattered_block_table(n_seq, bps, n_seq * bps)
            cu = torch.arange(n_seq + 1, dtype=torch.int32, device="cuda") * plen
            k_out = torch.empty(n_seq * plen, hkv, d, device="cuda", dtype=torch.bfloat16)
            v_out = torch.empty_like(k_out)
            def fn(i, cache=cache, bt=bt, cu=cu, d=d, k_out=k_out, v_out=v_out):
                ops.gather_prefix(cache, bt, cu, head_dim=d, key_out=k_out, value_out=v_out)

            ms = time_graph(fn, 1, estimate_ms(fn))
            moved = n_seq * plen * hkv * (layout.token_bytes_per_head + 4 * d)
            rows.append(dict(shape=shape, seqs=n_seq, prefix=plen, us=ms * 1e3, gbps=moved / (ms * 1e-3) / 1e9))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def print_tables(res):
    print("\n== decode (ms per call; TB/s = fewest bytes moved / time) ==")
    for r in res["decode"]:
        if "error" in r:
            print(f"{r['shape']:9} {r['batch']:4d} {r['ctx']:7d} ERROR {r['error']}")
    print(f"{'shape':9} {'B':>4} {'ctx':>7} {'splits':>6} {'oscar ms':>9} {'TB/s':>5} {'no-rotV':>8} "
          f"{'no-win':>8} {'fa3 ms':>8} {'fa3 TB/s':>8} {'speedup':>7}")
    for r in (r for r in res["decode"] if "error" not in r):
        print(f"{r['shape']:9} {r['batch']:4d} {r['ctx']:7d} {r['splits']:6d} {r['oscar_ms']:9.4f} "
              f"{r['oscar_tbps']:5.2f} {r.get('oscar_no_rotv_ms', float('nan')):8.4f} "
              f"{r.get('oscar_no_window_no_rotv_ms', float('nan')):8.4f} {r.get('fa3_ms', float('nan')):8.4f} "
              f"{r.get('fa3_tbps', float('nan')):8.2f} {r.get('speedup', float('nan')):7.2f}")
    if res.get("split_sweep"):
        print("\n== INT2 split sweep (no R_V) ==")
        for r in res["split_sweep"]:
            print(f"{r['shape']:9} B={r['batch']:<3d} ctx={r['ctx']:<7d} splits={r['splits']:<3d} "
                  f"{r['oscar_ms']:.4f} ms {r['tbps']:.2f} TB/s{'  (default)' if r.get('default') else ''}")
    print("\n== store_kv ==")
    for r in res["store"]:
        print(f"{r['shape']:9} T={r['tokens']:<5d} {r.get('levels', 'minmax'):6} window={int(r['window'])} "
              f"{r['us']:8.1f} us "
              f"{r['mtok_per_s']:8.2f} Mtok/s {r['gbps']:7.1f} GB/s")
    if res.get("step"):
        print("\n== decode step: store_kv + decode vs store_and_decode (us, no R_V, MSE grid) ==")
        for r in res["step"]:
            print(f"{r['shape']:9} B={r['batch']:<3d} ctx={r['ctx']:<7d} decode {r['decode_us']:7.1f}  "
                  f"store+decode {r['store_then_decode_us']:7.1f}  fused {r['store_and_decode_us']:7.1f}  "
                  f"saved {r['saved_us']:6.1f}  {'(overlap)' if r['overlap'] else '(sequential in vLLM)'}")
    print("\n== gather_prefix ==")
    for r in res["gather"]:
        print(f"{r['shape']:9} seqs={r['seqs']} prefix={r['prefix']} {r['us']:8.1f} us {r['gbps']:7.1f} GB/s")
    print(f"\ncopy bandwidth {res['copy_tbps']:.2f} TB/s; FA3: {res['fa3_source']}")


def main():
    global INT2_BLOCK_SIZE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels-h100.json"))
    ap.add_argument("--quick", action="store_true", help="a few configurations only")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later measurements are skipped")
    ap.add_argument("--int2-block-size", type=int, default=INT2_BLOCK_SIZE,
                    help=f"tokens per INT2 page (default {INT2_BLOCK_SIZE}, what the vLLM backend allocates)")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help=f"comma list of {', '.join(ALL_SHAPES)} (default: {', '.join(DEFAULT_SHAPES)})")
    ap.add_argument("--parts", default="decode,store,gather,sweep,step",
                    help="comma list of decode, store, gather, sweep, step, params (default: all but params)")
    args = ap.parse_args()
    if args.int2_block_size <= 0 or args.int2_block_size % 16:
        ap.error(f"--int2-block-size must be a positive multiple of 16, got {args.int2_block_size}")
    INT2_BLOCK_SIZE = args.int2_block_size
    shapes = [x for x in args.shapes.split(",") if x]
    unknown_shapes = [x for x in shapes if x not in ALL_SHAPES]
    if unknown_shapes or not shapes:
        ap.error(f"unknown --shapes {unknown_shapes or shapes}; choose from {', '.join(ALL_SHAPES)}")
    SHAPES.clear()
    SHAPES.update({k: ALL_SHAPES[k] for k in shapes})
    parts = set(args.parts.split(","))
    unknown = parts - {"decode", "store", "gather", "sweep", "step", "params"}
    if unknown:
        ap.error(f"unknown --parts {sorted(unknown)}; choose from decode, store, gather, sweep, step, params")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    fa3, fa3_source = load_fa3()
    res = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               fa3_source=fa3_source, sink=SINK, recent=RECENT,
               int2_block_size=INT2_BLOCK_SIZE, window_block_size=VLLM_BLOCK_SIZE, fa3_block_size=VLLM_BLOCK_SIZE)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    budget = Budget(args.time_budget, save)
    res.update(decode=[], store=[], gather=[], split_sweep=[], step=[], params=[])
    res["copy_tbps"] = copy_bandwidth()
    print(f"copy bandwidth {res['copy_tbps']:.2f} TB/s", flush=True)
    res["parts"] = sorted(parts)
    if "decode" in parts:
        run_decode(fa3, args.quick, budget, res["decode"])
    for name, fn in (("store", lambda: run_store(args.quick)), ("gather", run_gather)):
        if name not in parts:
            continue
        try:
            res[name] = fn()
        except Exception as exc:  # noqa: BLE001
            res[name + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        save()
    if not args.no_sweep and "sweep" in parts:
        res["split_sweep"] = run_split_sweep(args.quick, budget)
    if "step" in parts:
        res["step"] = run_step(args.quick, budget)
    if "params" in parts:
        res["params"] = run_params(args.quick, budget)
    save()
    print_tables(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
