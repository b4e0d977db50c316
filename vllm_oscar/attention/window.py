"""The BF16 sink + recent windows as a vLLM KV-cache group of their own.

OSCAR attends the first ``sink`` (64) and the last ``recent`` (256) tokens of every request in BF16 and
everything in between in INT2 (a port without the windows lost 13 points on GSM8K, vLLM PR #46774).
The windows live in memory that vLLM's KV-cache manager owns, so capacity, preemption and prefix
caching stay vLLM's own logic:

* every OSCAR layer ``L`` gets a companion layer ``L.oscar_window`` (:class:`OscarWindowLayer`,
  registered in ``static_forward_context`` next to ``L``; no weights, no forward) whose KV-cache spec
  is :class:`OscarWindowSpec`: a ``SlidingWindowSpec`` with ``sliding_window = recent`` that also
  keeps the first ``ceil(sink / block_size)`` blocks;
* vLLM groups the companions into a KV-cache group of their own, with its own block table, slot
  mapping and :class:`OscarWindowManager` (a ``SlidingWindowManager`` that never frees the sink
  blocks and requires them in prefix-cache hits);
* the OSCAR impl reads the companion's cache tensor, block table and slot mapping from the forward
  context; the window cache is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` bf16 (the
  model dtype; K then V, rotated rows), indexed by logical position ``// block_size`` exactly like
  :func:`vllm_oscar.ops.reference.gather_window` expects. Its page is padded to the INT2 page
  (:mod:`vllm_oscar.attention.specs`), so ``window_cache.stride(0)`` is larger than the product of the
  other dims: kernels must index blocks by the stride.

Allocation is vLLM's sliding-window behaviour: the tokens of the chunk being computed get BF16 slots
(so any block-aligned prefix can later be a prefix-cache hit with its window intact), and blocks that
fall out of the window are freed at the next step. What a request keeps between steps is the sink plus
the recent window, and that steady-state footprint is what :meth:`OscarWindowSpec.max_memory_usage_bytes`
charges (vLLM's default for sliding windows would charge a whole prefill chunk per request, about
``max_num_batched_tokens`` BF16 tokens, which at 32K context would hide most of the INT2 gain in
vLLM's capacity figures). The chunk in flight is bounded per *step*, not per request: at most
``max_num_batched_tokens`` tokens x ``max_concurrent_batches`` across all requests, freed one step
later; the runtime allocator checks real free blocks for it, and admission keeps vLLM's conservative
sliding-window cap (:meth:`OscarWindowSpec.max_admission_blocks_per_request`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from vllm_oscar.attention.specs import int2_layout, window_block_size

WINDOW_SUFFIX = ".oscar_window"

logger = logging.getLogger("vllm.oscar")  # under vLLM's handler, like the rest of the plugin


# ------------------------------------------------------------------------------------------------
# Spec (engine core and workers)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OscarWindowSpec(SlidingWindowSpec):
    """BF16 rows of the last ``sliding_window`` (= recent) tokens plus the first ``sink_tokens``."""

    sink_tokens: int = 0

    @property
    def sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def _cap(self, blocks: int, max_model_len: int) -> int:
        return min(blocks, cdiv(max_model_len, self.block_size))

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        # vLLM's sliding-window cap (window + one chunk in flight, +1 for an unaligned window start) plus
        # the sink blocks. Used only to admit requests, so it stays on the safe side.
        sw = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return self._cap(sw + self.sink_blocks, max_model_len)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # What one request holds between steps: the sink blocks, and the window of the next query
        # (`recent - 1` computed tokens) plus the tokens of the batches in flight (one decode token each),
        # +1 block because the window rarely starts on a block boundary. The prefill chunk in flight is
        # a per-step cost shared by all requests (see the module docstring), not a per-request one.
        max_model_len = vllm_config.model_config.max_model_len
        steady_tokens = min(self.sliding_window - 1 + vllm_config.max_concurrent_batches, max_model_len)
        blocks = self._cap(cdiv(steady_tokens, self.block_size) + 1 + self.sink_blocks, max_model_len)
        return blocks * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(s, OscarWindowSpec) and s.sliding_window == self.sliding_window
            and s.sink_tokens == self.sink_tokens
            for s in kv_cache_specs.values()
        )


# ------------------------------------------------------------------------------------------------
# Manager (engine core / scheduler)
# ------------------------------------------------------------------------------------------------


class OscarWindowManager(SlidingWindowManager):
    """``SlidingWindowManager`` that keeps the sink blocks of every request.

    Block list of a running request: ``[sink blocks][null ...][blocks of the recent window]``. Freed
    window blocks stay in vLLM's prefix cache (evictable) like any sliding-window block.
    """

    def __init__(self, kv_cache_spec: OscarWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = kv_cache_spec.sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        num_skipped_tokens = self.get_num_skipped_tokens(processed_computed_tokens)
        if num_skipped_tokens <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(num_skipped_tokens // self.block_size, len(self.req_to_blocks[request_id]))
        # Free [sink, window start): the base class frees [0, window start).
        self._remove_blocks_in_range(request_id, self.sink_blocks, last)

    def _kept_sink(self, total_computed_tokens: int, num_new_computed: int) -> int:
        """How many leading cache-hit blocks the base class would null out but the sink keeps."""
        skipped_blocks = self.get_num_skipped_tokens(total_computed_tokens) // self.block_size
        return min(self.sink_blocks, skipped_blocks, num_new_computed)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model,
                                   apply_admission_cap: bool = False) -> int:
        n = super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens, num_local_computed_tokens,
            num_tokens_main_model, apply_admission_cap=apply_admission_cap,
        )
        if request_id in self.num_cached_block or not new_computed_blocks:
            return n
        # Hit sink blocks sitting in the free queue are taken out of it by touch(): they cost free capacity.
        keep = self._kept_sink(total_computed_tokens, len(new_computed_blocks))
        return n + self._get_num_evictable_blocks(new_computed_blocks[:keep])

    def add_local_computed_blocks(self, request_id, new_computed_blocks, num_local_computed_tokens,
                                  num_external_computed_tokens) -> None:
        keep = self._kept_sink(num_local_computed_tokens + num_external_computed_tokens, len(new_computed_blocks))
        super().add_local_computed_blocks(request_id, new_computed_blocks, num_local_computed_tokens,
                                          num_external_computed_tokens)
        if keep:
            sink = list(new_computed_blocks[:keep])
            assert not any(b.is_null for b in sink), "a prefix-cache hit without its sink blocks"
            if self.enable_caching:
                self.block_pool.touch(sink)
            self.req_to_blocks[request_id][:keep] = sink

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        # The window part is vLLM's sliding-window search (the rightmost run of cached blocks covering
        # the window of the first uncached token); a hit also needs every sink block.
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
            alignment_tokens, dcp_world_size, pcp_world_size,
        )
        bs = kv_cache_spec.block_size
        n_sink = min(kv_cache_spec.sink_blocks, len(computed[0]))
        if n_sink == 0:
            return computed, hit_length
        hashes = resolve_block_hashes(
            block_hashes, block_pool.hash_block_size, bs,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )
        for i in range(n_sink):
            if not computed[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if not cached:
                # A sink block was evicted: only a hit inside the (contiguous, all cached) blocks before it
                # is usable, rounded down to the coordinator's alignment.
                hit_length = (i * bs) // alignment_tokens * alignment_tokens
                for blocks in computed:
                    del blocks[hit_length // bs:]
                return computed, hit_length
            for blocks, block in zip(computed, cached):
                blocks[i] = block
        return computed, hit_length

    @classmethod
    def reachable_block_mask(cls, start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                             retention_interval=None, reachable_boundaries=()):
        mask = super().reachable_block_mask(start_block, end_block, alignment_tokens, kv_cache_spec, use_eagle,
                                            retention_interval, reachable_boundaries)
        if mask is None:
            return None
        for i in range(start_block, min(end_block, kv_cache_spec.sink_blocks)):
            mask[i - start_block] = True  # every hit needs the sink: keep it in the prefix cache
        return mask


def register_window_spec() -> None:
    """Tell vLLM which manager runs the window group (called after vLLM's built-in registration)."""
    from vllm.v1.kv_cache_spec_registry import _REGISTRY_KVCACHESPEC_LIST, KVCacheSpecRegistry

    if OscarWindowSpec not in _REGISTRY_KVCACHESPEC_LIST:
        KVCacheSpecRegistry.register(OscarWindowSpec, OscarWindowManager, uniform_type_base_spec=OscarWindowSpec)


def check_pool_admits_one_request(available_memory: int, get_needed_memory, max_model_len: int) -> None:
    """Refuse at start-up a KV pool that could never admit one ``max_model_len`` request.

    ``OscarWindowSpec.max_memory_usage_bytes`` charges the window's steady state (for honest capacity
    figures), so vLLM's own check lets through pools smaller than what admission asks for: the INT2
    pages of the whole sequence plus the window's admission cap (window + the tokens in flight). Such an
    engine started and then never scheduled anything (H100, 48-page pool, 1024-token chunks). Called
    after vLLM's check with the same arguments; ``get_needed_memory`` is vLLM's
    ``partial(_max_memory_usage_bytes_from_groups, vllm_config, groups)``.
    """
    args = getattr(get_needed_memory, "args", ())
    if len(args) != 2 or not any(isinstance(g.kv_cache_spec, OscarWindowSpec) for g in args[1]):
        return
    from vllm.v1.core.kv_cache_utils import _pool_bytes_per_block

    vllm_config, groups = args
    in_flight = vllm_config.max_in_flight_tokens
    need: dict[str, int] = {}  # pages per spec type, over its groups
    for g in groups:
        spec = g.kv_cache_spec
        pages_for_one = (spec.max_admission_blocks_per_request(in_flight, max_model_len)
                         if isinstance(spec, SlidingWindowSpec) else cdiv(max_model_len, spec.block_size))
        need[type(spec).__name__] = need.get(type(spec).__name__, 0) + pages_for_one
    pages = available_memory // _pool_bytes_per_block(vllm_config, groups) - 1  # page 0 is vLLM's null block
    if sum(need.values()) > pages:
        detail = ", ".join(f"{n} {k}" for k, n in need.items())
        raise ValueError(
            f"oscar_int2: the KV pool has {pages} pages, but vLLM admits a request only when its whole sequence "
            f"fits: {sum(need.values())} pages for max_model_len={max_model_len} ({detail}; the BF16 window "
            f"reserves its recent tokens plus max_num_batched_tokens x concurrent batches = {in_flight} tokens "
            f"in flight). This engine would start and never schedule a request. Lower max_num_batched_tokens "
            f"or max_model_len, or give the cache more memory (gpu_memory_utilization, num_gpu_blocks_override)."
        )
    report_admission_reserve(vllm_config, groups, need, max_model_len, in_flight)


def report_admission_reserve(vllm_config, groups, need: dict[str, int], max_model_len: int,
                             in_flight: int) -> float:
    """Log how far below vLLM's logged maximum concurrency a cache full of long prompts runs, and return it
    in requests of ``max_model_len`` tokens.

    vLLM's concurrency figure charges each request the window's steady state (what it keeps while it
    decodes), but a waiting request is admitted only when its whole prompt fits, i.e. with the window's
    admission cap free (recent + ``in_flight`` tokens of BF16 pages). The difference is a reserve that a
    full cache must keep. Measured on the H100 (Qwen3-8B shape, 32K prompts, 16K chunks, README
    'Admission at a full cache'): 78 requests of 32,256 + 512 tokens never all ran at once, where
    28,672 + 4,096 did; ``tests/vllm/test_scheduler_preemption.py`` reproduces it with vLLM's scheduler.
    """
    window = [g.kv_cache_spec for g in groups if isinstance(g.kv_cache_spec, OscarWindowSpec)]
    steady = sum(spec.max_memory_usage_bytes(vllm_config) // spec.page_size_bytes for spec in window)
    cap = need.get(OscarWindowSpec.__name__, 0)
    extra = cap - steady
    per_request = sum(need.values()) - cap + steady  # pages a running max_model_len request keeps
    if extra <= 0 or per_request <= 0:
        return 0.0
    requests = extra / per_request
    logger.info(
        "vllm-oscar: a waiting request is admitted only when its whole prompt fits; for a %d-token prompt "
        "that is %d BF16 window pages (%d tokens in flight + the recent window + the sink), %d more than a "
        "running request keeps: the pages of %.1f running %d-token requests. A cache full of such prompts "
        "runs about that many fewer at once than vLLM's logged maximum concurrency; a smaller "
        "max_num_batched_tokens lowers the reserve.", max_model_len, cap, in_flight, extra, requests, max_model_len)
    return requests


# ------------------------------------------------------------------------------------------------
# Companion layer and its metadata-only backend (workers)
# ------------------------------------------------------------------------------------------------


@dataclass
class OscarWindowMetadata(AttentionMetadata):
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32, logical block -> window-cache block
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not store


class OscarWindowMetadataBuilder(AttentionMetadataBuilder[OscarWindowMetadata]):
    """Passes the window group's block table through; persistent runner buffers, so graph-safe."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS
    supports_update_block_table: bool = True

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> OscarWindowMetadata:
        return OscarWindowMetadata(common_attn_metadata.block_table_tensor, common_attn_metadata.slot_mapping)

    def update_block_table(self, metadata, blk_table, slot_mapping) -> OscarWindowMetadata:
        return OscarWindowMetadata(blk_table, slot_mapping)


class OscarWindowBackend(AttentionBackend):
    """Metadata-only backend of the window group: the OSCAR impl does all reads and writes."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    forward_includes_kv_cache_update: bool = True  # there is no forward; nothing for vLLM to call

    @staticmethod
    def get_name() -> str:
        return "OSCAR_WINDOW"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the OSCAR window group has no attention impl; the OSCAR layer reads it")

    @staticmethod
    def get_builder_cls():
        return OscarWindowMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return (num_blocks, 2, block_size, num_kv_heads, head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        # Physical layout == logical layout, blocks outermost: pages can be padded to the INT2 page size
        # (vLLM reads this through `indexes_kv_by_block_stride`).
        if include_num_layers_dimension:
            return (1, 0, 2, 3, 4, 5)
        return (0, 1, 2, 3, 4)

    @classmethod
    def supports_pcp(cls) -> bool:
        return False


class OscarWindowLayer(AttentionLayerBase):
    """Companion of one OSCAR layer: owns its BF16 window pages in vLLM's KV cache, nothing else."""

    impl = None  # no compute; vLLM code that walks layers checks hasattr(layer.impl, ...)
    kv_sharing_target_layer_name = None
    attn_type = AttentionType.DECODER
    num_heads = 0

    def __init__(self, primary, sink_tokens: int, recent_tokens: int):
        self.primary_name = primary.layer_name
        self.layer_name = primary.layer_name + WINDOW_SUFFIX
        self.num_kv_heads = primary.num_kv_heads
        self.head_size = primary.head_size
        self.dtype = primary.dtype
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.kv_cache = torch.tensor([])  # bound by vLLM's bind_kv_cache

    def get_attn_backend(self):
        return OscarWindowBackend

    def get_kv_cache_spec(self, vllm_config) -> OscarWindowSpec:
        from vllm_oscar.runtime_config import get_resolved

        bs = vllm_config.cache_config.block_size
        # Pad the BF16 page to the INT2 page of the primary layer: one page size for the whole pool.
        params = get_resolved(vllm_config).layout_params
        int2_page = int2_layout(self.head_size, self.num_kv_heads, bs, params).page_bytes
        spec = OscarWindowSpec(
            block_size=window_block_size(bs),
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size,
            dtype=self.dtype,
            sliding_window=self.recent_tokens,
            sink_tokens=self.sink_tokens,
            page_size_padded=int2_page,
        )
        if spec.real_page_size_bytes > int2_page:  # cannot happen with INT2_BLOCK_MULTIPLIER = 8
            raise AssertionError(f"window page {spec.real_page_size_bytes} B > INT2 page {int2_page} B")
        return spec

    def __repr__(self) -> str:
        return f"OscarWindowLayer({self.layer_name}, sink={self.sink_tokens}, recent={self.recent_tokens})"


def attach_window_companion(layer) -> None:
    """Register ``layer``'s window companion (from the wrapped ``Attention.__init__``)."""
    from vllm.config import get_current_vllm_config

    from vllm_oscar.runtime_config import get_resolved

    if layer.kv_sharing_target_layer_name is not None:
        raise ValueError(
            f"{layer.layer_name}: oscar_int2 does not support cross-layer KV sharing (this layer reads "
            f"{layer.kv_sharing_target_layer_name}'s cache); serve with another --kv-cache-dtype"
        )
    vllm_config = get_current_vllm_config()
    resolved = get_resolved(vllm_config)
    layer.oscar_window_name = None
    if not resolved.windows_enabled:
        return
    companion = OscarWindowLayer(layer, resolved.sink_tokens, resolved.recent_tokens)
    ctx = vllm_config.compilation_config.static_forward_context
    if companion.layer_name in ctx:
        raise ValueError(f"Duplicate layer name: {companion.layer_name}")
    ctx[companion.layer_name] = companion
    layer.oscar_window_name = companion.layer_name
