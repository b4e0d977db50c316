"""Backend choice for ``oscar_int2`` layers, with a startup error for every layer OSCAR cannot serve.

Called from the wrapped ``vllm.v1.attention.selector._cached_get_attn_backend`` while the model is
built (worker start-up), so an unsupported layer stops the server before it accepts a request. Every
message names the fix: most unsupported layers can stay in BF16 through
``--kv-cache-dtype-skip-layers``.
"""

from __future__ import annotations

import torch

from vllm_oscar.layout import SUPPORTED_HEAD_DIMS

_SKIP_HINT = (
    "List those layers in --kv-cache-dtype-skip-layers (layer indices, or 'sliding_window' for all "
    "sliding-window layers) to keep them in BF16, or serve with another --kv-cache-dtype."
)


def unsupported_reasons(cfg) -> list[str]:
    """Why an ``AttentionSelectorConfig`` cannot be served by OSCAR (empty when it can)."""
    from vllm.v1.attention.backend import AttentionType

    reasons = []
    if cfg.use_mla:
        reasons.append("MLA (multi-head latent attention) layers are not supported: their latent cache has "
                       "no per-head K/V rows to rotate")
    if cfg.use_sparse:
        reasons.append("sparse attention layers are not supported")
    if cfg.has_sliding_window:
        reasons.append("sliding-window layers are not supported (their window already bounds the cache)")
    if cfg.has_sink:
        reasons.append("learned attention-sink parameters are not supported")
    if cfg.attn_type != AttentionType.DECODER:
        reasons.append(f"attention type {cfg.attn_type!r} is not supported (decoder self-attention only)")
    if cfg.head_size not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head_dim {cfg.head_size} is not supported (supported: {list(SUPPORTED_HEAD_DIMS)})")
    if cfg.dtype != torch.bfloat16:
        reasons.append(f"model dtype {cfg.dtype} is not supported (the kernels run bfloat16; use --dtype bfloat16)")
    if cfg.use_mm_prefix:
        reasons.append("bidirectional multimodal-prefix attention is not supported")
    if cfg.use_per_head_quant_scales:
        reasons.append("checkpoint KV-cache quantization schemes (per-head scales) are not supported")
    if cfg.use_non_causal:
        reasons.append("non-causal attention is not supported")
    if cfg.use_kv_connector:
        reasons.append("KV connectors (--kv-transfer-config) are not supported yet")
    if cfg.use_pcp:
        reasons.append("prefill context parallelism is not supported")
    return reasons


def select_oscar_backend(cfg, num_heads: int | None = None, params: str = "fp16"):
    """The OSCAR backend class for an ``oscar_int2`` layer whose INT2 pages store ``params`` pairs
    (:data:`vllm_oscar.layout.PARAM_FORMATS`), or a ``ValueError`` listing what blocks it."""
    reasons = unsupported_reasons(cfg)
    if reasons:
        raise ValueError(
            "--kv-cache-dtype oscar_int2 cannot serve a layer of this model: " + "; ".join(reasons) + ". "
            + _SKIP_HINT
        )
    from vllm_oscar.attention.backend import backend_for_params

    return backend_for_params(params)
