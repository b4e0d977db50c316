"""The spec itself: rotation construction, targets, clipping, INT2, packing, mixed-window attention."""

import itertools
import math

import pytest
import torch

from vllm_oscar.layout import Int2PageLayout
from vllm_oscar.ops import reference as ref


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128, 256])
def test_hadamard_orthonormal_and_pm_entries(d):
    h = ref.hadamard(d)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full((d, d), d**-0.5, dtype=torch.float64))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ref.hadamard(96)


def test_bit_reversal_order():
    assert ref.bit_reversal(8).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]
    br = ref.bit_reversal(128)
    assert sorted(br.tolist()) == list(range(128))


@pytest.mark.parametrize("d", [8, 64, 128])
def test_bit_reversal_permutation_is_permutation_ranked_by_eigenvalue(d):
    eig = torch.randn(d, dtype=torch.float64)
    p = ref.bit_reversal_permutation(eig)
    assert torch.equal(p.sum(0), torch.ones(d, dtype=torch.float64))
    assert torch.equal(p.sum(1), torch.ones(d, dtype=torch.float64))
    assert set(p.unique().tolist()) == {0.0, 1.0}
    # Output slot br[i] receives the coordinate of the i-th largest eigenvalue.
    y = torch.arange(d, dtype=torch.float64)
    order = torch.argsort(eig, descending=True)
    br = ref.bit_reversal(d)
    assert torch.equal((y @ p)[br], y[order])


@pytest.mark.parametrize("d", [64, 128])
def test_fit_rotation_orthogonal_in_float64(d):
    a = torch.randn(4 * d, d, dtype=torch.float64)
    r, eig = ref.fit_rotation(a.T @ a)
    assert (r @ r.T - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-10
    assert torch.all(eig[1:] >= eig[:-1])  # ascending, as eigh returns them


def test_rotation_preserves_logits():
    d = 64
    a = torch.randn(200, d, dtype=torch.float64)
    r, _ = ref.fit_rotation(a.T @ a)
    q, k = torch.randn(5, d, dtype=torch.float64), torch.randn(7, d, dtype=torch.float64)
    assert torch.allclose((q @ r) @ (k @ r).T, q @ k.T, atol=1e-10)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 2)])  # GQA groups 1, 3, 4
def test_targets_match_brute_force(hq, hkv):
    t, d = 37, 16
    q = torch.randn(t, hq, d, dtype=torch.float64)
    k = torch.randn(t, hkv, d, dtype=torch.float64)
    v = torch.randn(t, hkv, d, dtype=torch.float64)
    g = hq // hkv
    sig = []
    for grp in range(hkv):
        rows = [q[i, h] for i in range(t) for h in range(grp * g, grp * g + g)]
        sig.append(sum(torch.outer(x, x) for x in rows) / len(rows))
    assert torch.allclose(ref.k_target(q, hkv), sum(sig) / hkv, atol=1e-12)
    cs = []
    for grp in range(hkv):
        w = torch.stack([k[i, grp] @ sig[grp] @ k[i, grp] for i in range(t)])
        w = w * t / w.sum()
        cs.append(sum(w[i] * torch.outer(v[i, grp], v[i, grp]) for i in range(t)) / t)
    assert torch.allclose(ref.v_target(q, k, v), sum(cs) / hkv, atol=1e-12)


@pytest.mark.parametrize("ratio,d,idx", [(0.96, 128, 122), (0.92, 128, 117), (0.96, 64, 61), (0.92, 64, 58),
                                         (1.0, 64, 63), (0.0, 64, None), (-1.0, 64, None)])
def test_clip_index_rule(ratio, d, idx):
    assert ref.clip_index(ratio, d) == idx


def test_clip_rows_clamps_at_the_indexed_magnitude():
    x = torch.randn(50, 128)
    y = ref.clip_rows(x, 0.96)
    thr = x.abs().sort(-1).values[:, 122:123]
    assert torch.equal(y, x.clamp(-thr, thr))
    # distinct magnitudes: exactly d-1-idx = 5 entries per row are clipped
    assert torch.all((y != x).sum(-1) == 5)
    assert torch.equal(ref.clip_rows(x, 0.0), x)


def test_quantize_dequantize_error_within_half_scale():
    x = torch.randn(1000, 64) * torch.rand(1000, 1) * 10
    codes, scale, offset = ref.quantize_int2(x)
    assert codes.dtype == torch.uint8 and codes.max() <= 3
    assert scale.dtype == offset.dtype == torch.float16
    xh = ref.dequantize_int2(codes, scale, offset)
    # fp16 rounding of scale/offset adds a few ulps on top of the scale/2 rounding bound
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    tol = scale.float()[:, None] / 2 + 4e-3 * torch.maximum(lo.abs(), hi.abs())
    assert torch.all((xh - x).abs() <= tol)


