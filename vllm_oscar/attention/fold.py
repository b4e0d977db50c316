"""Fold each layer's value rotation into its ``o_proj`` weight, so the decode kernel skips ``o @ R_V^T``.

The cache stores ``V R_V``, so attention over it returns ``o_rot = o R_V`` per head, and the model needs
``o = o_rot R_V^T``. For an ``o_proj`` that reads the attention output directly,
``y = sum_h o_h W_h^T = sum_h o_rot_h (W_h R_V)^T``, where ``W_h`` are the ``head_dim`` input columns of
head ``h``. Multiplying those columns by ``R_V`` once, after the weights are loaded, lets the kernels
leave the output in the rotated space: at batch 1 the decode kernel's R_V epilogue is 1.8-2.7 us of
each call on the Qwen3-8B shape ("no R_V" column of docs/kernels.md), ~0.07-0.1 ms per decode step over
36 layers.

Folded only where it is exact: the parent attention module is one whose ``forward`` feeds ``self.attn``'s
output straight into ``self.o_proj`` (:data:`FOLDABLE_ATTENTION_CLASSES`, checked against vLLM's source
by ``tests/vllm/test_canaries.py``), ``o_proj`` is unquantized, and LoRA is off (adapters on ``o_proj``
would see the rotated input). Elsewhere the kernels keep applying ``R_V^T`` and the start-up log says why.
``"fold_value_rotation": false`` in the ``oscar`` settings turns folding off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("vllm.oscar")  # under vLLM's handler, like the rest of the plugin

# vLLM model classes whose forward is `attn_output = self.attn(q, k, v); output, _ = self.o_proj(attn_output)`.
FOLDABLE_ATTENTION_CLASSES: dict[str, str] = {
    "LlamaAttention": "vllm.model_executor.models.llama",
    "MistralAttention": "vllm.model_executor.models.mistral",
    "GraniteAttention": "vllm.model_executor.models.granite",
    "Qwen2Attention": "vllm.model_executor.models.qwen2",
    "Qwen2MoeAttention": "vllm.model_executor.models.qwen2_moe",
    "Qwen3Attention": "vllm.model_executor.models.qwen3",
    "Qwen3MoeAttention": "vllm.model_executor.models.qwen3_moe",
    "MixtralAttention": "vllm.model_executor.models.mixtral",
    "GemmaAttention": "vllm.model_executor.models.gemma",
    "Gemma3Attention": "vllm.model_executor.models.gemma3",
    "Glm4Attention": "vllm.model_executor.models.glm4",
    "Exaone4Attention": "vllm.model_executor.models.exaone4",
    "SeedOssAttention": "vllm.model_executor.models.seed_oss",
    "StablelmAttention": "vllm.model_executor.models.stablelm",
}

# Set on the o_proj module: the weight's version counter right after folding. A second call with the same
# weights (vLLM may process weights more than once) must not rotate them again; reloaded weights fold anew.
_FOLDED_VERSION = "_oscar_rv_folded_version"


@dataclass
class FoldReport:
    folded: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why


def why_not_foldable(parent: torch.nn.Module, *, lora_enabled: bool) -> str | None:
    """None when ``parent.o_proj`` may absorb ``R_V``; otherwise the reason, for the start-up log."""
    cls = type(parent).__name__
    if cls not in FOLDABLE_ATTENTION_CLASSES:
        return f"{cls} is not known to feed the attention output straight into o_proj"
    if lora_enabled:
        return "LoRA is enabled (adapters on o_proj would see the rotated attention output)"
    o_proj = getattr(parent, "o_proj", None)
    weight = getattr(o_proj, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "o_proj has no 2-D weight"
    method = type(getattr(o_proj, "quant_method", None)).__name__
    if method != "UnquantizedLinearMethod":
        return f"o_proj is quantized ({method})"
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"o_proj weight dtype {weight.dtype} is not bf16/fp16/fp32"
    return None


@torch.no_grad()
def fold_value_rotation(o_proj: torch.nn.Module, rotation_v: torch.Tensor, head_dim: int) -> bool:
    """``W[:, h*d:(h+1)*d] <- W[:, h*d:(h+1)*d] @ R_V`` for every head ``h`` (fp32 product, rounded once to
    the weight's dtype). Returns False when this weight was already folded."""
    weight = o_proj.weight
    if getattr(o_proj, _FOLDED_VERSION, None) == weight._version:
        return False
    out_features, in_features = weight.shape
    if in_features % head_dim:
        raise ValueError(f"o_proj input width {in_features} is not a multiple of head_dim {head_dim}")
    rv = rotation_v.to(device=weight.device, dtype=torch.float32)
    folded = weight.float().view(out_features, in_features // head_dim, head_dim) @ rv
    weight.copy_(folded.view(out_features, in_features))
    setattr(o_proj, _FOLDED_VERSION, weight._version)
    return True


def oscar_impls(model: torch.nn.Module) -> list:
    """The ``OscarAttentionImpl`` of every attention layer in ``model`` the OSCAR backend serves."""
    from vllm_oscar.attention.backend import OscarAttentionImpl

    return [m.impl for m in model.modules() if isinstance(getattr(m, "impl", None), OscarAttentionImpl)]


def layer_state(model: torch.nn.Module) -> dict:
    """What serves the attention of ``model``: layers per KV-cache dtype, how many the OSCAR backend serves,
    and in how many of those R_V is folded into o_proj. For ``LLM.apply_model`` (runs in the worker);
    the benchmarks and the GPU end-to-end cases record it."""
    by_dtype: dict[str, int] = {}
    for module in model.modules():
        kv = getattr(module, "kv_cache_dtype", None)
        if isinstance(kv, str) and hasattr(module, "impl"):
            by_dtype[kv] = by_dtype.get(kv, 0) + 1
    impls = oscar_impls(model)
    return {"by_kv_cache_dtype": by_dtype, "oscar_layers": len(impls),
            "r_v_folded_into_o_proj": sum(i.value_rotation_folded for i in impls)}


def fold_model(model: torch.nn.Module, *, lora_enabled: bool) -> FoldReport:
    """Fold ``R_V`` into ``o_proj`` for every attention module served by the OSCAR backend."""
    from vllm_oscar.attention.backend import OscarAttentionImpl

    report = FoldReport()
    for name, parent in model.named_modules():
        attn = getattr(parent, "attn", None)
        impl = getattr(attn, "impl", None)
        if not isinstance(impl, OscarAttentionImpl):
            continue
        why = why_not_foldable(parent, lora_enabled=lora_enabled)
        if why is not None:
            impl.set_value_rotation_folded(False)
            report.skipped[name] = why
            continue
        rotation_v = getattr(attn, "oscar_rotation_v", None)
        if rotation_v is None:
            raise RuntimeError(f"{name}.attn has no oscar_rotation_v: its weights were not processed yet")
        if fold_value_rotation(parent.o_proj, rotation_v, impl.head_size):
            report.folded.append(name)
        else:
            report.already.append(name)
        impl.set_value_rotation_folded(True)
    return report


def fold_after_loading(model: torch.nn.Module) -> FoldReport | None:
    """The loader hook (vllm_patches): fold when this model is served by the OSCAR backend with folding on
    (the settings are read off the first OSCAR layer's engine config)."""
    from vllm_oscar.runtime_config import get_resolved

    impls = oscar_impls(model)
    if not impls:
        return None
    cfg = impls[0].vllm_config
    if not get_resolved(cfg).fold_value_rotation:
        return None
    report = fold_model(model, lora_enabled=cfg.lora_config is not None)
    if report.folded:
        logger.info("vllm-oscar: folded the value rotation into o_proj in %d layers", len(report.folded))
    if report.skipped:
        reasons = sorted(set(report.skipped.values()))
        logger.info("vllm-oscar: the decode kernel applies R_V itself in %d layers: %s", len(report.skipped),
                    "; ".join(reasons))
    return report
