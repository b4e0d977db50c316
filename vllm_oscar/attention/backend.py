"""The OSCAR attention backend (``AttentionBackendEnum.CUSTOM``) in vLLM's vocabulary.

Per step and layer, all inside ``forward`` (``forward_includes_kv_cache_update = True``: vLLM makes no
separate ``unified_kv_cache_update`` call), on a batch ordered decodes first (``reorder_batch_threshold
= 1``):

1. Store: the store kernel rotates and INT2-packs every token's K/V into the layer's pages (the resolved
   ``levels``: the MSE-fitted grid, or the paper's clipped min-max grid), and copies the rotated rows in
   the model dtype into the window pages of the companion layer (``attention/window.py``).
2. Attention:

   * decodes (one query token each): the decode kernel reads INT2 history and the BF16 sink/recent
     windows; fixed grid and builder-reserved scratch, so pure-decode batches run as FULL CUDA graphs
     (``AttentionCGSupport.UNIFORM_BATCH``; mixed batches run the attention op eagerly between
     piecewise graphs). At small batch (``DecodePlan.overlaps_store``: the decode's INT2 CTAs fit in
     one wave, with the BF16 window) store and decode are one op (``kernels.store_and_decode``): a
     decode reads its newest row only from the window, so the query rotation also rotates that row,
     the decode takes it from there, and the store runs after the decode in the slots its CTAs free.
     That is why the store moved from vLLM's separate update op into ``forward``: the three kernels
     must be launched back to back.
   * prefills: FlashAttention varlen. A chunk without cached context (a first chunk) attends its own
     exact K/V, as BF16 vLLM would. A chunk with context (chunked prefill, prefix-cache hit, resumed
     preemption) attends ``[gathered prefix ; exact chunk]`` in the rotated space: the prefix rows come
     from the window pages where they are in the window of the chunk's first token and are dequantized
     INT2 elsewhere (``gather_prefix``); ``q`` and the chunk's K/V are rotated with ``R_K``/``R_V`` and
     the output is rotated back with ``R_V^T`` (BF16 GEMMs, as the authors do).

Rotations are per layer and shared by all heads, so tensor parallelism slices nothing; they are loaded
in ``process_weights_after_loading`` (before vLLM profiles memory) as non-persistent buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_oscar.attention import kernels
from vllm_oscar.layout import SUPPORTED_HEAD_DIMS, Int2PageLayout

OSCAR_CACHE_DTYPE = "oscar_int2"


class OscarAttentionBackend(AttentionBackend):
    """INT2 KV cache with rotations, clipping and BF16 windows (vLLM's CUSTOM backend slot)."""

    accept_output_buffer: bool = True
    # forward stores the step's K/V itself, so that the decode can overlap the store (module docstring).
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16]  # the kernels' activation dtype
    supported_kv_cache_dtypes: ClassVar[list] = [OSCAR_CACHE_DTYPE]

    @staticmethod
    def get_name() -> str:
        # Attention.__init__ does AttentionBackendEnum[backend.get_name()]: the name must be the enum member.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[OscarAttentionImpl]:
        return OscarAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[OscarMetadataBuilder]:
        return OscarMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # Int2PageLayout keeps each page region 16-byte aligned

    #: The INT2 pages' (scale, offset) format: this class fp16 pairs, :class:`OscarAttentionBackendU8` u8.
    #: vLLM asks the backend class for the cache shape with nothing but sizes, so the class carries it.
    LAYOUT_PARAMS: ClassVar[str] = "fp16"

    @classmethod
    def get_kv_cache_shape(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # `cache_dtype_str` is ignored on purpose: both model runners pass "auto" for specs whose
        # kv_quant_mode is NONE (the trap that breaks TurboQuant on the V1 runner in 0.26).
        return Int2PageLayout(head_dim=head_size, block_size=block_size, num_kv_heads=num_kv_heads,
                              params=cls.LAYOUT_PARAMS).cache_shape(num_blocks)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        return (1, 0, 2, 3) if include_num_layers_dimension else (0, 1, 2)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype == OSCAR_CACHE_DTYPE

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False

    @classmethod
    def supports_pcp(cls) -> bool:
        return False


class OscarAttentionBackendU8(OscarAttentionBackend):
    """The same backend over INT2 pages with 2-byte (scale, offset) pairs (``scale_dtype: "u8"``)."""

    LAYOUT_PARAMS: ClassVar[str] = "u8"


def backend_for_params(params: str) -> type[OscarAttentionBackend]:
    """The backend class of INT2 pages with ``params`` pairs (:data:`vllm_oscar.layout.PARAM_FORMATS`)."""
    return OscarAttentionBackendU8 if params == "u8" else OscarAttentionBackend


# ------------------------------------------------------------------------------------------------
# Metadata
# ------------------------------------------------------------------------------------------------


@dataclass
class OscarPrefillBatch:
    """Prefill requests ``[req_start, req_end)`` attended in one FlashAttention varlen call."""

    req_start: int
    req_end: int
    tok_start: int  # first query token of the batch in the step's token order
    tok_end: int
    cu_seqlens_q: torch.Tensor  # int32 [n+1], relative to tok_start
    max_seqlen_q: int
    has_context: bool
    # Only with context: the packed K/V buffer holds, per request, its context rows then its chunk rows.
    cu_seqlens_k: torch.Tensor | None = None  # int32 [n+1]
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None  # int32 [n]
    window_starts: torch.Tensor | None = None  # int32 [n]: first context row read from the BF16 window
    kv_dest: torch.Tensor | None = None  # int64 [tok_end - tok_start]: packed row of each chunk token
    total_kv: int = 0


@dataclass
class OscarMetadata(AttentionMetadata):
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    seq_lens: torch.Tensor  # [num_reqs] (persistent runner buffer)
    block_table: torch.Tensor  # [num_reqs, max_blocks] INT2 group
    slot_mapping: torch.Tensor
    decode_plan: object = None  # kernels.DecodePlan of the builder (split counts, semaphores)
    decode_overlaps_store: bool = False  # decode_plan.overlaps_store(num_decodes): store_and_decode
    prefill_batches: list[OscarPrefillBatch] = field(default_factory=list)


def plan_prefill_batches(query_start_loc_cpu: np.ndarray, seq_lens_cpu: np.ndarray, first_prefill: int,
                         max_kv_rows: int, recent_tokens: int,
                         device: torch.device | str) -> list[OscarPrefillBatch]:
    """Group the prefill requests ``first_prefill ..`` into varlen calls of at most ``max_kv_rows`` K/V rows.

    ``seq_lens_cpu`` must be exact for prefill rows (vLLM's ``seq_lens_cpu_upper_bound`` is). Requests
    stay in batch order; one request never exceeds ``max_kv_rows`` (it is at least ``max_model_len``).
    """
    num_reqs = len(seq_lens_cpu)
    q_lens = np.diff(query_start_loc_cpu[: num_reqs + 1]).astype(np.int64)
    seq = seq_lens_cpu[:num_reqs].astype(np.int64)
    ctx = seq - q_lens
    batches: list[OscarPrefillBatch] = []
    start = first_prefill
    while start < num_reqs:
        end, rows = start, 0
        while end < num_reqs and (end == start or rows + seq[end] <= max_kv_rows):
            rows += seq[end]
            end += 1
        ql, cl, sl = q_lens[start:end], ctx[start:end], seq[start:end]
        cu_q = np.concatenate([[0], np.cumsum(ql)]).astype(np.int32)
        tok0 = int(query_start_loc_cpu[start])
        b = OscarPrefillBatch(
            req_start=start, req_end=end, tok_start=tok0, tok_end=tok0 + int(cu_q[-1]),
            cu_seqlens_q=torch.from_numpy(cu_q).to(device, non_blocking=True),
            max_seqlen_q=int(ql.max()), has_context=bool((cl > 0).any()),
        )
        if b.has_context:
            cu_k = np.concatenate([[0], np.cumsum(sl)]).astype(np.int64)
            # chunk token t of request r sits after r's context: cu_k[r] + ctx[r] + (t - cu_q[r])
            dest = np.repeat(cu_k[:-1] + cl - cu_q[:-1], ql) + np.arange(int(cu_q[-1]))
            b.cu_seqlens_k = torch.from_numpy(cu_k.astype(np.int32)).to(device, non_blocking=True)
            b.max_seqlen_k = int(sl.max())
            b.context_lens = torch.from_numpy(cl.astype(np.int32)).to(device, non_blocking=True)
            # Context rows in the window of the chunk's first query (position ctx) are read in BF16.
            starts = np.maximum(cl + 1 - recent_tokens, 0).astype(np.int32)
            b.window_starts = torch.from_numpy(starts).to(device, non_blocking=True)
            b.kv_dest = torch.from_numpy(dest.astype(np.int64)).to(device, non_blocking=True)
            b.total_kv = int(cu_k[-1])
        batches.append(b)
        start = end
    return batches


class OscarMetadataBuilder(AttentionMetadataBuilder[OscarMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Decodes first; a 1-token chunk of a prompt is a decode too (same math: query at the last position).
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        kernels.require_kernels(device)
        from vllm_oscar.runtime_config import get_resolved

        self.resolved = get_resolved(vllm_config)
        mc, sc = vllm_config.model_config, vllm_config.scheduler_config
        self.num_heads = mc.get_num_attention_heads(vllm_config.parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_dim = kv_cache_spec.head_size
        self.act_dtype = mc.dtype
        self.max_num_reqs = sc.max_num_seqs
        self.max_query_tokens = sc.max_num_batched_tokens
        # One prefill varlen call packs at most this many K/V rows (context + chunk of each request).
        self.max_kv_rows = max(mc.max_model_len, sc.max_num_batched_tokens)
        self.decode_plan = kernels.DecodePlan(
            self.max_num_reqs, self.num_heads, self.num_kv_heads, self.head_dim, mc.max_model_len,
            self.resolved.sink_tokens, self.resolved.recent_tokens, self.resolved.windows_enabled, device,
        )
        self._reserve_workspace()

    def prefill_workspace_shapes(self):
        d = self.head_dim
        return [
            ((self.max_query_tokens, self.num_heads, d), self.act_dtype),  # rotated q, then the rotated output
            ((self.max_kv_rows, self.num_kv_heads, d), self.act_dtype),  # packed K
            ((self.max_kv_rows, self.num_kv_heads, d), self.act_dtype),  # packed V
        ]

    def _reserve_workspace(self) -> None:
        # vLLM's workspace is locked after warm-up: reserve the largest request of either path now.
        from vllm.v1.worker.workspace import current_workspace_manager, is_workspace_manager_initialized

        if not is_workspace_manager_initialized():
            return
        wm = current_workspace_manager()
        for shapes in (self.decode_plan.workspace_shapes(), self.prefill_workspace_shapes()):
            if shapes:
                wm.get_simultaneous(*shapes)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> OscarMetadata:
        from vllm.v1.attention.backends.utils import split_decodes_and_prefills

        cam = common_attn_metadata
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold
        )
        batches: list[OscarPrefillBatch] = []
        if num_prefills:
            seq_cpu = cam.seq_lens_cpu_upper_bound
            if seq_cpu is None:  # only runners older than 0.26 leave it unset
                seq_cpu = cam.seq_lens.cpu()
            batches = plan_prefill_batches(
                cam.query_start_loc_cpu.numpy(), seq_cpu[: cam.num_reqs].numpy(), num_decodes,
                self.max_kv_rows, self.resolved.recent_tokens, self.device,
            )
        return OscarMetadata(
            num_actual_tokens=cam.num_actual_tokens, num_decodes=num_decodes, num_decode_tokens=num_decode_tokens,
            seq_lens=cam.seq_lens, block_table=cam.block_table_tensor, slot_mapping=cam.slot_mapping,
            decode_plan=self.decode_plan, prefill_batches=batches,
            decode_overlaps_store=num_decodes > 0 and self.decode_plan.overlaps_store(num_decodes),
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> OscarMetadata:
        # Capture with short contexts (replay reads the real seq_lens from the same persistent buffer);
        # the decode grid does not depend on them.
        md = self.build(0, common_attn_metadata)
        md.seq_lens.fill_(1)
        return md


# ------------------------------------------------------------------------------------------------
# Impl
# ------------------------------------------------------------------------------------------------


class OscarAttentionImpl(AttentionImpl[OscarMetadata]):
    supports_quant_query_input: bool = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **extra) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding window")
        if logits_soft_cap:
            unsupported.append("logits soft-capping")
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type!r}")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        extra = {k: v for k, v in extra.items() if v is not None and k != "use_alibi_sqrt"}
        if extra:
            unsupported.append(f"layer options {sorted(extra)}")
        if unsupported:
            raise ValueError(
                f"oscar_int2 does not support {', '.join(unsupported)}; keep such layers in BF16 with "
                "--kv-cache-dtype-skip-layers or serve with another --kv-cache-dtype"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self._vllm_config = get_current_vllm_config()
        self._layer_name: str | None = None
        self._window_name: str | None = None
        self._args: OscarLayerArgsCache | None = None  # set by process_weights_after_loading
        # True once attention/fold.py has multiplied o_proj's input columns by R_V: the kernels then leave
        # the output in the rotated space.
        self._value_rotation_folded = False

    # -------------------------------------------------------------------------------- setup

    def _find_layer(self):
        ctx = self._vllm_config.compilation_config.static_forward_context
        for name, layer in ctx.items():
            if getattr(layer, "impl", None) is self:
                return name, layer
        raise RuntimeError("OSCAR attention impl is not attached to any layer in the static forward context")

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Load this layer's rotations as buffers (runs before vLLM profiles memory)."""
        from vllm.model_executor.models.utils import extract_layer_index

        from vllm_oscar.runtime_config import artifact_for, get_resolved

        name, layer = self._find_layer()
        device = layer._k_scale.device  # the layer's buffers already sit on the target device
        kernels.require_kernels(device)
        resolved = get_resolved(self._vllm_config)
        art = artifact_for(self._vllm_config)
        idx = extract_layer_index(name)
        rk = art.k_rotation[idx].to(device=device, dtype=torch.float32).contiguous()
        rv = art.v_rotation[idx].to(device=device, dtype=torch.float32).contiguous()
        # fp32 copies for the store/decode kernels (quantization runs in fp32), model-dtype copies for the
        # prefill GEMMs. Non-persistent: they are not checkpoint weights.
        for buf, t in (("oscar_rotation_k", rk), ("oscar_rotation_v", rv), ("oscar_rotation_k_act", rk.to(act_dtype)),
                       ("oscar_rotation_v_act", rv.to(act_dtype)),
                       ("oscar_rotation_v_t_act", rv.t().contiguous().to(act_dtype))):
            layer.register_buffer(buf, t, persistent=False)
        self._layer_name = name
        self._window_name = getattr(layer, "oscar_window_name", None)
        self._args = OscarLayerArgsCache(resolved, self.head_size, self.num_kv_heads, self.scale)

    @property
    def vllm_config(self):
        return self._vllm_config

    @property
    def value_rotation_folded(self) -> bool:
        return self._value_rotation_folded

    def set_value_rotation_folded(self, folded: bool) -> None:
        self._value_rotation_folded = bool(folded)

    def _layer_args(self, layer, kv_cache: torch.Tensor) -> kernels.OscarLayerArgs:
        if self._args is None:
            raise RuntimeError("OSCAR layer used before process_weights_after_loading loaded its rotations")
        return self._args.get(layer, kv_cache, rotate_output=not self._value_rotation_folded)

    def _window(self, num_tokens: int | None = None):
        """The companion's (cache, block table, slot mapping) for this step; Nones without windows."""
        if self._window_name is None:
            return None, None, None
        from vllm.forward_context import get_forward_context

        fc = get_forward_context()
        companion = fc.no_compile_layers[self._window_name]
        md = fc.attn_metadata
        if isinstance(md, list):  # speculative decoding shape; refused at start-up, kept for safety
            md = md[0]
        wmd = md.get(self._window_name) if isinstance(md, dict) else None
        slots = fc.slot_mapping.get(self._window_name) if isinstance(fc.slot_mapping, dict) else None
        if slots is not None and num_tokens is not None:
            slots = slots[:num_tokens]
        return companion.kv_cache, (wmd.block_table if wmd is not None else None), slots

    # -------------------------------------------------------------------------------- attention

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: OscarMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("oscar_int2 does not fuse output quantization")
        if attn_metadata is None:  # memory profiling run: no KV cache yet
            return output.fill_(0)
        args = self._layer_args(layer, kv_cache)
        md = attn_metadata
        # vLLM's slot mapping of this step (padded with -1 in FULL CUDA-graph mode; key/value may be longer).
        n = md.slot_mapping.shape[0]
        window_cache, window_bt, window_slots = self._window(n)
        out = output.view(-1, self.num_heads, self.head_size)
        q = query.view(-1, self.num_heads, self.head_size)
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)

        if n and not md.decode_overlaps_store:
            kernels.store(k[:n], v[:n], kv_cache, md.slot_mapping, window_cache, window_slots, args)
        if md.num_decodes:
            nd, nr = md.num_decode_tokens, md.num_decodes
            plan = md.decode_plan
            workspace = plan.bind(self._workspace(plan.workspace_shapes()), nr)
            bt, seq_lens = md.block_table[:nr], md.seq_lens[:nr]
            wbt = None if window_bt is None else window_bt[:nr]
            if md.decode_overlaps_store:  # small batch: the store runs beside the decode
                kernels.store_and_decode(out[:nd], q[:nd], k[:n], v[:n], kv_cache, md.slot_mapping, bt, seq_lens,
                                         window_cache, window_slots, wbt, args, workspace)
            else:
                kernels.decode(out[:nd], q[:nd], kv_cache, bt, seq_lens, window_cache, wbt, args, workspace)

        if md.prefill_batches:
            for b in md.prefill_batches:
                self._prefill(layer, b, q, k, v, out, kv_cache, md, window_cache, window_bt, args)
        return output

    @staticmethod
    def _workspace(shapes):
        if not shapes:
            return []
        from vllm.v1.worker.workspace import current_workspace_manager

        return current_workspace_manager().get_simultaneous(*shapes)

    def _prefill(self, layer, b: OscarPrefillBatch, q, k, v, out, kv_cache, md, window_cache, window_bt, args):
        t0, t1 = b.tok_start, b.tok_end
        qs, ks, vs, outs = q[t0:t1], k[t0:t1], v[t0:t1], out[t0:t1]
        if not b.has_context:
            # First chunks attend their own exact K/V: identical to BF16 attention.
            kernels.varlen_attention(qs, ks, vs, b.cu_seqlens_q, b.cu_seqlens_q, b.max_seqlen_q, b.max_seqlen_q,
                                     self.scale, outs)
            if args.output_rotation_v is None:  # o_proj absorbed R_V (attention/fold.py): hand it o R_V
                (obuf,) = self._workspace([(tuple(outs.shape), outs.dtype)])
                torch.matmul(outs, layer.oscar_rotation_v_act, out=obuf)
                outs.copy_(obuf)
            return
        n, d, hkv = t1 - t0, self.head_size, self.num_kv_heads
        qbuf, kbuf, vbuf = self._workspace([
            ((n, self.num_heads, d), qs.dtype), ((b.total_kv, hkv, d), qs.dtype), ((b.total_kv, hkv, d), qs.dtype),
        ])
        kernels.gather_prefix(kv_cache, md.block_table[b.req_start:b.req_end], b.context_lens, b.cu_seqlens_k,
                              b.window_starts, window_cache, None if window_bt is None else window_bt[b.req_start:b.req_end],
                              args, kbuf, vbuf)
        rot = qbuf.view(-1)[: n * hkv * d].view(n, hkv, d)  # scratch for the chunk's rotated K, then V
        torch.matmul(ks, layer.oscar_rotation_k_act, out=rot)
        kbuf.index_copy_(0, b.kv_dest, rot)
        torch.matmul(vs, layer.oscar_rotation_v_act, out=rot)
        vbuf.index_copy_(0, b.kv_dest, rot)
        torch.matmul(qs, layer.oscar_rotation_k_act, out=qbuf)
        kernels.varlen_attention(qbuf, kbuf, vbuf, b.cu_seqlens_q, b.cu_seqlens_k, b.max_seqlen_q, b.max_seqlen_k,
                                 self.scale, outs)
        if args.output_rotation_v is not None:  # else o_proj absorbed R_V (attention/fold.py)
            torch.matmul(outs, layer.oscar_rotation_v_t_act, out=qbuf)  # back to the model space: o = o_rot R_V^T
            outs.copy_(qbuf)


class OscarLayerArgsCache:
    """Builds :class:`kernels.OscarLayerArgs` from the layer's current buffers and cache tensor.

    The page layout is read off the bound cache tensor: ``process_weights_after_loading`` runs before
    vLLM settles the block size (``Platform.update_block_size_for_backend``), so it cannot know it.
    """

    def __init__(self, resolved, head_dim: int, num_kv_heads: int, scale: float):
        self.resolved = resolved
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self._cached: tuple | None = None

    def get(self, layer, kv_cache: torch.Tensor, *, rotate_output: bool = True) -> kernels.OscarLayerArgs:
        rk, rv = layer.oscar_rotation_k, layer.oscar_rotation_v
        page = kv_cache.shape[-1]
        key = (id(rk), id(rv), page, rotate_output)
        if self._cached is None or self._cached[:4] != key:
            r = self.resolved
            layout = Int2PageLayout.for_head_page(self.head_dim, page, self.num_kv_heads, r.layout_params)
            args = kernels.OscarLayerArgs(
                layout=layout, rotation_k=rk, rotation_v=rv, k_clip_ratio=r.k_clip_ratio,
                v_clip_ratio=r.v_clip_ratio, sink_tokens=r.sink_tokens, recent_tokens=r.recent_tokens,
                scale=self.scale, levels=r.levels, rotate_output=rotate_output)
            self._cached = (*key, args)
        return self._cached[4]
