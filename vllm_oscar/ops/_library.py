"""Fake (meta) implementations of the ``oscar::`` ops for torch.compile and CUDA-graph tracing.

The schemas are defined in ``csrc/torch_bindings.cpp`` (``TORCH_LIBRARY(oscar, m)``); this module
is imported by :mod:`vllm_oscar.ops` right after ``vllm_oscar._C`` loads. Every op mutates its
outputs in place and returns nothing, so a fake only validates what it can see without data:
dtypes, ranks and the shapes that tie the arguments together (the CUDA launchers check the rest).
"""

from __future__ import annotations

import torch

from vllm_oscar.layout import PARAM_FORMATS, Int2PageLayout

_registered = False

_HEAD_DIMS = (64, 128, 256)


def _check_head_dim(d: int, what: str) -> None:
    torch._check(d in _HEAD_DIMS, lambda: f"oscar: unsupported head_dim {d} (from {what}); supported: 64, 128, 256")


def _check_params(params: int) -> None:
    torch._check(params in (0, 1), lambda: f"oscar: params must be 0 (fp16 scale and offset) or 1 (u8), got {params}")


def _int2_block_size(kv_cache: torch.Tensor, d: int, params: int = 0) -> int:
    name = list(PARAM_FORMATS)[params]  # the ops' params codes: PARAM_FORMATS in order
    per_token = Int2PageLayout.token_bytes(d, name)
    page = kv_cache.shape[2]
    torch._check(
        page % per_token == 0 and (page // per_token) % 16 == 0,
        lambda: f"oscar: kv_cache head page of {page} bytes is not block_size * {per_token} bytes "
        f"with block_size a multiple of 16 (head_dim {d}, {name} params)",
    )
    return page // per_token


def _check_cache(kv_cache: torch.Tensor, hkv: int, d: int, params: int = 0) -> None:
    _check_params(params)
    torch._check(kv_cache.dtype == torch.uint8, lambda: f"oscar: kv_cache must be uint8, got {kv_cache.dtype}")
    torch._check(kv_cache.dim() == 3, lambda: f"oscar: kv_cache must be 3-D, got {tuple(kv_cache.shape)}")
    torch._check(
        kv_cache.shape[1] == hkv, lambda: f"oscar: kv_cache has {kv_cache.shape[1]} kv heads, expected {hkv}"
    )
    _int2_block_size(kv_cache, d, params)


def _check_window(window_cache: torch.Tensor | None, hkv: int, d: int) -> None:
    if window_cache is None:
        return
    torch._check(
        window_cache.dim() == 5
        and window_cache.shape[1] == 2
        and window_cache.shape[3] == hkv
        and window_cache.shape[4] == d,
        lambda: f"oscar: window_cache must be [num_blocks, 2, block_size, {hkv}, {d}], "
        f"got {tuple(window_cache.shape)}",
    )


def _check_rotation(r: torch.Tensor | None, name: str, d: int) -> None:
    if r is None:
        return
    torch._check(
        r.dtype == torch.float32 and tuple(r.shape) == (d, d),
        lambda: f"oscar: {name} must be float32 [{d}, {d}], got {r.dtype} {tuple(r.shape)}",
    )


def register_fakes() -> None:
    """Register the fakes once (idempotent). Needs the ops defined, i.e. ``vllm_oscar._C`` loaded."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("oscar::store_kv")
    def _store_kv_fake(
        key, value, kv_cache, slot_mapping, rotation_k, rotation_v, k_clip_ratio, v_clip_ratio,
        window_cache=None, window_slot_mapping=None, levels=0, params=0,
    ):
        torch._check(
            key.dtype in (torch.bfloat16, torch.float16), lambda: f"oscar: key must be bf16/fp16, got {key.dtype}"
        )
        torch._check(key.dim() == 3, lambda: f"oscar: key must be [num_tokens, Hkv, d], got {tuple(key.shape)}")
        torch._check(
            value.dtype == key.dtype and value.shape == key.shape,
            lambda: f"oscar: value must match key {key.dtype} {tuple(key.shape)}, got {value.dtype} "
            f"{tuple(value.shape)}",
        )
        hkv, d = key.shape[1], key.shape[2]
        _check_head_dim(d, "key.shape[2]")
        _check_cache(kv_cache, hkv, d, params)
        torch._check(
            slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1,
            lambda: f"oscar: slot_mapping must be 1-D int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}",
        )
        _check_rotation(rotation_k, "rotation_k", d)
        _check_rotation(rotation_v, "rotation_v", d)
        _check_window(window_cache, hkv, d)
        torch._check(
            window_cache is None or window_slot_mapping is not None,
            lambda: "oscar: window_slot_mapping is required with window_cache",
        )
        torch._check(levels in (0, 1), lambda: f"oscar: levels must be 0 (minmax) or 1 (mse), got {levels}")

    @torch.library.register_fake("oscar::decode")
    def _decode_fake(
        out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table, rotation_k, rotation_v,
        sink, recent, scale, workspace, semaphores, num_splits, params=0,
    ):
        torch._check(q.dtype == torch.bfloat16, lambda: f"oscar: q must be bfloat16, got {q.dtype}")
        torch._check(q.dim() == 3, lambda: f"oscar: q must be [batch, Hq, d], got {tuple(q.shape)}")
        torch._check(
            out.dtype == q.dtype and out.shape == q.shape,
            lambda: f"oscar: out must be bfloat16 {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}",
        )
        d = q.shape[2]
        _check_head_dim(d, "q.shape[2]")
        torch._check(kv_cache.dim() == 3, lambda: f"oscar: kv_cache must be 3-D, got {tuple(kv_cache.shape)}")
        hkv = kv_cache.shape[1]
        _check_cache(kv_cache, hkv, d, params)
        torch._check(
            q.shape[1] % hkv == 0, lambda: f"oscar: num_q_heads {q.shape[1]} is not a multiple of {hkv} kv heads"
        )
        torch._check(
            block_table.dtype == torch.int32 and block_table.dim() == 2,
            lambda: f"oscar: block_table must be 2-D int32, got {block_table.dtype} {tuple(block_table.shape)}",
        )
        torch._check(
            seq_lens.dtype == torch.int32 and seq_lens.dim() == 1,
            lambda: f"oscar: seq_lens must be 1-D int32, got {seq_lens.dtype} {tuple(seq_lens.shape)}",
        )
        _check_window(window_cache, hkv, d)
        _check_rotation(rotation_k, "rotation_k", d)
        _check_rotation(rotation_v, "rotation_v", d)
        torch._check(workspace.dtype == torch.float32, lambda: "oscar: workspace must be float32")
        torch._check(semaphores.dtype == torch.int32, lambda: "oscar: semaphores must be int32")
        torch._check(num_splits >= 1, lambda: f"oscar: num_splits must be >= 1, got {num_splits}")

    @torch.library.register_fake("oscar::store_and_decode")
    def _store_and_decode_fake(
        out, q, key, value, kv_cache, slot_mapping, block_table, seq_lens, window_cache, window_slot_mapping,
        window_block_table, rotation_k, rotation_v, output_rotation_v, k_clip_ratio, v_clip_ratio, levels, sink,
        recent, scale, workspace, semaphores, num_splits, params=0,
    ):
        _store_kv_fake(key, value, kv_cache, slot_mapping, rotation_k, rotation_v, k_clip_ratio, v_clip_ratio,
                       window_cache, window_slot_mapping, levels, params)
        _decode_fake(out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table, rotation_k,
                     output_rotation_v, sink, recent, scale, workspace, semaphores, num_splits, params)
        torch._check(
            key.shape[2] == q.shape[2],
            lambda: f"oscar: key's head_dim {key.shape[2]} must equal q's {q.shape[2]}",
        )
        if window_cache is not None and recent > 0:  # the op's overlapped path reads key[b] for sequence b
            torch._check(
                slot_mapping.shape[0] >= q.shape[0],
                lambda: f"oscar: store_and_decode takes the newest token of decoded sequence b at key[b], so "
                f"slot_mapping needs at least q.shape[0] = {q.shape[0]} entries, got {slot_mapping.shape[0]}",
            )

    @torch.library.register_fake("oscar::gather_prefix")
    def _gather_prefix_fake(
        key_out, value_out, kv_cache, block_table, cu_seqlens, prefix_lens, window_cache, window_block_table,
        window_starts, sink, params=0,
    ):
        torch._check(
            key_out.dtype == torch.bfloat16 and key_out.dim() == 3,
            lambda: f"oscar: key_out must be 3-D bfloat16, got {key_out.dtype} {tuple(key_out.shape)}",
        )
        torch._check(
            value_out.dtype == key_out.dtype and value_out.shape == key_out.shape,
            lambda: f"oscar: value_out must match key_out {tuple(key_out.shape)}, got {tuple(value_out.shape)}",
        )
        hkv, d = key_out.shape[1], key_out.shape[2]
        _check_head_dim(d, "key_out.shape[2]")
        _check_cache(kv_cache, hkv, d, params)
        torch._check(
            cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1,
            lambda: f"oscar: cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}",
        )
        _check_window(window_cache, hkv, d)

    _registered = True
