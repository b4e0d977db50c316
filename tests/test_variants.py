"""The accuracy variants (calibrate/variants.py) against brute-force definitions. CPU, seconds."""

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from vllm_oscar.calibrate import variants as V
from vllm_oscar.ops import reference as ref


def rows(n=64, d=64, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    if heavy:  # a few outliers per row, a non-zero mean
        x = x + 4 * torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.05) + 0.7
    return x


# ---- parameter formats ------------------------------------------------------------------------------


def test_fp16_minmax_with_clip_is_the_reference_quantizer():
    x = rows(heavy=True)
    for clip in (0.0, 0.96, 0.92):
        c, s, o = V.quantize_rows_variant(x, V.QuantSpec("minmax", clip, "fp16"))
        rc, rs, ro = ref.quantize_int2(ref.clip_rows(x, clip))
        assert torch.equal(c, rc) and torch.equal(s, rs.float()) and torch.equal(o, ro.float())


def test_log8_scale_and_int8_offset_grids():
    s = torch.tensor([1e-3, 0.0371, 0.5, 1.0, 3.3, 40.0])
    o = torch.tensor([-0.1, 0.02, -0.7, 2.0, -5.0, -60.0])
    rs, ro = V.round_params(s, o, "log8_i8")
    for si, oi, rsi, roi in zip(s.tolist(), o.tolist(), rs.tolist(), ro.tolist()):
        m = round((math.log2(si) - V.LOG8_MIN_EXP) * 16)  # brute force: nearest 1/16 octave
        assert rsi == pytest.approx(2 ** (m / 16 + V.LOG8_MIN_EXP), rel=1e-6)
        assert abs(rsi / si - 1) <= 2 ** (1 / 32) - 1 + 1e-6  # at most half a step away
        k = max(-128, min(127, round((oi / rsi + 1.5) * 16)))
        assert roi == pytest.approx(rsi * (k / 16 - 1.5), rel=1e-6)
    _, osym = V.round_params(s, o, "log8_sym")
    assert torch.allclose(osym, -1.5 * rs)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp16_i8", "log8_i8", "log8_sym", "u8"])
def test_codes_are_nearest_levels_of_the_stored_parameters(fmt):
    x = rows(heavy=True)
    for levels in ("minmax", "mse"):
        c, s, o = V.quantize_rows_variant(x, V.QuantSpec(levels, 0.0, fmt))
        assert torch.equal(s, V.round_params(s, o, fmt)[0])  # parameters are representable
        levels_ = torch.arange(4.0) * s[:, None] + o[:, None]  # [n, 4]
        dist = (x[..., None] - levels_[:, None, :]).abs()  # [n, d, 4]
        chosen = dist.gather(-1, c.long()[..., None])[..., 0]
        assert torch.all(chosen <= dist.amin(-1) + 1e-5 * s[:, None])


# ---- Lloyd-Max (the authors' trick) -----------------------------------------------------------------


def test_lloyd_max_matches_elementwise_definition():
    x = rows(n=8, d=16, heavy=True)
    for ratio in (1.0, 1.16):
        c, s, o = V.quantize_rows_variant(x, V.QuantSpec("lm", 0.0, "fp32", lm_ratio=ratio))
        for i in range(x.shape[0]):
            r = x[i].tolist()
            mean = sum(r) / len(r)
            std = math.sqrt(sum((a - mean) ** 2 for a in r) / len(r) + 1e-8)
            for j, a in enumerate(r):
                z = (a - mean) / std
                want = 0 if z < -0.98107 else 1 if z < 0 else 2 if z < 0.98107 else 3
                assert int(c[i, j]) == want
            scale = 1.00637 * ratio * std
            assert float(s[i]) == pytest.approx(scale, rel=1e-5)
            assert float(o[i]) == pytest.approx(mean - 1.5 * scale, rel=1e-5, abs=1e-6)
        # reconstruction levels mean +- {0.5, 1.5} * 1.00637 * ratio * std
        xh = c.float() * s[:, None] + o[:, None]
        std = x.std(-1, unbiased=False)
        lv = ((xh - x.mean(-1, keepdim=True)) / std[:, None]).abs().unique().tolist()
        assert all(min(abs(v - 0.5 * 1.00637 * ratio), abs(v - 1.5 * 1.00637 * ratio)) < 1e-3 for v in lv)


# ---- MSE-fitted uniform grid ------------------------------------------------------------------------


def brute_best_uniform_grid(r: list[float], symmetric: bool) -> float:
    """Global minimum over every code assignment of the least-squares affine fit's SSE."""
    d, best = len(r), float("inf")
    for codes in itertools.product(range(4), repeat=d):
        if symmetric:
            u = [c - 1.5 for c in codes]
            s = sum(a * b for a, b in zip(u, r)) / sum(a * a for a in u)
            if s <= 0:
                continue
            sse = sum((a - s * b) ** 2 for a, b in zip(r, u))
        else:
            n, sc, scc = d, sum(codes), sum(c * c for c in codes)
            det = n * scc - sc * sc
            if det == 0:
                continue
            sx, scx = sum(r), sum(c * a for c, a in zip(codes, r))
            s = (n * scx - sc * sx) / det
            if s <= 0:
                continue
            o = (sx - s * sc) / n
            sse = sum((a - (c * s + o)) ** 2 for c, a in zip(codes, r))
        best = min(best, sse)
    return best


def partition_brute_force(x: torch.Tensor) -> torch.Tensor:
    """Global minimum SSE of an affine 4-level grid per row of ``x [n, d]``: nearest-level codes are
    monotone in ``x``, so enumerate every split of the sorted row into 4 runs (codes 0..3) and fit
    each split by least squares in closed form from prefix sums."""
    n, d = x.shape
    xs = torch.sort(x.double(), -1).values
    zero = torch.zeros(n, 1, dtype=torch.float64)
    p1, p2 = torch.cat([zero, xs.cumsum(-1)], -1), torch.cat([zero, (xs * xs).cumsum(-1)], -1)
    splits = [(a, b, c) for a in range(d + 1) for b in range(a, d + 1) for c in range(b, d + 1)]
    a, b, c = torch.tensor(splits).T
    cnt = torch.stack([a, b - a, c - b, d - c], -1).double()
    code = torch.arange(4, dtype=torch.float64)
    sc, scc = (cnt * code).sum(-1), (cnt * code * code).sum(-1)
    seg = torch.stack([p1[:, a], p1[:, b] - p1[:, a], p1[:, c] - p1[:, b], p1[:, d:] - p1[:, c]], -1)
    sx, sxx, scx = p1[:, d:], p2[:, d:], (seg * code).sum(-1)
    det = d * scc - sc * sc
    s = (d * scx - sc * sx) / torch.where(det > 0, det, torch.ones_like(det))
    o = (sx - s * sc) / d
    sse = sxx - 2 * s * scx - 2 * o * sx + s * s * scc + 2 * s * o * sc + d * o * o
    return torch.where((det > 0) & (s > 0), sse, torch.full_like(sse, float("inf"))).amin(-1)


def test_partition_brute_force_is_the_exhaustive_optimum():
    x = rows(n=12, d=6, seed=3, heavy=True)
    want = torch.tensor([brute_best_uniform_grid(r, False) for r in x.tolist()], dtype=torch.float64)
    assert torch.allclose(partition_brute_force(x), want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("heavy", [False, True])
def test_mse_grid_is_near_the_global_optimum(heavy):
    x = rows(n=24, d=64, seed=1, heavy=heavy)
    sse = ((V.fake_quantize_variant(x, V.QuantSpec("mse", 0.0, "fp32")) - x) ** 2).sum(-1).double()
    ratio = sse / partition_brute_force(x)
    assert torch.all(ratio >= 1 - 1e-4)  # the brute force is a true lower bound
    assert float(ratio.mean()) < 1.03  # alternating least squares lands within a few percent
    # ... where the paper's clipped min-max grid is far off
    mm = ((V.fake_quantize_variant(x, V.QuantSpec("minmax", 0.92, "fp32")) - x) ** 2).sum(-1).double()
    assert float((mm / partition_brute_force(x)).mean()) > 1.15


def test_symmetric_mse_grid_is_near_its_brute_force_optimum():
    x = rows(n=30, d=6, seed=3)
    x = x - x.mean(-1, keepdim=True)
    c, s, o = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, "log8_sym"))
    sse = ((c.float() * s[:, None] + o[:, None] - x) ** 2).sum(-1)
    brute = torch.tensor([brute_best_uniform_grid(r, True) for r in x.tolist()])
    assert float((sse / brute).mean()) < 1.05  # 8-bit log scale rounding included


