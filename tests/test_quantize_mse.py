"""The MSE-fitted INT2 grid (``levels="mse"``): reference properties, and a line-by-line CPU emulation of
the CUDA store kernel's lanes, butterflies and early exit (csrc/kernels/store.cuh, ``mse_grid``) that
must agree with the vectorized reference bit for bit. CPU, seconds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from test_variants import partition_brute_force
from vllm_oscar.layout import Int2PageLayout
from vllm_oscar.ops import reference as ref

STORE_CUH = Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "store.cuh"
F32 = np.float32


def rows(n=64, d=64, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    if heavy:  # sparse outliers and a non-zero mean, as rotated K/V rows have
        x = x + 4 * torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.05) + 0.7
    return x


def edge_rows(d: int) -> torch.Tensor:
    """Constant, zero, tiny, fp16-overflowing, overflowing-to-inf-in-sums and one-outlier rows."""
    g = torch.Generator().manual_seed(d)
    base = torch.randn(10, d, generator=g)
    out = [
        torch.full((d,), 1.25), torch.zeros(d), torch.full((d,), -3e-7),
        base[0] * 1e-6,  # below the fp16 scale floor
        base[1] * 1e5 + 7e4,  # beyond fp16: scale and offset clamp at 65504
        base[2] * 3e37,  # squares and sums overflow fp32 to inf
        torch.where(torch.arange(d) == 5, 1e3, 0.0) + base[3] * 1e-3,  # one outlier
        torch.where(torch.arange(d) < d // 2, -1.0, 2.0),  # two values
        torch.tensor([float(i % 4) for i in range(d)]) * 0.5 - 0.25,  # already on a 4-level grid
        base[4].to(torch.bfloat16).float(),
    ]
    return torch.stack(out)


def sse(x, c, s, o):
    return ((c.double() * s.double()[..., None] + o.double()[..., None] - x.double()) ** 2).sum(-1)


# ------------------------------------------------------------------------------ kernel emulation


def _kernel_constants() -> dict:
    """The MSE constants of store.cuh (hex float literals), parsed from the source."""
    src = STORE_CUH.read_text()

    def hexf(lit: str) -> float:
        return float.fromhex(lit.rstrip("f"))

    fr = re.search(r"mse_start_fraction\(int i, float& a, float& half_a\) \{(.*?)\n\}", src,
                   re.DOTALL).group(1)
    pairs = re.findall(r"a = (0x[0-9a-fp.+-]+f); half_a = (0x[0-9a-fp.+-]+f);", fr)
    return {
        "lloyd_max": re.search(r"constexpr bool kMseLloydMax = (\w+);", src).group(1) == "true",
        "fracs": int(re.search(r"constexpr int kMseFracs = (\d+);", src).group(1)),
        "passes": int(re.search(r"constexpr int kMsePasses = (\d+);", src).group(1)),
        "lm_step": hexf(re.search(r"constexpr float kMseLmStep = (0x[0-9a-fp.+-]+f);", src).group(1)),
        "min_scale": hexf(re.search(r"constexpr float kMseMinScale = (0x[0-9a-fp.+-]+f);", src).group(1)),
        "a": [hexf(a) for a, _ in pairs],
        "half_a": [hexf(h) for _, h in pairs],
    }


def test_kernel_constants_are_the_reference_settings():
    k = _kernel_constants()
    f32 = lambda v: float(F32(v))  # noqa: E731
    assert k["lloyd_max"] == ref.MSE_LLOYD_MAX_START
    assert k["passes"] == ref.MSE_PASSES
    assert k["fracs"] == len(ref.MSE_START_FRACTIONS) == len(k["a"])
    assert k["a"] == [f32(a) for a in ref.MSE_START_FRACTIONS]
    assert k["half_a"] == [f32(a / 2) for a in ref.MSE_START_FRACTIONS]
    assert k["lm_step"] == f32(ref._LM_STEP)
    assert k["min_scale"] == ref._MSE_MIN_SCALE


def _butterfly(v: np.ndarray) -> np.ndarray:
    """``group_sum<L>``: every lane adds its xor partner's value, offsets L/2 .. 1 (all lanes at once)."""
    lanes = v.shape[0]
    idx = np.arange(lanes)
    off = lanes // 2
    while off:
        v = (v + v[idx ^ off]).astype(F32)
        off //= 2
    assert np.all(v.view(np.uint32) == v[0].view(np.uint32)), "lanes disagree after the butterfly"
    return v


