"""oscar::gather_prefix against reference.gather_kv / gather_window (GPU), bit for bit."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import kv_rows, nan_window_cache, poisoned_int2_cache, random_rotation, requires_gpu

from vllm_oscar import ops
from vllm_oscar.layout import Int2PageLayout
from vllm_oscar.ops import reference as ref

pytestmark = requires_gpu


def _build(d, bs, wbs, hkv, prefix_lens, sink, recent, window, seed, params="fp16"):
    gen = torch.Generator().manual_seed(seed)
    layout = Int2PageLayout(d, bs, hkv, params=params)
    n_seq = len(prefix_lens)
    max_len = max(prefix_lens)
    bps = -(-max_len // bs)
    num_blocks = n_seq * bps + 1
    bt = torch.randperm(num_blocks, generator=gen)[: n_seq * bps].view(n_seq, bps).int()
    cache = poisoned_int2_cache(layout, num_blocks)
    rk, rv = random_rotation(d, gen), random_rotation(d, gen)
    total = sum(prefix_lens)
    k, v = kv_rows(total, hkv, d, gen), kv_rows(total, hkv, d, gen)
    slots = torch.cat([bt[i, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
                       for i, n in enumerate(prefix_lens)])
    ref.store_kv(k, v, cache, slots, rk, rv, layout, 0.96, 0.92)
    starts = torch.tensor([max(n - recent, 0) for n in prefix_lens], dtype=torch.int32)
    win = wbt = None
    if window:
        wbps = -(-max_len // wbs)
        wbt = (torch.randperm(n_seq * wbps + 1, generator=gen)[: n_seq * wbps].view(n_seq, wbps) + 0).int()
        win = nan_window_cache(n_seq * wbps + 1, wbs, hkv, d)
        wslots = []
        for i, n in enumerate(prefix_lens):
            pos = torch.arange(n)
            s = wbt[i, pos // wbs].long() * wbs + pos % wbs
            wslots.append(torch.where((pos < sink) | (pos >= starts[i]), s, torch.full_like(s, -1)))
        ref.store_window(k, v, win, torch.cat(wslots), rk, rv)
    return layout, cache, bt, win, wbt, starts


@pytest.mark.parametrize("d,bs,wbs,window,params", [
    (128, 16, 16, True, "fp16"), (64, 64, 32, True, "fp16"), (128, 32, 16, False, "fp16"), (64, 128, 16, False, "fp16"),
    (128, 16, 16, True, "u8"), (64, 128, 16, False, "u8"), (256, 32, 16, True, "u8"),
])
def test_gather_prefix_bit_exact(d, bs, wbs, window, params):
    prefix_lens = [1, 63, 64, 65, 320, 4097]
    hkv, sink, recent, gap = 4, 64, 256, 5
    layout, cache, bt, win, wbt, starts = _build(d, bs, wbs, hkv, prefix_lens, sink, recent, window, seed=d + bs,
                                                 params=params)
    # each sequence gets `gap` extra rows after its prefix (room for the new chunk): they stay untouched
    cu = torch.tensor([0] + list(torch.cumsum(torch.tensor([n + gap for n in prefix_lens]), 0)), dtype=torch.int32)
    rows = int(cu[-1])
    dev = "cuda"
    k_out = torch.full((rows, hkv, d), float("nan"), dtype=torch.bfloat16, device=dev)
    v_out = torch.full_like(k_out, float("nan"))
    ops.gather_prefix(
        cache.to(dev), bt.to(dev), cu.to(dev), head_dim=d,
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32, device=dev),
        window_cache=None if win is None else win.to(dev), window_block_table=None if wbt is None else wbt.to(dev),
        window_starts=starts.to(dev) if window else None, sink=sink, key_out=k_out, value_out=v_out,
        params=params,
    )
    torch.cuda.synchronize()
    want_k = torch.full((rows, hkv, d), float("nan"), dtype=torch.bfloat16)
    want_v = want_k.clone()
    for i, n in enumerate(prefix_lens):
        kq, vq = ref.gather_kv(cache, bt[i], n, layout)
        if window:
            kw, vw = ref.gather_window(win, wbt[i], n)
            pos = torch.arange(n)[:, None, None]
            use_w = (pos < sink) | (pos >= starts[i])
            kq, vq = torch.where(use_w, kw, kq), torch.where(use_w, vw, vq)
        want_k[cu[i] : cu[i] + n] = kq.to(torch.bfloat16)
        want_v[cu[i] : cu[i] + n] = vq.to(torch.bfloat16)
    for got, want in ((k_out.cpu(), want_k), (v_out.cpu(), want_v)):
        same = torch.equal(got.view(torch.int16), want.view(torch.int16))
        assert same, f"{(got.view(torch.int16) != want.view(torch.int16)).sum().item()} elements differ"


def test_gather_prefix_opcheck():
    d, bs, hkv = 64, 16, 2
    _, cache, bt, win, wbt, starts = _build(d, bs, 16, hkv, [20, 70], 4, 8, True, seed=1)
    dev = "cuda"
    cu = torch.tensor([0, 20, 90], dtype=torch.int32, device=dev)
    k_out = torch.empty(90, hkv, d, dtype=torch.bfloat16, device=dev)
    v_out = torch.empty_like(k_out)
    torch.library.opcheck(
        torch.ops.oscar.gather_prefix.default,
        (k_out, v_out, cache.to(dev), bt.to(dev), cu, None, win.to(dev), wbt.to(dev), starts.to(dev), 4),
    )


def test_gather_prefix_errors():
    dev = "cuda"
    layout = Int2PageLayout(64, 16, 2)
    cache = poisoned_int2_cache(layout, 2, dev)
    bt = torch.zeros(1, 2, dtype=torch.int32, device=dev)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=dev)
    with pytest.raises(RuntimeError, match="cu_seqlens must be Int"):
        ops.gather_prefix(cache, bt, cu.long(), head_dim=64, total_tokens=8)
    with pytest.raises(RuntimeError, match="window_block_table and window_starts are required"):
        ops.gather_prefix(cache, bt, cu, head_dim=64, total_tokens=8, window_cache=nan_window_cache(1, 16, 2, 64, dev))
    with pytest.raises(RuntimeError, match="kv_cache has 2 kv heads, expected 4"):
        out = torch.empty(8, 4, 64, dtype=torch.bfloat16, device=dev)
        ops.gather_prefix(cache, bt, cu, head_dim=64, key_out=out, value_out=out.clone())
