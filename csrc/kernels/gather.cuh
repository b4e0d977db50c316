// Dequantize paged OSCAR prefixes (INT2, with the BF16 window rows taken from the window cache) into
// contiguous bf16 K and V buffers for FlashAttention varlen. Raw pointers only; launcher: csrc/gather.cu.
//
// Sequence i owns output rows [cu[i], cu[i+1]); its first prefix_len[i] rows are positions
// j = 0 .. prefix_len[i]-1. Position j is copied from the window cache when a window cache is given
// and (j < sink or j >= window_start[i]); otherwise it is dequantized from INT2 as
// bf16(code * scale + offset) with the product and the sum rounded separately in fp32 (what
// reference.dequantize_int2 computes). Rows past prefix_len[i] are not written.
#pragma once

#include "kernels/common.cuh"
#include "kernels/params.h"

namespace oscar {


// One thread per (row, kv head, K|V, 32-bit code word): 16 elements, written as 4 runs of 4.
template <int D>
__global__ void __launch_bounds__(256) gather_kernel(const GatherParams p) {
  constexpr int QB = D / 4, NWORD = D / 16;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.total_rows) * p.num_kv_heads * 2 * NWORD;
  if (idx >= total) return;
  const int w = static_cast<int>(idx % NWORD);
  const int kvsel = static_cast<int>((idx / NWORD) & 1);
  const int hh = static_cast<int>((idx / (2 * NWORD)) % p.num_kv_heads);
  const int row = static_cast<int>(idx / (2 * NWORD * p.num_kv_heads));

  // sequence of this output row: largest i with cu[i] <= row
  int lo = 0, hi = p.num_seqs;  // invariant: cu[lo] <= row < cu[hi]
  if (row < p.cu[0] || row >= p.cu[p.num_seqs]) return;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (p.cu[mid] <= row) lo = mid; else hi = mid;
  }
  const int seq = lo, j = row - p.cu[seq];
  const int plen = p.prefix_lens != nullptr ? p.prefix_lens[seq] : p.cu[seq + 1] - p.cu[seq];
  if (j >= plen) return;

  __nv_bfloat16* dst = kvsel ? static_cast<__nv_bfloat16*>(p.v_out) + row * p.vo_s0 + hh * p.vo_s1
                              : static_cast<__nv_bfloat16*>(p.k_out) + row * p.ko_s0 + hh * p.ko_s1;
  if (p.win != nullptr && (j < p.sink || j >= p.wstarts[seq])) {
    const int64_t blk = p.wbt[seq * p.wbt_s0 + j / p.win_block_size];
    const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.win) + blk * p.w_s0 + kvsel * p.w_s1 + (j % p.win_block_size) * p.w_s2 + hh * p.w_s3;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      *reinterpret_cast<uint2*>(dst + 4 * w + q * QB) = *reinterpret_cast<const uint2*>(src + 4 * w + q * QB);
    }
    return;
  }
  const int64_t blk = p.block_table[seq * p.bt_s0 + j / p.block_size];
  const int off = j % p.block_size;
  const uint8_t* page = p.kv + blk * p.kv_s0 + hh * p.kv_s1;
  const uint32_t word =
      *reinterpret_cast<const uint32_t*>(page + (kvsel ? p.block_size * QB : 0) + off * QB + 4 * w);
  float2 so;  // (scale, offset) as fp32, exact in both formats
  if (p.params_u8) {
    const uint32_t pw = *reinterpret_cast<const uint16_t*>(page + 2 * p.block_size * QB + (kvsel ? 2 * p.block_size : 0) + off * 2);
    so.x = u8_scale_div32(pw, kU8ScaleMagic) * 32.f;
    so.y = __fmul_rn(so.x, __fmul_rn(u8_offset_units(pw), 0.0625f));  // reference.decode_params' order
  } else {
    so = __half22float2(*reinterpret_cast<const __half2*>(page + 2 * p.block_size * QB + (kvsel ? 4 * p.block_size : 0) + off * 4));
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    __nv_bfloat16 v[4];
#pragma unroll
    for (int bt = 0; bt < 4; ++bt) {
      const float c = static_cast<float>((word >> (8 * bt + 2 * q)) & 3u);
      v[bt] = __float2bfloat16_rn(__fadd_rn(__fmul_rn(c, so.x), so.y));
    }
    *reinterpret_cast<uint2*>(dst + 4 * w + q * QB) = *reinterpret_cast<const uint2*>(v);
  }
}

}  // namespace oscar
