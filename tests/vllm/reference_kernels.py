"""``vllm_oscar.attention.kernels`` implemented with the plain-PyTorch spec, for CPU tests only.

The CPU tests swap these in (``install(monkeypatch)``) to run the real OSCAR backend (metadata builder,
impl, window companion, vLLM's KV-cache manager and tensor reshaping) without CUDA. Each function has the
contract of its namesake in ``vllm_oscar/attention/kernels.py``; the CUDA kernels are tested against the
same spec in the kernel tests.
"""

from __future__ import annotations

import torch

from vllm_oscar.attention import kernels
from vllm_oscar.ops import reference as ref


def require_kernels(device) -> None:
    return None


class DecodePlan:
    """No scratch and no split counts: the reference decode is a plain loop."""

    def __init__(self, *args, **kwargs):
        pass

    def workspace_shapes(self):
        return []

    def bind(self, buffers, batch):
        return None

    def overlaps_store(self, batch):
        return batch % 2 == 1  # both of the backend's decode-step paths run


def store(key, value, kv_cache, slot_mapping, window_cache, window_slot_mapping, args) -> None:
    ref.store_kv(key, value, kv_cache, slot_mapping, args.rotation_k, args.rotation_v, args.layout,
                 args.k_clip_ratio, args.v_clip_ratio, args.levels)
    if window_cache is not None:
        ref.store_window(key, value, window_cache, window_slot_mapping, args.rotation_k, args.rotation_v)


def decode(out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table, args, workspace) -> None:
    o = ref.paged_decode(q, kv_cache, block_table, seq_lens, args.layout, window_cache, window_block_table,
                         args.sink_tokens, args.recent_tokens, args.rotation_k, args.output_rotation_v, args.scale)
    out.copy_(o.to(out.dtype))


def store_and_decode(out, q, key, value, kv_cache, slot_mapping, block_table, seq_lens, window_cache,
                     window_slot_mapping, window_block_table, args, workspace) -> None:
    # The op's contract (ops.store_and_decode): key[b] is decoded sequence b's newest token, i.e. the
    # backend hands it vLLM's batch with the decodes first and their slots at position seq_len - 1.
    bs = args.layout.block_size
    for b, n in enumerate(seq_lens[: q.shape[0]].tolist()):
        if n > 0:
            assert int(slot_mapping[b]) == int(block_table[b, (n - 1) // bs]) * bs + (n - 1) % bs, (b, n)
            if window_cache is not None:
                wbs = window_cache.shape[2]
                want = int(window_block_table[b, (n - 1) // wbs]) * wbs + (n - 1) % wbs
                assert int(window_slot_mapping[b]) == want, (b, n)
    store(key, value, kv_cache, slot_mapping, window_cache, window_slot_mapping, args)
    decode(out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table, args, workspace)


def gather_prefix(kv_cache, block_table, context_lens, cu_seqlens_k, window_starts, window_cache, window_block_table,
                  args, k_out, v_out) -> None:
    for i, n in enumerate(context_lens.tolist()):
        kq, vq = ref.gather_kv(kv_cache, block_table[i], n, args.layout)
        if window_cache is not None:
            kw, vw = ref.gather_window(window_cache, window_block_table[i], n)
            pos = torch.arange(n)[:, None, None]
            exact = (pos < args.sink_tokens) | (pos >= int(window_starts[i]))
            kq, vq = torch.where(exact, kw, kq), torch.where(exact, vw, vq)
        start = int(cu_seqlens_k[i])
        k_out[start:start + n] = kq.to(k_out.dtype)
        v_out[start:start + n] = vq.to(v_out.dtype)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, out) -> None:
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    hq, hkv = q.shape[1], k.shape[1]
    for i in range(len(cq) - 1):
        qi = q[cq[i]:cq[i + 1]].float().transpose(0, 1)  # [H, lq, d]
        ki = k[ck[i]:ck[i + 1]].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        vi = v[ck[i]:ck[i + 1]].float().transpose(0, 1).repeat_interleave(hq // hkv, 0)
        lq, lk = qi.shape[1], ki.shape[1]
        s = qi @ ki.transpose(1, 2) * scale
        causal = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right aligned
        s = s.masked_fill(~causal, float("-inf"))
        out[cq[i]:cq[i + 1]] = (torch.softmax(s, -1) @ vi).transpose(0, 1).to(out.dtype)


def install(monkeypatch) -> None:
    for name in ("require_kernels", "DecodePlan", "store", "decode", "store_and_decode", "gather_prefix",
                 "varlen_attention"):
        monkeypatch.setattr(kernels, name, globals()[name])
