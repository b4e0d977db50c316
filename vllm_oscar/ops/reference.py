"""The OSCAR spec in plain PyTorch (CPU-runnable, float64-capable).

Every kernel (CUDA store/decode/prefix-dequant), the vLLM backend and the calibrator are tested
against the functions here. Conventions:

* Row vectors: ``x_rot = x @ R`` and ``x = x_rot @ R.T``. ``R`` is ``[head_dim, head_dim]``, one per
  layer, shared by all heads.
* A *row* is one (token, kv head) vector of ``head_dim`` elements; quantization is per row
  (group size = head_dim).
* Quantization arithmetic is float32 (what the kernels do) whatever the input dtype; rotations and
  calibration targets follow the input dtype, so float64 inputs give float64 math.

Quantizer, exactly (``d = head_dim``), ``levels="minmax"`` (the paper's)::

    x      = rows of (K or V) @ R                          (fp32)
    idx    = min(int(ratio * d), d - 1)                    (ratio <= 0: no clipping)
    thr    = sort(|x|)[idx]                                 (0-based, ascending)
    x      = clamp(x, -thr, thr)
    scale  = fp16(clamp(max((max(x) - min(x)) / 3, 2**-14), max=65504))
    offset = fp16(clamp(min(x), -65504, 65504))
    code   = clamp(floor((x - offset) / scale + 0.5), 0, 3)   (fp32, IEEE division)
    x_hat  = code * scale + offset

``levels="mse"`` stores the same ``(scale, offset, code)`` but fits the fp16 pair to the unclipped
row by alternating least squares (:func:`quantize_int2_mse`, spelled out in the kernel's fp32
summation order so that the store kernel reproduces it bit for bit).

``params="u8"`` (both grids) stores the pair in 2 bytes instead of 4 (:mod:`vllm_oscar.layout`): every
fp16 rounding above becomes :func:`round_params_u8` of the unrounded pair, and the codes are computed
against the rounded pair as before.
"""

from __future__ import annotations

import math

import torch

from vllm_oscar.layout import PARAM_FORMATS, Int2PageLayout

# Smallest normal fp16: a constant row (all elements equal) gets this scale instead of 0, so that the
# code computation never divides by zero and the row dequantizes to its value exactly (code 0).
SCALE_FLOOR = 2.0**-14
FP16_MAX = 65504.0
INT2_LEVELS = 4
# params="u8" (vllm_oscar.layout): scale = 2**(m//16 - 10) * (1 + (m%16)/16), offset = scale * (u - 152) / 16.
U8_SCALE_MIN = 2.0**-10  # m = 0
U8_SCALE_MAX = 62.0  # m = 255: 2**5 * 31/16
U8_OFFSET_ZERO = 152  # u of offset 0; u in 0..255 covers -9.5 .. +6.4375 scales
_U8_SCALE_BIAS_BITS = 117 << 23  # fp32 bits of the scale = (m << 19) + this


def check_params(params: str) -> None:
    if params not in PARAM_FORMATS:
        raise ValueError(f"unknown params {params!r}; valid: {list(PARAM_FORMATS)}")


# --------------------------------------------------------------------------------------------------
# Rotation construction
# --------------------------------------------------------------------------------------------------


def _check_power_of_two(d: int, what: str) -> None:
    if d <= 0 or d & (d - 1):
        raise ValueError(f"{what}={d} must be a power of two")


