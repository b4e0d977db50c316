// The window CTA count of decode_kernel: thresholds computed at launch (window_thresholds), counted by the
// CTAs (window_ctas). Host C++ and, under nvcc, device code: the kernel, the launcher and the op layer's
// query (decode_window_ctas_for in decode.cu) share these functions.
#pragma once

#include <climits>
#include <cstdint>

#include "kernels/params.h"

#ifdef __CUDACC__
#define OSCAR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OSCAR_HOST_DEVICE inline
#endif

namespace oscar {

// Window CTAs of one (sequence, KV head): the first win CTAs of its s_total (the window splits come first
// in each item's split numbering), each taking window tiles split, split + win, ...; the rest share the
// INT2 tiles. s_win (one CTA per window tile) less one for every threshold of p.win_from that the item's
// INT2 tile count reaches, so the CTAs spend no divisions on it (the search over counts with two divisions
// each was ~300 SASS instructions ahead of the first loads). Decided per sequence, the same in every CTA
// of the item.
OSCAR_HOST_DEVICE int window_ctas(const DecodeParams& p, int n_tiles) {
  int w = p.s_win;
#pragma unroll
  for (int j = 0; j < kWinFromSlots; ++j) w -= n_tiles >= p.win_from[j] ? 1 : 0;
  return w;
}

// DecodeParams::win_from for decode_kernel's window_ctas. When the whole grid is resident (win_first) all
// CTAs of an item run side by side, and its time is its slowest CTA's. One CTA per window tile leaves the
// INT2 tiles fewer CTAs: Qwen3-8B at batch 4 and 32K deals 127 INT2 tiles to 5 CTAs per item (25-26 each),
// while its 3 window CTAs of one 128-row tile each finish early. So an item with n INT2 tiles takes the
// count w of window CTAs (s_win down to 1) that minimizes max(ceil(s_win / w) * cost / 4, n / (s_total - w)),
// in INT2 tiles (cost: a window tile's time in quarters of an INT2 tile's; ties go to more window CTAs).
// The choice falls as n grows (tests/kernels/test_library.py checks it against a brute-force search), so
// it is a set of thresholds on n, found by bisection. A grid of several waves keeps one CTA per window tile:
// there the window CTAs fill the last wave's leftover slots, and longer ones would lengthen it.
inline int window_ctas_for(int64_t n_tiles, int s_total, int s_win, int cost) {
  int best = s_win;
  int64_t best_num = 0, best_den = 1;  // the best cost as a fraction (tiles x 4)
  for (int w = s_win; w >= 1; --w) {
    const int64_t win = static_cast<int64_t>((s_win + w - 1) / w) * cost, den = s_total - w;
    int64_t num = win * den;  // cost = max(win, 4 n / den) = num / den
    if (4 * n_tiles > num) num = 4 * n_tiles;
    if (w == s_win || num * best_den < best_num * den) {
      best = w;
      best_num = num;
      best_den = den;
    }
  }
  return best;
}

// Only where it can pay: the window CTAs that could go to INT2 tiles must add at least 15% more INT2
// CTAs (s_total - 1 >= 1.15 s_int), e.g. Qwen3-8B at batch 2 (13 INT2 CTAs + 3 window CTAs per item) and 4
// (5 + 3), SmolLM2 at batch 8 (8 + 3), but not batch 1 (30 + 3 and 85 + 3). At batch 1 on the H100
// (benchmarks/trace/split_order.py --costs --step, same call): Qwen3-8B at 32K decoded about as fast with one
// window CTA (22.8-24.1 against 23.2-23.6 us, 32 INT2 CTAs of at most 4 tiles instead of 30 of up to 5),
// but oscar::store_and_decode, which the vLLM backend runs at small batch, took 26.1-26.7 us against
// 24.8-25.1: its store kernel runs in the slots that finished decode CTAs free, and 8 window CTAs of 3
// tiles free none early where 24 of one tile did. SmolLM2 (d=64) lost 1.6 us in store_and_decode even
// with the same split: the build with the tile loop takes 105 registers per thread against 96, which left
// room beside two decode CTAs for a store CTA.
inline void window_thresholds(DecodeParams& p, bool resident, int cost) {
  for (int j = 0; j < kWinFromSlots; ++j) p.win_from[j] = INT_MAX;
  const int s_total = p.s_win + p.s_int;
  if (!resident || cost <= 0 || p.s_win <= 1 || 20 * (s_total - 1) < 23 * p.s_int) return;
  constexpr int64_t kMaxTiles = int64_t{1} << 24;
  for (int j = 0; j < kWinFromSlots && p.s_win - 1 - j >= 1; ++j) {
    const int target = p.s_win - 1 - j;
    if (window_ctas_for(kMaxTiles, s_total, p.s_win, cost) > target) break;
    int64_t lo = 1, hi = kMaxTiles;  // the least n_tiles that takes at most `target` window CTAs
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (window_ctas_for(mid, s_total, p.s_win, cost) <= target) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    p.win_from[j] = static_cast<int>(lo);
  }
}

}  // namespace oscar