def test_mse_grid_beats_minmax_and_lloyd_max_on_every_row():
    x = rows(n=256, d=64, heavy=True)
    def sse(spec):
        return ((V.fake_quantize_variant(x, spec) - x) ** 2).sum(-1)
    m = sse(V.QuantSpec("mse", 0.0, "fp32"))
    assert torch.all(m <= sse(V.QuantSpec("minmax", 0.0, "fp32")) * (1 + 1e-5))
    for clip in (0.96, 0.92):  # clipping is a special case the fit explores too
        assert float(m.mean()) < float(sse(V.QuantSpec("minmax", clip, "fp32")).mean())
    assert float(m.mean()) < float(sse(V.QuantSpec("lm", 0.0, "fp32", lm_ratio=1.0)).mean())


# ---- transforms and attention -----------------------------------------------------------------------


def qkv(t=40, hq=6, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(t, hkv, d, generator=g) + 2.0  # non-zero means
    v = torch.randn(t, hkv, d, generator=g) - 1.0
    return q, k, v


def test_invertible_transforms_and_means_leave_unquantized_attention_exact():
    q, k, v = qkv()
    d = q.shape[-1]
    g = torch.Generator().manual_seed(1)
    def well_conditioned():  # orthogonal times a diagonal in [0.5, 2]
        qm, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
        return qm * torch.exp2(2 * torch.rand(d, generator=g) - 1)
    tk = torch.stack([well_conditioned(), well_conditioned()])
    tv = torch.stack([well_conditioned(), well_conditioned()])
    t = V.LayerTransform(tk, tv, k_mean=k.mean(0), v_mean=v.mean(0))
    pos = torch.arange(q.shape[0])
    got = V.variant_attention(q, k, v, t, None, None, pos, sink=4, recent=8)
    want = V.exact_attention(q, k, v, d**-0.5)
    assert torch.allclose(got, want, atol=1e-4)


def test_orthogonal_transform_with_fp16_minmax_is_oscar_attention():
    q, k, v = qkv(d=16)
    rk, rv = ref.hadamard(16, torch.float32), ref.fit_rotation(torch.cov(v.reshape(-1, 16).T))[0].float()
    t = V.LayerTransform.orthogonal(rk, rv, 2)
    pos = torch.arange(q.shape[0])
    ks, vs = V.QuantSpec("minmax", 0.96, "fp16"), V.QuantSpec("minmax", 0.92, "fp16")
    got = V.variant_attention(q, k, v, t, ks, vs, pos, sink=4, recent=8)
    want = ref.oscar_attention(q, k, v, rk, rv, pos, k_clip_ratio=0.96, v_clip_ratio=0.92, sink=4, recent=8,
                               window_dtype=None)
    assert torch.allclose(got, want, atol=1e-5)


def test_importance_metric_minimizes_the_error_model():
    g = torch.Generator().manual_seed(0)
    d = 8
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    sx = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    si = b @ torch.diag(torch.linspace(0.1, 3, d, dtype=torch.float64)) @ b.T + 0.1 * eye
    gm = V.importance_metric(sx, si)
    t = V._sym_pow(gm, 0.5)
    best = float(V.error_model(sx, si, t))
    half = V._sym_pow(sx, 0.5)
    closed = float(torch.linalg.eigvalsh(half @ si @ half).sqrt().sum() ** 2 / d**2)
    assert best == pytest.approx(closed, rel=1e-8)
    # orthogonal transforms all give tr(Sx) tr(Si) / d^2 ...
    qm, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    iso = float(torch.trace(sx) * torch.trace(si) / d**2)
    assert float(V.error_model(sx, si, qm)) == pytest.approx(iso, rel=1e-8)
    # ... and no perturbation of the optimum does better
    assert best < iso
    for _ in range(20):
        p = t @ (eye + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64))
        assert float(V.error_model(sx, si, p)) >= best * (1 - 1e-9)


def test_streaming_stats_match_brute_force():
    q, k, v = qkv(t=30)
    q2, k2, v2 = qkv(t=20, seed=5)
    st = V.VariantStats(1, 2, 16)
    for a, b, c in ((q, k, v), (q2, k2, v2)):
        st.add(0, a, b, c, V.exact_attention(a, b, c, 0.25))
    kk = torch.cat([k, k2]).double()
    mu = kk.mean(0)
    cov = torch.einsum("thd,the->hde", kk - mu, kk - mu) / kk.shape[0]
    assert torch.allclose(st.cov("k", True)[0], cov, atol=1e-9)
    assert torch.allclose(st.mean("v")[0], torch.cat([v, v2]).double().mean(0), atol=1e-9)
    o = torch.cat([V.exact_attention(q, k, v, 0.25), V.exact_attention(q2, k2, v2, 0.25)]).double()
    og = o.reshape(-1, 2, 3, 16)  # [T, Hkv, G, d]
    cs = torch.einsum("thgd,thge->hde", og, og) / (og.shape[0] * 3)
    assert torch.allclose(st.c_s()[0], cs, atol=1e-6)
    want = ref.query_second_moments(torch.cat([q, q2]).double(), 2)
    assert torch.allclose(st.sigma_q()[0], want, atol=1e-9)


def test_bits_per_element_accounting():
    # the faithful method: fp16 scale+offset (2.5 bits) + 320 BF16 tokens at 32K
    assert V.bits_per_element(64, 32768, sink=64, recent=256, param_bits=32) == pytest.approx(
        (320 * 16 + (32768 - 320) * 2.5) / 32768)
    paper_128k = V.bits_per_element(128, 131072, sink=64, recent=256, param_bits=32)
    assert paper_128k == pytest.approx(2.2836, abs=1e-4)  # the paper's 2.28
    assert V.bits_per_element(64, 32768, sink=64, recent=256, param_bits=16) < 2.5


def test_attention_token_weights_match_a_loop_over_pairs():
    q, k, v = qkv(t=24, hq=4, hkv=2, d=8)
    sink, recent, scale = 3, 5, 0.3
    wk, wv = V.attention_token_weights(q, k, v, scale, sink=sink, recent=recent, k_weight="p2dv")
    wk2, wv2 = V.attention_token_weights(q, k, v, scale, sink=sink, recent=recent, k_weight="p2")
    t, hq, _ = q.shape
    bk, bv = torch.zeros(2, t, dtype=torch.float64), torch.zeros(2, t, dtype=torch.float64)
    for h in range(hq):
        g = h // 2
        for i in range(t):
            s = torch.tensor([float(q[i, h] @ k[j, g]) * scale for j in range(i + 1)], dtype=torch.float64)
            p = torch.softmax(s, 0)
            o = sum(p[j] * v[j, g].double() for j in range(i + 1))
            for j in range(i + 1):
                if j < sink or j >= i + 1 - recent:  # read from the BF16 windows: no INT2 error
                    continue
                bv[g, j] += p[j] ** 2
                bk[g, j] += p[j] ** 2 * float(((v[j, g].double() - o) ** 2).sum())
    assert torch.allclose(wv.double(), bv, rtol=1e-4, atol=1e-7)
    assert torch.allclose(wk.double(), bk, rtol=1e-4, atol=1e-6)
    assert torch.equal(wk2, wv2)


def test_weighted_moments_match_brute_force():
    _, k, v = qkv(t=30)
    g = torch.Generator().manual_seed(2)
    wk, wv = torch.rand(2, 30, generator=g), torch.rand(2, 30, generator=g)
    st = V.VariantStats(1, 2, 16)
    st.add_weighted(0, k[:12], v[:12], wk[:, :12], wv[:, :12])
    st.add_weighted(0, k[12:], v[12:], wk[:, 12:], wv[:, 12:])
    for side, x, w in (("k", k, wk), ("v", v, wv)):
        for h in range(2):
            xh, wh = x[:, h].double(), w[h].double()
            mu = (wh[:, None] * xh).sum(0) / wh.sum()
            cov = ((xh - mu) * wh[:, None]).T @ (xh - mu) / wh.sum()
            assert torch.allclose(st.wmean(side)[0, h], mu, atol=1e-9)
            assert torch.allclose(st.wcov(side, True)[0, h], cov, atol=1e-9)


def test_clip_search_returns_the_per_layer_argmin():
    q, k, v = qkv(t=48, hq=4, hkv=2, d=16)
    captures = [[(q, k, v)]]
    t = [V.LayerTransform.orthogonal(ref.hadamard(16, torch.float32), ref.hadamard(16, torch.float32), 2)]
    w_o = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    base = V.AttentionVariant(sink=2, recent=6)
    cands = (0.0, 0.9, 0.8)
    kc, vc = V.search_clip_ratios(captures, t, base, [w_o], 0.25, candidates=cands, q_start=8)

    def err(kr, vr):
        ks = V.QuantSpec("minmax", kr)
        vs = None if vr is None else V.QuantSpec("minmax", vr)
        return V.layer_proxy_error(q, k, v, t[0], ks, vs, w_o, 0.25, sink=2, recent=6, q_start=8)

    assert kc[0] == min(cands, key=lambda r: err(r, None))
    assert vc[0] == min(cands, key=lambda r: err(kc[0], r))


# ---- plain per-channel centering -------------------------------------------------------------------