def hadamard(d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix ``[d, d]`` (entries ±1/sqrt(d), orthonormal).

    Built recursively as ``[[h, h], [h, -h]] / sqrt(2)``.
    """
    _check_power_of_two(d, "hadamard size")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0) / math.sqrt(2.0)
    return h.to(dtype)


def bit_reversal(d: int) -> torch.Tensor:
    """``br[i]`` = ``i`` with its ``log2(d)`` bits reversed (d=8: 0,4,2,6,1,5,3,7)."""
    _check_power_of_two(d, "bit-reversal size")
    bits = d.bit_length() - 1
    return torch.tensor([int(format(i, f"0{bits}b")[::-1], 2) if bits else 0 for i in range(d)])


def bit_reversal_permutation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Permutation matrix ``P`` that sends the i-th largest eigenvalue's coordinate to slot ``br[i]``.

    ``perm[br[i]] = order[i]`` with ``order`` the indices of ``eigenvalues`` sorted descending, and
    ``P = I[:, perm]``, so ``(y @ P)[j] = y[perm[j]]``.
    """
    d = eigenvalues.shape[-1]
    br = bit_reversal(d)
    order = torch.argsort(eigenvalues.to(torch.float64), descending=True, stable=True)
    perm = torch.empty(d, dtype=torch.long)
    perm[br] = order
    return torch.eye(d, dtype=torch.float64)[:, perm]


def compose_rotation(eigenvectors: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``R = U @ H @ P_br`` (the authors' ``r_h_pbr`` composition, used by the published rotations)."""
    d = eigenvectors.shape[-1]
    u = eigenvectors.to(torch.float64)
    return u @ hadamard(d) @ bit_reversal_permutation(eigenvalues)


def fit_rotation(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation from a second-moment target ``[d, d]``: symmetrize, ``eigh``, compose.

    Returns ``(R [d, d] float64, eigenvalues [d] float64, ascending as eigh gives them)``.
    """
    t = target.to(torch.float64)
    t = (t + t.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(t)
    return compose_rotation(eigenvectors, eigenvalues), eigenvalues


# --------------------------------------------------------------------------------------------------
# Calibration targets (brute-force definitions; calibrate/ accumulates the same sums streaming)
# --------------------------------------------------------------------------------------------------


def _group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``q [T, Hq, d]`` -> ``[Hkv, T*G, d]`` with query heads ``g*G .. g*G+G-1`` in group ``g``."""
    t, hq, d = q.shape
    if hq % num_kv_heads:
        raise ValueError(f"num_q_heads={hq} is not a multiple of num_kv_heads={num_kv_heads}")
    g = hq // num_kv_heads
    return q.reshape(t, num_kv_heads, g, d).permute(1, 0, 2, 3).reshape(num_kv_heads, t * g, d)


def query_second_moments(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per KV group ``Sigma_g = mean over (token, q head in g) of q q^T``: ``[Hkv, d, d]``."""
    qg = _group_queries(q, num_kv_heads)
    return qg.transpose(1, 2) @ qg / qg.shape[1]


def k_target(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """K target ("qqt"): the mean over KV groups of the groups' raw query second moments ``[d, d]``.

    ``q`` is ``[T, Hq, d]``, after QK-norm and RoPE. No mean-centering, no 1/sqrt(d).
    """
    return query_second_moments(q, num_kv_heads).mean(0)


def v_token_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``w[g, t] = k_{t,g}^T Sigma_g k_{t,g}``, normalized to mean 1 per group.

    The normalization is ``w * T / max(sum_t w, 1e-12)``. Shapes: ``q [T, Hq, d]``, ``k [T, Hkv, d]``.
    """
    sigma = query_second_moments(q, k.shape[1])  # [Hkv, d, d]
    w = torch.einsum("thd,hde,the->ht", k, sigma, k)
    t = k.shape[0]
    return w * t / torch.clamp(w.sum(1, keepdim=True), min=1e-12)


def v_target(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """V target ("sst", the code's diagonal proxy of the paper's ``V^T S^T S V``): ``[d, d]``.

    ``C_g = (1/T) sum_t w~_t v_{t,g} v_{t,g}^T`` with :func:`v_token_weights`, averaged over groups.
    """
    w = v_token_weights(q, k)  # [Hkv, T]
    c = torch.einsum("ht,thd,the->hde", w, v, v) / v.shape[0]
    return c.mean(0)


# --------------------------------------------------------------------------------------------------
# Clipping, INT2 quantization, packing
# --------------------------------------------------------------------------------------------------


def clip_index(ratio: float, d: int) -> int | None:
    """``min(int(ratio * d), d - 1)``; ``None`` when ``ratio <= 0`` (clipping off)."""
    if ratio <= 0:
        return None
    return min(int(ratio * d), d - 1)


def clip_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clamp each row (last dim) to ``[-thr, thr]``, ``thr`` = the ``clip_index``-th smallest ``|x|``."""
    idx = clip_index(ratio, x.shape[-1])
    if idx is None:
        return x
    thr = torch.sort(x.abs(), dim=-1).values[..., idx : idx + 1]
    return torch.minimum(torch.maximum(x, -thr), thr)


def quantize_int2(x: torch.Tensor, params: str = "fp16") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max INT2 per row: ``(codes uint8 [..., d], scale fp16 [...], offset fp16 [...])``;
    with ``params="u8"`` scale and offset are fp32 values on the u8 grid (:func:`round_params_u8`)."""
    check_params(params)
    x = x.to(torch.float32)
    lo = x.amin(-1)
    hi = x.amax(-1)
    if params == "u8":
        scale, offset = round_params_u8((hi - lo) / _f32(3.0), lo)
        return _codes(x, scale, offset).to(torch.uint8), scale, offset
    scale = torch.clamp((hi - lo) / 3.0, min=SCALE_FLOOR, max=FP16_MAX).to(torch.float16)
    offset = torch.clamp(lo, -FP16_MAX, FP16_MAX).to(torch.float16)
    codes = torch.floor((x - offset.float()[..., None]) / scale.float()[..., None] + 0.5)
    return codes.clamp(0, INT2_LEVELS - 1).to(torch.uint8), scale, offset


# --- MSE-fitted affine grid (``levels="mse"``) ------------------------------------------------------
#
# Same storage as min-max (``code * scale + offset``, fp16 pair per row), but the pair is fitted to the
# row by alternating least squares instead of spanning [min, max]: codes = nearest level, then the
# least-squares line through the points (code, x), repeated from a few starting grids; the best grid
# by squared error (after fp16 rounding) is stored. No clipping: the fit trades the tails off itself.
#
# The store kernel (csrc/kernels/store.cuh) runs exactly this in fp32 with IEEE round-to-nearest ops
# and no contraction, so every row sum is spelled out in the kernel's order (``_lane_sum``).
#
# Choice of starts and passes, measured on 1,920 Hadamard-rotated K/V rows of SmolLM2 (calibration
# text): squared error / the exhaustive optimum of any affine 4-level grid, K and V, and the sweep's
# attention-output proxy (docs/accuracy.md "Adopted" has the table and the FLOP model):
#   min-max + Lloyd-Max + 4 shrunk starts, <= 6 passes (adopted)   1.0087 / 1.0074, proxy 0.0209, <= 22 KFLOP/row @d=64
#   same, 3 passes                                                  1.0144 / 1.0134, proxy 0.0210,    14 KFLOP
#   Lloyd-Max + one 60% start, 2 passes                             1.0271 / 1.0256, proxy 0.0219,     5 KFLOP
#   the paper's min-max, clip 0.96 / 0.92                           1.55 / 1.25,     proxy 0.0470
# All fits are within 4.5% of each other on the proxy; the adopted one is the sweep's own `mse` grid
# (identical output), and its cost is paid once per stored row by the store kernel only.

LEVELS = ("minmax", "mse")

#: Starting grids: the min-max grid shrunk around the mid-range to these fractions of the range.
#: One fraction (0.6) next to the Lloyd-Max start: on Hadamard-rotated SmolLM2 K/V rows (layers 0, 3, ...,
#: 27, one 2048-token sequence of the dev set) the squared error is 0.23% (rows of 128) and 0.61% (rows of
#: 64) above the best of the earlier five starts (1.0, 0.8, 0.6, 0.45 and Lloyd-Max), at 2/5 of the
#: refinement work, which dominates the store kernel's prefill cost: 1180 -> 612 us per 8192 tokens and
#: layer at the Qwen3-8B shape on an H100 (``python -m vllm_oscar.calibrate.mse_starts``, docs/kernels.md).
MSE_START_FRACTIONS = (0.6,)
#: Whether a Lloyd-Max start (uniform levels 1.00637 std apart, centred on the mean) is tried first.
MSE_LLOYD_MAX_START = True
#: Alternating least-squares passes (code step + line fit) from each start.
MSE_PASSES = 6
# The Lloyd-Max step of a 4-level quantizer for a Gaussian, in standard deviations.
_LM_STEP = 1.00637
# A start's scale is at least this (a constant row gives a zero range); codes then sit at one level.
_MSE_MIN_SCALE = 2.0**-100


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def lane_order(d: int) -> torch.Tensor:
    """The store kernel's element-to-lane assignment: ``perm [L * E]``, lane ``li`` owning elements
    ``perm[li*E : (li+1)*E]`` in that order (``L = min(d/4, 32)`` lanes, ``E = d/L`` elements each,
    element ``e`` of lane ``li`` is ``li + (e // 4) * L + (e % 4) * d/4``: its code bytes ``li + k*L``)."""
    lanes = min(d // 4, 32)
    per = d // lanes
    li = torch.arange(lanes)[:, None]
    e = torch.arange(per)[None, :]
    return (li + (e // 4) * lanes + (e % 4) * (d // 4)).reshape(-1)


def _lane_sum(t: torch.Tensor, perm: torch.Tensor, lanes: int) -> torch.Tensor:
    """Row sums of ``t [..., d]`` fp32 in the store kernel's order: each lane adds its ``E`` elements
    left to right, then halving folds ``v[:n/2] + v[n/2:]`` (what a xor butterfly over ``lanes``
    leaves, bit-identical, on every lane; fp32 addition is commutative)."""
    tl = t[..., perm].reshape(*t.shape[:-1], lanes, -1)
    acc = tl[..., 0]
    for e in range(1, tl.shape[-1]):
        acc = acc + tl[..., e]
    while acc.shape[-1] > 1:
        h = acc.shape[-1] // 2
        acc = acc[..., :h] + acc[..., h:]
    return acc[..., 0]


# The MSE path clamps with fmin/fmax (a NaN operand yields the other one), as CUDA's fminf/fmaxf do:
# huge finite rows overflow intermediate sums to inf and inf - inf to NaN, and the kernel must still
# land on the same grid.
def _clamp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.fmin(torch.fmax(t, _f32(lo)), _f32(hi))


def _codes(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Nearest level ``fmin(fmax(floor((x - offset) / scale + 0.5), 0), 3)`` as fp32 (IEEE division)."""
    return _clamp(torch.floor((x - offset[..., None]) / scale[..., None] + 0.5), 0.0, INT2_LEVELS - 1)


def _round_params(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored fp16 pair as fp32, with min-max's clamps (scale floor 2**-14, +-65504)."""
    return (_clamp(scale, SCALE_FLOOR, FP16_MAX).to(torch.float16).float(),
            _clamp(offset, -FP16_MAX, FP16_MAX).to(torch.float16).float())


def round_params_u8(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored u8 pair as fp32 (``params="u8"``), exactly (fp32, IEEE ops, fmin/fmax clamps)::

        s = fmin(fmax(scale, 2**-10), 62);  bits(s) = (bits(s) + 2**18) & ~(2**19 - 1)   (4 mantissa bits,
                                                                                     ties away from 0)
        u = fmin(fmax(floor((offset / s) * 16 + 0.5), -152), 103);  offset = s * (u * 0.0625)

    ``s`` has 5 significant bits and ``u`` 8, so ``offset`` is exact. The codes are
    ``m = (bits(s) - (117 << 23)) >> 19`` and ``u + 152`` (:func:`encode_params`)."""
    s = _clamp(scale.to(torch.float32), U8_SCALE_MIN, U8_SCALE_MAX)
    bits = s.view(torch.int32)
    s = ((bits + (1 << 18)) & ~((1 << 19) - 1)).view(torch.float32)
    u = _clamp(torch.floor((offset.to(torch.float32) / s) * _f32(16.0) + _f32(0.5)), -U8_OFFSET_ZERO,
               255 - U8_OFFSET_ZERO)
    return s, s * (u * _f32(0.0625))


def round_params(scale: torch.Tensor, offset: torch.Tensor, params: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored pair as fp32: :func:`_round_params` (fp16, min-max's clamps) or :func:`round_params_u8`."""
    return round_params_u8(scale, offset) if params == "u8" else _round_params(scale, offset)


def encode_params(scale: torch.Tensor, offset: torch.Tensor, params: str) -> torch.Tensor:
    """A stored pair (values already on the format's grid) as its bytes' dtype: ``[..., 2]`` fp16, or
    uint8 ``[scale code, offset code]`` for ``"u8"``."""
    check_params(params)
    if params == "fp16":
        return torch.stack([scale.to(torch.float16), offset.to(torch.float16)], -1)
    s = scale.to(torch.float32)
    m = (s.view(torch.int32) - _U8_SCALE_BIAS_BITS) >> 19
    u = torch.round(offset.to(torch.float32) / s * 16.0) + U8_OFFSET_ZERO
    if not (((m >= 0) & (m <= 255)).all() and ((u >= 0) & (u <= 255)).all()):
        raise ValueError("encode_params: a (scale, offset) pair is not on the u8 grid (round_params_u8 first)")
    return torch.stack([m.to(torch.uint8), u.to(torch.uint8)], -1)


def decode_params(raw: torch.Tensor, params: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_params`: ``raw [..., 2]`` -> ``(scale, offset)`` fp32."""
    check_params(params)
    if params == "fp16":
        return raw[..., 0].float(), raw[..., 1].float()
    m = raw[..., 0].to(torch.int32)
    s = ((m << 19) + _U8_SCALE_BIAS_BITS).view(torch.float32)
    return s, s * ((raw[..., 1].to(torch.float32) - U8_OFFSET_ZERO) * 0.0625)


def _sq_error(x, codes, scale, offset, perm, lanes):
    """``sum((code * scale + offset - x)^2)`` per row, fp32, each op rounded, kernel order."""
    e = codes * scale[..., None] + offset[..., None] - x
    return _lane_sum(e * e, perm, lanes)


def quantize_int2_mse(
    x: torch.Tensor,
    *,
    start_fractions: tuple[float, ...] = MSE_START_FRACTIONS,
    lloyd_max_start: bool = MSE_LLOYD_MAX_START,
    passes: int = MSE_PASSES,
    params: str = "fp16",
    _trace: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE-fitted affine INT2 per row: ``(codes uint8 [..., d], scale fp16 [...], offset fp16 [...])``
    (``params="u8"``: scale and offset fp32 on the u8 grid, every fp16 rounding below is
    :func:`round_params_u8`).

    ``d`` must be a multiple of 4 (the kernel's lanes hold whole code bytes). Exactly, in fp32 with
    every operation rounded to nearest (``Σ`` = :func:`_lane_sum`, the kernel's summation order;
    ``Σc``, ``Σc²`` are integers, exact in any order)::

        candidates: the min-max grid of :func:`quantize_int2` (no passes), then from each start
          Lloyd-Max: mean = Σx / d, std = sqrt(Σ((x - mean)²) / d), s = 1.00637 * std, o = mean - 1.5 s
          fraction a: mid = (lo + hi) * 0.5, rng = hi - lo, s = (a * rng) / 3, o = mid - (a/2) * rng
          s = fmax(s, 2**-100); c = codes(s, o); ``passes`` times:
            det = d Σc² - (Σc)²;  s' = (d Σcx - Σc Σx) / det;  o' = (Σx - s' Σc) * (1/d)
            (s, o) = (s', o') if det > 0 and s' > 0;  c = codes(s, o)
          (s, o) = fp16 as min-max clamps them; err = Σ((codes(s, o) * s + o - x)²)
        keep the first candidate with the smallest err (strict <); codes against its fp16 pair.

    ``codes(s, o) = fmin(fmax(floor((x - o) / s + 0.5), 0), 3)`` and every clamp use fmin/fmax (NaN
    gives the other operand), so rows huge enough to overflow a sum to inf still match the kernel.
    Finite inputs only: a NaN/inf element gives some grid, not necessarily the kernel's.
    ``_trace`` (tests): receives ``(scale, offset, err)`` fp32 per candidate, the pair before rounding.
    """
    check_params(params)
    x = x.to(torch.float32)
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"row length {d} is not a multiple of 4")
    lanes = min(d // 4, 32)
    perm = lane_order(d)

    def row_sum(t):
        return _lane_sum(t, perm, lanes)

    lo, hi = x.amin(-1), x.amax(-1)
    sx = row_sum(x)
    inv_d = _f32(1.0 / d)

    best_s, best_o = round_params((hi - lo) / _f32(3.0), lo, params)
    best_err = _sq_error(x, _codes(x, best_s, best_o), best_s, best_o, perm, lanes)
    if _trace is not None:
        _trace.append((best_s, best_o, best_err))

    starts = []
    if lloyd_max_start:
        mean = sx * inv_d
        dev = x - mean[..., None]
        std = torch.sqrt(row_sum(dev * dev) * inv_d)
        s0 = _f32(_LM_STEP) * std
        starts.append((s0, mean - _f32(1.5) * s0))
    if start_fractions:
        mid, rng = (lo + hi) * _f32(0.5), hi - lo
        for a in start_fractions:
            starts.append(((_f32(a) * rng) / _f32(3.0), mid - _f32(a / 2) * rng))
    dd = float(d)
    for s, o in starts:
        s = torch.fmax(s, _f32(_MSE_MIN_SCALE))
        c = _codes(x, s, o)
        for _ in range(passes):
            sc, scc = c.sum(-1), (c * c).sum(-1)  # integers <= 3d, 9d: exact in any order
            scx = row_sum(c * x)
            det = sc.mul(-sc).add_(scc * dd)  # exact: |terms| < 2**24
            s_new = (scx * dd - sc * sx) / torch.where(det > 0, det, torch.ones_like(det))
            o_new = (sx - s_new * sc) * inv_d
            ok = (det > 0) & (s_new > 0)
            s, o = torch.where(ok, s_new, s), torch.where(ok, o_new, o)
            c = _codes(x, s, o)
        sr, orr = round_params(s, o, params)
        err = _sq_error(x, _codes(x, sr, orr), sr, orr, perm, lanes)
        if _trace is not None:
            _trace.append((s, o, err))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_o = torch.where(better, sr, best_s), torch.where(better, orr, best_o)
    codes = _codes(x, best_s, best_o)
    if params == "u8":
        return codes.to(torch.uint8), best_s, best_o
    return codes.to(torch.uint8), best_s.to(torch.float16), best_o.to(torch.float16)


def check_levels(levels: str, k_clip_ratio: float = 0.0, v_clip_ratio: float = 0.0) -> None:
    """``levels`` is one of :data:`LEVELS`; ``"mse"`` does not clip (both ratios must be <= 0)."""
    if levels not in LEVELS:
        raise ValueError(f"unknown levels {levels!r}; valid: {list(LEVELS)}")
    if levels == "mse" and (k_clip_ratio > 0 or v_clip_ratio > 0):
        raise ValueError(
            f"levels 'mse' fits the grid to the whole row and does not clip; k_clip_ratio and v_clip_ratio must "
            f"be 0, got {k_clip_ratio} and {v_clip_ratio} (clipping belongs to levels 'minmax')"
        )


def quantize_int2_levels(
    x: torch.Tensor, levels: str, params: str = "fp16"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_int2` (``"minmax"``) or :func:`quantize_int2_mse` (``"mse"``)."""
    check_levels(levels)
    return quantize_int2(x, params) if levels == "minmax" else quantize_int2_mse(x, params=params)


def dequantize_int2(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``code * scale + offset`` in fp32: ``[..., d]``."""
    return codes.to(torch.float32) * scale.float()[..., None] + offset.float()[..., None]


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """Quartered packing ``[..., d]`` (values 0..3) -> ``[..., d/4]`` uint8 (see ``vllm_oscar.layout``)."""
    d = codes.shape[-1]
    if d % 4:
        raise ValueError(f"row length {d} is not a multiple of 4")
    q = d // 4
    c = codes.to(torch.uint8)
    return c[..., :q] | (c[..., q : 2 * q] << 2) | (c[..., 2 * q : 3 * q] << 4) | (c[..., 3 * q :] << 6)


def unpack_int2(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int2`: ``[..., d/4]`` uint8 -> ``[..., d]`` uint8 codes."""
    return torch.cat([(packed >> (2 * s)) & 3 for s in range(4)], dim=-1)


def quantize_rows(
    x: torch.Tensor, rotation: torch.Tensor | None, clip_ratio: float, levels: str = "minmax", params: str = "fp16"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate (fp32), clip, quantize and pack rows: ``(packed [..., d/4], scale, offset)``.

    ``levels="minmax"``: clip then :func:`quantize_int2`; ``"mse"``: :func:`quantize_int2_mse`
    (``clip_ratio`` must be 0)."""
    check_levels(levels, clip_ratio)
    xr = x.to(torch.float32)
    if rotation is not None:
        xr = xr @ rotation.to(torch.float32)
    codes, scale, offset = quantize_int2_levels(clip_rows(xr, clip_ratio), levels, params)
    return pack_int2(codes), scale, offset


def fake_quantize_rows(
    x: torch.Tensor, rotation: torch.Tensor | None, clip_ratio: float, levels: str = "minmax", params: str = "fp16"
) -> torch.Tensor:
    """Quantize then dequantize rows, returned **in the rotated space** as fp32."""
    packed, scale, offset = quantize_rows(x, rotation, clip_ratio, levels, params)
    return dequantize_int2(unpack_int2(packed), scale, offset)


# --------------------------------------------------------------------------------------------------
# The paged cache (layout in vllm_oscar.layout)
# --------------------------------------------------------------------------------------------------


def _head_page_views(kv_cache: torch.Tensor, layout: Int2PageLayout):
    """Views of one layer cache ``[num_blocks, Hkv, head_page_bytes]`` as its four regions."""
    nb, hkv, _ = kv_cache.shape
    bs, pr = layout.block_size, layout.packed_row_bytes
    k_codes = kv_cache[..., layout.k_codes_offset : layout.v_codes_offset].view(nb, hkv, bs, pr)
    v_codes = kv_cache[..., layout.v_codes_offset : layout.k_params_offset].view(nb, hkv, bs, pr)
    pdt = torch.float16 if layout.params == "fp16" else torch.uint8  # raw pairs: decode_params reads them
    k_params = kv_cache[..., layout.k_params_offset : layout.v_params_offset].view(pdt)
    v_params = kv_cache[..., layout.v_params_offset : layout.head_page_bytes].view(pdt)
    return k_codes, v_codes, k_params.view(nb, hkv, bs, 2), v_params.view(nb, hkv, bs, 2)


def check_cache(kv_cache: torch.Tensor, layout: Int2PageLayout) -> None:
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 3 or tuple(kv_cache.shape[1:]) != (
        layout.num_kv_heads,
        layout.head_page_bytes,
    ):
        raise ValueError(
            f"kv_cache must be uint8 [num_blocks, {layout.num_kv_heads}, {layout.head_page_bytes}] for {layout}, "
            f"got {kv_cache.dtype} {tuple(kv_cache.shape)}"
        )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rotation_k: torch.Tensor | None,
    rotation_v: torch.Tensor | None,
    layout: Int2PageLayout,
    k_clip_ratio: float,
    v_clip_ratio: float,
    levels: str = "minmax",
) -> None:
    """Quantize ``key``/``value`` ``[num_tokens, Hkv, d]`` into the paged cache in place.

    ``slot_mapping[t]`` is ``block * block_size + offset``; ``-1`` skips token ``t``. ``levels``: see
    :func:`quantize_rows` (the page layout is the same for both).
    """
    check_levels(levels, k_clip_ratio, v_clip_ratio)
    check_cache(kv_cache, layout)
    kc, vc, kp, vp = _head_page_views(kv_cache, layout)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offs = slots // layout.block_size, slots % layout.block_size
    for src, rot, ratio, codes_v, params_v in (
        (key, rotation_k, k_clip_ratio, kc, kp),
        (value, rotation_v, v_clip_ratio, vc, vp),
    ):
        packed, scale, offset = quantize_rows(src[keep], rot, ratio, levels, layout.params)  # [n, Hkv, ...]
        codes_v[blocks, :, offs] = packed
        params_v[blocks, :, offs] = encode_params(scale, offset, layout.params)


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, layout: Int2PageLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the first ``seq_len`` tokens of one sequence: ``(k, v)`` ``[seq_len, Hkv, d]`` fp32,
    in the rotated space."""
    kc, vc, kp, vp = _head_page_views(kv_cache, layout)
    pos = torch.arange(seq_len)
    blocks = block_table[pos // layout.block_size].long()
    offs = pos % layout.block_size
    out = []
    for codes_v, params_v in ((kc, kp), (vc, vp)):
        scale, offset = decode_params(params_v[blocks, :, offs], layout.params)  # [T, Hkv]
        out.append(dequantize_int2(unpack_int2(codes_v[blocks, :, offs]), scale, offset))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# Attention over the mixed cache: BF16 sink | INT2 middle | BF16 recent window
# --------------------------------------------------------------------------------------------------


def exact_window_mask(
    q_positions: torch.Tensor, kv_len: int, sink: int, recent: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(causal, exact)`` boolean masks ``[Tq, kv_len]``.

    Query at absolute position ``p`` sees keys ``j <= p``; key ``j`` is read exactly (BF16 window) when
    ``j < sink`` or ``j >= p + 1 - recent`` (the last ``recent`` tokens including itself), else from INT2.
    """
    j = torch.arange(kv_len)[None, :]
    p = q_positions.long()[:, None]
    causal = j <= p
    exact = (j < sink) | (j >= p + 1 - recent)
    return causal, exact & causal


def mixed_window_attention(
    q: torch.Tensor,
    k_exact: torch.Tensor,
    v_exact: torch.Tensor,
    k_quant: torch.Tensor,
    v_quant: torch.Tensor,
    q_positions: torch.Tensor,
    sink: int,
    recent: int,
    scale: float | None = None,
    exact_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q [Tq, Hq, d]`` over one sequence whose keys/values exist twice.

    ``k_exact/v_exact`` hold the window copies and ``k_quant/v_quant`` the dequantized INT2 rows, all
    ``[Tkv, Hkv, d]`` in the same (rotated) space; :func:`exact_window_mask` picks per (query, key)
    which one is read (``exact_mask [Tq, Tkv]`` overrides that rule, for baselines). GQA: query head
    ``h`` reads KV head ``h // (Hq/Hkv)``. Math in fp32 (float64 for float64 queries).
    Returns ``[Tq, Hq, d]``.
    """
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    tq, hq, d = q.shape
    tkv, hkv, _ = k_exact.shape
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    causal, exact = exact_window_mask(q_positions, tkv, sink, recent)
    if exact_mask is not None:
        exact = exact_mask & causal

    # Query heads grouped per KV head, [Hkv, G*Tq, d]: each K/V head is used by its G query heads
    # without materializing repeated K/V.
    qg = q.to(dt).reshape(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)

    def scores(k):  # [Tkv, Hkv, d] -> [Hkv, G, Tq, Tkv]
        return (qg @ k.to(dt).permute(1, 2, 0)).view(hkv, g, tq, tkv)

    s = torch.where(exact, scores(k_exact), scores(k_quant)).mul_(scale).masked_fill_(~causal, float("-inf"))
    p = torch.softmax(s, -1)
    p_exact = p.masked_fill(~exact, 0.0)
    p_quant = p.sub_(p_exact)
    o = p_exact.view(hkv, g * tq, tkv) @ v_exact.to(dt).permute(1, 0, 2)
    o = o.add_(p_quant.view(hkv, g * tq, tkv) @ v_quant.to(dt).permute(1, 0, 2))
    return o.view(hkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, hq, d)


def oscar_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rotation_k: torch.Tensor | None,
    rotation_v: torch.Tensor | None,
    q_positions: torch.Tensor,
    *,
    k_clip_ratio: float = 0.96,
    v_clip_ratio: float = 0.92,
    sink: int = 64,
    recent: int = 256,
    window_dtype: torch.dtype | None = torch.bfloat16,
    scale: float | None = None,
    levels: str = "minmax",
    params: str = "fp16",
    exact_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """End-to-end OSCAR attention for one sequence, in the model's space.

    ``q [Tq, Hq, d]`` at ``q_positions``; ``k, v [Tkv, Hkv, d]`` (post-RoPE). K/V are rotated, the
    INT2 copy is quantized (``levels="minmax"``: clipped min-max grid; ``"mse"``: the MSE-fitted grid,
    clip ratios must be 0; ``params``: how the pair is stored), the window copy is the rotated row rounded to ``window_dtype`` (``None``
    keeps it exact); ``q @ R_K`` attends over the mixed cache and the output is rotated back with
    ``R_V^T``. Identity rotations are ``None``. ``exact_mask [Tq, Tkv]`` overrides which keys are read
    from the window copy (see :func:`mixed_window_attention`).
    """
    check_levels(levels, k_clip_ratio, v_clip_ratio)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32

    def rot(x, r):
        return x.to(dt) if r is None else x.to(dt) @ r.to(dt)

    k_rot, v_rot = rot(k, rotation_k), rot(v, rotation_v)
    k_win = k_rot if window_dtype is None else k_rot.to(window_dtype)
    v_win = v_rot if window_dtype is None else v_rot.to(window_dtype)
    k_q = dequantize_int2(*quantize_int2_levels(clip_rows(k_rot.float(), k_clip_ratio), levels, params))
    v_q = dequantize_int2(*quantize_int2_levels(clip_rows(v_rot.float(), v_clip_ratio), levels, params))
    o = mixed_window_attention(rot(q, rotation_k), k_win, v_win, k_q, v_q, q_positions, sink, recent, scale,
                               exact_mask=exact_mask)
    return o if rotation_v is None else o @ rotation_v.to(o.dtype).T


def store_window(
    key: torch.Tensor,
    value: torch.Tensor,
    window_cache: torch.Tensor,
    window_slot_mapping: torch.Tensor,
    rotation_k: torch.Tensor | None,
    rotation_v: torch.Tensor | None,
) -> None:
    """Write rotated BF16 copies of ``key``/``value`` ``[T, Hkv, d]`` into the window cache in place.

    ``window_cache`` is ``[num_blocks, 2, block_size, Hkv, d]`` (K then V per block, rotated space);
    ``window_slot_mapping[t] = block * block_size + offset``, ``-1`` skips token ``t``.
    """
    keep = window_slot_mapping >= 0
    slots = window_slot_mapping[keep].long()
    bs = window_cache.shape[2]
    blocks, offs = slots // bs, slots % bs
    for i, (src, rot) in enumerate(((key, rotation_k), (value, rotation_v))):
        x = src[keep].to(torch.float32)
        if rot is not None:
            x = x @ rot.to(torch.float32)
        window_cache[blocks, i, offs] = x.to(window_cache.dtype)


def gather_window(
    window_cache: torch.Tensor, window_block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``0..seq_len-1`` of one sequence from the window cache: ``(k, v)`` ``[seq_len, Hkv, d]`` fp32.

    Logical block ``pos // block_size`` maps through ``window_block_table``; rows whose block was
    freed (outside the sink and recent windows) come back as whatever that block holds: callers only
    read window positions.
    """
    bs = window_cache.shape[2]
    pos = torch.arange(seq_len)
    blocks = window_block_table[pos // bs].long()
    rows = window_cache[blocks, :, pos % bs]  # [T, 2, Hkv, d]
    return rows[:, 0].float(), rows[:, 1].float()


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layout: Int2PageLayout,
    window_cache: torch.Tensor | None,
    window_block_table: torch.Tensor | None,
    sink: int,
    recent: int,
    rotation_k: torch.Tensor | None,
    rotation_v: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference decode: ``q [B, Hq, d]`` (model space) at position ``seq_lens[b]-1`` of each sequence.

    INT2 rows come from the paged ``kv_cache`` through ``block_table [B, max_blocks]``; window rows
    (``j < sink`` or ``j >= seq_len - recent``) from ``window_cache`` through ``window_block_table``
    (:func:`gather_window`), or from the INT2 cache too when ``window_cache`` is ``None``. Returns
    ``[B, Hq, d]`` fp32 in the model space (``@ R_V^T`` applied unless ``rotation_v`` is ``None``).
    """
    out = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        kq, vq = gather_kv(kv_cache, block_table[b], n, layout)
        if window_cache is None:
            kw, vw = kq, vq
        else:
            kw, vw = gather_window(window_cache, window_block_table[b], n)
            # Rows outside the windows may sit in freed (poisoned) blocks: never let them reach a matmul.
            pos = torch.arange(n)[:, None, None]
            in_window = (pos < sink) | (pos >= n - recent)
            kw, vw = torch.where(in_window, kw, 0.0), torch.where(in_window, vw, 0.0)
        qr = q[b : b + 1].float()
        if rotation_k is not None:
            qr = qr @ rotation_k.float()
        o = mixed_window_attention(qr, kw, vw, kq, vq, torch.tensor([n - 1]), sink, recent, scale)[0]
        out.append(o if rotation_v is None else o @ rotation_v.float().T)
    return torch.stack(out)
