"""oscar::store_kv against reference.store_kv / reference.store_window (GPU)."""

from __future__ import annotations

import pytest
import torch
from kernel_utils import (
    kv_rows,
    nan_window_cache,
    poisoned_int2_cache,
    random_rotation,
    requires_gpu,
    unpack_cache,
)

from vllm_oscar import ops
from vllm_oscar.layout import Int2PageLayout
from vllm_oscar.ops import reference as ref

pytestmark = requires_gpu


def _slots(n_tokens: int, n_slots: int, gen: torch.Generator, skip: float = 0.2) -> torch.Tensor:
    """Distinct random slots with about `skip` of the tokens set to -1."""
    s = torch.randperm(n_slots, generator=gen)[:n_tokens].long()
    return torch.where(torch.rand(n_tokens, generator=gen) < skip, torch.full_like(s, -1), s)


def _run_both(key, value, layout, num_blocks, rot_k, rot_v, clip, window, gen, wbs=16, strided=False,
              levels="minmax", return_slots=False):
    t, hkv, d = key.shape
    slots = _slots(t, num_blocks * layout.block_size, gen)
    cache_ref = poisoned_int2_cache(layout, num_blocks)
    win_blocks = max(1, -(-t // wbs) + 1)
    wslots = _slots(t, win_blocks * wbs, gen) if window else None
    win_ref = nan_window_cache(win_blocks, wbs, hkv, d) if window else None
    ref.store_kv(key, value, cache_ref, slots, rot_k, rot_v, layout, *clip, levels=levels)
    if window:
        ref.store_window(key, value, win_ref, wslots, rot_k, rot_v)

    dev = "cuda"
    if strided:  # key/value as views of a fused [T, 3*Hkv, d] tensor, like vLLM's qkv split
        fused = torch.empty(t, 3 * hkv, d, dtype=key.dtype, device=dev)
        fused[:, hkv : 2 * hkv] = key.to(dev)
        fused[:, 2 * hkv :] = value.to(dev)
        k_dev, v_dev = fused[:, hkv : 2 * hkv], fused[:, 2 * hkv :]
    else:
        k_dev, v_dev = key.to(dev), value.to(dev)
    cache = poisoned_int2_cache(layout, num_blocks, dev)
    win = nan_window_cache(win_blocks, wbs, hkv, d, dev) if window else None
    ops.store_kv(
        k_dev, v_dev, cache, slots.to(dev),
        None if rot_k is None else rot_k.to(dev), None if rot_v is None else rot_v.to(dev),
        k_clip_ratio=clip[0], v_clip_ratio=clip[1],
        window_cache=win, window_slot_mapping=None if wslots is None else wslots.to(dev), levels=levels,
        params=layout.params,
    )
    torch.cuda.synchronize()
    out = cache.cpu(), cache_ref, (None if win is None else win.cpu()), win_ref
    return (*out, slots) if return_slots else out


STORE_CASES = [
    # head_dim, block_size, dtype, tokens, (k_clip, v_clip), rotation, window, strided inputs
    (64, 16, torch.bfloat16, 1, (0.96, 0.92), None, True, False),
    (128, 32, torch.bfloat16, 63, (0.96, 0.92), "identity", True, True),
    (128, 64, torch.float16, 700, (0.96, 0.92), None, False, False),  # 5600 rows: 4 rows per warp pass
    (64, 128, torch.bfloat16, 700, (0.0, 0.0), "identity", True, False),  # no clipping
    (128, 16, torch.bfloat16, 65, (0.4, 1.0), None, True, False),  # threshold from the small side; ratio 1
    (64, 32, torch.float16, 320, (0.96, 0.5), "identity", False, True),
    (256, 16, torch.bfloat16, 33, (0.96, 0.92), None, True, False),
]


@pytest.mark.parametrize(
    "d,bs,dtype,t,clip,rot,window,strided", STORE_CASES,
    ids=[f"d{c[0]}-bs{c[1]}-{str(c[2])[6:]}-T{c[3]}-clip{c[4][0]}_{c[4][1]}-{c[5]}-win{int(c[6])}" for c in STORE_CASES],
)
def test_store_bit_exact(d, bs, dtype, t, clip, rot, window, strided):
    """Identity rotation (None or an explicit identity matrix): every byte equals the reference's,
    including slots skipped with -1, which stay poisoned (0xFF)."""
    gen = torch.Generator().manual_seed(1000 * d + t)
    hkv = 8 if d < 256 else 2
    layout = Int2PageLayout(d, bs, hkv)
    num_blocks = -(-t // bs) + 3
    key, value = kv_rows(t, hkv, d, gen, dtype), kv_rows(t, hkv, d, gen, dtype)
    r = torch.eye(d) if rot == "identity" else None
    cache, cache_ref, win, win_ref = _run_both(key, value, layout, num_blocks, r, r, clip, window, gen,
                                               strided=strided)
    assert torch.equal(cache, cache_ref), f"{(cache != cache_ref).sum().item()} cache bytes differ"
    if window:
        assert torch.equal(win.view(torch.int16), win_ref.view(torch.int16)), "window cache differs"


def test_store_ties_bit_exact():
    """Rows full of equal magnitudes: the clip threshold is sort(|x|)[idx] exactly, ties included."""
    gen = torch.Generator().manual_seed(7)
    d, hkv, t, bs = 128, 4, 257, 32
    layout = Int2PageLayout(d, bs, hkv)
    key = torch.randint(-3, 4, (t, hkv, d), generator=gen).to(torch.bfloat16)
    value = (torch.randint(-2, 3, (t, hkv, d), generator=gen) * 0.5).to(torch.bfloat16)
    key[0] = 1.0  # constant row: scale floor, every code 0
    cache, cache_ref, _, _ = _run_both(key, value, layout, -(-t // bs) + 2, None, None, (0.96, 0.92), False, gen)
    assert torch.equal(cache, cache_ref)


@pytest.mark.parametrize("d,bs,t", [(64, 16, 300), (128, 64, 600)])
def test_store_with_rotation(d, bs, t):
    """A real rotation: fp32 sums run in another order than the CPU matmul, so allow <= 0.1% of the
    codes one level apart and (scale, offset) within one fp16 ulp; window rows within one bf16 ulp."""
    gen = torch.Generator().manual_seed(d + t)
    hkv = 8
    layout = Int2PageLayout(d, bs, hkv)
    num_blocks = -(-t // bs) + 2
    key, value = kv_rows(t, hkv, d, gen), kv_rows(t, hkv, d, gen)
    rk, rv = random_rotation(d, gen), random_rotation(d, gen)
    cache, cache_ref, win, win_ref = _run_both(key, value, layout, num_blocks, rk, rv, (0.96, 0.92), True, gen)
    got, want = unpack_cache(cache, layout), unpack_cache(cache_ref, layout)
    for codes, codes_ref in zip(got[:2], want[:2]):
        diff = (codes.int() - codes_ref.int()).abs()
        assert diff.max().item() <= 1
        assert diff.float().mean().item() <= 1e-3, f"{diff.float().mean().item():.2e} of the codes differ"
    for params, params_ref in zip(got[2:], want[2:]):
        written = ~torch.isnan(params_ref.float())
        assert torch.equal(written, ~torch.isnan(params.float())), "written slots differ"
        a, b = params.float()[written], params_ref.float()[written]
        assert ((a - b).abs() <= 1e-3 * b.abs() + 1e-7).all()
    ok = ~torch.isnan(win_ref.float())
    assert torch.equal(ok, ~torch.isnan(win.float()))
    a, b = win.float()[ok], win_ref.float()[ok]
    assert ((a - b).abs() <= 2**-7 * b.abs() + 1e-6).all()


MSE_CASES = [
    # head_dim, block_size, dtype, tokens, rotation, window, strided inputs
    (64, 16, torch.bfloat16, 1, None, True, False),  # 8 rows, 2 row groups per warp: team mode
    (64, 32, torch.float16, 700, "identity", False, True),  # 5600 rows: 4 rows per warp pass
    (128, 16, torch.bfloat16, 65, "identity", True, False),
    (128, 64, torch.float16, 600, None, True, True),
    (128, 32, torch.bfloat16, 9, "identity", True, True),  # 72 rows: team mode (a warp per candidate grid)
    (256, 16, torch.bfloat16, 33, None, True, False),  # 8 elements per lane; team mode
    (256, 32, torch.float16, 2100, "identity", False, False),  # 4200 rows (hkv 2): 4 rows per pass
]


@pytest.mark.parametrize(
    "d,bs,dtype,t,rot,window,strided", MSE_CASES,
    ids=[f"d{c[0]}-bs{c[1]}-{str(c[2])[6:]}-T{c[3]}-{c[4]}-win{int(c[5])}" for c in MSE_CASES],
)
def test_store_mse_bit_exact(d, bs, dtype, t, rot, window, strided):
    """levels="mse", identity rotation: every byte equals reference.quantize_int2_mse's (the kernel sums
    in the order the reference spells out), skipped (-1) slots stay poisoned (0xFF)."""
    gen = torch.Generator().manual_seed(2000 * d + t)
    hkv = 8 if d < 256 else 2
    layout = Int2PageLayout(d, bs, hkv)
    num_blocks = -(-t // bs) + 3
    key, value = kv_rows(t, hkv, d, gen, dtype), kv_rows(t, hkv, d, gen, dtype)
    if t > 8:  # edge rows: constant, zero, tiny, beyond fp16, (bf16) huge enough to overflow fp32 sums
        big = torch.finfo(dtype).max
        key[1], key[2], value[3] = 1.25, 0.0, 3e-7
        key[4] = (torch.randn(hkv, d, generator=gen) * 1e5 + 7e4).clamp(-big, big).to(dtype)
        value[5] = (torch.randn(hkv, d, generator=gen) * 3e37).clamp(-big, big).to(dtype)
    r = torch.eye(d) if rot == "identity" else None
    cache, cache_ref, win, win_ref = _run_both(key, value, layout, num_blocks, r, r, (0.0, 0.0), window, gen,
                                               strided=strided, levels="mse")
    if not torch.equal(cache, cache_ref):
        got, want = unpack_cache(cache, layout), unpack_cache(cache_ref, layout)
        rows_bad = [(codes != codes_ref).any(-1).sum().item() for codes, codes_ref in zip(got[:2], want[:2])]
        raise AssertionError(f"{(cache != cache_ref).sum().item()} cache bytes differ; rows with differing codes "
                             f"K/V {rows_bad}")
    if window:
        assert torch.equal(win.view(torch.int16), win_ref.view(torch.int16)), "window cache differs"


U8_CASES = [
    # head_dim, block_size, dtype, tokens, levels, (k_clip, v_clip), rotation, window
    (64, 16, torch.bfloat16, 300, "mse", (0.0, 0.0), "identity", True),  # team mode below 128 CTAs
    (128, 32, torch.float16, 700, "mse", (0.0, 0.0), None, False),  # 5600 rows: 4 rows per pass
    (256, 16, torch.bfloat16, 33, "mse", (0.0, 0.0), None, True),
    (128, 64, torch.bfloat16, 65, "minmax", (0.96, 0.92), "identity", True),
    (64, 128, torch.float16, 600, "minmax", (0.0, 0.0), None, False),
]


@pytest.mark.parametrize(
    "d,bs,dtype,t,levels,clip,rot,window", U8_CASES,
    ids=[f"d{c[0]}-bs{c[1]}-{str(c[2])[6:]}-T{c[3]}-{c[4]}-{c[6]}-win{int(c[7])}" for c in U8_CASES],
)
def test_store_u8_params_bit_exact(d, bs, dtype, t, levels, clip, rot, window):
    """params="u8" (2-byte (scale, offset), reference.round_params_u8): every byte equals the reference's,
    for both grids, with rows at and beyond the u8 range (constant, zero, tiny, 1e5-sized, a mean far
    outside the offset's reach) and skipped slots left poisoned."""
    gen = torch.Generator().manual_seed(7000 * d + t)
    hkv = 8 if d < 256 else 2
    layout = Int2PageLayout(d, bs, hkv, params="u8")
    num_blocks = -(-t // bs) + 3
    key, value = kv_rows(t, hkv, d, gen, dtype), kv_rows(t, hkv, d, gen, dtype)
    if t > 8:
        key[1], key[2], value[3] = 1.25, 0.0, 3e-7
        key[4] = (torch.randn(hkv, d, generator=gen) * 1e4 + 7e3).to(dtype)  # scale clamps to 62
        value[5] = (torch.randn(hkv, d, generator=gen) * 0.01 + 5.0).to(dtype)  # offset clamps at +6.44 scales
        value[6] = (torch.randn(hkv, d, generator=gen) * 0.01 - 5.0).to(dtype)  # and at -9.5
    r = torch.eye(d) if rot == "identity" else None
    cache, cache_ref, win, win_ref = _run_both(key, value, layout, num_blocks, r, r, clip, window, gen,
                                               levels=levels)
    assert (cache_ref != 0xFF).any(), "nothing was stored"
    if not torch.equal(cache, cache_ref):
        got, want = unpack_cache(cache, layout), unpack_cache(cache_ref, layout)
        rows_bad = [(a != b).any(-1).sum().item() for a, b in zip(got, want)]
        raise AssertionError(f"{(cache != cache_ref).sum().item()} cache bytes differ; rows differing in K codes, "
                             f"V codes, K params, V params: {rows_bad}")
    if window:
        assert torch.equal(win.view(torch.int16), win_ref.view(torch.int16)), "window cache differs"


def test_store_mse_ties_bit_exact():
    """Integer-valued rows (many equal elements, exact sums) and a constant row."""
    gen = torch.Generator().manual_seed(8)
    d, hkv, t, bs = 128, 4, 257, 32
    layout = Int2PageLayout(d, bs, hkv)
    key = torch.randint(-3, 4, (t, hkv, d), generator=gen).to(torch.bfloat16)
    value = (torch.randint(-2, 3, (t, hkv, d), generator=gen) * 0.5).to(torch.bfloat16)
    key[0] = 1.0
    cache, cache_ref, _, _ = _run_both(key, value, layout, -(-t // bs) + 2, None, None, (0.0, 0.0), False, gen,
                                       levels="mse")
    assert torch.equal(cache, cache_ref)


@pytest.mark.parametrize("d,bs,t", [(64, 16, 300), (128, 64, 600), (256, 16, 200)])
def test_store_mse_with_rotation(d, bs, t):
    """levels="mse" with a real rotation: the kernel's fp32 rotation sums differ from the CPU matmul in
    the last bits, which can tip a near-tie between two starting grids or a code at a level boundary.
    Allow <= 2% of the rows a different (scale, offset) and require the kernel's grid to fit the
    reference's rotated rows as well (squared error ratio: mean within 0.5%, every row within 10%)."""
    gen = torch.Generator().manual_seed(3 * d + t)
    hkv = 8 if d < 256 else 2
    layout = Int2PageLayout(d, bs, hkv)
    num_blocks = -(-t // bs) + 2
    key, value = kv_rows(t, hkv, d, gen), kv_rows(t, hkv, d, gen)
    rk, rv = random_rotation(d, gen), random_rotation(d, gen)
    cache, cache_ref, _, _, slots = _run_both(key, value, layout, num_blocks, rk, rv, (0.0, 0.0), False, gen,
                                              levels="mse", return_slots=True)
    keep = slots >= 0
    pos = slots[keep]
    table = torch.arange(num_blocks)
    got = ref.gather_kv(cache, table, num_blocks * bs, layout)  # [slots, Hkv, d] dequantized, rotated space
    want = ref.gather_kv(cache_ref, table, num_blocks * bs, layout)
    _, _, kp, vp = unpack_cache(cache, layout)
    _, _, kp_ref, vp_ref = unpack_cache(cache_ref, layout)
    sides = ((key, rk, got[0], want[0], kp, kp_ref), (value, rv, got[1], want[1], vp, vp_ref))
    for x, rot, deq, deq_ref, p, p_ref in sides:
        same = (p[pos].view(torch.int16) == p_ref[pos].view(torch.int16)).all(-1)  # [n, Hkv]
        assert same.float().mean().item() >= 0.98, f"{(~same).sum().item()} of {same.numel()} rows differ"
        xr = x[keep].float() @ rot  # the reference's rotated rows
        e = ((deq[pos] - xr) ** 2).sum(-1).double()
        e_ref = ((deq_ref[pos] - xr) ** 2).sum(-1).double()
        ratio = e / e_ref.clamp(min=1e-30)
        assert abs(ratio.mean().item() - 1) <= 5e-3 and ratio.max().item() <= 1.1, (ratio.mean(), ratio.max())


@pytest.mark.parametrize("d,hkv,t,chunk", [(64, 8, 600, 1), (64, 3, 200, 7), (128, 8, 80, 3), (256, 2, 700, 16)])
def test_store_mse_team_mode_matches_plain_mode(d, hkv, t, chunk):
    """With few rows per call (decode steps) levels="mse" runs in team mode, one warp per candidate grid
    (csrc/store.cu); with many rows, one warp per row (four per pass from 4096 rows: the first case). Both rotate in the same fp32 order and pick the
    same candidate, so storing the tokens `chunk` at a time (team mode) must give the very bytes of one
    call over all of them (plain mode), with a real rotation, skipped slots and the window write."""
    gen = torch.Generator().manual_seed(31 * d + t)
    layout = Int2PageLayout(d, 16, hkv)
    num_blocks = -(-t // 16) + 2
    dev = "cuda"
    key, value = kv_rows(t, hkv, d, gen).to(dev), kv_rows(t, hkv, d, gen).to(dev)
    key[5] = 0.75  # a constant row: every candidate grid ties
    rk, rv = random_rotation(d, gen).to(dev), random_rotation(d, gen).to(dev)
    slots = _slots(t, num_blocks * 16, gen).to(dev)
    wslots = _slots(t, num_blocks * 16, gen).to(dev)
    per_mode = []
    for step in (t, chunk):
        cache = poisoned_int2_cache(layout, num_blocks, dev)
        win = nan_window_cache(num_blocks, 16, hkv, d, dev)
        for a in range(0, t, step):
            ops.store_kv(key[a : a + step], value[a : a + step], cache, slots[a : a + step], rk, rv,
                         k_clip_ratio=0.0, v_clip_ratio=0.0, window_cache=win,
                         window_slot_mapping=wslots[a : a + step], levels="mse")
        torch.cuda.synchronize()
        per_mode.append((cache.cpu(), win.cpu()))
    (plain, win_plain), (team, win_team) = per_mode
    assert (plain != 0xFF).any(), "nothing was stored"
    assert torch.equal(team, plain), f"{(team != plain).sum().item()} cache bytes differ between the modes"
    assert torch.equal(win_team.view(torch.int16), win_plain.view(torch.int16)), "window cache differs"


def test_store_opcheck():
    gen = torch.Generator().manual_seed(3)
    d, hkv, t, bs = 64, 2, 20, 16
    layout = Int2PageLayout(d, bs, hkv)
    dev = "cuda"
    key, value = kv_rows(t, hkv, d, gen).to(dev), kv_rows(t, hkv, d, gen).to(dev)
    cache = poisoned_int2_cache(layout, 3, dev)
    slots = _slots(t, 3 * bs, gen).to(dev)
    win = nan_window_cache(2, 16, hkv, d, dev)
    wslots = _slots(t, 32, gen).to(dev)
    r = random_rotation(d, gen).to(dev)
    torch.library.opcheck(
        torch.ops.oscar.store_kv.default, (key, value, cache, slots, r, r, 0.96, 0.92, win, wslots)
    )
    torch.library.opcheck(
        torch.ops.oscar.store_kv.default, (key, value, cache, slots, r, r, 0.0, 0.0, win, wslots, 1)
    )


def test_store_errors():
    dev = "cuda"
    layout = Int2PageLayout(128, 16, 2)
    cache = poisoned_int2_cache(layout, 2, dev)
    key = torch.zeros(4, 2, 128, dtype=torch.bfloat16, device=dev)
    slots = torch.zeros(4, dtype=torch.long, device=dev)
    kw = dict(k_clip_ratio=0.96, v_clip_ratio=0.92)
    with pytest.raises(RuntimeError, match="key must be bfloat16 or float16"):
        ops.store_kv(key.float(), key.float(), cache, slots, **kw)
    with pytest.raises(RuntimeError, match="slot_mapping must be Long"):
        ops.store_kv(key, key, cache, slots.int(), **kw)
    with pytest.raises(RuntimeError, match="key must be a CUDA tensor"):
        ops.store_kv(key.cpu(), key.cpu(), cache, slots, **kw)
    with pytest.raises(RuntimeError, match="unsupported head_dim 96"):
        k96 = torch.zeros(4, 2, 96, dtype=torch.bfloat16, device=dev)
        ops.store_kv(k96, k96, cache, slots, **kw)
    with pytest.raises(RuntimeError, match="kv_cache has 2 kv heads, expected 4"):
        k4 = torch.zeros(4, 4, 128, dtype=torch.bfloat16, device=dev)
        ops.store_kv(k4, k4, cache, slots, **kw)
    with pytest.raises(RuntimeError, match="head page of"):
        ops.store_kv(key, key, cache[:, :, :-16], slots, **kw)
    with pytest.raises(RuntimeError, match="rotation_k must be a contiguous float32"):
        ops.store_kv(key, key, cache, slots, torch.eye(64, device=dev), **kw)
    with pytest.raises(RuntimeError, match="window_slot_mapping is required"):
        ops.store_kv(key, key, cache, slots, window_cache=nan_window_cache(1, 16, 2, 128, dev), **kw)
    with pytest.raises(RuntimeError, match="levels mse fits the grid to the whole row and does not clip"):
        ops.store_kv(key, key, cache, slots, levels="mse", **kw)
    with pytest.raises(RuntimeError, match="levels must be 0 \\(minmax\\) or 1 \\(mse\\), got 2"):
        torch.ops.oscar.store_kv(key, key, cache, slots, None, None, 0.0, 0.0, None, None, 2)
    with pytest.raises(ValueError, match="unknown levels 'lloyd'"):
        ops.store_kv(key, key, cache, slots, k_clip_ratio=0, v_clip_ratio=0, levels="lloyd")