def test_channel_stats_match_brute_force():
    g = torch.Generator().manual_seed(3)
    seqs = [(torch.randn(n, 2, 8, generator=g) + 3.0, torch.randn(n, 2, 8, generator=g) - 1.0) for n in (40, 25, 6)]
    seqs[0][0][0] += 50.0  # an attention-sink-like first key
    st = V.ChannelStats(1, 2, 8, head=8, sample_stride=3)
    for k, v in seqs:
        st.add(0, k, v)
    for side, j in (("k", 0), ("v", 1)):
        for skip in (0, 1, 8):
            rows = torch.cat([s[j][skip:] for s in seqs]).double()
            assert torch.allclose(st.mean(side, skip)[0], rows.mean(0), atol=1e-12)
        sampled = torch.cat([s[j][8::3] for s in seqs if s[j].shape[0] > 8]).double()
        assert torch.allclose(st.median(side)[0], sampled.median(0).values)
        # in a rotated basis: (x - mu) @ B has median 0 in every coordinate of every head
        basis = ref.hadamard(8, torch.float64).expand(1, 2, 8, 8)
        mu = st.median(side, basis)[0]
        rot = torch.einsum("nhd,de->nhe", sampled - mu, basis[0, 0])
        assert torch.allclose(rot.median(0).values, torch.zeros(2, 8, dtype=torch.float64), atol=1e-9)
    with pytest.raises(ValueError, match="skip"):
        st.mean("k", 9)
    again = V.ChannelStats.from_state(1, 2, 8, st.state(), head=8, sample_stride=3)
    assert torch.equal(again.mean("v", 1), st.mean("v", 1))
    assert torch.equal(again.median("k"), st.median("k"))


@pytest.mark.parametrize("sides", ["k", "v", "kv"])
def test_channel_centering_leaves_unquantized_attention_exact(sides):
    q, k, v = qkv(t=40)
    k = k + 5.0 * torch.randn(16)  # a large per-channel bias, constant over tokens
    had = ref.hadamard(16, torch.float32)
    st = V.ChannelStats(1, 2, 16, head=4, sample_stride=2)
    st.add(0, *qkv(t=30, seed=9)[1:])  # calibration rows (not the evaluated ones)
    base = [V.LayerTransform.orthogonal(had, had, 2)]
    basis = had.double().expand(1, 2, 16, 16)
    for mu_k, mu_v in ((st.mean("k"), st.mean("v")), (st.mean("k", 4), st.mean("v", 4)),
                       (st.median("k", basis), st.median("v", basis))):
        t = V.with_means(base, mu_k if "k" in sides else None, mu_v if "v" in sides else None)[0]
        assert (t.k_mean is not None) == ("k" in sides) and (t.v_mean is not None) == ("v" in sides)
        pos = torch.arange(q.shape[0])
        got = V.variant_attention(q, k, v, t, None, None, pos, sink=4, recent=8)
        want = V.exact_attention(q, k, v, 16**-0.5)
        assert torch.allclose(got, want, atol=1e-5)
        # the cache holds centered rows (windows included), rotated
        kt, _ = V.transformed_kv(k, v, t)
        if "k" in sides:
            assert torch.allclose(kt, torch.einsum("thd,de->the", k - mu_k[0].float(), had), atol=1e-4)
    # quantized, centering K with the right mean shrinks the error of a biased K
    ks = V.QuantSpec("mse", 0.0)
    t = V.with_means(base, k.mean(0, keepdim=True).double(), None)[0]
    err_c = (V.variant_attention(q, k, v, t, ks, None, pos, sink=4, recent=8) - want).norm()
    err_u = (V.variant_attention(q, k, v, base[0], ks, None, pos, sink=4, recent=8) - want).norm()
    assert err_c < err_u