def _lane_sum(t: np.ndarray) -> np.ndarray:
    """``lane_sum<E>``: per lane (rows of ``t [L, E]``), left to right."""
    a = t[:, 0].copy()
    for e in range(1, t.shape[1]):
        a = (a + t[:, e]).astype(F32)
    return a


def _code(x, s, o):
    c = np.floor(((x - o) / s + F32(0.5)).astype(F32))
    return np.fmin(np.fmax(c, F32(0)), F32(3)).astype(F32)


def _round_scale(s):
    return F32(np.float16(np.fmin(np.fmax(s, F32(2.0**-14)), F32(65504))))


def _round_offset(o):
    return F32(np.float16(np.fmin(np.fmax(o, F32(-65504)), F32(65504))))


def emulate_store_row(row: np.ndarray, k: dict, early_exit: bool = True, trace: list | None = None
                      ) -> tuple[np.ndarray, np.float16, np.float16]:
    """One row through store_kernel's MSE path as the warp sees it: ``(code bytes [d/4], scale, offset)``;
    ``trace`` receives ``(scale, offset, err)`` per candidate (``reference.quantize_int2_mse(_trace=)``).

    Transliterates store.cuh: lane ``li`` owns elements ``li + (e/4)*L + (e%4)*d/4``; sums are
    ``lane_sum`` then the xor butterfly; ``Σc``/``Σc²`` travel packed in one int; every op rounds to fp32.
    """
    d = row.shape[0]
    L = min(d // 4, 32)
    E = d // L
    QB = d // 4
    dims = np.array([[li + (e // 4) * L + (e % 4) * QB for e in range(E)] for li in range(L)])
    x = row.astype(F32)[dims]  # [L, E]
    with np.errstate(all="ignore"):
        lo = F32(x.min())
        hi = F32(x.max())
        kD, kInvD = F32(d), F32(1.0 / d)
        sx = _butterfly(_lane_sum(x))[0]

        def sq_error(s, o):
            dv = ((_code(x, s, o) * s).astype(F32) + o).astype(F32) - x
            return _butterfly(_lane_sum((dv.astype(F32) * dv).astype(F32)))[0]

        bs, bo = _round_scale(F32((hi - lo) / F32(3))), _round_offset(lo)
        best = sq_error(bs, bo)
        if trace is not None:
            trace.append((bs, bo, best))
        mid, rng = F32(F32(lo + hi) * F32(0.5)), F32(hi - lo)
        for st in range(k["fracs"] + int(k["lloyd_max"])):
            if k["lloyd_max"] and st == 0:
                mean = F32(sx * kInvD)
                dv = (x - mean).astype(F32)
                sd = np.sqrt(F32(_butterfly(_lane_sum((dv * dv).astype(F32)))[0] * kInvD))
                s = F32(F32(k["lm_step"]) * sd)
                o = F32(mean - F32(F32(1.5) * s))
            else:
                i = st - int(k["lloyd_max"])
                s = F32(F32(F32(k["a"][i]) * rng) / F32(3))
                o = F32(mid - F32(F32(k["half_a"][i]) * rng))
            s = np.fmax(s, F32(k["min_scale"]))
            c = _code(x, s, o)
            for _ in range(k["passes"]):
                ci = c.astype(np.int64)
                packed = (ci + ((ci * ci) << 16)).sum(1)  # per lane, then the int butterfly (exact)
                packed = int(packed.sum())
                scx = _butterfly(_lane_sum((c * x).astype(F32)))[0]
                n_c, n_cc = packed & 0xFFFF, packed >> 16
                det = d * n_cc - n_c * n_c
                if det > 0:
                    fc = F32(n_c)
                    sn = F32(F32(F32(scx * kD) - F32(fc * sx)) / F32(det))
                    if sn > 0:
                        s = sn
                        o = F32(F32(sx - F32(sn * fc)) * kInvD)
                cn = _code(x, s, o)
                changed = bool(np.any(cn != c))
                c = cn
                if early_exit and not changed:
                    break
            rs, ro = _round_scale(s), _round_offset(o)
            err = sq_error(rs, ro)
            if trace is not None:
                trace.append((s, o, err))
            if err < best:
                best, bs, bo = err, rs, ro
        codes = _code(x, bs, bo).astype(np.uint32)
    code_bytes = np.zeros(QB, dtype=np.uint8)
    for li in range(L):  # bytes[e/4] |= c << 2*(e%4), stored at codes[li + k*L]
        for kk in range(E // 4):
            b = 0
            for q in range(4):
                b |= int(codes[li, kk * 4 + q]) << (2 * q)
            code_bytes[li + kk * L] = b
    return code_bytes, np.float16(bs), np.float16(bo)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_kernel_emulation_matches_reference_bit_for_bit(d):
    """The vectorized reference (halving folds) is what the kernel's lanes and butterflies compute,
    early exit included, on ordinary, heavy-tailed and edge-case rows."""
    x = torch.cat([rows(n=6, d=d, seed=d), rows(n=6, d=d, seed=d + 1, heavy=True), edge_rows(d)])
    trace: list = []
    codes, scale, offset = ref.quantize_int2_mse(x, _trace=trace)
    packed = ref.pack_int2(codes)
    k = _kernel_constants()
    assert len(trace) == 1 + k["fracs"] + int(k["lloyd_max"])
    for i, row in enumerate(x.numpy()):
        row_trace: list = []
        b, s, o = emulate_store_row(row, k, trace=row_trace)
        # every candidate's fp32 pair and squared error, bit for bit: the summation order shows here
        got = np.array([[v.view(np.uint32) for v in (F32(a), F32(b_), F32(c))] for a, b_, c in row_trace])
        want = np.array([[t[i].numpy().view(np.uint32) for t in cand] for cand in trace])
        assert np.array_equal(got, want), f"row {i}: candidates differ\n{got}\n{want}"
        assert np.array_equal(b, packed[i].numpy()), f"row {i}: code bytes differ"
        assert s.view(np.uint16) == scale[i].view(torch.int16).item() & 0xFFFF, f"row {i}: scale {s} vs {scale[i]}"
        assert o.view(np.uint16) == offset[i].view(torch.int16).item() & 0xFFFF, f"row {i}: offset {o} vs {offset[i]}"


def test_early_exit_changes_nothing():
    """The kernel stops a start's passes once no code changes (a fixed point): same grid as all passes."""
    k = _kernel_constants()
    for row in torch.cat([rows(n=8, d=64, heavy=True), edge_rows(64)]).numpy():
        full, early = emulate_store_row(row, k, early_exit=False), emulate_store_row(row, k, early_exit=True)
        assert np.array_equal(full[0], early[0]) and full[1] == early[1] and full[2] == early[2]


def test_lane_order_is_the_kernels_code_byte_ownership():
    for d in (64, 128, 256):
        perm = ref.lane_order(d)
        assert sorted(perm.tolist()) == list(range(d))
        lanes = min(d // 4, 32)
        per = d // lanes
        for li in range(lanes):  # lane li's elements sit in the code bytes it writes: li + k*L
            assert {int(p) % (d // 4) for p in perm[li * per : (li + 1) * per]} == {li + k * lanes for k in range(per // 4)}


# ------------------------------------------------------------------------------ reference properties


@pytest.mark.parametrize("heavy", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_mse_never_worse_than_unclipped_minmax(d, heavy):
    x = rows(n=512, d=d, seed=d, heavy=heavy)
    m = sse(x, *ref.quantize_int2_mse(x))
    mm = sse(x, *ref.quantize_int2(x))
    assert torch.all(m <= mm * (1 + 1e-6))
    assert float((m / mm).mean()) < 0.75  # and much better on average (measured ~0.5 on K/V rows)
    clipped = sse(x, *ref.quantize_int2(ref.clip_rows(x, 0.92)))
    assert float(m.mean()) < float(clipped.mean())


def test_mse_is_near_the_global_optimum():
    """Against the exhaustive optimum of any affine 4-level grid (every split of the sorted row into 4
    runs, least squares in closed form): within a few percent (1.007-1.009 measured on SmolLM2 rows)."""
    d = 32
    x = rows(n=16, d=d, seed=5, heavy=True).double()
    opt = partition_brute_force(x)  # the exhaustive oracle shared with test_variants.py
    ratio = sse(x.float(), *ref.quantize_int2_mse(x.float())) / opt
    assert torch.all(ratio >= 1 - 1e-3)  # fp16 parameters can land a hair below the fp64 optimum
    assert float(ratio.mean()) < 1.03


def test_mse_is_deterministic_and_row_independent():
    x = rows(n=40, d=64, heavy=True)
    a = ref.quantize_int2_mse(x)
    b = ref.quantize_int2_mse(x.clone())
    row_by_row = [ref.quantize_int2_mse(r[None]) for r in x]
    for i, t in enumerate(a):
        assert torch.equal(t, b[i])
        assert torch.equal(t, torch.cat([r[i] for r in row_by_row]))
    batched = ref.quantize_int2_mse(x.view(4, 10, 64))
    assert all(torch.equal(t.reshape(a[i].shape), a[i]) for i, t in enumerate(batched))


def test_mse_edge_rows():
    x = edge_rows(64)
    c, s, o = ref.quantize_int2_mse(x)
    assert c.dtype == torch.uint8 and int(c.max()) <= 3
    assert s.dtype == torch.float16 and o.dtype == torch.float16
    assert torch.isfinite(s.float()).all() and torch.isfinite(o.float()).all()
    assert (s.float() >= ref.SCALE_FLOOR).all() and (s.float() <= ref.FP16_MAX).all()
    assert (o.float().abs() <= ref.FP16_MAX).all()
    deq = ref.dequantize_int2(c, s, o)
    assert torch.equal(deq[0], x[0])  # constant row (fp16-representable value): exact
    assert torch.equal(deq[1], x[1])  # zeros: exact
    assert (s[1].float(), o[1].float()) == (ref.SCALE_FLOOR, 0.0)
    assert torch.equal(deq[7], x[7])  # two values: both levels hit exactly
    assert torch.equal(deq[8], x[8])  # already a 4-level grid: recovered exactly
    assert float(s[4]) == ref.FP16_MAX  # beyond fp16: the same clamps as min-max
    assert float(s[5]) == ref.FP16_MAX and float(o[5]) in (ref.FP16_MAX, -ref.FP16_MAX)
    # never worse than min-max on what fp16 can represent
    fine = [0, 1, 2, 3, 6, 7, 8, 9]
    assert torch.all(sse(x[fine], c[fine], s[fine], o[fine]) <= sse(x[fine], *ref.quantize_int2(x[fine])) * (1 + 1e-6))


def test_codes_are_nearest_levels_of_the_stored_pair():
    x = rows(n=64, d=128, heavy=True)
    c, s, o = ref.quantize_int2_mse(x)
    lv = torch.arange(4.0) * s.float()[:, None] + o.float()[:, None]
    dist = (x[..., None] - lv[:, None, :]).abs()
    chosen = dist.gather(-1, c.long()[..., None])[..., 0]
    assert torch.all(chosen <= dist.amin(-1) + 1e-5 * s.float()[:, None])


def test_levels_plumbing_and_clip_refusal():
    g = torch.Generator().manual_seed(0)
    d, hkv, t = 64, 2, 40
    key, value = torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    r = ref.hadamard(d, torch.float32)
    with pytest.raises(ValueError, match="does not clip"):
        ref.quantize_rows(key, r, 0.96, "mse")
    with pytest.raises(ValueError, match="unknown levels 'lloyd'; valid: \\['minmax', 'mse'\\]"):
        ref.quantize_rows(key, r, 0.0, "lloyd")
    with pytest.raises(ValueError, match="does not clip"):
        ref.oscar_attention(key.repeat(1, 2, 1), key, value, r, r, torch.arange(t), levels="mse")
    # minmax is the default and unchanged
    assert all(torch.equal(a, b) for a, b in zip(ref.quantize_rows(key, r, 0.96),
                                                  ref.quantize_rows(key, r, 0.96, "minmax")))
    # the paged store holds exactly the row quantizer's bytes
    layout = Int2PageLayout(d, 16, hkv)
    cache = torch.full(layout.cache_shape(4), 0xFF, dtype=torch.uint8)
    slots = torch.randperm(64, generator=g)[:t]
    slots[3] = -1
    ref.store_kv(key, value, cache, slots, r, r, layout, 0.0, 0.0, levels="mse")
    order = torch.argsort(slots)
    keep = order[slots[order] >= 0]
    kq, vq = ref.gather_kv(cache, torch.arange(4), 64, layout)
    pos = slots[keep]
    assert torch.equal(kq[pos], ref.fake_quantize_rows(key[keep], r, 0.0, "mse"))
    assert torch.equal(vq[pos], ref.fake_quantize_rows(value[keep], r, 0.0, "mse"))


def test_mse_attention_is_closer_to_exact_than_minmax():
    g = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 96, 4, 2, 64
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g) * (0.5 + torch.rand(1, 1, d, generator=g)) + 0.5
    v = torch.randn(t, hkv, d, generator=g)
    r = ref.hadamard(d, torch.float32)
    pos = torch.arange(t)
    kw = dict(sink=4, recent=8, window_dtype=None)
    exact = ref.oscar_attention(q, k, v, None, None, pos, k_clip_ratio=0, v_clip_ratio=0, sink=t, recent=t,
                                window_dtype=None)
    err = {}
    for name, args in {"mse": dict(levels="mse", k_clip_ratio=0, v_clip_ratio=0),
                       "paper": dict(levels="minmax", k_clip_ratio=0.96, v_clip_ratio=0.92)}.items():
        o = ref.oscar_attention(q, k, v, r, r, pos, **args, **kw)
        err[name] = float(((o - exact) ** 2).sum() / (exact**2).sum())
    assert err["mse"] < 0.8 * err["paper"], err


def test_mse_starts_experiment_helpers():
    """`python -m vllm_oscar.calibrate.mse_starts` (the start set's evidence): rows, errors, winner shares."""
    from vllm_oscar.calibrate import mse_starts

    g = torch.Generator().manual_seed(0)
    captures = [tuple(torch.randn(40, h, 64, generator=g) for h in (6, 2, 2)) for _ in range(4)]
    rows = mse_starts.rotated_rows(captures, 128, layer_stride=3, row_stride=4)
    assert rows.shape == (2 * 2 * (40 * 2 // 4) * 64 // 128, 128)  # layers 0 and 3, K and V
    before = mse_starts.squared_error(rows, start_fractions=mse_starts.FIVE_STARTS, lloyd_max_start=True)
    now = mse_starts.squared_error(rows)
    lm_only = mse_starts.squared_error(rows, start_fractions=(), lloyd_max_start=True)
    assert 0 < before <= now <= lm_only  # the five starts include the current two, which include LM alone
    shares = mse_starts.winner_shares(rows, mse_starts.FIVE_STARTS)
    assert len(shares) == 2 + len(mse_starts.FIVE_STARTS) and abs(sum(shares) - 1) < 1e-3
