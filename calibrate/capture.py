"""Capture the Q, K and V that attention consumes in Hugging Face models.

Transformers' Llama, Mistral, Qwen2 and Qwen3 attention modules apply QK-norm (Qwen3) and RoPE, then
call the function registered under ``config._attn_implementation`` with ``query [B, Hq, T, d]``,
``key/value [B, Hkv, T, d]``. Registering our own attention function there is the one capture
point that sees exactly post-norm, post-RoPE Q/K and raw V for every supported family, without
re-implementing any model's forward. The same hook lets the evaluator swap in quantized attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from vllm_oscar.config import SUPPORTED_ARCHITECTURES

# (module, q, k, v) -> attention output [B, T, Hq, d]; q [B, Hq, T, d], k/v [B, Hkv, T, d]
AttentionFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_architecture(config) -> str:
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else f"{type(config).__name__} (no 'architectures')"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported model architecture {arch!r}; vllm-oscar calibrates {list(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def causal_sdpa(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention (GQA), ``[B, T, Hq, d]``: what the model computes unhooked."""
    g = q.shape[1] // k.shape[1]
    tq, tkv = q.shape[2], k.shape[2]
    # With a KV cache the queries are the last ``tq`` positions (bottom-right aligned causal mask).
    mask = None if tq == tkv else torch.arange(tkv, device=q.device)[None, :] <= torch.arange(
        tkv - tq, tkv, device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, is_causal=mask is None,
        scale=module.scaling
    )
    return out.transpose(1, 2).contiguous()


@contextlib.contextmanager
def attention_override(model: torch.nn.Module, fn: AttentionFn) -> Iterator[None]:
    """Route every attention layer of ``model`` through ``fn`` inside the ``with`` block.

    Only unpadded single-sequence causal batches are supported (what calibration and evaluation feed).
    """
    from transformers import AttentionInterface  # noqa: PLC0415

    name = f"vllm_oscar_{id(fn):x}"

    def _interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[0] != 1:
            raise ValueError("attention_override supports batch size 1 (one unpadded sequence per forward)")
        return fn(module, query, key, value), None

    AttentionInterface.register(name, _interface)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def layer_index(module: torch.nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx; cannot attribute captured tensors to a layer")
    return int(idx)
