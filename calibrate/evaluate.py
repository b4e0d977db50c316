"""Teacher-forced perplexity with K/V quantized through the reference path (the CPU accuracy gate).

Every token reads its history as decode would read the cache: keys/values outside the BF16 windows
(the first ``sink`` tokens and the last ``recent`` tokens before and including the query) come from
INT2 (``reference.mixed_window_attention``, per-query windows). So a 2048-token sequence measures
what a decode step at every position would see, not a one-chunk prefill over exact K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from vllm_oscar.artifact import RotationArtifact
from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, layer_index
from vllm_oscar.ops import reference as ref

KIVI_GROUP = 32  # KIVI-2: per-channel K over groups of 32 tokens
KIVI_RESIDUAL = 128  # KIVI-2: full-precision recent tokens


@dataclass(frozen=True)
class EvalMethod:
    name: str
    description: str
    kind: Literal["exact", "int2", "kivi"]
    rotation: Literal["calibrated", "hadamard", "none"] = "none"
    clip: bool = False
    windows: bool = False
    levels: Literal["minmax", "mse"] = "minmax"  # reference.LEVELS; "mse" never clips
    params: Literal["fp16", "u8"] = "fp16"  # layout.PARAM_FORMATS: how each row's (scale, offset) is stored


METHODS: dict[str, EvalMethod] = {
    m.name: m
    for m in (
        EvalMethod("exact", "no quantization", "exact"),
        EvalMethod("naive_int2", "INT2, no rotation, no clipping, no windows", "int2"),
        EvalMethod("hadamard_int2", "QuaRot-style: Hadamard INT2, no clipping, no windows", "int2", "hadamard"),
        EvalMethod("hadamard_int2_windows",
                   "Hadamard INT2 with OSCAR's clipping and BF16 windows (data-free, the paper's grid)",
                   "int2", "hadamard", clip=True, windows=True),
        EvalMethod("kivi2", "KIVI-2: per-channel K (32-token groups), per-token V, 128-token FP residual", "kivi"),
        EvalMethod("oscar_no_windows", "OSCAR rotations + clipping, no windows", "int2", "calibrated", clip=True),
        EvalMethod("oscar", "OSCAR: calibrated rotations, clipping, BF16 sink and recent windows", "int2",
                   "calibrated", clip=True, windows=True),
        EvalMethod("hadamard_mse", "data-free default: Hadamard, per-row MSE-fitted INT2 grid (no clipping), "
                   "BF16 windows", "int2", "hadamard", windows=True, levels="mse"),
        EvalMethod("oscar_mse", "calibrated rotations, per-row MSE-fitted INT2 grid (no clipping), BF16 windows",
                   "int2", "calibrated", windows=True, levels="mse"),
        EvalMethod("hadamard_mse_u8", "hadamard_mse with each row's (scale, offset) in 2 bytes instead of 4 "
                   "(8-bit float scale, 8-bit offset in sixteenths of the scale)", "int2", "hadamard", windows=True,
                   levels="mse", params="u8"),
    )
}


def bits_per_element(method: EvalMethod, head_dim: int, context: int, sink: int, recent: int) -> float:
    """Average stored bits per K/V element for a ``context``-token request (data + scale/offset + windows)."""
    if method.kind == "exact":
        return 16.0
    if method.kind == "kivi":
        k_bits, v_bits = 2 + 32 / KIVI_GROUP, 2 + 32 / head_dim
        full = min(context, KIVI_RESIDUAL + KIVI_GROUP / 2)  # the residual holds 128..159 tokens
        return ((context - full) * (k_bits + v_bits) / 2 + full * 16) / context
    int2 = 2 + (16 if method.params == "u8" else 32) / head_dim
    full = min(context, sink + recent) if method.windows else 0
    return ((context - full) * int2 + full * 16) / context


def _kivi_fake_quant_k(k: torch.Tensor) -> torch.Tensor:
    """Per-channel INT2 over complete 32-token groups of ``k [T, Hkv, d]``; the tail stays exact."""
    t = k.shape[0]
    n = (t // KIVI_GROUP) * KIVI_GROUP
    out = k.float().clone()
    if n:
        g = out[:n].reshape(n // KIVI_GROUP, KIVI_GROUP, *k.shape[1:]).permute(0, 2, 3, 1)  # [..., 32 tokens]
        deq = ref.dequantize_int2(*ref.quantize_int2(g))
        out[:n] = deq.permute(0, 3, 1, 2).reshape(n, *k.shape[1:])
    return out


def _kivi_exact_mask(t: int) -> torch.Tensor:
    """Query ``p`` reads keys at or after the start of its residual: ``32*floor(max(p+1-128, 0)/32)``."""
    p = torch.arange(t)[:, None]
    start = torch.clamp(p + 1 - KIVI_RESIDUAL, min=0) // KIVI_GROUP * KIVI_GROUP
    return torch.arange(t)[None, :] >= start


def _rotations(method: EvalMethod, artifact: RotationArtifact | None, head_dim: int):
    if method.rotation == "none":
        return None, None
    if method.rotation == "hadamard":
        h = ref.hadamard(head_dim, torch.float32)
        return (lambda i: h), (lambda i: h)
    if artifact is None:
        raise ValueError(f"method {method.name!r} needs calibrated rotations")
    return (lambda i: artifact.k_rotation[i]), (lambda i: artifact.v_rotation[i])


def make_attention(method: EvalMethod, artifact: RotationArtifact | None, head_dim: int, *,
                   k_clip: float, v_clip: float, sink: int, recent: int, int2_from: int = 0):
    """The attention function (for ``capture.attention_override``) that implements ``method``.

    ``int2_from``: queries at positions before it read every key exactly (a one-chunk prefill over
    exact K/V); queries at or after it read keys outside their windows from INT2 (decode). 0 (the
    default): every query reads INT2, the semantics of :func:`perplexity`. With a KV cache (fewer
    queries than keys) the queries are the last positions of the sequence.
    """
    if method.kind == "exact":
        return causal_sdpa
    rot_k, rot_v = _rotations(method, artifact, head_dim)
    kc, vc = (k_clip, v_clip) if method.clip else (0.0, 0.0)
    s, r = (sink, recent) if method.windows else (0, 0)

    def attention(module, q, k, v):
        i = layer_index(module)
        q_, k_, v_ = (x[0].transpose(0, 1).float() for x in (q, k, v))  # [T, H, d]
        tq, tkv = q_.shape[0], k_.shape[0]
        pos = torch.arange(tkv - tq, tkv)
        prefill = pos[:, None] < int2_from  # [Tq, 1]: these queries read everything exactly
        if method.kind == "kivi":
            kq = _kivi_fake_quant_k(k_)
            vq = ref.dequantize_int2(*ref.quantize_int2(v_))
            o = ref.mixed_window_attention(q_, k_, v_, kq, vq, pos, 0, 0, module.scaling,
                                           exact_mask=_kivi_exact_mask(tkv)[tkv - tq:] | prefill)
        else:
            mask = ref.exact_window_mask(pos, tkv, s, r)[1] | prefill if int2_from > 0 else None
            o = ref.oscar_attention(q_, k_, v_, rot_k and rot_k(i), rot_v and rot_v(i), pos, k_clip_ratio=kc,
                                    v_clip_ratio=vc, sink=s, recent=r, window_dtype=None, scale=module.scaling,
                                    levels=method.levels, params=method.params, exact_mask=mask)
        return o[None].to(q.dtype)

    return attention


@torch.inference_mode()
def perplexity(model, sequences: torch.Tensor, attention_fn, *, desc: str = "", progress: bool = True) -> float:
    """``exp(mean NLL)`` over every predicted token of ``sequences [N, T]``."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with attention_override(model, attention_fn):
        for seq in tqdm(sequences, desc=desc, unit="seq", disable=not progress):
            seq = seq.to(device)
            logits = model(seq[None]).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, seq[1:], reduction="sum"))
            count += seq.numel() - 1
    return math.exp(nll / count)