def test_constant_row_dequantizes_exactly():
    x = torch.full((3, 64), 0.75)
    codes, scale, offset = ref.quantize_int2(x)
    assert torch.equal(ref.dequantize_int2(codes, scale, offset), x)
    assert torch.all(scale.float() == ref.SCALE_FLOOR)


@pytest.mark.parametrize("d", [4, 64, 128])
def test_pack_unpack_bit_exact_over_all_code_patterns(d):
    # every 4-code pattern at every byte position
    pats = torch.tensor(list(itertools.product(range(4), repeat=4)), dtype=torch.uint8)  # [256, 4]
    q = d // 4
    codes = torch.zeros(256, d, dtype=torch.uint8)
    for s in range(4):
        codes[:, s * q : (s + 1) * q] = pats[:, s : s + 1]
    packed = ref.pack_int2(codes)
    assert packed.shape == (256, q)
    assert sorted(packed[:, 0].tolist()) == list(range(256))
    assert torch.equal(ref.unpack_int2(packed), codes)


def test_quartered_packing_layout():
    codes = torch.zeros(1, 8, dtype=torch.uint8)
    codes[0, [1, 3, 5, 7]] = torch.tensor([1, 2, 3, 1], dtype=torch.uint8)  # Q = 2
    # byte 1 holds elements 1, 3, 5, 7 at bits [1:0], [3:2], [5:4], [7:6]
    assert ref.pack_int2(codes).tolist() == [[0, 1 | (2 << 2) | (3 << 4) | (1 << 6)]]


def _exact_attention(q, k, v, scale):
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(g, 1)) * scale
    s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.repeat_interleave(g, 1))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3), (8, 1)])
