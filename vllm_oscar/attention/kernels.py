"""The OSCAR backend's only door to the kernels (``vllm_oscar.ops``) and to FlashAttention.

Every call the backend makes into compiled code goes through a function here, so a signature change
in :mod:`vllm_oscar.ops` is a one-line edit in this file. The contracts are the plain-PyTorch spec in
:mod:`vllm_oscar.ops.reference` (tests/vllm/reference_kernels.py implements this module's functions
with it, and the CPU tests run the whole backend on top of that).

There is deliberately no PyTorch fallback: without the CUDA kernels :func:`require_kernels` stops the
server at start-up with the reason, instead of serving at a fraction of the speed.

Tensors, for one layer (``d`` = head_dim, ``H``/``Hkv`` = query/KV heads):

* ``kv_cache``: ``uint8 [num_blocks, Hkv, head_page_bytes]`` (:class:`vllm_oscar.layout.Int2PageLayout`);
* ``window_cache``: ``[num_blocks_w, 2, block_size_w, Hkv, d]`` bf16, K then V, rotated rows;
  ``stride(0)`` is the padded page (see ``attention/window.py``), not ``2*block_size_w*Hkv*d``;
  ``None`` when the windows are off (``sink_tokens = recent_tokens = 0``);
* block tables: ``int32 [num_reqs, max_blocks]`` in vLLM's per-group format (freed window blocks are
  vLLM's null block 0); slot mappings ``int64 [num_tokens]`` with ``-1`` = skip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_oscar.layout import Int2PageLayout

KERNEL_OPS = ("store_kv", "decode", "store_and_decode", "gather_prefix", "decode_num_splits", "make_decode_workspace")


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels oscar_int2 needs are not available in this process."""


@dataclass(frozen=True)
class OscarLayerArgs:
    """Per-layer constants of every kernel call."""

    layout: Int2PageLayout
    rotation_k: torch.Tensor  # fp32 [d, d], row convention x_rot = x @ R
    rotation_v: torch.Tensor  # fp32 [d, d]
    k_clip_ratio: float
    v_clip_ratio: float
    sink_tokens: int
    recent_tokens: int
    scale: float
    levels: str = "minmax"  # reference.LEVELS: how the store kernel fits (scale, offset)
    # False when o_proj absorbed R_V (attention/fold.py): the attention output stays in the rotated space.
    rotate_output: bool = True

    @property
    def output_rotation_v(self) -> torch.Tensor | None:
        """What decode and the prefill path apply to the output (``o_rot @ R_V^T``); None: nothing."""
        return self.rotation_v if self.rotate_output else None


