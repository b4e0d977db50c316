"""Accuracy variants of the OSCAR INT2 KV cache (issue 6), kept apart from the faithful spec.

``vllm_oscar.ops.reference`` is the faithful method (``method: paper``) and is not changed here; this
module reuses its pieces (Hadamard, clipping, the mixed-window attention) and adds:

* **Row quantizers** with the same storage form ``x_hat = code * scale + offset`` (one FMA per
  element at dequant), differing in how ``(scale, offset)`` and the codes are chosen:

  - ``minmax``: the paper's (optionally clipped) min-max grid;
  - ``lm``: the OSCAR authors' Lloyd-Max trick (thresholds ``mean +- 0.98107 std`` and 0, affine
    pair ``scale = 1.00637 * lm_ratio * std``, ``offset = mean - 1.5 scale``);
  - ``mse``: the uniform 4-level grid fitted per row by alternating least squares (codes = nearest
    level; ``(scale, offset)`` = least-squares line through ``(code, x)``) from five starting grids
    (Lloyd-Max and the min-max grid shrunk to 100/80/60/45% of the range), keeping the best: a
    near-MSE-optimal affine grid, still one FMA to dequantize.

* **Attention-aware (weighted) fit** (``QuantSpec.weighting``): the ``mse`` grid's least-squares
  line (and optionally its start and the choice among candidates) weighted per element, e.g. by the
  calibration queries' second moment along each stored K coordinate (:func:`query_weights`), so the
  fit targets the logit error ``q . (k - k_hat)`` rather than the row MSE; ``"full"`` uses the whole
  query second-moment matrix (:func:`query_moment_matrix`). Codes stay nearest-level.

* **Per-row parameter formats** (what one row's ``(scale, offset)`` costs in the cache):
  ``fp16`` (32 bits, the reference), ``bf16`` (32), ``fp16_i8`` (fp16 scale + 8-bit offset in units
  of the scale: 24), ``log8_i8`` (8-bit log2 scale + 8-bit offset: 16), ``log8_sym`` (8-bit log2
  scale, offset fixed at ``-1.5 scale``: 8), ``u8`` (the served 2-byte pair, ``params="u8"`` of the
  kernels: :func:`vllm_oscar.ops.reference.round_params_u8`: 16). Codes are always computed against the
  *stored* (rounded) parameters, as a store kernel would. A 2-bit ``mse`` row with ``u8`` pairs (no
  clip, no weighting, per token) is the store kernel's own fit, :func:`vllm_oscar.ops.reference.quantize_int2_mse`
  (2 starts, kernel summation order), so it is exactly what the served cache stores; other widths with
  ``u8`` use this module's ``mse`` fit with the pair rounded by ``round_params_u8``.

* **Per-channel token groups** (``QuantSpec.token_group``, KIVI's key layout): one pair per channel
  and G consecutive token positions (aligned at the sink) instead of one per token row; the same row
  quantizers run on the transposed group (:func:`fake_quantize_positions`).

* **Transforms** that replace the orthogonal rotation ``R`` by an invertible ``T`` (per layer or per
  KV head) plus an optional mean vector ``mu``: the cache stores ``(k - mu_K) T_K`` and
  ``(v - mu_V) T_V``; queries use ``q T_K^{-T}`` (scores unchanged up to a per-query constant, which
  softmax ignores) and the output is ``o T_V^{-1} + mu_V`` (attention weights sum to one). With
  ``T`` orthogonal and ``mu = 0`` this is exactly the reference.

* **Plain per-channel centering** (:class:`ChannelStats`, :func:`with_means`): per-(layer, KV head)
  channel means (optionally leaving out each sequence's first tokens) and coordinate-wise medians in
  a rotated basis, from calibration text, removed from the stored rows (exact for attention).

* **Calibration statistics and fits** (:class:`VariantStats`, :func:`fit_transforms`): centered K/V
  covariances, the query second moment, the V-side importance ``W_o W_o^T`` of the output
  projection, and the paper's *true* softmax V target ``C_S = (1/N) (SV)^T (SV)`` (the second moment
  of the attention outputs). The ``importance`` transform minimizes the first-order INT2 error model
  ``tr(T^T Sigma_X T) * tr(Sigma_imp T^{-T} T^{-1})`` (per-row step proportional to the row's RMS,
  error isotropic in the quantized coordinates): the optimum is ``T T^T = Sigma_X^{-1} # Sigma_imp``
  (matrix geometric mean), followed by a Hadamard to spread it over the row. Any *orthogonal* ``T``
  leaves that objective at ``tr(Sigma_X) tr(Sigma_imp)``, which is why calibrated rotations alone buy
  little over a Hadamard.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from vllm_oscar.ops import reference as ref

# The OSCAR authors' Lloyd-Max constants (reference notes §4.3).
LM_THRESHOLD = 0.98107
LM_UNIFORM_FACTOR = 1.00637
LOG8_STEPS_PER_OCTAVE = 16  # log8 scale: s = 2**(m/16 + LOG8_MIN_EXP), m in 0..255
LOG8_MIN_EXP = -10.0  # smallest representable scale 2**-10, largest 2**(-10 + 255/16) ~ 61
MSE_INIT_RANGE_FRACTIONS = (1.0, 0.8, 0.6, 0.45)  # starting grids of the "mse" fit (plus Lloyd-Max)
OFFSET_I8_STEPS = 16  # int8 offset: offset = scale * (m/16 - 1.5), m in -128..127 (+-8 scale units)

Levels = Literal["minmax", "lm", "mse"]
ParamFormat = Literal["fp32", "fp16", "bf16", "fp16_i8", "log8_i8", "log8_sym", "u8"]

PARAM_BITS: dict[str, int] = {"fp32": 64, "fp16": 32, "bf16": 32, "fp16_i8": 24, "log8_i8": 16, "log8_sym": 8,
                              "u8": 16}


# --------------------------------------------------------------------------------------------------
# Row quantizers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """How one side (K or V) quantizes a row of ``d`` elements to INT2 + a per-row affine pair."""

    levels: Levels = "minmax"
    clip: float = 0.0  # row quantile clip ratio (reference rule); 0 = off
    params: ParamFormat = "fp16"
    lm_ratio: float = 1.16  # only for levels="lm"
    iters: int = 6  # only for levels="mse"
    # only for levels="mse": per-element weights (``LayerTransform.k_weight``/``v_weight``, e.g. the
    # query second moments per rotated dimension) in the fit. "fit": the least-squares line through
    # (code, x) is weighted, the starts and the choice among them stay unweighted; "fit_select": also a
    # weighted Lloyd-Max start and the candidate with the smallest *weighted* error is kept; "full":
    # the weights are a matrix ``M [..., d, d]`` and fit and choice minimize ``e^T M e`` (``e`` = the
    # row's error; codes still nearest-level, unweighted starts).
    weighting: Literal["none", "fit", "fit_select", "full"] = "none"
    # Code bits per element (2 = INT2, what the kernels store). Other widths are accuracy experiments on
    # how a fixed budget is best split between K and V (levels "minmax" and "mse" only, asymmetric rows).
    bits: int = 2
    # 0: one (scale, offset) per row, i.e. per token of ``d`` elements. G > 0: per channel over groups of
    # G consecutive token positions (KIVI's keys, arXiv 2402.02750): the groups are
    # ``[sink + m G, sink + (m + 1) G)`` in absolute positions, and each channel's G values in a group
    # are quantized as one "row" by the same row quantizer (:func:`fake_quantize_positions`). Needs
    # ``recent >= G`` (causality, see there).
    token_group: int = 0

    def __post_init__(self):
        if self.bits not in (1, 2, 3, 4):
            raise ValueError(f"bits={self.bits} is not a code width this sweep supports; choose 1, 2, 3 or 4")
        if self.token_group < 0:
            raise ValueError(f"token_group={self.token_group} must be >= 0 (0 = one pair per row)")
        if self.token_group and self.weighting != "none":
            raise ValueError(f"weighting {self.weighting!r} weights the elements of a token row; it has no "
                             f"meaning for per-channel groups (token_group={self.token_group})")
        if self.bits != 2 and (self.levels == "lm" or self.params == "log8_sym"):
            raise ValueError(f"bits={self.bits} needs levels 'minmax' or 'mse' with an offset (the Lloyd-Max "
                             f"thresholds and log8_sym's fixed offset are 2-bit rules); got levels "
                             f"{self.levels!r}, params {self.params!r}")

    @property
    def num_levels(self) -> int:
        return 1 << self.bits

    def bits_per_row_params(self) -> int:
        return PARAM_BITS[self.params]


def _round_scale(s: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "fp32":
        return torch.clamp(s, min=1e-30)
    if fmt in ("fp16", "fp16_i8"):
        return torch.clamp(s, min=ref.SCALE_FLOOR, max=ref.FP16_MAX).to(torch.float16).float()
    if fmt == "bf16":
        return torch.clamp(s, min=ref.SCALE_FLOOR).to(torch.bfloat16).float()
    if fmt in ("log8_i8", "log8_sym"):
        m = torch.round((torch.log2(torch.clamp(s, min=1e-30)) - LOG8_MIN_EXP) * LOG8_STEPS_PER_OCTAVE)
        return torch.exp2(m.clamp(0, 255) / LOG8_STEPS_PER_OCTAVE + LOG8_MIN_EXP)
    raise ValueError(f"unknown parameter format {fmt!r}; valid: {list(PARAM_BITS)}")


def round_params(scale: torch.Tensor, offset: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a per-row ``(scale, offset)`` to what format ``fmt`` stores; returns fp32 tensors."""
    if fmt == "u8":  # the kernels' 2-byte pair, exactly as the reference (and the store kernel) rounds it
        return ref.round_params_u8(scale.float(), offset.float())
    s = _round_scale(scale.float(), fmt)
    o = offset.float()
    if fmt == "fp16":
        o = torch.clamp(o, -ref.FP16_MAX, ref.FP16_MAX).to(torch.float16).float()
    elif fmt == "bf16":
        o = o.to(torch.bfloat16).float()
    elif fmt in ("fp16_i8", "log8_i8"):
        m = torch.round((o / s + 1.5) * OFFSET_I8_STEPS).clamp(-128, 127)
        o = s * (m / OFFSET_I8_STEPS - 1.5)
    elif fmt == "log8_sym":
        o = -1.5 * s
    return s, o


