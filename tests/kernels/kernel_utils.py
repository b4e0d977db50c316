"""Shared helpers of the CUDA kernel tests: skip marks, random inputs, poisoned caches, references."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_oscar import ops
from vllm_oscar.layout import Int2PageLayout
from vllm_oscar.ops import reference as ref


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU: torch.cuda.is_available() is False"
    if not ops.kernels_available():
        return f"vllm_oscar CUDA kernels unavailable: {ops.kernels_unavailable_reason()}"
    return None


_REASON = gpu_skip_reason()
requires_gpu = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def random_rotation(d: int, gen: torch.Generator) -> torch.Tensor:
    """Random orthogonal ``[d, d]`` float32 (QR of a Gaussian, on the CPU)."""
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return (qm * torch.sign(torch.diagonal(r))).float().contiguous()  # QR returns column-major Q


def kv_rows(t: int, hkv: int, d: int, gen: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    """K/V-like rows on the CPU: per-channel scales, a bias and sparse outliers (what clipping is for)."""
    x = torch.randn(t, hkv, d, generator=gen) * (0.5 + torch.rand(1, hkv, d, generator=gen))
    x = x + 0.3 * torch.randn(1, hkv, d, generator=gen)
    spikes = torch.rand(t, hkv, d, generator=gen) < 0.02
    x = torch.where(spikes, x * 8, x)
    return x.to(dtype)


def poisoned_int2_cache(layout: Int2PageLayout, num_blocks: int, device="cpu") -> torch.Tensor:
    """All bytes 0xFF: every fp16 (scale, offset) reads as NaN (u8: scale 62, offset +6.44 scales), every
    code as 3."""
    return torch.full(layout.cache_shape(num_blocks), 0xFF, dtype=torch.uint8, device=device)


def nan_window_cache(num_blocks: int, block_size: int, hkv: int, d: int, device="cpu", dtype=torch.bfloat16):
    return torch.full((num_blocks, 2, block_size, hkv, d), float("nan"), dtype=dtype, device=device)


def unpack_cache(kv_cache: torch.Tensor, layout: Int2PageLayout):
    """``(k_codes, v_codes, k_params, v_params)`` per slot: codes ``[slots, Hkv, d]`` uint8,
    params ``[slots, Hkv, 2]`` fp16."""
    kc, vc, kp, vp = ref._head_page_views(kv_cache, layout)
    nb, hkv = kv_cache.shape[:2]

    def slots(x):
        return x.permute(0, 2, 1, 3).reshape(nb * layout.block_size, hkv, -1)

    return ref.unpack_int2(slots(kc)), ref.unpack_int2(slots(vc)), slots(kp), slots(vp)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------------------------------
# decode fixtures
# --------------------------------------------------------------------------------------------------


class DecodeCase:
    """A random paged INT2 cache (+ window cache) for ``seq_lens``, built with the reference store on CPU.

    Block tables are random permutations of physical blocks; window blocks exist only for logical
    blocks that hold window rows, the others point at a NaN block, and unwritten window rows are NaN.
    """

    def __init__(self, *, batch, num_q_heads, num_kv_heads, head_dim, block_size, seq_lens, sink, recent,
                 window=True, window_block_size=None, rot_k=True, rot_v=True, seed=0, q_scale=2.0, params="fp16"):
        gen = torch.Generator().manual_seed(seed)
        self.layout = Int2PageLayout(head_dim, block_size, num_kv_heads, params=params)
        self.seq_lens = list(seq_lens)
        assert len(self.seq_lens) == batch
        self.batch, self.hq, self.hkv, self.d = batch, num_q_heads, num_kv_heads, head_dim
        self.sink, self.recent = (sink, recent) if window else (0, 0)
        bs = block_size
        max_len = max(max(self.seq_lens), 1)
        bps = math.ceil(max_len / bs)
        num_blocks = batch * bps + 2
        perm = torch.randperm(num_blocks, generator=gen)[: batch * bps].view(batch, bps)
        self.block_table = perm.to(torch.int32)
        self.rot_k = random_rotation(head_dim, gen) if rot_k else None
        self.rot_v = random_rotation(head_dim, gen) if rot_v else None
        total = sum(self.seq_lens)
        k = kv_rows(total, num_kv_heads, head_dim, gen)
        v = kv_rows(total, num_kv_heads, head_dim, gen)
        slots = torch.cat([
            self.block_table[b, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
            for b, n in enumerate(self.seq_lens)
        ]) if total else torch.zeros(0, dtype=torch.long)
        self.kv_cache = poisoned_int2_cache(self.layout, num_blocks)
        ref.store_kv(k, v, self.kv_cache, slots, self.rot_k, self.rot_v, self.layout, 0.96, 0.92)
        # Slots past seq_len in the last block stay poisoned (NaN params): the kernel must mask them.
        self.window = window
        if window:
            wbs = window_block_size or bs
            self.wbs = wbs
            wbps = math.ceil(max_len / wbs)
            # block 0 is a NaN block every non-window logical block points at
            self.window_block_table = torch.zeros(batch, wbps, dtype=torch.int32)
            nxt = 1
            wslots = []
            for b, n in enumerate(self.seq_lens):
                pos = torch.arange(n)
                in_win = (pos < self.sink) | (pos >= n - self.recent)
                for lb in torch.unique(pos[in_win] // wbs).tolist():
                    self.window_block_table[b, lb] = nxt
                    nxt += 1
                ws = self.window_block_table[b, pos // wbs].long() * wbs + pos % wbs
                wslots.append(torch.where(in_win, ws, torch.full_like(ws, -1)))
            self.window_cache = nan_window_cache(nxt, wbs, num_kv_heads, head_dim)
            if total:
                ref.store_window(k, v, self.window_cache, torch.cat(wslots), self.rot_k, self.rot_v)
        else:
            self.window_cache = None
            self.window_block_table = None
        self.q = (torch.randn(batch, num_q_heads, head_dim, generator=gen) * q_scale).to(torch.bfloat16)
        self.scale = head_dim**-0.5

    def cuda_args(self):
        dev = "cuda"
        return dict(
            kv_cache=self.kv_cache.to(dev),
            block_table=self.block_table.to(dev),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
            window_cache=None if self.window_cache is None else self.window_cache.to(dev),
            window_block_table=None if self.window_block_table is None else self.window_block_table.to(dev),
            rotation_k=None if self.rot_k is None else self.rot_k.to(dev),
            rotation_v=None if self.rot_v is None else self.rot_v.to(dev),
            params=self.layout.params,
        )

    def reference(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 reference (:func:`reference.paged_decode`, CPU)."""
        q = self.q if q is None else q
        return ref.paged_decode(
            q.float().cpu(), self.kv_cache, self.block_table, torch.tensor(self.seq_lens), self.layout,
            self.window_cache, self.window_block_table, self.sink, self.recent, self.rot_k, self.rot_v,
            self.scale,
        )

    def reference_bf16(self, q: torch.Tensor | None = None) -> torch.Tensor:
        """The same attention computed the way a BF16 implementation would (what OSCAR's Triton decode
        does): bf16 rotation, bf16 dequantized K/V, fp32 scores and softmax, bf16 P, bf16 output,
        bf16 R_V. The kernel must stay within 2x of this one's error against :meth:`reference`."""
        q = self.q if q is None else q
        out = []
        for b, n in enumerate(self.seq_lens):
            if n == 0:
                out.append(torch.zeros(self.hq, self.d))
                continue
            kq, vq = ref.gather_kv(self.kv_cache, self.block_table[b], n, self.layout)
            pos = torch.arange(n)[:, None, None]
            exact = (pos < self.sink) | (pos >= n - self.recent)
            if self.window_cache is not None:
                kw, vw = ref.gather_window(self.window_cache, self.window_block_table[b], n)
                ks = torch.where(exact, kw, kq).bfloat16().float()
                vs = torch.where(exact, vw, vq).bfloat16().float()
            else:
                ks, vs = kq.bfloat16().float(), vq.bfloat16().float()
            qb = q[b].bfloat16()
            if self.rot_k is not None:
                qb = (qb.float() @ self.rot_k.bfloat16().float()).bfloat16()
            g = self.hq // self.hkv
            kk = ks.permute(1, 0, 2).repeat_interleave(g, 0)  # [Hq, n, d]
            vv = vs.permute(1, 0, 2).repeat_interleave(g, 0)
            s = (qb.float()[:, None, :] @ kk.transpose(1, 2))[:, 0] * self.scale
            p = torch.softmax(s, -1).bfloat16().float()
            o = (p[:, None, :] @ vv)[:, 0].bfloat16()
            if self.rot_v is not None:
                o = (o.float() @ self.rot_v.bfloat16().float().T).bfloat16()
            out.append(o.float())
        return torch.stack(out)