def tiny_setup(tmp_path, cal):
    """An ``experiments.Setup`` on a tiny random Llama (no download), calibration sequences ``cal``."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import experiments as E
    from vllm_oscar.calibrate.models import model_info

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=1024, architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(cfg).eval()
    setup = E.Setup.__new__(E.Setup)
    setup.lm, setup.info = SimpleNamespace(model=model), model_info(model.config, "test/tiny", None)
    setup.work, setup._cal, setup._channel, setup._captures = tmp_path, cal, None, None
    setup._stats = setup._per_head = setup._imp_v = None
    return setup


def test_channel_means_come_from_the_calibration_sequences_only(tmp_path):
    from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, layer_index

    cal = torch.randint(0, 97, (3, 90))
    setup = tiny_setup(tmp_path, cal)
    model = setup.lm.model
    grabbed = {0: [], 1: []}

    def grab(module, q, k, v):
        grabbed[layer_index(module)].append((k[0].transpose(0, 1).double(), v[0].transpose(0, 1).double()))
        return causal_sdpa(module, q, k, v)

    with attention_override(model, grab), torch.inference_mode():
        for s in cal:
            model(s[None])
    tr = setup.channel_centered("hadamard", "mean64", "kv")
    for i in range(2):
        ks = torch.cat([k[64:] for k, _ in grabbed[i]])
        vs = torch.cat([v[64:] for _, v in grabbed[i]])
        assert torch.allclose(tr[i].k_mean.double(), ks.mean(0), atol=1e-5)
        assert torch.allclose(tr[i].v_mean.double(), vs.mean(0), atol=1e-5)
    assert (tmp_path / "channel-stats.pt").is_file()  # cached; a fresh setup reloads the same means
    setup._channel = None
    assert torch.equal(setup.channel_centered("hadamard", "mean64", "k")[1].k_mean, tr[1].k_mean)
    assert setup.channel_centered("hadamard", "mean64", "k")[1].v_mean is None


def test_selected_centering_keeps_a_mean_only_where_the_calibration_proxy_drops(tmp_path):
    from vllm_oscar.calibrate import experiments as E

    setup = tiny_setup(tmp_path, torch.randint(0, 97, (12, 600)))
    mse = V.QuantSpec("mse", 0.0)
    var = V.AttentionVariant(k=mse, v=mse, sink=4, recent=16)
    sel = setup.channel_selected("hadamard", "mean", var)
    base, full = setup.orthogonal("hadamard"), setup.channel_centered("hadamard", "mean", "kv")
    caps, w_os = setup.captures(), E.o_proj_weights(setup.lm.model)
    for side, v_ in (("k", V.AttentionVariant(k=mse, v=None, sink=4, recent=16)),
                     ("v", V.AttentionVariant(k=None, v=mse, sink=4, recent=16))):
        e0 = E.proxy_errors(caps, base, v_, w_os, 0.25)
        e1 = E.proxy_errors(caps, full, v_, w_os, 0.25)
        for i, t in enumerate(sel):
            mu = t.k_mean if side == "k" else t.v_mean
            want = (full[i].k_mean if side == "k" else full[i].v_mean) if e1[i] < e0[i] else None
            assert (mu is None and want is None) or torch.equal(mu, want)


# ---- attention-aware (weighted) grid fit ------------------------------------------------------------


def _weighted_err(x, c, s, o, w):
    return (((c.float() * s[..., None] + o[..., None]) - x) ** 2 * w).sum(-1)


@pytest.mark.parametrize("heavy", [False, True])
def test_weighted_fit_lowers_the_weighted_error(heavy):
    g = torch.Generator().manual_seed(3)
    x = rows(n=256, heavy=heavy).reshape(64, 4, 64)
    w = torch.exp(1.5 * torch.randn(4, 64, generator=g))  # per (head, dimension), like query moments
    err = {}
    for mode in ("none", "fit", "fit_select"):
        c, s, o = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, "fp16", weighting=mode), w)
        # codes stay nearest-level against the stored pair whatever the weights
        lv = torch.arange(4.0) * s[..., None] + o[..., None]
        dist = (x[..., None] - lv[..., None, :]).abs()
        assert torch.all(dist.gather(-1, c.long()[..., None])[..., 0] <= dist.amin(-1) + 1e-5 * s[..., None])
        err[mode] = _weighted_err(x, c, s, o, w)
    assert err["fit"].sum() < 0.95 * err["none"].sum()
    assert err["fit_select"].sum() < err["fit"].sum()
    # the weighted choice keeps, per row, the best weighted candidate: at least as good on most rows
    assert (err["fit_select"] <= err["none"] * (1 + 1e-5)).float().mean() > 0.9


@pytest.mark.parametrize("fmt", ["fp16", "log8_i8", "log8_sym"])
def test_uniform_weights_give_the_unweighted_fit_exactly(fmt):
    x = rows(n=128, heavy=True).reshape(32, 4, 64)
    want = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, fmt))
    for mode in ("fit", "fit_select"):
        got = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, fmt, weighting=mode), torch.ones(4, 64))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # a constant weight is the same fit up to rounding
    c, s, _ = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, fmt, weighting="fit"), torch.full((4, 64), 3.7))
    assert (c == want[0]).float().mean() > 0.999 and torch.allclose(s, want[1], rtol=1e-3)
    # the full quadratic form with M = I is the unweighted fit too (other arithmetic)
    if fmt != "log8_sym":
        c, s, _ = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, fmt, weighting="full"), torch.eye(64))
        assert (c == want[0]).float().mean() > 0.999 and torch.allclose(s, want[1], rtol=1e-3)


def test_full_weighting_lowers_the_quadratic_form():
    g = torch.Generator().manual_seed(4)
    x = rows(n=256, heavy=True).reshape(64, 4, 64)
    u = torch.randn(4, 64, 64, generator=g)
    m = u @ u.transpose(-1, -2) / 64 + torch.diag_embed(torch.rand(4, 64, generator=g))
    e = {}
    for mode, w in (("none", None), ("full", m)):
        c, s, o = V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, "fp16", weighting=mode), w)
        r = c.float() * s[..., None] + o[..., None] - x
        e[mode] = (torch.matmul(r.unsqueeze(-2), m).squeeze(-2) * r).sum(-1)
    assert e["full"].sum() < 0.99 * e["none"].sum()
    assert (e["full"] <= e["none"] * (1 + 1e-5)).float().mean() > 0.8


def test_weighting_needs_weights_and_the_mse_grid():
    x = rows(n=4)
    with pytest.raises(ValueError):
        V.quantize_rows_variant(x, V.QuantSpec("mse", 0.0, weighting="fit"))
    with pytest.raises(ValueError):
        V.quantize_rows_variant(x, V.QuantSpec("minmax", 0.0, weighting="fit"), torch.ones(64))
    q, k, v = qkv()
    had = ref.hadamard(16, torch.float32)
    t = V.LayerTransform.orthogonal(had, had, 2)
    with pytest.raises(ValueError):
        V.variant_attention(q, k, v, t, V.QuantSpec("mse", weighting="fit"), None, torch.arange(40), sink=4, recent=8)


def test_query_weights_are_the_query_moments_of_the_stored_basis():
    g = torch.Generator().manual_seed(5)
    d, h = 16, 2
    a = torch.randn(2, h, d, d, generator=g, dtype=torch.float64)
    sq = a @ a.transpose(-1, -2) + 0.5 * torch.ones(d, d, dtype=torch.float64)  # [L, Hkv, d, d], mean-dominated
    u = V.query_eigenbasis(sq)
    tr = [V.LayerTransform.orthogonal(u[i].float(), u[i].float(), h) for i in range(2)]
    w = V.query_weights(sq, tr)
    lam = torch.linalg.eigvalsh(sq).flip(-1)  # descending, as the eigenbasis' columns
    assert torch.allclose(w.double(), (lam / lam.mean(-1, keepdim=True)).clamp(min=1e-3), atol=1e-4)
    m = V.query_moment_matrix(sq, tr)  # diagonal in the eigenbasis: the diagonal weights are exact there
    assert torch.allclose(m, torch.diag_embed(torch.diagonal(m, dim1=-2, dim2=-1)), atol=1e-4)
    # any other basis: diag(R^T Sigma R), mean 1
    had = ref.hadamard(d, torch.float32)
    trh = [V.LayerTransform.orthogonal(had, had, h) for _ in range(2)]
    wh = V.query_weights(sq, trh)
    want = torch.diagonal(had.double().T @ sq @ had.double(), dim1=-2, dim2=-1)
    assert torch.allclose(wh.double(), want / want.mean(-1, keepdim=True), atol=1e-5)


def test_variant_attention_fn_with_a_kv_cache_reads_the_last_positions(monkeypatch):
    """``make_variant_attention`` with fewer queries than keys (decode with a KV cache): the queries are
    the last positions, so the result equals the last rows of the full computation."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import capture

    q, k, v = qkv(t=48)
    had = ref.hadamard(16, torch.float32)
    tr = [V.LayerTransform.orthogonal(had, had, 2)]
    mse = V.QuantSpec("mse", 0.0)
    monkeypatch.setattr(capture, "layer_index", lambda m: 0)
    fn = V.make_variant_attention(tr, V.AttentionVariant(k=mse, v=mse, sink=4, recent=8))
    module = SimpleNamespace(scaling=0.25)
    full = fn(module, *(x.transpose(0, 1)[None] for x in (q, k, v)))
    last = fn(module, q[-3:].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    assert torch.allclose(last[0], full[0, -3:], atol=1e-5)


def test_weighted_fit_weights_come_from_the_calibration_queries_only(tmp_path):
    from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, layer_index

    cal = torch.randint(0, 97, (2, 40))
    setup = tiny_setup(tmp_path, cal)
    qs = {0: [], 1: []}

    def grab(module, q, k, v):
        qs[layer_index(module)].append(q[0].transpose(0, 1).double())
        return causal_sdpa(module, q, k, v)

    with attention_override(setup.lm.model, grab), torch.inference_mode():
        for s in cal:
            setup.lm.model(s[None])
    for kind in ("hadamard", "qeig"):
        tr = setup.weighted(kind, v=True)
        for i in range(2):
            sq = ref.query_second_moments(torch.cat(qs[i]), 2)  # brute force over the calibration tokens
            kq = tr[i].k_query.double()
            want = torch.diagonal(kq.transpose(-1, -2) @ sq @ kq, dim1=-2, dim2=-1)
            want = (want / want.mean(-1, keepdim=True)).clamp(min=1e-3)
            assert torch.allclose(tr[i].k_weight.double(), want, atol=1e-4)
            assert tr[i].v_weight.shape == (2, 16)


def decode_case(seed, tq, hq, hkv, d, tkv):
    """Decode-style inputs (the queries are the last ``tq`` positions) with a Hadamard transform and the fp16
    MSE grid, plus the rows a brute-force check reads: ``kt, vt`` exact and ``kq, vq`` quantized."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, hq, d, generator=g)
    k, v = torch.randn(tkv, hkv, d, generator=g), torch.randn(tkv, hkv, d, generator=g)
    had = ref.hadamard(d, torch.float32)
    spec = V.QuantSpec("mse", 0.0, "fp16")
    kt, vt = k @ had, v @ had
    rows = {"kt": kt, "vt": vt, "kq": V.fake_quantize_variant(kt, spec), "vq": V.fake_quantize_variant(vt, spec)}
    return q, k, v, had, V.LayerTransform.orthogonal(had, had, hkv), spec, torch.arange(tkv - tq, tkv), rows


def test_logit_variance_correction_matches_explicit_logits():
    """``k_logit_var``: INT2 keys' logits lose ``lambda/2 * scale^2 * |q|^2 * mean((k - k_hat)^2)``;
    window keys are untouched. Checked against softmax over explicitly written logits."""
    tq, hq, hkv, d, tkv, sink, recent, lam, scale = 5, 4, 2, 8, 14, 2, 3, 0.7, 0.3
    q, k, v, had, t, spec, pos, r = decode_case(3, tq, hq, hkv, d, tkv)
    got = V.variant_attention(q, k, v, t, spec, spec, pos, sink=sink, recent=recent, scale=scale, k_logit_var=lam)

    kt, vt, kq, vq = r["kt"], r["vt"], r["kq"], r["vq"]
    err = (kt - kq).square().mean(-1)  # [Tkv, Hkv]
    causal, exact = ref.exact_window_mask(pos, tkv, sink, recent)
    want = torch.empty(tq, hq, d)
    for i, h in itertools.product(range(tq), range(hq)):
        j = h // (hq // hkv)
        qi = q[i, h] @ had
        logits = torch.empty(tkv)
        for n in range(tkv):
            if exact[i, n]:
                logits[n] = scale * (qi @ kt[n, j])
            else:
                logits[n] = scale * (qi @ kq[n, j]) - 0.5 * lam * scale**2 * (qi @ qi) * err[n, j]
        p = torch.softmax(logits.masked_fill(~causal[i], float("-inf")), 0)
        vals = torch.where(exact[i, :, None], vt[:, j], vq[:, j])
        want[i, h] = (p @ vals) @ had.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = V.variant_attention(q, k, v, t, spec, spec, pos, sink=sink, recent=recent, scale=scale)
    assert (got - plain).abs().max() > 1e-3  # the correction is not a no-op here
    with pytest.raises(ValueError, match="quantized K"):
        V.variant_attention(q, k, v, t, None, spec, pos, sink=sink, recent=recent, k_logit_var=lam)


def test_one_side_unquantized_variant_attributes_the_error():
    """k=None / v=None keep that side at 16 bits: attention equals quantizing only the other side, the
    config says "exact", and the bits count 16 for that side outside the windows."""
    q, k, v = qkv(d=16)
    t = V.LayerTransform(torch.eye(16).expand(2, 16, 16), torch.eye(16).expand(2, 16, 16))
    pos = torch.arange(q.shape[0])
    mse = V.QuantSpec("mse")
    for var, kspec, vspec in ((V.AttentionVariant(k=mse, v=None), mse, None),
                              (V.AttentionVariant(k=None, v=mse), None, mse)):
        ks, vs = var.specs(0)
        assert (ks, vs) == (kspec, vspec)
        got = V.variant_attention(q, k, v, t, ks, vs, pos, sink=4, recent=8)
        both = V.variant_attention(q, k, v, t, mse, mse, pos, sink=4, recent=8)
        exact = V.variant_attention(q, k, v, t, None, None, pos, sink=4, recent=8)
        # one side's error: between exact and both sides quantized, and not either of them
        assert not torch.allclose(got, both) and not torch.allclose(got, exact)
        assert (got - exact).norm() < (both - exact).norm()
    cfg = V.AttentionVariant(k=mse, v=None).config()
    assert cfg["v"] == "exact" and cfg["k"]["levels"] == "mse"
    # d=64, 32K: K 2 + 32/64 bits, V 16 bits outside the 320 window tokens
    bits = V.AttentionVariant(k=mse, v=None).bits(64, 32768)
    assert bits == pytest.approx((320 * 16 + (32768 - 320) * (2.5 + 16) / 2) / 32768)
    with pytest.raises(ValueError, match="v_clips needs a quantized v side"):
        V.AttentionVariant(v=None, v_clips=(0.9,))
    with pytest.raises(ValueError, match="k_logit_var needs a quantized K side"):
        V.AttentionVariant(k=None, k_logit_var=0.4)


def test_variant_config_records_every_setting_that_changes_results():
    var = V.AttentionVariant(k=V.QuantSpec("mse", 0.0, "log8_i8"), recent=512, k_clips=(0.9, 0.8), k_logit_var=0.4)
    cfg = var.config()
    assert cfg["k"]["params"] == "log8_i8" and cfg["recent"] == 512 and cfg["k_clips"] == (0.9, 0.8)
    assert cfg["k_logit_var"] == 0.4 and cfg["v"] == V.QuantSpec(clip=0.92).__dict__
    pinned = V.AttentionVariant(pin_tokens=32, pin_window=16, pin_pool=7, pin_rule="window_exit").config()
    assert (pinned["pin_tokens"], pinned["pin_window"], pinned["pin_pool"]) == (32, 16, 7)
    assert pinned["pin_rule"] == "window_exit"
    with pytest.raises(ValueError, match="'prompt' or 'window_exit'"):
        V.AttentionVariant(pin_tokens=8, pin_rule="exit")


def test_pinned_keys_are_read_exactly_by_every_query():
    """``variant_attention(pinned=...)``: a pinned key is read from the exact rows, per KV head, on top of
    each query's windows. Checked against softmax over explicitly chosen rows."""
    tq, hq, hkv, d, tkv, sink, recent, scale = 3, 4, 2, 8, 20, 2, 3, 0.3
    q, k, v, had, t, spec, pos, r = decode_case(5, tq, hq, hkv, d, tkv)
    pinned = torch.zeros(hkv, tkv, dtype=torch.bool)
    pinned[0, [5, 9]] = True
    pinned[1, 7] = True
    got = V.variant_attention(q, k, v, t, spec, spec, pos, sink=sink, recent=recent, scale=scale, pinned=pinned)

    kt, vt, kq, vq = r["kt"], r["vt"], r["kq"], r["vq"]
    causal, window = ref.exact_window_mask(pos, tkv, sink, recent)
    want = torch.empty(tq, hq, d)
    for i, h in itertools.product(range(tq), range(hq)):
        j = h // (hq // hkv)
        exact = window[i] | pinned[j]
        qi = q[i, h] @ had
        logits = scale * torch.where(exact, kt[:, j] @ qi, kq[:, j] @ qi)
        p = torch.softmax(logits.masked_fill(~causal[i], float("-inf")), 0)
        want[i, h] = (p @ torch.where(exact[:, None], vt[:, j], vq[:, j])) @ had.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = V.variant_attention(q, k, v, t, spec, spec, pos, sink=sink, recent=recent, scale=scale)
    assert (got - plain).abs().max() > 1e-3  # pinning changed something here


def test_pin_scores_and_mask():
    """pin_scores sums the last ``window`` queries' exact softmax weights per KV head; pin_mask takes the top
    positions outside the sink and the recent window only."""
    g = torch.Generator().manual_seed(6)
    t, hq, hkv, d, w, scale = 12, 4, 2, 8, 3, 0.4
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    got = V.pin_scores(q, k, scale, w)
    want = torch.zeros(hkv, t, dtype=torch.float64)
    for i, h in itertools.product(range(t - w, t), range(hq)):
        logits = (k[: i + 1, h // 2].double() @ q[i, h].double()) * scale
        want[h // 2, : i + 1] += torch.softmax(logits, 0)
    torch.testing.assert_close(got, want)
    pooled = V.pin_scores(q, k, scale, w, pool=3)
    torch.testing.assert_close(pooled[:, 5], want[:, 4:7].mean(1))
    torch.testing.assert_close(pooled[:, 0], want[:, :2].mean(1))  # the edge averages what exists
    with pytest.raises(ValueError, match="odd"):
        V.pin_scores(q, k, scale, w, pool=4)

    scores = torch.arange(10.0).repeat(2, 1)
    scores[1, 1] = scores[1, 9] = 100.0  # in the sink / the recent window: never chosen
    scores[1, 3] = 50.0
    mask = V.pin_mask(scores, 2, sink=2, recent=3)  # candidates: positions 2..6
    assert mask[0].nonzero().flatten().tolist() == [5, 6]
    assert mask[1].nonzero().flatten().tolist() == [3, 6]
    assert V.pin_mask(scores, 99, sink=2, recent=3).sum(1).tolist() == [5, 5]


def test_pinning_attention_fn_picks_tokens_from_the_observed_prefill(monkeypatch):
    """With ``pin_tokens`` the attention function pins what ``observe_prefill`` chose from the prompt and
    refuses a whole-sequence pass (no exact prefill to choose from)."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import capture

    q, k, v = qkv(t=40)
    had = ref.hadamard(16, torch.float32)
    tr = [V.LayerTransform.orthogonal(had, had, 2)]
    mse = V.QuantSpec("mse", 0.0)
    var = V.AttentionVariant(k=mse, v=mse, sink=4, recent=8, pin_tokens=3, pin_window=5)
    monkeypatch.setattr(capture, "layer_index", lambda m: 0)
    fn = V.make_variant_attention(tr, var)
    module = SimpleNamespace(scaling=0.25)
    heads_first = lambda x: x.transpose(0, 1)[None]
    with pytest.raises(ValueError, match="exact prompt prefill"):
        fn(module, heads_first(q), heads_first(k), heads_first(v))
    n = 36  # the prompt; the last 4 positions are decode steps
    fn.observe_prefill(module, heads_first(q[:n]), heads_first(k[:n]))
    got = fn(module, heads_first(q[n:]), heads_first(k), heads_first(v))[0]
    chosen = V.pin_mask(V.pin_scores(q[:n], k[:n], 0.25, 5), 3, 4, 8)
    assert chosen.sum().item() == 6  # 3 per KV head
    pinned = torch.cat([chosen, torch.zeros(2, 4, dtype=torch.bool)], 1)
    want = V.variant_attention(q[n:], k, v, tr[0], mse, mse, torch.arange(n, 40), sink=4, recent=8, scale=0.25,
                               pinned=pinned)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pool", [1, 3])
def test_window_exit_pin_mask_matches_a_per_query_brute_force(pool):
    """``window_exit_pin_mask``: for every query, the ``count`` keys that have left its window (and whose
    pooled neighbours have too) with the most exact attention received while in the window; earlier key on
    ties. Brute force: explicit loops over queries, heads and keys."""
    g = torch.Generator().manual_seed(11)
    t, hq, hkv, d, sink, recent, count, scale = 30, 4, 2, 8, 3, 5, 4, 0.5
    q, k = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g)
    got = V.window_exit_pin_mask(q, k, scale, count, sink, recent, pool)

    received = torch.zeros(hkv, t, dtype=torch.float64)
    for p, h in itertools.product(range(t), range(hq)):
        w = torch.softmax((k[: p + 1, h // 2].double() @ q[p, h].double()) * scale, 0)
        for j in range(max(0, p - recent + 1), p + 1):  # keys in query p's recent window
            received[h // 2, j] += w[j]
    half = pool // 2
    score = torch.stack([received[:, max(0, j - half): j + half + 1].mean(1) for j in range(t)], 1)
    want = torch.zeros(hkv, t, t, dtype=torch.bool)
    for h, p in itertools.product(range(hkv), range(t)):
        ranked = sorted(range(sink, p - recent - half + 1), key=lambda j: (-score[h, j].item(), j))
        want[h, p, ranked[:count]] = True
    assert torch.equal(got, want)
    assert want[:, -1].sum(1).tolist() == [count, count]  # the last query has a full set
    assert not want[:, : sink + recent + half].any()  # nothing has left the window yet


def test_window_exit_pinning_runs_over_whole_sequences_only(monkeypatch):
    """The attention function with ``pin_rule="window_exit"`` equals ``variant_attention`` with the per-query
    mask, needs no prefill observer, and refuses a cached decode step."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import capture

    q, k, v = qkv(t=40)
    had = ref.hadamard(16, torch.float32)
    tr = [V.LayerTransform.orthogonal(had, had, 2)]
    mse = V.QuantSpec("mse", 0.0)
    var = V.AttentionVariant(k=mse, v=mse, sink=4, recent=8, pin_tokens=3, pin_rule="window_exit")
    monkeypatch.setattr(capture, "layer_index", lambda m: 0)
    fn = V.make_variant_attention(tr, var)
    assert not hasattr(fn, "observe_prefill")
    module = SimpleNamespace(scaling=0.25)
    heads_first = lambda x: x.transpose(0, 1)[None]
    got = fn(module, heads_first(q), heads_first(k), heads_first(v))[0]
    pinned = V.window_exit_pin_mask(q, k, 0.25, 3, 4, 8)
    want = V.variant_attention(q, k, v, tr[0], mse, mse, torch.arange(40), sink=4, recent=8, scale=0.25,
                               pinned=pinned)
    torch.testing.assert_close(got, want)
    plain = V.variant_attention(q, k, v, tr[0], mse, mse, torch.arange(40), sink=4, recent=8, scale=0.25)
    assert (got - plain).abs().max() > 1e-4  # pinning changed something here
    with pytest.raises(ValueError, match="whole sequences"):
        fn(module, heads_first(q[-1:]), heads_first(k), heads_first(v))


def test_the_perplexity_sweep_refuses_and_skips_passkey_only_variants():
    """Pinned-token variants need an exact prompt prefill: naming one in the sweep is refused before any
    model loads; the default list (every variant) leaves them out."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import experiments as E

    registry = E.variant_registry()
    assert {n for n, spec in registry.items() if spec["passkey_only"]} >= {"hadamard_mse_pin128_pool7"}
    with pytest.raises(SystemExit, match=r"hadamard_mse_pin32.*calibrate.passkey"):
        E.run_sweep(SimpleNamespace(variants="hadamard_mse,hadamard_mse_pin32"))


def test_screens_update_their_own_entry_of_the_results_file(tmp_path):
    from vllm_oscar.calibrate import experiments as E

    out = tmp_path / "r.json"
    out.write_text('{"variants": {"a": 1}, "weighted_fit_screen": {"variants": {"x": 1}}}')
    E._write_screen(out, "weighted_fit_screen", lambda old: {"variants": {**old["variants"], "y": 2}})
    E._write_screen(out, "channel_centering_screen", lambda old: {"seen": old})
    assert json.loads(out.read_text()) == {"variants": {"a": 1}, "weighted_fit_screen": {"variants": {"x": 1, "y": 2}},
                                           "channel_centering_screen": {"seen": {}}}


def test_code_widths_other_than_two_bits():
    """QuantSpec.bits: codes span 2^bits levels, the MSE fit improves with each bit, the bit count reaches the
    storage cost, and the 2-bit-only rules refuse other widths."""
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(3))
    errs = []
    for b in (1, 2, 3, 4):
        spec = V.QuantSpec("mse", params="log8_i8", bits=b)
        codes, s, o = V.quantize_rows_variant(x, spec)
        assert int(codes.max()) <= (1 << b) - 1 and int(codes.min()) >= 0
        assert int(codes.max()) == (1 << b) - 1  # the grid uses its top level
        errs.append(float(((codes.float() * s[:, None] + o[:, None] - x) ** 2).mean()))
    assert errs[0] > 2.5 * errs[1] > 2.5 * 2.5 * errs[2] > 2.5 ** 3 * errs[3]
    # 2 bits is the default and unchanged: identical to the spec without the field
    two = V.quantize_rows_variant(x, V.QuantSpec("mse", params="log8_i8", bits=2))
    default = V.quantize_rows_variant(x, V.QuantSpec("mse", params="log8_i8"))
    assert all(torch.equal(a, b) for a, b in zip(two, default))
    minmax3 = V.quantize_rows_variant(x, V.QuantSpec("minmax", bits=3))[0]
    assert int(minmax3.max()) == 7
    k3v1 = V.AttentionVariant(k=V.QuantSpec("mse", params="log8_i8", bits=3),
                              v=V.QuantSpec("mse", params="log8_i8", bits=1))
    k2v2 = V.AttentionVariant(k=V.QuantSpec("mse", params="log8_i8"), v=V.QuantSpec("mse", params="log8_i8"))
    assert k3v1.bits(64, 32768) == k2v2.bits(64, 32768)
    assert V.AttentionVariant(k=V.QuantSpec("mse", params="log8_i8", bits=3), v=k2v2.v).bits(64, 32768) > \
        k2v2.bits(64, 32768) + 0.45
    for bad in ({"bits": 5}, {"levels": "lm", "bits": 3}, {"levels": "mse", "params": "log8_sym", "bits": 1}):
        with pytest.raises(ValueError):
            V.QuantSpec(**bad)


def test_per_channel_token_groups_match_a_loop_over_groups_and_channels():
    """QuantSpec.token_group: each channel's values over positions [sink + m G, sink + (m+1) G) (the last group
    partial) are quantized as one row by the row quantizer; positions < sink are left as they are."""
    t, h, d, sink, g = 45, 2, 8, 5, 16  # groups [5, 21), [21, 37), [37, 45)
    x = torch.randn(t, h, d, generator=torch.Generator().manual_seed(7)) * torch.linspace(0.2, 5, d) + 3.0
    for levels, clip, fmt in (("minmax", 0.0, "fp16"), ("mse", 0.0, "fp16"), ("mse", 0.0, "log8_i8"),
                              ("minmax", 0.9, "bf16")):
        spec = V.QuantSpec(levels, clip, fmt, token_group=g)
        got = V.fake_quantize_positions(x, spec, sink)
        want = x.clone()
        for start in range(sink, t, g):
            stop = min(start + g, t)
            for head in range(h):
                for c in range(d):
                    row = x[start:stop, head, c][None]
                    codes, s, o = V.quantize_rows_variant(row, replace(spec, token_group=0))
                    want[start:stop, head, c] = (codes.float() * s[:, None] + o[:, None])[0]
        assert torch.equal(got[:sink], x[:sink])
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
        assert not torch.allclose(got[sink:], x[sink:], atol=1e-3)  # it does quantize
    # token_group 0 is the per-row quantizer, and the per-row entry point refuses groups
    spec = V.QuantSpec("mse")
    assert torch.equal(V.fake_quantize_positions(x, spec, sink), V.fake_quantize_variant(x, spec))
    with pytest.raises(ValueError, match="fake_quantize_positions"):
        V.fake_quantize_variant(x, V.QuantSpec("mse", token_group=g))
    with pytest.raises(ValueError, match="per-channel groups"):
        V.QuantSpec("mse", token_group=g, weighting="fit")


def test_per_channel_token_groups_are_aligned_at_the_sink_and_causal():
    """The groups start at the sink (a value moved inside one group changes the pairs of that group only), and
    with recent >= G every group a query reads from INT2 lies wholly in its past: changing a later token never
    changes an earlier query's output. recent < G is refused."""
    t, sink, g, recent = 40, 4, 8, 8
    q, k, v = qkv(t=t, d=16)
    spec = V.QuantSpec("minmax", 0.0, "fp32", token_group=g)
    k2 = k.clone()
    k2[sink + g + 3] += 50.0  # inside group 1 = [12, 20)
    a, b = V.fake_quantize_positions(k, spec, sink), V.fake_quantize_positions(k2, spec, sink)
    changed = (a != b).any(-1).any(-1).nonzero().flatten().tolist()
    assert changed == list(range(sink + g, sink + 2 * g))
    t_id = V.LayerTransform(torch.eye(16).expand(2, 16, 16), torch.eye(16).expand(2, 16, 16))
    pos = torch.arange(t)
    base = V.variant_attention(q, k, v, t_id, spec, spec, pos, sink=sink, recent=recent)
    for p in (20, 27, 33):  # perturb token p: queries before p must not move
        k3, v3 = k.clone(), v.clone()
        k3[p] += 7.0
        v3[p] -= 7.0
        o = V.variant_attention(q, k3, v3, t_id, spec, spec, pos, sink=sink, recent=recent)
        assert torch.equal(o[:p], base[:p])
        assert not torch.allclose(o[p:], base[p:])
    # the groups are read from INT2: not the same as per-row quantization
    row = V.variant_attention(q, k, v, t_id, replace(spec, token_group=0), spec, pos, sink=sink, recent=recent)
    assert not torch.allclose(row, base)
    with pytest.raises(ValueError, match="recent >= token_group"):
        V.variant_attention(q, k, v, t_id, replace(spec, token_group=16), None, pos, sink=sink, recent=recent)
    with pytest.raises(ValueError, match="recent >= token_group"):
        V.AttentionVariant(k=V.QuantSpec("mse", token_group=128), recent=64)
    with pytest.raises(ValueError, match="recent >= token_group"):
        V.AttentionVariant(v=V.QuantSpec("mse", token_group=512))


def test_bits_per_element_of_per_channel_token_groups():
    """A grouped side stores one pair per channel and G tokens (param_bits / G per element) on whole groups
    (a group is stored once its first token leaves the recent window)."""
    mse = V.QuantSpec("mse")
    kivi = V.AttentionVariant(k=replace(mse, token_group=128), v=mse)
    ctx, n = 32768, 32768 - 320  # 32448 tokens outside the windows: 253.5 groups of 128 -> 254 stored
    k_bits = 254 * 128 * (2 + 32 / 128)
    v_bits = n * (2 + 32 / 64)
    assert kivi.bits(64, ctx) == pytest.approx((320 * 16 * 2 + k_bits + v_bits) / (2 * ctx))
    assert kivi.bits(64, ctx) == pytest.approx(2.5103, abs=1e-4)
    assert V.AttentionVariant(k=mse, v=mse).bits(64, ctx) == pytest.approx(2.6318, abs=1e-4)  # per row
    # G = head_dim costs what per-row pairs cost, up to the partial group held twice
    g64 = V.AttentionVariant(k=replace(mse, token_group=64), v=mse).bits(64, ctx)
    assert g64 == pytest.approx(V.AttentionVariant(k=mse, v=mse).bits(64, ctx))  # 32448 = 507 * 64 exactly
    # both sides grouped, no partial groups: 2 + 32/G bits outside the windows
    both = V.AttentionVariant(k=replace(mse, token_group=128), v=replace(mse, token_group=128))
    assert both.bits(64, 64 + 256 + 128 * 100) == pytest.approx((320 * 16 + 12800 * 2.25) / 13120)
    short = V.bits_per_element(64, 1000, sink=64, recent=256, param_bits=32, token_group=(128, 0))
    assert short == pytest.approx((320 * 16 * 2 + 6 * 128 * 2.25 + 680 * 2.5) / 2000)  # 680 tokens: 6 groups
    assert V.bits_per_element(64, 300, sink=64, recent=256, param_bits=32, token_group=(128, 128)) == 16


# ---- per-layer K code widths (3-bit keys in a few layers) -----------------------------------------


def test_per_layer_k_bits_give_each_layer_its_own_key_width():
    log8 = V.QuantSpec("mse", params="log8_i8")
    var = V.AttentionVariant(k=log8, v=log8, k_bits=(2, 3, 2, 4), k_clips=(0.0, 0.9, 0.0, 0.0))
    for i, b in enumerate((2, 3, 2, 4)):
        k, v = var.specs(i)
        assert k == replace(log8, bits=b, clip=(0.0, 0.9, 0.0, 0.0)[i]) and v == log8
    assert var.config()["k_bits"] == (2, 3, 2, 4)
    assert V.AttentionVariant(k=log8, v=log8).specs(0) == (log8, log8)  # no override: unchanged
    # layer choice helpers
    assert V.even_layers(30, 6) == (2, 7, 12, 17, 22, 27)
    assert V.top_layers([0.1, 0.5, 0.3, 0.5, 0.0], 3) == (1, 2, 3)
    assert V.top_layers([0.2, 0.2, 0.1], 1) == (0,)  # ties: the lower layer
    assert V.layer_bits(5, (1, 4)) == (2, 3, 2, 2, 3)
    with pytest.raises(ValueError, match="outside 0..4"):
        V.layer_bits(5, (5,))


def test_per_layer_k_bits_are_validated():
    log8 = V.QuantSpec("mse", params="log8_i8")
    with pytest.raises(ValueError, match="k_bits needs a quantized K side"):
        V.AttentionVariant(k=None, v=log8, k_bits=(2, 3))
    with pytest.raises(ValueError, match=r"k_bits \[5, 0\] are not code widths"):
        V.AttentionVariant(k=log8, v=log8, k_bits=(2, 5, 0))
    with pytest.raises(ValueError, match="empty tuple"):
        V.AttentionVariant(k=log8, v=log8, k_bits=())
    with pytest.raises(ValueError, match="cannot take 3-bit codes"):  # Lloyd-Max is a 2-bit rule
        V.AttentionVariant(k=V.QuantSpec("lm"), v=log8, k_bits=(2, 3))
    with pytest.raises(ValueError, match="must cover the same layers"):
        V.AttentionVariant(k=log8, v=log8, k_bits=(2, 3), k_clips=(0.9,))
    var = V.AttentionVariant(k=log8, v=log8, k_bits=(2, 3, 2))
    with pytest.raises(ValueError, match="k_bits has 3 entries but the model has 2 layers"):
        var.bits(64, 4096, num_layers=2)
    had = ref.hadamard(16, torch.float32)
    with pytest.raises(ValueError, match="k_bits has 3 entries but the model has 2 layers"):
        V.make_variant_attention([V.LayerTransform.orthogonal(had, had, 2)] * 2, var)


def test_per_layer_k_bits_average_the_storage_over_layers():
    log8 = V.QuantSpec("mse", params="log8_i8")
    plain = V.AttentionVariant(k=log8, v=log8)
    k3v2 = V.AttentionVariant(k=replace(log8, bits=3), v=log8)
    for ctx in (2048, 4096, 32768):
        assert V.AttentionVariant(k=log8, v=log8, k_bits=(3,) * 30).bits(64, ctx) == pytest.approx(k3v2.bits(64, ctx))
        assert V.AttentionVariant(k=log8, v=log8, k_bits=(2,) * 30).bits(64, ctx, 30) == pytest.approx(
            plain.bits(64, ctx))
        six = V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, V.even_layers(30, 6)))
        assert six.bits(64, ctx) == pytest.approx((24 * plain.bits(64, ctx) + 6 * k3v2.bits(64, ctx)) / 30)
    # the budget: 6 of 30 layers with 3-bit keys fit in 2.5 bits at 32K (head_dim 64), 8 do not
    assert plain.bits(64, 32768) == pytest.approx(2.3843, abs=1e-4)
    assert V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, range(6))).bits(64, 32768) == \
        pytest.approx(2.4833, abs=1e-4)
    assert V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, range(8))).bits(64, 32768) > 2.5
    assert plain.bits(64, 32768, num_layers=30) == plain.bits(64, 32768)  # old callers: unchanged