def needs_rotations(methods: list[str]) -> bool:
    """Whether any of ``methods`` reads calibrated rotations (the others are data-free)."""
    return any(METHODS[m].rotation == "calibrated" for m in methods)


def evaluate(model, eval_sets: dict[str, torch.Tensor], artifact: RotationArtifact | None,
             methods: list[str], *, progress: bool = True, clips: tuple[float, float] = (0.96, 0.92),
             windows: tuple[int, int] = (64, 256)) -> dict:
    """Perplexity per method and eval set; windows and the min-max methods' clip ratios come from the
    artifact, else from ``windows`` (sink, recent) and ``clips`` (K, V; also used when the artifact
    records levels "mse", which has none)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {list(METHODS)}")
    cfg = artifact.config if artifact is not None else None
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)
    minmax_cfg = cfg is not None and cfg.quantization.levels == "minmax"
    k_clip = cfg.quantization.k_clip_ratio if minmax_cfg else clips[0]
    v_clip = cfg.quantization.v_clip_ratio if minmax_cfg else clips[1]
    sink = cfg.windows.sink_tokens if cfg else windows[0]
    recent = cfg.windows.recent_tokens if cfg else windows[1]
    results: dict = {"methods": {}, "settings": {"k_clip_ratio": k_clip, "v_clip_ratio": v_clip,
                                                 "sink_tokens": sink, "recent_tokens": recent}}
    for name in methods:
        m = METHODS[name]
        fn = make_attention(m, artifact, head_dim, k_clip=k_clip, v_clip=v_clip, sink=sink, recent=recent)
        per_set = {}
        for set_name, seqs in eval_sets.items():
            per_set[set_name] = perplexity(model, seqs, fn, desc=f"{name} on {set_name}", progress=progress)
        ctx = int(next(iter(eval_sets.values())).shape[1])
        results["methods"][name] = {
            "description": m.description,
            "perplexity": per_set,
            "bits_per_element": {
                f"at_{ctx}": round(bits_per_element(m, head_dim, ctx, sink, recent), 3),
                "at_32768": round(bits_per_element(m, head_dim, 32768, sink, recent), 3),
            },
        }
    if "exact" in results["methods"]:
        base = results["methods"]["exact"]["perplexity"]
        for r in results["methods"].values():
            r["increase_over_exact_pct"] = {k: round(100 * (v / base[k] - 1), 2) for k, v in r["perplexity"].items()}
    return results