def _codes(x: torch.Tensor, s: torch.Tensor, o: torch.Tensor, levels: int = ref.INT2_LEVELS) -> torch.Tensor:
    return torch.clamp(torch.floor((x - o[..., None]) / s[..., None] + 0.5), 0, levels - 1)


def _rowmat(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rows ``x [..., d]`` times ``m`` (``[d, d]``, or ``[H, d, d]`` for rows ``[..., H, d]``)."""
    if m.dim() == 2:
        return x @ m
    if m.dim() == 3 and x.dim() >= 2 and x.shape[-2] == m.shape[0]:
        return torch.einsum("...hd,hde->...he", x, m)  # one matrix product per head, not a matvec per row
    return torch.matmul(x.unsqueeze(-2), m).squeeze(-2)


def _sse(x, c, s, o, w=None, full=False):
    e = c * s[..., None] + o[..., None] - x
    if full:  # e^T M e with M = w [..., d, d]
        return (_rowmat(e, w) * e).sum(-1)
    return (e * e if w is None else e * e * w).sum(-1)


def _ls_fit_full(x, c, s, o, m, m1, m11):
    """``(s, o)`` minimizing ``(c s + o - x)^T M (c s + o - x)`` per row (``M = m [..., d, d]``
    symmetric positive definite, ``m1 = M 1``, ``m11 = 1^T M 1``); keeps ``(s, o)`` where degenerate."""
    mc = _rowmat(c, m)
    a11, a12, b1 = (mc * c).sum(-1), mc.sum(-1), (mc * x).sum(-1)
    b2 = (m1 * x).sum(-1)
    det = a11 * m11 - a12 * a12
    ok0 = det > 1e-12 * a11 * m11
    det = torch.where(ok0, det, torch.ones_like(det))
    s_new = (m11 * b1 - a12 * b2) / det
    o_new = (a11 * b2 - a12 * b1) / det
    ok = ok0 & (s_new > 0)
    return torch.where(ok, s_new, s), torch.where(ok, o_new, o)


def _minmax_params(x: torch.Tensor, levels: int = ref.INT2_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = x.amin(-1), x.amax(-1)
    return (hi - lo) / (levels - 1), lo


def _lm_params(x: torch.Tensor, lm_ratio: float, w: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The authors' Lloyd-Max affine pair and threshold codes: ``(codes, scale, offset)`` (unrounded).
    With element weights ``w`` the row's mean and standard deviation are weighted."""
    if w is None:
        mean = x.mean(-1)
        std = torch.sqrt(x.var(-1, unbiased=False) + 1e-8)
    else:
        w = w.expand_as(x)
        tot = w.sum(-1)
        mean = (w * x).sum(-1) / tot
        std = torch.sqrt((w * (x - mean[..., None]) ** 2).sum(-1) / tot + 1e-8)
    z = (x - mean[..., None]) / std[..., None]
    codes = (z >= -LM_THRESHOLD).float() + (z >= 0).float() + (z >= LM_THRESHOLD).float()
    scale = LM_UNIFORM_FACTOR * lm_ratio * std
    return codes, scale, mean - 1.5 * scale


def _ls_fit(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, o: torch.Tensor, symmetric: bool,
            w: torch.Tensor | None = None):
    """Least-squares ``x ~ c*s + o`` per row (``o = -1.5 s`` when ``symmetric``), weighted by the
    per-element weights ``w`` (broadcast to ``x``) if given; keeps ``(s, o)`` where the fit is
    degenerate (one distinct code) or gives a non-positive scale. All-ones weights give bit for bit
    the unweighted fit."""
    if symmetric:
        u = c - 1.5
        wu = u if w is None else w * u
        den = (wu * u).sum(-1)
        s_new = (wu * x).sum(-1) / torch.clamp(den, min=1e-30)
        ok = s_new > 0
        return torch.where(ok, s_new, s), torch.where(ok, -1.5 * s_new, o)
    if w is None:
        d = x.shape[-1]
        sc, scc, sx, scx = c.sum(-1), (c * c).sum(-1), x.sum(-1), (c * x).sum(-1)
    else:  # the same normal equations with weighted sums (d -> sum of weights)
        w = w.expand_as(x)
        wc = w * c
        d, sc, scc, sx, scx = w.sum(-1), wc.sum(-1), (wc * c).sum(-1), (w * x).sum(-1), (wc * x).sum(-1)
    det = d * scc - sc * sc
    s_new = (d * scx - sc * sx) / torch.where(det > 0, det, torch.ones_like(det))
    o_new = (sx - s_new * sc) / d
    ok = (det > 0) & (s_new > 0)
    return torch.where(ok, s_new, s), torch.where(ok, o_new, o)


def quantize_rows_variant(x: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize rows ``x [..., d]`` (fp32): ``(codes uint8 [..., d], scale fp32 [...], offset fp32 [...])``.

    ``scale``/``offset`` are exactly the stored (rounded) values and the codes are nearest-level codes
    against them, except for ``levels="lm"`` whose codes are the authors' threshold codes.

    ``weights`` (positive, broadcastable to ``x``, e.g. ``[Hkv, d]`` for rows ``[T, Hkv, d]``): the
    per-element weights of ``spec.weighting`` (``levels="mse"`` only). The codes stay nearest-level
    (the weighted error is separable, so the nearest level minimizes each element's term whatever its
    weight); only the line fit (and with ``"fit_select"`` the starts and the choice) are weighted.
    """
    x = ref.clip_rows(x.float(), spec.clip)
    if (spec.params == "u8" and spec.levels == "mse" and spec.bits == 2 and spec.clip == 0.0
            and spec.weighting == "none"):  # the served store's fit (2 starts, kernel order), bit for bit
        c, s, o = ref.quantize_int2_mse(x, params="u8")
        return c, s, o
    w = None
    if spec.weighting != "none":
        if spec.levels != "mse":
            raise ValueError(f"weighting {spec.weighting!r} needs levels 'mse', got {spec.levels!r}")
        if weights is None:
            raise ValueError(f"weighting {spec.weighting!r} needs per-element weights")
        w = weights.float()
    full = spec.weighting == "full"
    if full:
        if spec.params == "log8_sym":
            raise ValueError("weighting 'full' does not support symmetric rows")
        m1 = w.sum(-1)  # M 1 (M symmetric)
        m11 = m1.sum(-1)
    w_sel = w if spec.weighting in ("fit_select", "full") else None
    symmetric = spec.params == "log8_sym"
    nl = spec.num_levels
    if spec.levels == "minmax":
        s, o = _minmax_params(x, nl)
        if symmetric:  # levels +-s/2, +-3s/2 reaching the row's largest magnitude
            s = torch.maximum(x.amax(-1).abs(), x.amin(-1).abs()) / 1.5
            o = -1.5 * s
        s, o = round_params(s, o, spec.params)
        c = _codes(x, s, o, nl)
    elif spec.levels == "lm":
        c, s, o = _lm_params(x, spec.lm_ratio)
        s, o = round_params(s, o, spec.params)
    elif spec.levels == "mse":
        best = None
        lo, hi = x.amin(-1), x.amax(-1)
        mid, rng = (lo + hi) / 2, hi - lo
        # The Lloyd-Max start is a 4-level rule; other widths start from the shrunk min-max grids only.
        inits = [_lm_params(x, 1.0, None if full else w_sel)[1:]] if nl == ref.INT2_LEVELS else []
        for a in MSE_INIT_RANGE_FRACTIONS:  # min-max grid shrunk around the mid-range
            inits.append((a * rng / (nl - 1), mid - 0.5 * a * rng))
        for s, o in inits:
            s = torch.clamp(s, min=1e-30)
            if symmetric:
                o = -1.5 * s
            c = _codes(x, s, o, nl)
            for _ in range(spec.iters):
                if full:
                    s, o = _ls_fit_full(x, c, s, o, w, m1, m11)
                else:
                    s, o = _ls_fit(x, c, s, o, symmetric, w)
                c = _codes(x, s, o, nl)
            sr, orr = round_params(s, o, spec.params)
            cr = _codes(x, sr, orr, nl)
            err = _sse(x, cr, sr, orr, w_sel, full)
            if best is None:
                best = (err, cr, sr, orr)
            else:
                keep = err < best[0]
                best = (torch.where(keep, err, best[0]), torch.where(keep[..., None], cr, best[1]),
                        torch.where(keep, sr, best[2]), torch.where(keep, orr, best[3]))
        _, c, s, o = best
    else:
        raise ValueError(f"unknown levels {spec.levels!r}")
    return c.to(torch.uint8), s, o


def fake_quantize_variant(x: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize + dequantize rows (``code * scale + offset``), fp32. Per-row specs only: a spec with
    ``token_group`` needs the rows' positions (:func:`fake_quantize_positions`)."""
    if spec.token_group:
        raise ValueError(f"token_group={spec.token_group} quantizes per channel over token positions: use "
                         "fake_quantize_positions")
    c, s, o = quantize_rows_variant(x, spec, weights)
    return c.float() * s[..., None] + o[..., None]


def fake_quantize_positions(x: torch.Tensor, spec: QuantSpec, sink: int, weights: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Quantize + dequantize the rows ``x [T, ..., d]`` of token positions ``0 .. T-1`` (fp32).

    ``spec.token_group == 0``: every row on its own (:func:`fake_quantize_variant`). ``G > 0``: per
    channel over the position groups ``[sink + m G, sink + (m + 1) G)``: each channel's values in a
    group form one row of the row quantizer (levels, clipping and parameter format unchanged); the last
    group may be partial (its existing tokens). Positions ``< sink`` are returned unchanged: they are
    always read from the BF16 sink window.

    Causality (with ``recent >= G``): a query at ``j`` reads position ``p`` from INT2 only if
    ``j >= p + recent`` (:func:`ref.exact_window_mask`), and ``p``'s group ends before ``p + G <= p +
    recent <= j``; so a group is quantized from its own tokens, all of which exist when any query reads
    one of them from INT2. A real cache quantizes group ``m`` when its first token leaves the recent
    window (all its G tokens exist then). A partial last group is never read from INT2 by a query in
    the same sequence (it lies within the last ``G - 1 < recent`` positions).
    """
    g = spec.token_group
    if not g:
        return fake_quantize_variant(x, spec, weights)
    if weights is not None:
        raise ValueError("per-channel token groups take no element weights")
    x = x.float()
    out = x.clone()
    t = x.shape[0]
    if t <= sink:
        return out
    full = (t - sink) // g  # whole groups, then at most one partial group
    for start, n, count in ((sink, g, full), (sink + full * g, t - sink - full * g, 1)):
        if n == 0 or count == 0:
            continue
        blk = x[start:start + n * count].reshape(count, n, *x.shape[1:])  # [groups, n, ..., d]
        rows = blk.movedim(1, -1)  # [groups, ..., d, n]: a channel's n values form one row
        c, s, o = quantize_rows_variant(rows, spec)
        out[start:start + n * count] = (c.float() * s[..., None] + o[..., None]).movedim(-1, 1).reshape(
            n * count, *x.shape[1:])
    return out


def check_token_groups(spec: QuantSpec | None, recent: int, side: str = "") -> None:
    """A per-channel token group must fit in the recent window (``recent >= G``), or a query would read a
    group from INT2 before the group's last token exists."""
    if spec is not None and spec.token_group > recent:
        raise ValueError(f"{side + ' ' if side else ''}token_group={spec.token_group} needs recent >= "
                         f"token_group (got recent={recent}): otherwise a group is read from INT2 before all "
                         "its tokens exist")


# --------------------------------------------------------------------------------------------------
# Storage cost
# --------------------------------------------------------------------------------------------------


def bits_per_element(head_dim: int, context: int, *, sink: int, recent: int,
                     param_bits: int | tuple[int, int],
                     window_bits: int = 16, extra_window_tokens: int = 0,
                     code_bits: tuple[int, int] = (2, 2), token_group: tuple[int, int] = (0, 0)) -> float:
    """Average stored bits per K/V element of a ``context``-token request: INT2 codes + per-row
    parameters for the quantized tokens, ``window_bits`` for the BF16 sink/recent tokens.
    ``param_bits`` may be a (K, V) pair; ``code_bits`` is the (K, V) bits per element outside the
    windows (16 for a side kept in BF16, with 0 parameter bits).

    ``token_group`` (K, V): a side with ``G > 0`` stores one pair per channel and G tokens
    (``param_bits / G`` per element instead of ``/ head_dim``), and its INT2 part covers whole groups:
    a group is stored once its first token leaves the recent window, so up to ``G - 1`` tokens still in
    the window are held both in BF16 and in INT2."""
    kb, vb = (param_bits, param_bits) if isinstance(param_bits, int) else param_bits
    full = min(context, sink + recent + extra_window_tokens)
    total = full * window_bits
    for code, pb, g in zip(code_bits, (kb, vb), token_group, strict=True):
        n = context - full
        if g and n > 0:
            n = min(context - sink, -(-n // g) * g)  # whole groups, each complete (recent >= G)
        total += n * (code + pb / (g or head_dim)) / 2
    return total / context


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


@dataclass
class LayerTransform:
    """What one layer stores and applies. Matrices are ``[Hkv, d, d]`` (per KV head; a per-layer
    transform is repeated), means ``[Hkv, d]`` or ``None``.

    cache K row: ``(k - k_mean) @ k_store``; query: ``q @ k_query`` with ``k_query = k_store^{-T}``;
    cache V row: ``(v - v_mean) @ v_store``; output: ``o_cache @ v_out + v_mean``, ``v_out = v_store^{-1}``.
    ``k_weight``/``v_weight`` ``[Hkv, d]``: per-dimension weights of the stored coordinates for a
    weighted grid fit (``QuantSpec.weighting``), e.g. :func:`query_weights` / :func:`output_weights`.
    """

    k_store: torch.Tensor
    v_store: torch.Tensor
    k_mean: torch.Tensor | None = None
    v_mean: torch.Tensor | None = None
    k_query: torch.Tensor | None = None
    v_out: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    v_weight: torch.Tensor | None = None

    def __post_init__(self):
        if self.k_query is None:
            self.k_query = torch.linalg.inv(self.k_store.double()).transpose(-1, -2).float()
        if self.v_out is None:
            self.v_out = torch.linalg.inv(self.v_store.double()).float()

    @staticmethod
    def orthogonal(rk: torch.Tensor, rv: torch.Tensor, num_kv_heads: int) -> "LayerTransform":
        rk = rk.float().expand(num_kv_heads, *rk.shape[-2:]) if rk.dim() == 2 else rk.float()
        rv = rv.float().expand(num_kv_heads, *rv.shape[-2:]) if rv.dim() == 2 else rv.float()
        return LayerTransform(rk, rv, k_query=rk, v_out=rv.transpose(-1, -2))


def _per_head(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x [T, H, d] @ m[h]`` for every head ``h`` (``m [H, d, d]``)."""
    return torch.einsum("thd,hde->the", x, m)


def _per_group(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Query heads ``[T, Hq, d]`` times their KV group's matrix (``m [Hkv, d, d]``)."""
    g = x.shape[1] // m.shape[0]
    return _per_head(x, m.repeat_interleave(g, 0))


@dataclass(frozen=True)
class AttentionVariant:
    """One point of the sweep: quantizers, windows and whether the layer transforms are used."""

    # None: that side is not quantized (kept at 16 bits everywhere), for attributing the error to K or V
    k: QuantSpec | None = QuantSpec(clip=0.96)
    v: QuantSpec | None = QuantSpec(clip=0.92)
    sink: int = 64
    recent: int = 256
    # per-layer clip ratios (override ``k.clip``/``v.clip``), e.g. from :func:`search_clip_ratios`
    k_clips: tuple[float, ...] | None = None
    v_clips: tuple[float, ...] | None = None
    # softmax logit-variance correction (lambda): the logit of a key read from INT2 gets
    # ``- lambda/2 * scale^2 * |q|^2 * mean((k - k_hat)^2)`` (the row's own mean squared K error, which
    # would cost one more parameter per row to store): the exp(sigma^2/2) bias of exp(logit + noise)
    # for an error independent of the key. 0 = off (every stored format).
    k_logit_var: float = 0.0
    # Pinned tokens (a SnapKV-style retrieval experiment): when a prompt is prefilled exactly, the
    # ``pin_tokens`` prompt positions per (layer, KV head) outside the windows that the prompt's last
    # ``pin_window`` queries attend to most (:func:`pin_scores`, averaged over ``pin_pool`` neighbours)
    # are read exactly, like the windows, by every later query. Costs a BF16 K/V row and a 32-bit
    # position per pinned token and head. 0 = off (every stored format).
    pin_tokens: int = 0
    pin_window: int = 32
    pin_pool: int = 1
    # How pinned tokens are chosen. "prompt": from an exact prompt prefill, as above (passkey harness).
    # "window_exit": causally, while the sequence grows (H2O-like, any workload): when a token leaves the
    # recent window, it competes on the attention it received while it was in the window (exact
    # softmax weights summed over the window's queries and the KV group's query heads, averaged over
    # ``pin_pool`` neighbours); each query reads the ``pin_tokens`` best tokens that have left so far
    # exactly (:func:`window_exit_pin_mask`). Scores are fixed once a token leaves, so a token that
    # drops out of the best never returns and the set needs no stored history beyond its BF16 rows.
    pin_rule: Literal["prompt", "window_exit"] = "prompt"
    # per-layer K code widths (override ``k.bits``; one entry per layer, each 1-4), e.g. 3-bit keys in the
    # layers most sensitive to INT2 keys (:func:`k_bits_sensitivity`, :func:`top_layers`)
    k_bits: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.pin_rule not in ("prompt", "window_exit"):
            raise ValueError(f"pin_rule={self.pin_rule!r} is not a pinning rule; choose 'prompt' or 'window_exit'")
        for side, spec, clips in (("k", self.k, self.k_clips), ("v", self.v, self.v_clips)):
            if spec is None and clips is not None:
                raise ValueError(f"{side}_clips needs a quantized {side} side ({side}=None keeps it unquantized)")
        if self.k_bits is not None:
            if self.k is None:
                raise ValueError("k_bits needs a quantized K side (k=None keeps it unquantized)")
            if not self.k_bits:
                raise ValueError("k_bits needs one code width per layer; got an empty tuple")
            bad = [b for b in self.k_bits if b not in (1, 2, 3, 4)]
            if bad:
                raise ValueError(f"k_bits {bad} are not code widths this sweep supports; choose 1, 2, 3 or 4 per layer")
            for b in set(self.k_bits):
                try:
                    replace(self.k, bits=b)
                except ValueError as e:
                    raise ValueError(f"k_bits: K spec {self.k} cannot take {b}-bit codes: {e}") from e
        if self.k_clips is not None and self.k_bits is not None and len(self.k_clips) != len(self.k_bits):
            raise ValueError(f"k_clips ({len(self.k_clips)} layers) and k_bits ({len(self.k_bits)} layers) "
                             "must cover the same layers")
        if self.k is None and self.k_logit_var:
            raise ValueError("k_logit_var needs a quantized K side")
        check_token_groups(self.k, self.recent, "k")
        check_token_groups(self.v, self.recent, "v")

    def specs(self, layer: int) -> tuple[QuantSpec | None, QuantSpec | None]:
        k, v = self.k, self.v
        if self.k_clips is not None:
            k = replace(k, clip=self.k_clips[layer])
        if self.v_clips is not None:
            v = replace(v, clip=self.v_clips[layer])
        if self.k_bits is not None:
            k = replace(k, bits=self.k_bits[layer])
        return k, v

    def check_layers(self, num_layers: int) -> None:
        """Per-layer settings (``k_clips``, ``v_clips``, ``k_bits``) must have one entry per layer."""
        for name in ("k_clips", "v_clips", "k_bits"):
            x = getattr(self, name)
            if x is not None and len(x) != num_layers:
                raise ValueError(f"{name} has {len(x)} entries but the model has {num_layers} layers")

    def config(self) -> dict:
        """What a results file records of this variant (JSON-ready)."""
        def side(spec):
            return "exact" if spec is None else spec.__dict__

        return {"k": side(self.k), "v": side(self.v), "sink": self.sink, "recent": self.recent,
                "k_clips": self.k_clips, "v_clips": self.v_clips, "k_logit_var": self.k_logit_var,
                "pin_tokens": self.pin_tokens, "pin_window": self.pin_window, "pin_pool": self.pin_pool,
                "pin_rule": self.pin_rule, "k_bits": self.k_bits}

    def bits(self, head_dim: int, context: int, num_layers: int | None = None) -> float:
        """Stored bits per K/V element of a ``context``-token request, averaged over the layers when
        ``k_bits`` gives each layer its own K code width (every layer stores the same tokens). The layer
        count is ``len(k_bits)``; ``num_layers``, if given, is checked against it."""
        if num_layers is not None:
            self.check_layers(num_layers)
        if self.k_bits is None:
            return self._bits(head_dim, context, self.k)
        return sum(self._bits(head_dim, context, replace(self.k, bits=b)) for b in self.k_bits) / len(self.k_bits)

    def _bits(self, head_dim: int, context: int, k: QuantSpec | None) -> float:
        pins = min(self.pin_tokens, max(0, context - self.sink - self.recent))
        params = tuple(0 if spec is None else spec.bits_per_row_params() for spec in (k, self.v))
        codes = tuple(16 if spec is None else spec.bits for spec in (k, self.v))
        groups = tuple(0 if spec is None else spec.token_group for spec in (k, self.v))
        return bits_per_element(head_dim, context, sink=self.sink, recent=self.recent, param_bits=params,
                                extra_window_tokens=pins, code_bits=codes,
                                token_group=groups) + pins * 32 / (2 * head_dim) / context


def transformed_kv(k: torch.Tensor, v: torch.Tensor, t: LayerTransform) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the cache holds (before quantization): ``(k - mu_K) T_K``, ``(v - mu_V) T_V``."""
    kc = k if t.k_mean is None else k - t.k_mean
    vc = v if t.v_mean is None else v - t.v_mean
    return _per_head(kc, t.k_store), _per_head(vc, t.v_store)


def _weights(spec: QuantSpec, w: torch.Tensor | None, side: str) -> torch.Tensor | None:
    if spec.weighting == "none":
        return None
    if w is None:
        raise ValueError(f"{side} spec has weighting {spec.weighting!r} but the layer transform has no {side} weights")
    return w


def variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: LayerTransform,
                      kspec: QuantSpec | None, vspec: QuantSpec | None, q_positions: torch.Tensor, *,
                      sink: int, recent: int, scale: float | None = None, k_logit_var: float = 0.0,
                      pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q [Tq, Hq, d]`` over ``k, v [Tkv, Hkv, d]`` (model space, fp32) with the cache
    transformed by ``t`` and quantized outside the windows; ``None`` spec = that side unquantized.
    ``k_logit_var``: see :attr:`AttentionVariant.k_logit_var`. ``pinned [Hkv, Tkv]`` (bool): keys every
    query reads exactly besides its windows (:attr:`AttentionVariant.pin_tokens`), or ``[Hkv, Tq, Tkv]``:
    per query. Returns ``[Tq, Hq, d]`` in the model space."""
    check_token_groups(kspec, recent, "k")
    check_token_groups(vspec, recent, "v")
    kt, vt = transformed_kv(k.float(), v.float(), t)  # keys and values at positions 0 .. Tkv-1
    kq = kt if kspec is None else fake_quantize_positions(kt, kspec, sink, _weights(kspec, t.k_weight, "K"))
    vq = vt if vspec is None else fake_quantize_positions(vt, vspec, sink, _weights(vspec, t.v_weight, "V"))
    qt = _per_group(q.float(), t.k_query)
    if k_logit_var:
        if kspec is None:
            raise ValueError("k_logit_var needs a quantized K side")
        scale = q.shape[-1] ** -0.5 if scale is None else scale  # fixed before the extra dimension
        qt, kt, kq, vt, vq = _with_logit_var(qt, kt, kq, vt, vq, k_logit_var, scale)
    exact_mask = None
    if pinned is not None:  # [Hkv, 1, Tq, Tkv]: broadcasts over the G query heads of each KV head
        _, window = ref.exact_window_mask(q_positions, k.shape[0], sink, recent)
        exact_mask = (window[None] | (pinned[:, None, :] if pinned.dim() == 2 else pinned))[:, None]
    o = ref.mixed_window_attention(qt, kt, vt, kq, vq, q_positions, sink, recent, scale,
                                   exact_mask=exact_mask)[..., :q.shape[-1]]
    o = _per_group(o, t.v_out)
    if t.v_mean is not None:
        o = o + t.v_mean.repeat_interleave(q.shape[1] // t.v_mean.shape[0], 0)
    return o


def _with_logit_var(qt, kt, kq, vt, vq, lam: float, scale: float):
    """One extra dimension carries the correction through :func:`ref.mixed_window_attention`:
    ``q' = [q, |q|^2]``, INT2 keys ``[k_hat, -lambda/2 * scale * err]``, window keys ``[k, 0]``, values
    padded with a zero column (drop the output's last column)."""
    err = (kt - kq).square().mean(-1, keepdim=True)  # [Tkv, Hkv, 1]
    qn = qt.square().sum(-1, keepdim=True)

    def pad(x, col=None):
        return torch.cat([x, torch.zeros_like(x[..., :1]) if col is None else col], -1)

    return (pad(qt, qn), pad(kt), pad(kq, -0.5 * lam * scale * err), pad(vt), pad(vq))


def _causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float, q_start: int, dtype: torch.dtype) -> torch.Tensor:
    """Exact causal softmax weights ``[Hq, Tq, T]`` of queries ``q [Tq, Hq, d]`` at positions
    ``q_start ..`` over keys ``k [T, Hkv, d]`` (query head ``h`` reads KV head ``h // (Hq/Hkv)``)."""
    tq, hq, _ = q.shape
    t, hkv = k.shape[:2]
    s = torch.einsum("qhd,khd->hqk", q.to(dtype), k.to(dtype).repeat_interleave(hq // hkv, 1)) * scale
    s = s.masked_fill(torch.arange(t)[None, :] > torch.arange(q_start, q_start + tq)[:, None], float("-inf"))
    return torch.softmax(s, -1)


def _pool_neighbours(scores: torch.Tensor, pool: int) -> torch.Tensor:
    """``scores [Hkv, T]`` averaged over ``pool`` (odd) neighbouring positions; the edges average what exists."""
    if pool <= 1:
        return scores
    if pool % 2 == 0:
        raise ValueError(f"pin_pool must be odd (a window centred on each token), got {pool}")
    return torch.nn.functional.avg_pool1d(scores[:, None], pool, 1, pool // 2, count_include_pad=False)[:, 0]


def pin_scores(q: torch.Tensor, k: torch.Tensor, scale: float, window: int, pool: int = 1) -> torch.Tensor:
    """How much the last ``window`` queries of an exact prefill attend to each key, ``[Hkv, T]``:
    exact softmax weights (model space, causal) summed over those queries and each KV head's query heads,
    then averaged over ``pool`` neighbouring positions (odd; SnapKV's pooling keeps a token's neighbours).
    ``q [T, Hq, d]``, ``k [T, Hkv, d]``."""
    t, hq, _ = q.shape
    hkv = k.shape[1]
    w = min(window, t)
    weights = _causal_probs(q[t - w:], k, scale, t - w, torch.float64).sum(1).view(hkv, hq // hkv, t).sum(1)
    return _pool_neighbours(weights, pool)  # [Hkv, T]


def window_exit_pin_mask(q: torch.Tensor, k: torch.Tensor, scale: float, count: int, sink: int, recent: int,
                         pool: int = 1) -> torch.Tensor:
    """Which keys each query of a whole sequence reads exactly under ``pin_rule="window_exit"``, as a bool
    ``[Hkv, T, T]`` (query, key), windows not included. ``q [T, Hq, d]``, ``k [T, Hkv, d]`` (model space).

    Key ``j`` is in the recent window of queries ``j .. j + recent - 1``; its score is the exact
    attention those queries give it (summed over the KV group's query heads, then averaged over
    ``pool`` neighbouring keys). Query ``p`` reads exactly the ``count`` best-scoring keys among
    ``[sink, p - recent - pool // 2]``: the ones that have left the window, with their neighbours'
    scores complete (causal), ties to the earlier key."""
    t, hq, _ = q.shape
    hkv = k.shape[1]
    pos = torch.arange(t)
    probs = _causal_probs(q, k, scale, 0, torch.float32).view(hkv, hq // hkv, t, t).sum(1)  # [Hkv, query, key]
    in_window = (pos[:, None] - pos[None, :] >= 0) & (pos[:, None] - pos[None, :] < recent)
    score = _pool_neighbours((probs * in_window).sum(1), pool)  # [Hkv, key]
    # better[h, j', j]: key j' outranks key j; ahead[h, m, j]: how many keys in [sink, m] outrank j
    better = (score[:, :, None] > score[:, None, :]) | (
        (score[:, :, None] == score[:, None, :]) & (pos[:, None] < pos[None, :]))
    better[:, :sink] = False
    ahead = better.to(torch.int32).cumsum(1)
    left = pos - recent - pool // 2  # the last key query p can rank
    rows = ahead[:, left.clamp(min=0)]  # [Hkv, query, key]
    return (pos[None, None, :] >= sink) & (pos[None, None, :] <= left[None, :, None]) & (rows < count)


def pin_mask(scores: torch.Tensor, count: int, sink: int, recent: int) -> torch.Tensor:
    """The ``count`` highest-scoring positions per KV head among ``[sink, T - recent)`` (those the next
    query reads from INT2), as a bool ``[Hkv, T]``."""
    hkv, t = scores.shape
    mask = torch.zeros(hkv, t, dtype=torch.bool)
    lo, hi = sink, max(sink, t - recent)
    n = min(count, hi - lo)
    if n > 0:
        top = scores[:, lo:hi].topk(n, -1).indices + lo
        mask.scatter_(1, top, True)
    return mask


def make_variant_attention(transforms: list[LayerTransform], variant: AttentionVariant):
    """An attention function for ``capture.attention_override`` / ``evaluate.perplexity``.

    With ``variant.pin_tokens`` the function has an ``observe_prefill(module, q, k)`` method: an exact
    prefill calls it per layer (``passkey.exact_prefill_logits``) and the later (decode) calls read the
    chosen prompt positions exactly. A call over a whole sequence (``Tq == Tkv``: every query reads
    INT2, e.g. ``evaluate.perplexity``) has no exact prefill to choose from and is refused."""
    from vllm_oscar.calibrate.capture import layer_index  # noqa: PLC0415

    variant.check_layers(len(transforms))
    pins: dict[int, torch.Tensor] = {}  # layer -> [Hkv, prompt length] of the last observed prefill

    def attention(module, q, k, v):
        i = layer_index(module)
        q_, k_, v_ = (x[0].transpose(0, 1).float() for x in (q, k, v))
        ks, vs = variant.specs(i)
        tq, tkv = q_.shape[0], k_.shape[0]  # with a KV cache the queries are the last positions
        pinned = None
        if variant.pin_tokens and variant.pin_rule == "window_exit":
            if tq != tkv:
                raise ValueError("pin_rule='window_exit' is simulated over whole sequences (teacher-forced "
                                 "perplexity): a cached decode step does not have the earlier queries it needs")
            pinned = window_exit_pin_mask(q_, k_, module.scaling, variant.pin_tokens, variant.sink, variant.recent,
                                          variant.pin_pool)
        elif variant.pin_tokens:
            if tq == tkv or i not in pins:
                raise ValueError("pin_tokens chooses its tokens from an exact prompt prefill: use the passkey "
                                 "harness's exact_prefill semantics (observe_prefill), not a whole-sequence pass")
            p = pins[i]
            pinned = torch.cat([p, p.new_zeros(p.shape[0], tkv - p.shape[1])], 1)
        o = variant_attention(q_, k_, v_, transforms[i], ks, vs, torch.arange(tkv - tq, tkv), sink=variant.sink,
                              recent=variant.recent, scale=module.scaling, k_logit_var=variant.k_logit_var,
                              pinned=pinned)
        return o[None].to(q.dtype)

    if variant.pin_tokens and variant.pin_rule == "prompt":
        def observe_prefill(module, q, k):
            """``q [1, Hq, T, d]``, ``k [1, Hkv, T, d]`` of one exact prompt prefill (model space)."""
            scores = pin_scores(q[0].transpose(0, 1).float(), k[0].transpose(0, 1).float(), module.scaling,
                                variant.pin_window, variant.pin_pool)
            pins[layer_index(module)] = pin_mask(scores, variant.pin_tokens, variant.sink, variant.recent)

        attention.observe_prefill = observe_prefill
    return attention


# --------------------------------------------------------------------------------------------------
# Calibration statistics (streaming, float64) and transform fits
# --------------------------------------------------------------------------------------------------


@dataclass
class VariantStats:
    """Per-layer, per-KV-group float64 sums over calibration tokens.

    ``qq``: query second moment (sum over the group's query heads); ``k_sum/kk``, ``v_sum/vv``: first
    and second moments of K and V; ``oo``: second moment of the true attention outputs ``o = S V`` of
    the group's heads (the paper's ``C_S = V^T S^T S V / N``); ``wvv``/``w_sum``: the code's diagonal
    proxy (``w_t = k_t^T Sigma_Q k_t``), accumulated with the *running* Sigma_Q estimate of the
    previous sequences when used streaming (exact when Sigma_Q is supplied).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    qq: torch.Tensor = field(init=False)
    q_rows: torch.Tensor = field(init=False)
    k_sum: torch.Tensor = field(init=False)
    kk: torch.Tensor = field(init=False)
    v_sum: torch.Tensor = field(init=False)
    vv: torch.Tensor = field(init=False)
    oo: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)

    def __post_init__(self):
        L, H, d = self.num_layers, self.num_kv_heads, self.head_dim
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.qq, self.kk, self.vv, self.oo = z(L, H, d, d), z(L, H, d, d), z(L, H, d, d), z(L, H, d, d)
        self.k_sum, self.v_sum = z(L, H, d), z(L, H, d)
        self.q_rows, self.tokens = z(L), z(L)

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor) -> None:
        """``q, o [T, Hq, d]``; ``k, v [T, Hkv, d]`` (post-RoPE, exact attention output ``o``)."""
        H = self.num_kv_heads
        qg = ref._group_queries(q.double(), H)  # [H, T*G, d]
        og = ref._group_queries(o.double(), H)
        k64, v64 = k.double().transpose(0, 1), v.double().transpose(0, 1)  # [H, T, d]
        self.qq[layer] += qg.transpose(1, 2) @ qg
        self.oo[layer] += og.transpose(1, 2) @ og
        self.q_rows[layer] += qg.shape[1]
        self.kk[layer] += k64.transpose(1, 2) @ k64
        self.vv[layer] += v64.transpose(1, 2) @ v64
        self.k_sum[layer] += k64.sum(1)
        self.v_sum[layer] += v64.sum(1)
        self.tokens[layer] += k.shape[0]

    def add_weighted(self, layer: int, k: torch.Tensor, v: torch.Tensor, wk: torch.Tensor,
                     wv: torch.Tensor) -> None:
        """Attention-weighted moments: ``k, v [T, Hkv, d]``, token weights ``wk, wv [Hkv, T]`` (see
        :func:`attention_token_weights`)."""
        if not hasattr(self, "kkw"):
            L, H, d = self.num_layers, self.num_kv_heads, self.head_dim
            z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
            self.kkw, self.vvw = z(L, H, d, d), z(L, H, d, d)
            self.kw_sum, self.vw_sum = z(L, H, d), z(L, H, d)
            self.k_wtot, self.v_wtot = z(L, H), z(L, H)
        for x, w, xx, xs, tot in ((k, wk, self.kkw, self.kw_sum, self.k_wtot),
                                  (v, wv, self.vvw, self.vw_sum, self.v_wtot)):
            x64, w64 = x.double().transpose(0, 1), w.double()  # [H, T, d], [H, T]
            xx[layer] += (x64 * w64[..., None]).transpose(1, 2) @ x64
            xs[layer] += (x64 * w64[..., None]).sum(1)
            tot[layer] += w64.sum(1)

    def wmean(self, side: str) -> torch.Tensor:
        s, t = (self.kw_sum, self.k_wtot) if side == "k" else (self.vw_sum, self.v_wtot)
        return s / t[..., None]

    def wcov(self, side: str, centered: bool) -> torch.Tensor:
        xx, t = (self.kkw, self.k_wtot) if side == "k" else (self.vvw, self.v_wtot)
        m2 = xx / t[..., None, None]
        if not centered:
            return m2
        mu = self.wmean(side)
        return m2 - mu[..., :, None] * mu[..., None, :]

    def sigma_q(self) -> torch.Tensor:
        return self.qq / self.q_rows[:, None, None, None]

    def c_s(self) -> torch.Tensor:
        """The paper's softmax V target per group, ``[L, H, d, d]``."""
        return self.oo / self.q_rows[:, None, None, None]

    def mean(self, side: str) -> torch.Tensor:
        return (self.k_sum if side == "k" else self.v_sum) / self.tokens[:, None, None]

    def cov(self, side: str, centered: bool) -> torch.Tensor:
        m2 = (self.kk if side == "k" else self.vv) / self.tokens[:, None, None, None]
        if not centered:
            return m2
        mu = self.mean(side)
        return m2 - mu[..., :, None] * mu[..., None, :]


def attention_token_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, sink: int,
                            recent: int, k_weight: Literal["p2", "p2dv"] = "p2"
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """How much an INT2 error on each token's K and V row moves the attention outputs, from exact
    attention over ``q [T, Hq, d]``, ``k, v [T, Hkv, d]``; only (query, key) pairs that read the key
    from INT2 (outside the sink/recent windows) count. Returns ``(wk, wv)``, each ``[Hkv, T]``:

    * ``wv[t] = sum_q p_qt^2`` (an error ``e`` on ``v_t`` moves ``o_q`` by ``p_qt e``);
    * ``wk[t] = sum_q p_qt^2`` (``"p2"``) or ``sum_q p_qt^2 ||v_t - o_q||^2`` (``"p2dv"``: a logit
      error ``delta`` on key ``t`` moves ``o_q`` by ``p_qt delta (v_t - o_q)``).

    Summed over the query heads of each KV group.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qh = q.float().transpose(0, 1)  # [Hq, T, d]
    kh = k.float().transpose(0, 1).repeat_interleave(g, 0)
    vh = v.float().transpose(0, 1).repeat_interleave(g, 0)
    causal, exact = ref.exact_window_mask(torch.arange(t), t, sink, recent)
    s = (qh @ kh.transpose(1, 2)) * scale
    p = torch.softmax(s.masked_fill_(~causal, float("-inf")), -1)
    p2 = (p * p).masked_fill_(~(causal & ~exact), 0.0)  # [Hq, Tq, Tk]
    wv = p2.sum(1)
    if k_weight == "p2":
        wk = wv
    else:
        o = p @ vh  # [Hq, T, d]
        dist = (vh * vh).sum(-1)[:, None, :] - 2 * (o @ vh.transpose(1, 2)) + (o * o).sum(-1)[:, :, None]
        wk = (p2 * dist.clamp_(min=0)).sum(1)
    return wk.view(hkv, g, t).sum(1), wv.view(hkv, g, t).sum(1)


def o_proj_importance(model, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[L, Hkv, d, d]``: per KV group, ``sum_{h in g} W_o^h W_o^h^T`` with ``W_o^h`` the output
    projection's input block of query head ``h`` (``[d, hidden]``): how much an error in that head's
    attention output moves the residual stream."""
    out = []
    for layer in model.get_decoder().layers:
        w = layer.self_attn.o_proj.weight.detach().double()  # [hidden, Hq*d]
        hq = w.shape[1] // head_dim
        wh = w.T.reshape(hq, head_dim, -1)  # [Hq, d, hidden]
        m = wh @ wh.transpose(1, 2)  # [Hq, d, d]
        out.append(m.reshape(num_kv_heads, hq // num_kv_heads, head_dim, head_dim).sum(1))
    return torch.stack(out)


def _sym_pow(a: torch.Tensor, p: float, eps_rel: float = 1e-9) -> torch.Tensor:
    a = (a + a.transpose(-1, -2)) / 2
    w, u = torch.linalg.eigh(a)
    w = torch.clamp(w, min=eps_rel * w.amax(-1, keepdim=True).clamp(min=1e-300))
    return (u * w[..., None, :] ** p) @ u.transpose(-1, -2)


def importance_metric(sigma_x: torch.Tensor, sigma_imp: torch.Tensor, shrink: float = 0.0) -> torch.Tensor:
    """``G = Sigma_X^{-1} # Sigma_imp`` (geometric mean), the minimizer of
    ``tr(Sigma_X G) tr(Sigma_imp G^{-1})``; normalized to ``det G = 1`` in log terms (mean log
    eigenvalue 0). ``shrink`` blends both inputs towards their scaled identity for robustness."""
    d = sigma_x.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)

    def blend(a):
        a = a.double()
        if shrink:
            tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)[..., None, None] / d
            a = (1 - shrink) * a + shrink * tr * eye
        return a

    sx, si = blend(sigma_x), blend(sigma_imp)
    sx_h, sx_ih = _sym_pow(sx, 0.5), _sym_pow(sx, -0.5)
    g = sx_ih @ _sym_pow(sx_h @ si @ sx_h, 0.5) @ sx_ih
    w = torch.linalg.eigvalsh((g + g.transpose(-1, -2)) / 2)
    return g / torch.exp(torch.log(w).mean(-1))[..., None, None]


def error_model(sigma_x: torch.Tensor, sigma_imp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``tr(T^T Sigma_X T) tr(Sigma_imp T^{-T} T^{-1}) / d^2``: the first-order INT2 error of storing
    ``x T`` (relative units; invariant to orthogonal ``T``)."""
    t = t.double()
    ti = torch.linalg.inv(t)
    a = torch.diagonal(t.transpose(-1, -2) @ sigma_x.double() @ t, dim1=-2, dim2=-1).sum(-1)
    b = torch.diagonal(sigma_imp.double() @ ti.transpose(-1, -2) @ ti, dim1=-2, dim2=-1).sum(-1)
    return a * b / t.shape[-1] ** 2


TransformKind = Literal["hadamard", "oscar", "oscar_softmax_v", "importance", "random"]


def fit_transforms(stats: VariantStats, kind_k: TransformKind, kind_v: TransformKind, *,
                   per_head: bool = False, center_k: bool = False, center_v: bool = False,
                   v_importance: torch.Tensor | None = None, shrink: float = 0.0, power: float = 1.0,
                   seed: int = 0, artifact=None, weighted: bool = False) -> list[LayerTransform]:
    """Fit one :class:`LayerTransform` per layer.

    Kinds: ``hadamard`` (data-free), ``oscar`` (the artifact's rotations, or refit ``U H P_br`` from
    the paper's targets: K ``qqt``; V the code's diagonal proxy needs a second pass, so without an
    artifact V falls back to ``oscar_softmax_v``), ``oscar_softmax_v`` (V: ``U H P_br`` of the paper's
    softmax target ``C_S``), ``importance`` (``T = G^{power/2} H``, ``G`` from :func:`importance_metric`
    with ``Sigma_X`` the (centered if ``center_*``) covariance and importance ``Sigma_Q`` for K /
    ``v_importance`` for V), ``random`` (a seeded random orthogonal matrix, per layer).
    ``per_head`` fits per KV group instead of pooling the groups. ``weighted`` uses the
    attention-weighted moments (:meth:`VariantStats.add_weighted`) for ``Sigma_X`` and the means.
    """
    L, H, d = stats.num_layers, stats.num_kv_heads, stats.head_dim
    had = ref.hadamard(d, torch.float64)
    gen = torch.Generator().manual_seed(seed)

    def pool(x):  # [L, H, d, d] -> [L, H, d, d] (mean over groups unless per_head)
        return x if per_head else x.mean(1, keepdim=True).expand_as(x)

    def rot_from_target(target):  # [L, H, d, d]
        out = torch.empty_like(target)
        for i in range(L):
            for h in range(H):
                out[i, h] = ref.fit_rotation(target[i, h])[0]
        return out

    def side(kind, s):
        centered = center_k if s == "k" else center_v
        sig_x = pool(stats.wcov(s, centered) if weighted else stats.cov(s, centered))
        if kind == "hadamard":
            return had.expand(L, H, d, d).clone(), None
        if kind == "random":
            mats = []
            for _ in range(L):
                qm, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
                mats.append(qm * torch.sign(torch.diagonal(r)))
            return torch.stack(mats)[:, None].expand(L, H, d, d).clone(), None
        if kind == "oscar":
            if artifact is not None:
                r = (artifact.k_rotation if s == "k" else artifact.v_rotation).double()
                return r[:, None].expand(L, H, d, d).clone(), None
            if s == "k":
                return rot_from_target(pool(stats.sigma_q())), None
            kind = "oscar_softmax_v"
        if kind == "oscar_softmax_v":
            return rot_from_target(pool(stats.c_s() if s == "v" else stats.sigma_q())), None
        if kind == "importance":
            imp = pool(stats.sigma_q()) if s == "k" else pool(v_importance)
            g = importance_metric(sig_x, imp, shrink)
            return _sym_pow(g, power / 2) @ had, None
        raise ValueError(f"unknown transform kind {kind!r}")

    tk, _ = side(kind_k, "k")
    tv, _ = side(kind_v, "v")
    mean = stats.wmean if weighted else stats.mean
    mk = mean("k") if center_k else None
    mv = mean("v") if center_v else None
    out = []
    for i in range(L):
        out.append(LayerTransform(tk[i].float(), tv[i].float(), None if mk is None else mk[i].float(),
                                  None if mv is None else mv[i].float()))
    return out


# --------------------------------------------------------------------------------------------------
# Proxy error on captured tensors (screening) and per-layer clip search
# --------------------------------------------------------------------------------------------------


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal GQA attention ``[T, Hq, d]`` (fp32), for proxy targets."""
    g = q.shape[1] // k.shape[1]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().repeat_interleave(g, 1).transpose(0, 1),
        v.float().repeat_interleave(g, 1).transpose(0, 1), is_causal=True, scale=scale)
    return o.transpose(0, 1)


def output_error(o_var: torch.Tensor, o_ref: torch.Tensor, w_o: torch.Tensor) -> float:
    """Relative error after the output projection: ``||(o_var - o_ref) W_o^T||^2 / ||o_ref W_o^T||^2``
    (``o [T, Hq, d]``, ``w_o [hidden, Hq*d]``)."""
    t = o_ref.shape[0]
    e = (o_var - o_ref).reshape(t, -1) @ w_o.T.float()
    r = o_ref.reshape(t, -1) @ w_o.T.float()
    return float((e * e).sum() / (r * r).sum())


def layer_proxy_error(q, k, v, t: LayerTransform, kspec, vspec, w_o, scale, *, sink, recent,
                      q_start: int = 0, q_stride: int = 1, o_ref: torch.Tensor | None = None) -> float:
    """Proxy error of one layer on captured ``q, k, v`` for queries at positions
    ``q_start, q_start + q_stride, ...`` (``o_ref``: their exact outputs, if already computed)."""
    pos = torch.arange(q_start, q.shape[0], q_stride)
    if o_ref is None:
        o_ref = exact_attention(q, k, v, scale)[pos]
    o = variant_attention(q[pos], k, v, t, kspec, vspec, pos, sink=sink, recent=recent, scale=scale)
    return output_error(o, o_ref, w_o)


def captures_proxy_error(captures, layer: int, t: LayerTransform, kspec, vspec, w_o, scale, *, sink, recent,
                         q_start: int = 0, q_stride: int = 1) -> float:
    """:func:`layer_proxy_error` of ``layer`` summed over ``captures`` (``[(q, k, v) per layer]`` per sequence)."""
    return sum(layer_proxy_error(c[layer][0], c[layer][1], c[layer][2], t, kspec, vspec, w_o, scale, sink=sink,
                                 recent=recent, q_start=q_start, q_stride=q_stride) for c in captures)


def search_clip_ratios(captures, transforms: list[LayerTransform], base: AttentionVariant, w_os, scale, *,
                       candidates=(0.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.85, 0.8), q_start: int = 512):
    """Per layer, pick the K clip (V unquantized) and then the V clip (K at its chosen clip) that
    minimize the proxy error summed over ``captures`` (``[(q, k, v) per layer]`` per sequence).
    Returns ``(k_clips, v_clips)`` tuples."""
    kc, vc = [], []
    for i, t in enumerate(transforms):
        def err(ks, vs, i=i, t=t):
            return captures_proxy_error(captures, i, t, ks, vs, w_os[i], scale, sink=base.sink, recent=base.recent,
                                        q_start=q_start)
        ek = {r: err(replace(base.k, clip=r), None) for r in candidates}
        bk = min(ek, key=ek.get)
        ev = {r: err(replace(base.k, clip=bk), replace(base.v, clip=r)) for r in candidates}
        bv = min(ev, key=ev.get)
        kc.append(bk)
        vc.append(bv)
    return tuple(kc), tuple(vc)


def k_bits_sensitivity(captures, transforms: list[LayerTransform], base: AttentionVariant, w_os, scale, *,
                       low: int = 2, high: int = 3, q_start: int = 1024, q_stride: int = 4) -> list[dict]:
    """Per layer, how much the attention-output proxy error (:func:`layer_proxy_error`, summed over
    ``captures`` = ``[(q, k, v) per layer]`` per sequence) drops when that layer's K codes go from ``low``
    to ``high`` bits, everything else as in ``base`` (V quantized as in ``base``). ``q_start``: only
    queries that read many INT2 keys (from position 1024 with the 64 + 256 windows: >= 704). Returns
    ``[{"low": err, "high": err, "drop": low - high}]`` per layer; rank layers by ``drop``."""
    if base.k is None:
        raise ValueError("k_bits_sensitivity needs a quantized K side")
    out = []
    for i, t in enumerate(transforms):
        ks, vs = base.specs(i)

        def err(bits, i=i, t=t, ks=ks, vs=vs):
            return captures_proxy_error(captures, i, t, replace(ks, bits=bits), vs, w_os[i], scale, sink=base.sink,
                                        recent=base.recent, q_start=q_start, q_stride=q_stride)

        lo, hi = err(low), err(high)
        out.append({"low": lo, "high": hi, "drop": lo - hi})
    return out


def top_layers(scores, n: int) -> tuple[int, ...]:
    """The ``n`` layers with the largest scores (ties: the lower layer), in layer order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return tuple(sorted(order[:n]))


def even_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """``n`` evenly spaced layers, centred in their strides (30 layers, 6: 2, 7, 12, 17, 22, 27)."""
    stride = num_layers / n
    return tuple(int(stride * j + stride / 2) for j in range(n))


def layer_bits(num_layers: int, layers, high: int = 3, low: int = 2) -> tuple[int, ...]:
    """A ``k_bits`` tuple: ``high`` in ``layers``, ``low`` elsewhere."""
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{num_layers - 1}")
    chosen = set(layers)
    return tuple(high if i in chosen else low for i in range(num_layers))


def clip_note(ratios) -> str:
    return ",".join(f"{r:g}" for r in ratios)



# --------------------------------------------------------------------------------------------------
# Per-channel centering with plain (token-count) statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class ChannelStats:
    """Per-(layer, KV head) channel statistics of K and V rows for per-channel centering, streamed
    over calibration sequences (position 0 = the first token of a sequence).

    Kept: float64 sums over all tokens; the per-position sums of the first ``head`` positions of every
    sequence (so the mean that leaves out the first ``s <= head`` tokens of each sequence, e.g. the
    attention-sink token 0 or the whole BF16 sink window, is exact); and every ``sample_stride``-th
    row at positions ``>= head`` (fp32) for the median.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    head: int = 64
    sample_stride: int = 8
    sums: dict = field(init=False)
    head_sums: dict = field(init=False)
    head_count: torch.Tensor = field(init=False)
    tokens: torch.Tensor = field(init=False)
    samples: dict = field(init=False)

    def __post_init__(self):
        L, H, d = self.num_layers, self.num_kv_heads, self.head_dim
        self.sums = {s: torch.zeros(L, H, d, dtype=torch.float64) for s in "kv"}
        self.head_sums = {s: torch.zeros(L, self.head, H, d, dtype=torch.float64) for s in "kv"}
        self.head_count = torch.zeros(L, self.head, dtype=torch.float64)
        self.tokens = torch.zeros(L, dtype=torch.float64)
        self.samples = {s: [[] for _ in range(L)] for s in "kv"}

    def add(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [T, Hkv, d]``: one whole sequence of one layer, from its first token."""
        t = k.shape[0]
        n = min(t, self.head)
        for s, x in (("k", k), ("v", v)):
            x64 = x.double()
            self.sums[s][layer] += x64.sum(0)
            self.head_sums[s][layer, :n] += x64[:n]
            if t > self.head:
                self.samples[s][layer].append(x[self.head::self.sample_stride].float().clone())
        self.head_count[layer, :n] += 1
        self.tokens[layer] += t

    def mean(self, side: str, skip: int = 0) -> torch.Tensor:
        """``[L, H, d]``: the channel mean over every token at position ``>= skip`` of its sequence."""
        if not 0 <= skip <= self.head:
            raise ValueError(f"skip must be in [0, {self.head}], got {skip}")
        s = self.sums[side] - self.head_sums[side][:, :skip].sum(1)
        n = self.tokens - self.head_count[:, :skip].sum(1)
        return s / n[:, None, None]

    def median(self, side: str, basis: torch.Tensor | None = None) -> torch.Tensor:
        """``[L, H, d]`` (model space): the coordinate-wise median of the sampled rows (positions
        ``>= head``) taken in the basis ``x @ basis[l, h]`` (``basis [L, H, d, d]``, invertible; ``None``
        = the model space) and mapped back, so that ``(x - mu) @ basis`` has median 0 per coordinate."""
        out = []
        for i in range(self.num_layers):
            x = torch.cat(self.samples[side][i]).double()  # [N, H, d]
            if basis is None:
                out.append(x.median(0).values)
                continue
            b = basis[i].double()
            med = torch.einsum("nhd,hde->nhe", x, b).median(0).values  # [H, d] in the rotated basis
            out.append(torch.einsum("hd,hde->he", med, torch.linalg.inv(b)))
        return torch.stack(out)

    def state(self) -> dict:
        return {"sums": self.sums, "head_sums": self.head_sums, "head_count": self.head_count,
                "tokens": self.tokens, "samples": {s: [torch.cat(x) if x else torch.empty(0) for x in self.samples[s]]
                                                   for s in "kv"}}

    @staticmethod
    def from_state(num_layers: int, num_kv_heads: int, head_dim: int, state: dict, **kw) -> ChannelStats:
        st = ChannelStats(num_layers, num_kv_heads, head_dim, **kw)
        st.sums, st.head_sums = state["sums"], state["head_sums"]
        st.head_count, st.tokens = state["head_count"], state["tokens"]
        st.samples = {s: [[x] if x.numel() else [] for x in state["samples"][s]] for s in "kv"}
        return st


def with_means(transforms: list[LayerTransform], k_mean: torch.Tensor | None = None,
               v_mean: torch.Tensor | None = None) -> list[LayerTransform]:
    """The same transforms with per-layer means ``[L, H, d]`` (model space) removed before storing;
    ``None`` leaves that side uncentered. Exact for attention without quantization (softmax ignores
    the per-query constant ``q . mu_K``; ``o = P (V - mu_V) + mu_V`` since each row of ``P`` sums to 1)."""
    return [replace(t, k_mean=None if k_mean is None else k_mean[i].float(),
                    v_mean=None if v_mean is None else v_mean[i].float())
            for i, t in enumerate(transforms)]


# --------------------------------------------------------------------------------------------------
# Attention-aware (weighted) grid fit: per-dimension weights of the stored coordinates
# --------------------------------------------------------------------------------------------------


def _normalized_diag(m: torch.Tensor) -> torch.Tensor:
    """``diag(m)`` of ``[..., d, d]`` scaled to mean 1 over ``d`` (the fit is invariant to the scale)."""
    w = torch.diagonal(m, dim1=-2, dim2=-1).clamp(min=0)
    return w / w.mean(-1, keepdim=True).clamp(min=1e-300)


def query_weights(sigma_q: torch.Tensor, transforms: list[LayerTransform], floor: float = 1e-3) -> torch.Tensor:
    """``[L, Hkv, d]``: the second moment of the queries along each stored K coordinate,
    ``diag(k_query^T Sigma_Q k_query)`` per layer and KV group (``sigma_q [L, Hkv, d, d]``, the
    calibration text's :meth:`VariantStats.sigma_q`; ``k_query`` maps model-space queries to the
    stored basis), normalized to mean 1 and floored at ``floor`` (relative). A K row error ``e`` moves
    a query's score by ``q'.e``; averaged over the calibration queries its square is ``e^T Sigma' e``,
    of which ``sum_i w_i e_i^2`` is the diagonal part (all of it when ``Sigma'`` is diagonal, as in the
    eigenbasis of ``Sigma_Q``)."""
    out = []
    for i, t in enumerate(transforms):
        kq = t.k_query.double()  # [Hkv, d, d]
        out.append(_normalized_diag(kq.transpose(-1, -2) @ sigma_q[i].double() @ kq))
    w = torch.stack(out)
    return torch.clamp(w, min=floor).float()


def output_weights(v_importance: torch.Tensor, transforms: list[LayerTransform], floor: float = 1e-3) -> torch.Tensor:
    """``[L, Hkv, d]``: how much an error on each stored V coordinate moves the residual stream,
    ``diag(v_out Sigma_imp v_out^T)`` with ``Sigma_imp = sum_h W_o^h W_o^h^T`` (:func:`o_proj_importance`),
    normalized to mean 1 and floored at ``floor``."""
    out = []
    for i, t in enumerate(transforms):
        vo = t.v_out.double()  # [Hkv, d, d]: stored -> model space
        out.append(_normalized_diag(vo @ v_importance[i].double() @ vo.transpose(-1, -2)))
    return torch.clamp(torch.stack(out), min=floor).float()


def query_moment_matrix(sigma_q: torch.Tensor, transforms: list[LayerTransform]) -> torch.Tensor:
    """``[L, Hkv, d, d]``: ``k_query^T Sigma_Q k_query`` (the calibration queries' second moment in the
    stored K basis), scaled to mean diagonal 1: the whole quadratic form of the expected squared score
    error ``e^T Sigma' e`` (``weighting="full"``)."""
    out = []
    for i, t in enumerate(transforms):
        kq = t.k_query.double()
        m = kq.transpose(-1, -2) @ sigma_q[i].double() @ kq
        m = (m + m.transpose(-1, -2)) / 2
        out.append(m / torch.diagonal(m, dim1=-2, dim2=-1).mean(-1)[..., None, None])
    return torch.stack(out).float()


def with_weights(transforms: list[LayerTransform], k_weight: torch.Tensor | None = None,
                 v_weight: torch.Tensor | None = None) -> list[LayerTransform]:
    """The same transforms with per-layer weights ``[L, Hkv, d]`` for the weighted grid fit."""
    return [replace(t, k_weight=None if k_weight is None else k_weight[i],
                    v_weight=None if v_weight is None else v_weight[i]) for i, t in enumerate(transforms)]


def query_eigenbasis(sigma_q: torch.Tensor) -> torch.Tensor:
    """``[L, Hkv, d, d]``: the eigenvectors of each KV group's ``Sigma_Q`` (columns, descending
    eigenvalue), an orthogonal K basis in which ``Sigma_Q`` is diagonal (no Hadamard after it)."""
    s = sigma_q.double()
    _, u = torch.linalg.eigh((s + s.transpose(-1, -2)) / 2)
    return u.flip(-1)