def test_per_layer_k_bits_reach_the_attention_of_their_layer(monkeypatch):
    """A 3-bit layer computes what a 3-bit K spec computes, a 2-bit layer what the 2-bit spec does, and the
    sensitivity score is the proxy error's drop from 2- to 3-bit keys per layer."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import capture

    q, k, v = qkv(t=48)
    had = ref.hadamard(16, torch.float32)
    tr = [V.LayerTransform.orthogonal(had, had, 2)] * 2
    log8 = V.QuantSpec("mse", params="log8_i8")
    layer = {"i": 0}
    monkeypatch.setattr(capture, "layer_index", lambda m: layer["i"])
    module = SimpleNamespace(scaling=0.25)
    args = [x.transpose(0, 1)[None] for x in (q, k, v)]
    mixed = V.make_variant_attention(tr, V.AttentionVariant(k=log8, v=log8, sink=4, recent=8, k_bits=(3, 2)))
    for i, b in enumerate((3, 2)):
        layer["i"] = i
        one = V.make_variant_attention(tr, V.AttentionVariant(k=replace(log8, bits=b), v=log8, sink=4, recent=8))
        assert torch.equal(mixed(module, *args), one(module, *args))
    w_o = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    caps = [[(q, k, v), (q, k * 2, v)]]
    base = V.AttentionVariant(k=log8, v=log8, sink=4, recent=8)
    sc = V.k_bits_sensitivity(caps, tr, base, [w_o, w_o], 0.25, q_start=16)
    for i in range(2):
        q_, k_, v_ = caps[0][i]
        e = [V.layer_proxy_error(q_, k_, v_, tr[i], replace(log8, bits=b), log8, w_o, 0.25, sink=4, recent=8,
                                 q_start=16, q_stride=4) for b in (2, 3)]
        assert sc[i] == pytest.approx({"low": e[0], "high": e[1], "drop": e[0] - e[1]})
        assert sc[i]["drop"] > 0  # a third key bit lowers the proxy error


def test_four_bit_key_layers_cost_what_twice_as_many_three_bit_layers_cost():
    """4-bit keys add 2 bits per K element, 3-bit keys 1: k4top3 stores what k3top6 does, k4top2 what k3top4
    does, at every context (head_dim 64, 30 layers), and the mixed variant reaches its 4-bit layers."""
    log8 = V.QuantSpec("mse", params="log8_i8")
    plain = V.AttentionVariant(k=log8, v=log8)
    k4v2 = V.AttentionVariant(k=replace(log8, bits=4), v=log8)
    for ctx in (2048, 4096, 32768):
        for n4, n3 in ((3, 6), (2, 4)):
            k4 = V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, range(n4), high=4))
            k3 = V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, range(n3)))
            assert k4.bits(64, ctx, 30) == pytest.approx(k3.bits(64, ctx, 30), rel=1e-12)
            mean = ((30 - n4) * plain.bits(64, ctx) + n4 * k4v2.bits(64, ctx)) / 30
            assert k4.bits(64, ctx) == pytest.approx(mean)
    k4top3 = V.AttentionVariant(k=log8, v=log8, k_bits=V.layer_bits(30, (3, 18, 20), high=4))
    assert k4top3.bits(64, 32768) == pytest.approx(2.4833, abs=1e-4) and k4top3.bits(64, 32768) <= 2.5
    assert k4top3.specs(18)[0] == replace(log8, bits=4) and k4top3.specs(0)[0] == log8
    # the 2 -> 4 score is the proxy's drop to 4-bit keys, larger than the drop to 3-bit keys
    q, k, v = qkv(t=48)
    had = ref.hadamard(16, torch.float32)
    tr = [V.LayerTransform.orthogonal(had, had, 2)]
    w_o = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    base = V.AttentionVariant(k=log8, v=log8, sink=4, recent=8)
    sc3, sc4 = (V.k_bits_sensitivity([[(q, k, v)]], tr, base, [w_o], 0.25, high=h, q_start=16)[0]
                for h in (3, 4))
    e = [V.layer_proxy_error(q, k, v, tr[0], replace(log8, bits=b), log8, w_o, 0.25, sink=4, recent=8,
                             q_start=16, q_stride=4) for b in (2, 4)]
    assert sc4 == pytest.approx({"low": e[0], "high": e[1], "drop": e[0] - e[1]})
    assert sc4["low"] == sc3["low"] and sc4["drop"] > sc3["drop"] > 0


def test_k4top3_takes_its_layers_from_the_2_to_4_bit_calibration_scores(tmp_path, monkeypatch):
    """The registry's k4 variants rank layers by Setup.k_scores(4) (cached apart from the 3-bit scores, in
    k4-layer-scores.json); the k3 variants keep Setup.k_scores(3). No model: the sensitivity is stubbed."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import experiments as E

    drops = {3: [0.0] * 30, 4: [0.0] * 30}
    for rank, i in enumerate((18, 20, 3, 8, 23, 7)):  # the 3-bit ranking of docs/accuracy.md
        drops[3][i] = 0.2 - 0.01 * rank
    for rank, i in enumerate((5, 29, 11, 18)):  # a different 4-bit ranking, so that a mix-up shows
        drops[4][i] = 0.3 - 0.01 * rank
    calls = []

    def fake_sensitivity(captures, transforms, base, w_os, scale, *, low=2, high=3, q_start=1024, q_stride=4):
        calls.append((low, high, q_start, q_stride, base.k.bits, base.v.bits))
        return [{"low": 1.0, "high": 1.0 - d, "drop": d} for d in drops[high]]

    monkeypatch.setattr(E.V, "k_bits_sensitivity", fake_sensitivity)
    monkeypatch.setattr(E, "o_proj_weights", lambda model: [None] * 30)
    s = object.__new__(E.Setup)  # no model, no calibration text: only what k_scores reads
    s.work, s.info, s.lm, s._captures, s._k_scores = tmp_path, SimpleNamespace(num_layers=30, head_dim=64), \
        SimpleNamespace(model=None), [], {}
    monkeypatch.setattr(s, "orthogonal", lambda which: [None] * 30)
    reg = E.variant_registry()
    k4top3 = reg["hadamard_mse_log8_k4top3"]["variant"](s)
    assert k4top3.k_bits == V.layer_bits(30, (5, 11, 29), high=4)
    assert calls == [(2, 4, 1024, 4, 2, 2)]
    assert reg["hadamard_mse_log8_k4top2"]["variant"](s).k_bits == V.layer_bits(30, (5, 29), high=4)
    k3top6 = reg["hadamard_mse_log8_k3top6"]["variant"](s)
    assert k3top6.k_bits == V.layer_bits(30, (3, 7, 8, 18, 20, 23))
    assert calls == [(2, 4, 1024, 4, 2, 2), (2, 3, 1024, 4, 2, 2)]  # each width scored once
    saved = json.loads((tmp_path / "k4-layer-scores.json").read_text())
    assert saved["drop"] == drops[4] and "proxy_k4" in saved and "proxy_k3" not in saved
    assert json.loads((tmp_path / "k3-layer-scores.json").read_text())["drop"] == drops[3]
    s._k_scores = {}  # a new Setup reads the cache instead of scoring again
    assert s.k_layers("top", 3, 4) == (5, 11, 29) and s.k_layers("top", 6, 3) == (3, 7, 8, 18, 20, 23)
    assert len(calls) == 2
    assert k4top3.bits(64, 32768, 30) == pytest.approx(k3top6.bits(64, 32768, 30), rel=1e-12)
    assert k4top3.bits(64, 32768, 30) <= 2.5