def require_kernels(device: torch.device | str) -> None:
    """Raise :class:`KernelsUnavailable` unless the OSCAR kernels can run on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise KernelsUnavailable(
            f"--kv-cache-dtype oscar_int2 needs a CUDA GPU (this worker runs on {device.type!r}); the INT2 "
            "store/decode kernels are CUDA-only and vllm-oscar has no slow fallback"
        )
    from vllm_oscar import ops

    missing = [name for name in KERNEL_OPS if not callable(getattr(ops, name, None))]
    if missing:
        raise KernelsUnavailable(f"vllm_oscar.ops lacks {missing}: this vllm-oscar is older than its backend")
    if not ops.kernels_available():
        raise KernelsUnavailable(
            f"--kv-cache-dtype oscar_int2 needs the vllm-oscar CUDA kernels: {ops.kernels_unavailable_reason()}. "
            "Reinstall vllm-oscar on a machine with the CUDA toolkit (nvcc on PATH or CUDA_HOME) and without "
            "VLLM_OSCAR_SKIP_CUDA_BUILD=1; `vllm-oscar env` shows the kernel status"
        )


def store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
          window_cache: torch.Tensor | None, window_slot_mapping: torch.Tensor | None, args: OscarLayerArgs) -> None:
    """Quantize ``key``/``value`` ``[N, Hkv, d]`` into the INT2 pages and copy them (rotated, model dtype)
    into the window pages. Spec: ``reference.store_kv`` + ``reference.store_window``."""
    from vllm_oscar import ops

    ops.store_kv(key, value, kv_cache, slot_mapping, args.rotation_k, args.rotation_v,
                 k_clip_ratio=args.k_clip_ratio, v_clip_ratio=args.v_clip_ratio,
                 window_cache=window_cache, window_slot_mapping=window_slot_mapping, levels=args.levels,
                 params=args.layout.params)


class DecodePlan:
    """Split counts and scratch of the decode kernel, fixed at start-up (CUDA graphs replay them).

    The split count depends on the batch size only (the context bound is ``max_model_len``), so each
    captured graph keeps its own; the scratch comes from vLLM's workspace (sized here for the largest
    batch and split count) and the zero-initialized semaphores are owned here, because the kernel
    leaves them at zero and the workspace is reused by the prefill path in between.
    """

    def __init__(self, max_batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 sink: int, recent: int, window: bool, device: torch.device):
        from vllm_oscar import ops

        self._args = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          max_seq_len=max_seq_len)
        self._window = dict(sink=sink, recent=recent, window=window)
        self.max_batch = max_batch
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        self._splits: dict[int, int] = {}
        self._overlaps: dict[int, bool] = {}  # per batch bucket; asked on every step by the metadata builder
        # A buffer for (max_batch, the most splits of any batch bucket) covers every batch. The most go to
        # a batch of one with every shape measured, but the split rule does not promise it.
        most = max(self.num_splits(1 << k) for k in range(max(max_batch, 1).bit_length() + 1))  # every bucket
        sizing = ops.make_decode_workspace(max_batch, num_q_heads, num_kv_heads, head_dim, max_seq_len,
                                           **self._window, device="meta", num_splits=most)
        self.buffer_numel = sizing.buffer.numel()
        self.semaphores = torch.zeros(sizing.semaphores.numel(), dtype=torch.int32, device=device)

    def num_splits(self, batch: int) -> int:
        # Bucket the batch to the next power of two: a captured graph runs the batch padded to a capture
        # size, eager mode runs it unpadded, and vLLM's capture sizes include every power of two, so both
        # modes pick the same split count (the same fp32 summation order: identical tokens).
        bucket = self._bucket(batch)
        if bucket not in self._splits:
            from vllm_oscar import ops

            a = self._args
            self._splits[bucket] = ops.decode_num_splits(bucket, a["num_q_heads"], a["num_kv_heads"], a["head_dim"],
                                                         a["max_seq_len"], num_sms=self._num_sms, **self._window)
        return self._splits[bucket]

    def _bucket(self, batch: int) -> int:
        return min(1 << max(batch - 1, 0).bit_length(), self.max_batch)

    def overlaps_store(self, batch: int) -> bool:
        """Whether this batch's decode step runs :func:`store_and_decode` (else :func:`store`, then
        :func:`decode`). Decided per batch bucket like the split count, so eager and graph agree. Only
        with a BF16 recent window: without one the op runs the two kernels in turn anyway."""
        from vllm_oscar import ops

        if not self._window["window"] or self._window["recent"] <= 0:
            return False
        bucket = self._bucket(batch)
        if bucket not in self._overlaps:
            a = self._args
            self._overlaps[bucket] = ops.store_overlaps_decode(bucket, a["num_kv_heads"], self.num_splits(batch),
                                                               self._num_sms, head_dim=a["head_dim"],
                                                               num_q_heads=a["num_q_heads"])
        return self._overlaps[bucket]

    def workspace_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((self.buffer_numel,), torch.float32)]

    def bind(self, buffers: list[torch.Tensor], batch: int):
        from vllm_oscar import ops

        return ops.DecodeWorkspace(buffer=buffers[0], semaphores=self.semaphores, num_splits=self.num_splits(batch),
                                   max_batch=self.max_batch)


def decode(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
           seq_lens: torch.Tensor, window_cache: torch.Tensor | None, window_block_table: torch.Tensor | None,
           args: OscarLayerArgs, workspace) -> None:
    """One query token per request: ``q [B, H, d]`` (model space) at position ``seq_lens[b] - 1``;
    writes ``out [B, H, d]``: model space, or ``o R_V`` when ``args.output_rotation_v`` is None (o_proj
    absorbed R_V). Spec: ``reference.paged_decode``. CUDA-graph safe."""
    from vllm_oscar import ops

    ops.decode(q, kv_cache, block_table, seq_lens, workspace, window_cache=window_cache,
               window_block_table=window_block_table, rotation_k=args.rotation_k, rotation_v=args.output_rotation_v,
               sink=args.sink_tokens, recent=args.recent_tokens, scale=args.scale, out=out, params=args.layout.params)


def store_and_decode(out: torch.Tensor, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, window_cache: torch.Tensor | None,
                     window_slot_mapping: torch.Tensor | None, window_block_table: torch.Tensor | None,
                     args: OscarLayerArgs, workspace) -> None:
    """:func:`store` of ``key``/``value`` (every token of the step, ``[N, Hkv, d]``), then :func:`decode` of
    the first ``q.shape[0]`` requests, whose newest tokens are ``key[:q.shape[0]]`` (decodes first in the
    batch) and whose only stored rows they are. The store runs beside the decode
    (``ops.store_and_decode``). Spec: ``reference.store_kv`` + ``reference.store_window``, then
    ``reference.paged_decode``. CUDA-graph safe."""
    from vllm_oscar import ops

    ops.store_and_decode(q, key, value, kv_cache, slot_mapping, block_table, seq_lens, workspace,
                         window_cache=window_cache, window_slot_mapping=window_slot_mapping,
                         window_block_table=window_block_table, rotation_k=args.rotation_k,
                         rotation_v=args.rotation_v, rotate_output=args.rotate_output,
                         k_clip_ratio=args.k_clip_ratio, v_clip_ratio=args.v_clip_ratio, levels=args.levels,
                         params=args.layout.params, sink=args.sink_tokens, recent=args.recent_tokens, scale=args.scale, out=out)


def gather_prefix(kv_cache: torch.Tensor, block_table: torch.Tensor, context_lens: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, window_starts: torch.Tensor, window_cache: torch.Tensor | None,
                  window_block_table: torch.Tensor | None, args: OscarLayerArgs,
                  k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Rows ``0 .. context_lens[i]-1`` of request ``i`` into ``k_out/v_out[cu_seqlens_k[i] + j]`` (rotated
    space, model dtype): the BF16 window copy for ``j < sink`` or ``j >= window_starts[i]`` (the builder
    sets ``context_lens[i] + 1 - recent``: the window of the chunk's first query), the dequantized INT2
    row otherwise. Rows ``cu_seqlens_k[i] + context_lens[i] ..`` belong to the chunk and are untouched."""
    from vllm_oscar import ops

    ops.gather_prefix(kv_cache, block_table, cu_seqlens_k, head_dim=args.layout.head_dim, prefix_lens=context_lens,
                      window_cache=window_cache, window_block_table=window_block_table,
                      window_starts=window_starts if window_cache is not None else None, sink=args.sink_tokens,
                      key_out=k_out, value_out=v_out, params=args.layout.params)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float,
                     out: torch.Tensor) -> None:
    """Causal varlen attention (FlashAttention; bottom-right aligned mask when ``seqlen_k > seqlen_q``)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version

    kwargs = {}
    fa_version = _fa_version(q.shape[-1], get_flash_attn_version)
    if fa_version is not None:
        kwargs["fa_version"] = fa_version
    flash_attn_varlen_func(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=scale,
                           causal=True, out=out, **kwargs)


_FA_VERSION: dict[int, int | None] = {}


def _fa_version(head_size: int, get_version) -> int | None:
    if head_size not in _FA_VERSION:
        _FA_VERSION[head_size] = get_version(head_size=head_size)
    return _FA_VERSION[head_size]
