"""KV-cache specs of an OSCAR layer: the INT2 pages and the BF16 window pages.

vLLM's hybrid KV-cache allocator keeps **one page size for every group** (all groups share one block
pool and layers of different groups share tensors, ``kv_cache_utils.py:1137-1257``). An OSCAR model
therefore has two groups whose pages are the same number of bytes:

* the INT2 group (:class:`OscarFullAttentionSpec`, a ``FullAttentionSpec``: every token, whole request),
  ``int2_block_size`` tokens per page, laid out by :class:`~vllm_oscar.layout.Int2PageLayout`;
* the window group (:class:`~vllm_oscar.attention.window.OscarWindowSpec`, a ``SlidingWindowSpec``
  that also keeps the sink blocks), ``window_block_size`` BF16 tokens per page, padded up to the INT2
  page.

Block sizes: the window uses vLLM's ``cache_config.block_size`` (16 by default, also what skip-listed
BF16 layers use), the INT2 group :data:`INT2_BLOCK_MULTIPLIER` times that. An INT2 token costs
``d/2 + 8`` bytes per KV head against ``4d`` in BF16, a ratio of 6.4 (d=64), 7.1 (d=128) and 7.5
(d=256); 8 is the smallest power of two above all three, so one INT2 page always covers one BF16 page
of the same head count and the BF16 pages are padded (12.5% of a 16-token page at d=128) instead of
the INT2 pages (which would waste up to 7x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_oscar.layout import INT2_BLOCK_MULTIPLIER, Int2PageLayout


def window_block_size(cache_block_size: int) -> int:
    """Tokens per BF16 window page: vLLM's block size, shared with skip-listed BF16 layers."""
    return cache_block_size


def int2_block_size(cache_block_size: int) -> int:
    """Tokens per INT2 page, chosen so the INT2 page is at least one BF16 page of the same heads."""
    return INT2_BLOCK_MULTIPLIER * cache_block_size


def int2_layout(head_dim: int, num_kv_heads: int, cache_block_size: int, params: str = "fp16") -> Int2PageLayout:
    return Int2PageLayout(head_dim=head_dim, block_size=int2_block_size(cache_block_size),
                          num_kv_heads=num_kv_heads, params=params)


def align_skip_layer_pages(vllm_config) -> None:
    """Skip-listed BF16 layers pad their pages up to the INT2 page (``vllm_patches`` patch 11, in place of
    vLLM's ``Platform._align_heterogeneous_kv_block_size``).

    The cache block size stays what the backend chose (16 by default): the INT2 page of
    :data:`INT2_BLOCK_MULTIPLIER` times that many tokens already covers a BF16 page of that many tokens
    at every supported head_dim, so the skip layers and the window pad up by 6-25% (d=256: 17408 against
    16384 bytes per KV head). vLLM's sliding-window layers read ``skip_page_size_padded`` to pick their
    block and padded page; its full-attention layers take the cache block size and ``unify`` pads them.
    """
    cc = vllm_config.cache_config
    if not cc.kv_cache_dtype_skip_layers:
        return
    from vllm_oscar.runtime_config import get_resolved

    mc = vllm_config.model_config
    cc.skip_page_size_padded = int2_layout(mc.get_head_size(), mc.get_num_kv_heads(vllm_config.parallel_config),
                                           cc.block_size, get_resolved(vllm_config).layout_params).page_bytes


@dataclass(frozen=True, kw_only=True)
class OscarFullAttentionSpec(FullAttentionSpec):
    """The INT2 pages of an OSCAR layer: ``uint8 [num_blocks, num_kv_heads, head_page_bytes]``.

    vLLM's own ``FullAttentionSpec`` math would charge ``2 * head_dim`` bytes per token for a uint8
    cache (4x the INT2 size); the page size here comes from :class:`Int2PageLayout`, so vLLM's block
    counts and its logged capacity are the real ones. ``FullAttentionSpec.merge`` builds ``cls(...)``,
    and this class adds no fields, so merging keeps the subclass: the (scale, offset) format is a class
    constant for that reason (:class:`OscarFullAttentionSpecU8`), not a field merge would drop.
    """

    LAYOUT_PARAMS: ClassVar[str] = "fp16"

    @property
    def layout(self) -> Int2PageLayout:
        return Int2PageLayout(head_dim=self.head_size, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                              params=self.LAYOUT_PARAMS)

    @property
    def real_page_size_bytes(self) -> int:
        return self.layout.page_bytes


@dataclass(frozen=True, kw_only=True)
class OscarFullAttentionSpecU8(OscarFullAttentionSpec):
    """The INT2 pages with 2-byte (scale, offset) pairs (``scale_dtype: "u8"``)."""

    LAYOUT_PARAMS: ClassVar[str] = "u8"


def oscar_spec_class(params: str) -> type[OscarFullAttentionSpec]:
    return OscarFullAttentionSpecU8 if params == "u8" else OscarFullAttentionSpec


def oscar_layer_spec(layer, vllm_config) -> OscarFullAttentionSpec:
    """``Attention.get_kv_cache_spec`` for an ``oscar_int2`` layer (installed by ``vllm_patches``)."""
    from vllm.v1.attention.backend import AttentionType

    if layer.attn_type != AttentionType.DECODER:
        raise ValueError(
            f"{layer.layer_name}: oscar_int2 supports decoder self-attention only, got attn_type "
            f"{layer.attn_type!r}; list the layer in --kv-cache-dtype-skip-layers"
        )
    if layer.head_size_v != layer.head_size:
        raise ValueError(
            f"{layer.layer_name}: oscar_int2 needs K and V of the same head dim (one INT2 row layout for both); "
            f"this layer has head_size={layer.head_size}, head_size_v={layer.head_size_v}. "
            "List the layer in --kv-cache-dtype-skip-layers or serve with another --kv-cache-dtype."
        )
    from vllm_oscar.runtime_config import get_resolved

    return oscar_spec_class(get_resolved(vllm_config).layout_params)(
        block_size=int2_block_size(vllm_config.cache_config.block_size),
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        head_size_v=layer.head_size,
        dtype=torch.uint8,
    )


def check_skip_layer(layer, vllm_config) -> None:
    """A skip-listed (BF16) layer shares the block pool with the INT2 pages, so vLLM pads its pages up to
    the INT2 page size, which works only for backends that index KV pages by the block stride (vLLM's
    FlashAttention and Triton backends do). Refuse the others at start-up with the reason."""
    from vllm.config import set_current_vllm_config

    backend = layer.get_attn_backend()
    with set_current_vllm_config(vllm_config):  # the stride order depends on the configured KV layout
        pads = backend.indexes_kv_by_block_stride()
    if not pads:
        raise ValueError(
            f"{layer.layer_name} is kept in BF16 (--kv-cache-dtype-skip-layers) with the {backend.get_name()} "
            "backend, which cannot pad its KV pages to the oscar_int2 page size (indexes_kv_by_block_stride is "
            "False); use --attention-backend FLASH_ATTN or TRITON_ATTN for the BF16 layers"
        )