# ---- the served u8 pair (params="u8") -----------------------------------------------------------------


def test_u8_pairs_are_the_served_store_exactly():
    """QuantSpec("mse", 0.0, "u8") is the kernels' u8 store (reference.quantize_int2_mse(params="u8")) bit
    for bit, codes, pair and dequantized rows; other widths round their pair with reference.round_params_u8;
    the pair costs what log8_i8's does."""
    spec = V.QuantSpec("mse", 0.0, "u8")
    for x in (rows(heavy=True), rows(n=48, d=128, seed=1), rows(seed=2).reshape(4, 4, 4, 64)):
        c, s, o = V.quantize_rows_variant(x, spec)
        rc, rs, ro = ref.quantize_int2_mse(x, params="u8")
        assert torch.equal(c, rc) and torch.equal(s, rs) and torch.equal(o, ro)
        assert torch.equal(V.fake_quantize_variant(x, spec), ref.dequantize_int2(rc, rs, ro))
        assert ref.encode_params(s, o, "u8").dtype == torch.uint8  # on the u8 grid
    s0, o0 = torch.rand(200) * 3 + 1e-3, torch.randn(200) * 2
    assert all(torch.equal(a, b) for a, b in zip(V.round_params(s0, o0, "u8"), ref.round_params_u8(s0, o0)))
    x = rows(n=200, heavy=True)
    c3, s3, o3 = V.quantize_rows_variant(x, replace(spec, bits=3))
    assert int(c3.max()) == 7 and torch.equal((s3, o3)[0], ref.round_params_u8(s3, o3)[0])
    assert torch.equal(o3, ref.round_params_u8(s3, o3)[1])
    err2 = float(((V.fake_quantize_variant(x, spec) - x) ** 2).mean())
    err3 = float(((c3.float() * s3[:, None] + o3[:, None] - x) ** 2).mean())
    assert err3 < err2 / 2.5
    log8 = V.QuantSpec("mse", 0.0, "log8_i8")
    assert spec.bits_per_row_params() == log8.bits_per_row_params() == 16
    for ctx in (2048, 4096, 32768):
        assert V.AttentionVariant(k=spec, v=spec).bits(64, ctx) == V.AttentionVariant(k=log8, v=log8).bits(64, ctx)
    assert V.AttentionVariant(k=spec, v=spec).bits(64, 32768) == pytest.approx(2.384, abs=5e-4)