def test_mixed_window_attention_equals_exact_without_quantization(hq, hkv):
    t, d = 40, 16
    q, k, v = (torch.randn(t, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    out = ref.mixed_window_attention(q, k, v, k, v, torch.arange(t), sink=4, recent=8)
    assert torch.allclose(out, _exact_attention(q, k, v, d**-0.5), atol=1e-12)


def test_mixed_window_attention_reads_int2_only_outside_windows():
    t, d, sink, recent = 30, 8, 3, 5
    q, k, v = (torch.randn(t, 2, d, dtype=torch.float64) for _ in range(3))
    garbage_k, garbage_v = torch.randn_like(k) * 100, torch.randn_like(v) * 100
    out = ref.mixed_window_attention(q, k, v, garbage_k, garbage_v, torch.arange(t), sink, recent)
    # positions whose whole history is inside the windows never touch the INT2 copy
    assert torch.allclose(out[: sink + recent], _exact_attention(q, k, v, d**-0.5)[: sink + recent], atol=1e-12)
    assert not torch.allclose(out[-1], _exact_attention(q, k, v, d**-0.5)[-1], atol=1e-3)
    causal, exact = ref.exact_window_mask(torch.tensor([20]), t, sink, recent)
    assert exact[0].nonzero().flatten().tolist() == [0, 1, 2, 16, 17, 18, 19, 20]
    assert causal[0].sum() == 21


def test_oscar_attention_quantization_error_is_bounded_and_rotation_helps():
    t, hq, hkv, d = 300, 8, 2, 64
    # anisotropic K with outlier channels, as in real models
    scale = torch.ones(d)
    scale[:4] = 12.0
    q = torch.randn(t, hq, d) * scale
    k = torch.randn(t, hkv, d) * scale
    v = torch.randn(t, hkv, d)
    pos = torch.arange(t)
    exact = _exact_attention(q.double(), k.double(), v.double(), d**-0.5).float()
    h = ref.hadamard(d, torch.float32)
    kw = dict(sink=0, recent=0, window_dtype=None)
    plain = ref.oscar_attention(q, k, v, None, None, pos, **kw)
    rotated = ref.oscar_attention(q, k, v, h, h, pos, **kw)
    windowed = ref.oscar_attention(q, k, v, h, h, pos, sink=16, recent=64, window_dtype=None)

    def rel(x):
        return float((x - exact).norm() / exact.norm())

    assert rel(rotated) < rel(plain)
    assert rel(windowed) < rel(rotated)
    assert rel(windowed) < 0.5
    # exact when every token is inside the windows
    assert torch.allclose(ref.oscar_attention(q, k, v, h, h, pos, sink=t, recent=0, window_dtype=None), exact,
                          atol=1e-4)


@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32)])
def test_paged_store_gather_roundtrip_matches_row_quantizer(d, bs):
    layout = Int2PageLayout(head_dim=d, block_size=bs, num_kv_heads=3)
    nb = 6
    cache = torch.full(layout.cache_shape(nb), 0xAB, dtype=torch.uint8)
    t = 2 * bs + 5
    k, v = torch.randn(t, 3, d), torch.randn(t, 3, d)
    r = ref.hadamard(d, torch.float32)
    block_table = torch.tensor([4, 1, 3])
    pos = torch.arange(t)
    slots = block_table[pos // bs] * bs + pos % bs
    slots_skip = slots.clone()
    slots_skip[3] = -1
    ref.store_kv(k, v, cache, slots_skip, r, r, layout, 0.96, 0.92)
    kg, vg = ref.gather_kv(cache, block_table, t, layout)
    want_k = ref.fake_quantize_rows(k, r, 0.96)
    want_v = ref.fake_quantize_rows(v, r, 0.92)
    keep = torch.ones(t, dtype=torch.bool)
    keep[3] = False
    assert torch.equal(kg[keep], want_k[keep]) and torch.equal(vg[keep], want_v[keep])
    # the skipped slot and unused blocks keep their poison
    kc, _, kp, _ = ref._head_page_views(cache, layout)
    assert torch.all(kc[block_table[0], :, 3] == 0xAB)
    assert torch.all(cache[[0, 2, 5]] == 0xAB)


def test_paged_decode_matches_oscar_attention_last_position():
    d, bs, hq, hkv, sink, recent = 64, 16, 6, 2, 4, 8
    layout = Int2PageLayout(head_dim=d, block_size=bs, num_kv_heads=hkv)
    t = 45
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    rk = ref.fit_rotation(torch.cov(torch.randn(d, 300)))[0].float()
    rv = ref.fit_rotation(torch.cov(torch.randn(d, 300)))[0].float()
    cache = torch.zeros(layout.cache_shape(8), dtype=torch.uint8)
    window = torch.full((8, 2, bs, hkv, d), float("nan"), dtype=torch.bfloat16)
    bt = torch.tensor([[5, 2, 7]])
    pos = torch.arange(t)
    slots = bt[0][pos // bs] * bs + pos % bs
    ref.store_kv(k, v, cache, slots, rk, rv, layout, 0.96, 0.92)
    in_win = (pos < sink) | (pos >= t - recent)
    ref.store_window(k, v, window, torch.where(in_win, slots, -1), rk, rv)
    out = ref.paged_decode(q[-1:], cache, bt, torch.tensor([t]), layout, window, bt, sink, recent, rk, rv)
    want = ref.oscar_attention(q, k, v, rk, rv, pos, sink=sink, recent=recent, window_dtype=torch.bfloat16)[-1:]
    assert torch.isfinite(out).all()
    assert torch.allclose(out, want, atol=1e-5)


def test_bits_and_layout_sizes():
    lay = Int2PageLayout(head_dim=128, block_size=16, num_kv_heads=8)
    assert lay.token_bytes_per_head == 72
    assert lay.page_bytes == 8 * 16 * 72
    assert math.isclose(lay.compression_ratio(), 512 / 72)
    assert math.isclose(Int2PageLayout(64, 16).compression_ratio(), 6.4)
    assert lay.bits_per_element() == 2.25
    assert lay.v_params_offset + 16 * 4 == lay.head_page_bytes


@pytest.mark.parametrize("kwargs,match", [(dict(head_dim=96, block_size=16), "head_dim=96"),
                                          (dict(head_dim=64, block_size=24), "multiple of 16")])
def test_layout_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Int2PageLayout(**kwargs)


# --------------------------------------------------------------------------------------------------
# params "u8": the 2-byte (scale, offset) pair
# --------------------------------------------------------------------------------------------------


def test_u8_params_layout_sizes():
    lay = Int2PageLayout(head_dim=128, block_size=16, num_kv_heads=8, params="u8")
    assert lay.params_row_bytes == 2 and lay.token_bytes_per_head == 68
    assert lay.v_params_offset + 16 * 2 == lay.head_page_bytes
    assert math.isclose(lay.compression_ratio(), 512 / 68)
    assert lay.bits_per_element() == 2.125
    assert Int2PageLayout(64, 16, params="u8").token_bytes_per_head == 36
    with pytest.raises(ValueError, match="params='fp8' is not a parameter format; valid: \\['fp16', 'u8'\\]"):
        Int2PageLayout(64, 16, params="fp8")


def test_u8_params_decode_every_code():
    """All 65536 byte pairs: the scale is 2**(m//16 - 10) * (1 + (m%16)/16), the offset (u - 152)/16 scales,
    both exact in fp32, and encoding the decoded pair gives the bytes back."""
    m, u = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    raw = torch.stack([m, u], -1).to(torch.uint8).reshape(-1, 2)
    s, o = ref.decode_params(raw, "u8")
    mm, uu = raw[:, 0].double(), raw[:, 1].double()
    want_s = torch.exp2(torch.div(mm, 16, rounding_mode="floor") - 10) * (1 + (mm % 16) / 16)
    assert torch.equal(s.double(), want_s)
    assert torch.equal(o.double(), want_s * (uu - 152) / 16)
    assert torch.equal(ref.encode_params(s, o, "u8"), raw)
    assert s.min().item() == ref.U8_SCALE_MIN and s.max().item() == ref.U8_SCALE_MAX


def test_round_params_u8_is_nearest_on_the_grid():
    """The scale rounds to the nearest of the 256 scales (ties away from zero), clamped to [2**-10, 62];
    the offset to the nearest sixteenth of that scale, clamped to [-9.5, +6.4375] scales."""
    gen = torch.Generator().manual_seed(3)
    grid = ref.decode_params(torch.stack([torch.arange(256), torch.full((256,), 152)], -1).to(torch.uint8), "u8")[0]
    s = torch.exp2(torch.rand(5000, generator=gen) * 22 - 13)  # 2**-13 .. 2**9: below, in and above the range
    o = (torch.rand(5000, generator=gen) * 30 - 15) * s
    rs, ro = ref.round_params_u8(s, o)
    inside = (s >= ref.U8_SCALE_MIN) & (s <= ref.U8_SCALE_MAX)
    dist = (s[inside, None] - grid[None]).abs()
    assert torch.all((rs[inside] - s[inside]).abs() <= dist.min(-1).values)  # a nearest grid scale
    assert torch.all(rs[s < ref.U8_SCALE_MIN] == ref.U8_SCALE_MIN)
    assert torch.all(rs[s > ref.U8_SCALE_MAX] == ref.U8_SCALE_MAX)
    units = ro / rs * 16  # integers in [-152, 103]
    assert torch.equal(units, units.round()) and units.min() >= -152 and units.max() <= 103
    want = torch.clamp(torch.floor(o / rs * 16 + 0.5), -152, 103)
    assert torch.equal(units, want)


@pytest.mark.parametrize("levels", ["minmax", "mse"])
def test_u8_params_cost_little_against_fp16(levels):
    """Gaussian-like rows with a per-row mean within a few standard deviations (the offset's reach is about
    8 grid steps from a zero mean): the u8 pair raises the squared error by under 2% against fp16 with the
    same grid fit (the scale's 4 mantissa bits and the offset's sixteenths). A row whose mean sits further
    out saturates the offset (next test)."""
    gen = torch.Generator().manual_seed(5)
    sd = 0.5 + torch.rand(4000, 1, generator=gen) * 4
    x = (torch.randn(4000, 128, generator=gen) + torch.randn(4000, 1, generator=gen)) * sd
    errs = {}
    for params in ("fp16", "u8"):
        c, s, o = ref.quantize_int2_levels(x, levels, params)
        errs[params] = ((ref.dequantize_int2(c, s, o) - x) ** 2).mean().item()
    assert errs["u8"] <= 1.02 * errs["fp16"], errs


@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32)])
def test_u8_params_paged_store_gather_roundtrip(d, bs):
    """store_kv/gather_kv with a u8 layout give quantize_rows' values (the page holds the u8 bytes)."""
    gen = torch.Generator().manual_seed(d + bs)
    hkv, t = 2, 3 * bs + 5
    layout = Int2PageLayout(d, bs, hkv, params="u8")
    k, v = torch.randn(t, hkv, d, generator=gen), torch.randn(t, hkv, d, generator=gen) + 2
    nb = -(-t // bs)
    cache = torch.full(layout.cache_shape(nb), 0xFF, dtype=torch.uint8)
    ref.store_kv(k, v, cache, torch.arange(t), None, None, layout, 0.0, 0.0, levels="mse")
    gk, gv = ref.gather_kv(cache, torch.arange(nb), t, layout)
    for x, got in ((k, gk), (v, gv)):
        packed, s, o = ref.quantize_rows(x, None, 0.0, "mse", "u8")
        assert torch.equal(got, ref.dequantize_int2(ref.unpack_int2(packed), s, o))


def test_u8_params_offset_saturates_beyond_its_reach():
    """The documented limit: a row whose mean is more than ~8 grid steps from zero keeps offset +6.4375 or
    -9.5 scales, so its error grows (fp16 stores any offset)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 64, generator=gen) * 0.1 + 5.0  # mean 50 standard deviations away
    _, s8, o8 = ref.quantize_int2_mse(x, params="u8")
    assert torch.all(o8 == s8 * (103 / 16))
    err = {p: ((ref.dequantize_int2(*ref.quantize_int2_mse(x, params=p)) - x) ** 2).mean().item()
           for p in ("fp16", "u8")}
    assert err["u8"] > 10 * err["fp16"], err
