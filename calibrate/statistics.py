"""Streaming float64 accumulators for the OSCAR calibration targets.

Memory is ``O(layers * kv_heads * head_dim^2)`` whatever the token budget. The V target's per-token
weight ``k^T Sigma_Q k`` needs the *final* query second moment, so calibration makes two passes over
the same text: pass 1 accumulates ``Sigma_Q`` per KV group, pass 2 the weighted V moments. With
``W_g = sum_t w_t`` and ``A_g = sum_t w_t v v^T``, the target's per-group term is exactly
``C_g = (1/T) sum_t (w_t T / W_g) v v^T = A_g / W_g`` (see ``reference.v_target``).
"""

from __future__ import annotations

import torch

from vllm_oscar.ops.reference import _group_queries


class LayerMoments:
    """Second-moment sums for one attention layer (float64)."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        z = torch.zeros(num_kv_heads, head_dim, head_dim, dtype=torch.float64)
        self.qq_sum = z.clone()  # sum over (token, q head in group) of q q^T
        self.q_rows = 0  # rows per group in qq_sum
        self.wvv_sum = z.clone()  # sum_t w_t v v^T
        self.w_sum = torch.zeros(num_kv_heads, dtype=torch.float64)
        self.v_tokens = 0

    def add_queries(self, q: torch.Tensor) -> None:
        """Pass 1. ``q [T, Hq, d]`` (post-QK-norm, post-RoPE)."""
        qg = _group_queries(q.to(torch.float64), self.num_kv_heads)  # [Hkv, T*G, d]
        self.qq_sum += qg.transpose(1, 2) @ qg
        self.q_rows += qg.shape[1]

    def query_moments(self) -> torch.Tensor:
        """``Sigma_g`` per KV group ``[Hkv, d, d]``."""
        if self.q_rows == 0:
            raise ValueError("no queries were accumulated for this layer")
        return self.qq_sum / self.q_rows

    def add_values(self, k: torch.Tensor, v: torch.Tensor, sigma_q: torch.Tensor) -> None:
        """Pass 2. ``k, v [T, Hkv, d]``; ``sigma_q`` from :meth:`query_moments` after pass 1."""
        k64, v64 = k.to(torch.float64), v.to(torch.float64)
        w = torch.einsum("thd,hde,the->ht", k64, sigma_q, k64)  # [Hkv, T]
        self.wvv_sum += torch.einsum("ht,thd,the->hde", w, v64, v64)
        self.w_sum += w.sum(1)
        self.v_tokens += k.shape[0]

    def k_target(self) -> torch.Tensor:
        return self.query_moments().mean(0)

    def v_target(self) -> torch.Tensor:
        if self.v_tokens == 0:
            raise ValueError("no values were accumulated for this layer (pass 2 did not run)")
        c = self.wvv_sum / torch.clamp(self.w_sum, min=1e-12)[:, None, None]
        return c.mean(0)