def test_u8_k3top6_is_k3top6_with_u8_pairs(tmp_path, monkeypatch):
    """hadamard_mse_u8_k3top6: the layers of hadamard_mse_log8_k3top6 (Setup.k_layers('top', 6, 3)), u8
    pairs on both sides; hadamard_mse_u8 is the same with 2-bit K everywhere. Sensitivity stubbed."""
    from types import SimpleNamespace

    from vllm_oscar.calibrate import experiments as E

    drops = [0.0] * 30
    for rank, i in enumerate((18, 20, 3, 8, 23, 7)):
        drops[i] = 0.2 - 0.01 * rank
    monkeypatch.setattr(E.V, "k_bits_sensitivity", lambda *a, high=3, **k: [
        {"low": 1.0, "high": 1.0 - d, "drop": d} for d in drops])
    monkeypatch.setattr(E, "o_proj_weights", lambda model: [None] * 30)
    s = object.__new__(E.Setup)
    s.work, s.info, s.lm, s._captures, s._k_scores = tmp_path, SimpleNamespace(num_layers=30, head_dim=64), \
        SimpleNamespace(model=None), [], {}
    monkeypatch.setattr(s, "orthogonal", lambda which: [None] * 30)
    reg = E.variant_registry()
    u8 = V.QuantSpec("mse", 0.0, "u8")
    k3u8, k3log8 = reg["hadamard_mse_u8_k3top6"]["variant"](s), reg["hadamard_mse_log8_k3top6"]["variant"](s)
    assert k3u8.k_bits == k3log8.k_bits == V.layer_bits(30, (3, 7, 8, 18, 20, 23))
    assert k3u8.specs(18) == (replace(u8, bits=3), u8) and k3u8.specs(0) == (u8, u8)
    assert k3u8.bits(64, 32768, 30) == pytest.approx(k3log8.bits(64, 32768, 30), rel=1e-12)
    plain = reg["hadamard_mse_u8"]["variant"](s)
    assert plain.k == plain.v == u8 and plain.k_bits is None and (plain.sink, plain.recent) == (64, 256)
