"""Calibrate: capture -> streaming moments (two passes) -> per-layer rotations -> artifact."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from vllm_oscar.artifact import RotationArtifact
from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, layer_index
from vllm_oscar.calibrate.statistics import LayerMoments
from vllm_oscar.config import (
    BaseModelInfo,
    CalibrationInfo,
    OscarArtifactConfig,
    QuantizationConfig,
    RotationConfig,
    WindowConfig,
)
from vllm_oscar.ops.reference import fit_rotation

#: a rotation fitted in float64 must be orthogonal to this tolerance before it is stored in fp32.
FIT_ORTHOGONALITY_TOLERANCE = 1e-10
MIN_CALIBRATION_TOKENS = 256


def exact_passes(model, sequences: torch.Tensor, fn, desc: str, progress: bool) -> None:
    """Run the decoder over each of ``sequences [N, T]`` with ``fn`` as every layer's attention (it sees
    the exact q/k/v after RoPE and returns the output)."""
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    with attention_override(model, fn), torch.inference_mode():
        for seq in tqdm(sequences, desc=desc, unit="seq", disable=not progress):
            decoder(seq[None].to(device))  # the decoder stack only: the LM head is not needed


def collect_moments(model, sequences: torch.Tensor, info: BaseModelInfo, *, progress: bool = True) -> list[LayerMoments]:
    """Two passes over ``sequences [N, T]``: query moments, then score-weighted value moments."""
    if sequences.numel() < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"calibration set too short: {sequences.numel()} tokens, need at least {MIN_CALIBRATION_TOKENS}"
        )
    moments = [LayerMoments(info.num_kv_heads, info.head_dim) for _ in range(info.num_layers)]

    def pass_queries(module, q, k, v):
        moments[layer_index(module)].add_queries(q[0].transpose(0, 1))
        return causal_sdpa(module, q, k, v)

    exact_passes(model, sequences, pass_queries, "calibration pass 1/2 (queries)", progress)
    sigmas = [m.query_moments() for m in moments]

    def pass_values(module, q, k, v):
        i = layer_index(module)
        moments[i].add_values(k[0].transpose(0, 1), v[0].transpose(0, 1), sigmas[i])
        return causal_sdpa(module, q, k, v)

    exact_passes(model, sequences, pass_values, "calibration pass 2/2 (values)", progress)
    return moments


def fit_rotations(moments: list[LayerMoments]) -> dict[str, torch.Tensor]:
    """Per-layer ``R = U H P_br`` for the K (qqt) and V (sst) targets, stacked ``[L, d, d]``."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("k_rotation", "v_rotation", "k_eigenvalues", "v_eigenvalues")}
    for i, m in enumerate(moments):
        for side, target in (("k", m.k_target()), ("v", m.v_target())):
            r, eig = fit_rotation(target)
            err = float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype)).abs().max())
            if err > FIT_ORTHOGONALITY_TOLERANCE:
                raise RuntimeError(f"layer {i} {side.upper()} rotation is not orthogonal (max|RR^T-I|={err:.3g})")
            out[f"{side}_rotation"].append(r)
            out[f"{side}_eigenvalues"].append(eig)
    return {k: torch.stack(v).to(torch.float32) for k, v in out.items()}


def calibrate(
    model,
    sequences: torch.Tensor,
    info: BaseModelInfo,
    *,
    source: str,
    seed: int = 0,
    quantization: QuantizationConfig | None = None,
    windows: WindowConfig | None = None,
    progress: bool = True,
) -> RotationArtifact:
    moments = collect_moments(model, sequences, info, progress=progress)
    tensors = fit_rotations(moments)
    config = OscarArtifactConfig(
        base_model=info,
        quantization=quantization or QuantizationConfig(group_size=info.head_dim),
        windows=windows or WindowConfig(),
        rotation=RotationConfig(),
        calibration=CalibrationInfo(
            source=source,
            num_tokens=int(sequences.numel()),
            sequence_length=int(sequences.shape[1]),
            num_sequences=int(sequences.shape[0]),
            seed=seed,
        ),
    )
    return RotationArtifact(config=config, **tensors)


def model_card(artifact: RotationArtifact, repo_id: str | None = None) -> str:
    """The generated ``README.md`` of an artifact folder (Hub model card with YAML front matter)."""
    template = (Path(__file__).parent / "card_template.md").read_text()
    c = artifact.config
    m, q, w = c.base_model, c.quantization, c.windows
    cal = c.calibration
    fields = {
        "base_model": m.id,
        "revision": m.revision or "unrecorded",
        "architecture": m.architecture,
        "num_layers": m.num_layers,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "levels": q.levels,
        "scale_dtype": q.scale_dtype,
        "k_clip": q.k_clip_ratio,
        "v_clip": q.v_clip_ratio,
        "sink": w.sink_tokens,
        "recent": w.recent_tokens,
        "mode": c.rotation.mode.value,
        "method": c.rotation.method.value,
        "cal_source": cal.source if cal else "none (data-free)",
        "cal_tokens": cal.num_tokens if cal else 0,
        "cal_seq_len": cal.sequence_length if cal else 0,
        "tool_version": c.tool.version,
        "repo_id": repo_id or "ORG/NAME",
    }
    return template.format(**fields)
