// Launch templates for the decode kernels, explicitly instantiated per head_dim in decode_d*.cu so
// that the instantiations compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "kernels/launch_utils.cuh"
#include "kernels/decode.cuh"

namespace oscar {

template <int D, int RB, int CB, int KS>
void launch_rotate_q_blocks(const DecodeParams& p, cudaStream_t stream) {
  using Tr = RotateQTraits<D, RB, CB, KS>;
  using Nr = RotateNewestTraits<D, CB>;
  constexpr int kSmem = cmax(Tr::kSmem, Nr::kSmem);
  auto kern = rotate_q_kernel<D, RB, CB, KS>;
  static std::atomic<uint64_t> smem_set{0};
  set_smem_once(kern, kSmem, smem_set);
  // q row blocks, then (store_and_decode) the newest K rows' blocks and the newest V rows'.
  const int q_blocks = (p.batch * p.num_q_heads + RB - 1) / RB;
  const int new_blocks = p.new_rows != nullptr ? 2 * Nr::blocks_per_side(p) : 0;
  const dim3 grid(q_blocks + new_blocks, D / CB);
  kern<<<grid, Tr::kThreads, kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Up to kRotateQSmallRows q rows (batch 16 at 32 query heads) the 8 x 8 blocks: the decode CTAs wait
// for q_rot, and at small batch nothing else hides its latency (rotate_q_kernel says more).
constexpr int kRotateQSmallRows = 512;

template <int D>
void launch_rotate_q(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch * p.num_q_heads <= kRotateQSmallRows) {
    launch_rotate_q_blocks<D, 8, 8, 4>(p, stream);
  } else {
    launch_rotate_q_blocks<D, 32, 32, 1>(p, stream);
  }
}

// One linear grid of (s_win + s_int) * num_kv_heads * batch CTAs, INT2 CTAs first (decode_kernel says why).
inline dim3 decode_grid(const DecodeParams& p) {
  return dim3(static_cast<unsigned>((p.s_win + p.s_int) * p.num_kv_heads * p.batch));
}

// pdl: launch with programmatic stream serialization (sm_90+), so that the CTAs start while the kernel
// launched just before on the same stream (rotate_q_kernel, or the store kernel in store_and_decode)
// is still running.
template <int D, int NT, int PB>
void launch_decode(const DecodeParams& p, cudaStream_t stream, bool pdl) {
  using Tr = DecodeTraits<D, NT, PB>;
  auto one_tile = decode_kernel<D, NT, PB, false>;
  auto tiles = decode_kernel<D, NT, PB, true>;
  static std::atomic<uint64_t> smem_set{0}, smem_set_tiles{0};
  set_smem_once(one_tile, Tr::kSmem, smem_set);
  set_smem_once(tiles, Tr::kSmem, smem_set_tiles);
  static std::atomic<int> resident[64];
  DecodeParams pp = p;
  const bool whole_grid =
      static_cast<int>(decode_grid(p).x) <= resident_ctas(one_tile, Tr::kThreads, Tr::kSmem, resident);
  pp.win_first = whole_grid;
  window_thresholds(pp, whole_grid, Tr::kWinTileCost);
  // The build whose window CTAs take several tiles only where some item may use it (decode_kernel).
  auto kern = pp.win_from[0] != INT_MAX ? tiles : one_tile;
  if (!pdl) {
    kern<<<decode_grid(pp), Tr::kThreads, Tr::kSmem, stream>>>(pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  launch_pdl(kern, decode_grid(pp), dim3(Tr::kThreads), Tr::kSmem, stream, pp);
}

// decode_kernel CTAs one SM of the current device holds at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor
// with the kernel's threads and shared memory; the lower of its two builds): what DecodeTraits::kMinBlocks,
// and so the split rule (vllm_oscar.ops.decode_num_splits), assume; a GPU test compares the two for every
// variant.
template <int D, int NT, int PB>
int decode_occupancy() {
  using Tr = DecodeTraits<D, NT, PB>;
  static std::atomic<uint64_t> smem_set[2];
  int lowest = 1 << 30, build = 0;
  for (auto kern : {decode_kernel<D, NT, PB, false>, decode_kernel<D, NT, PB, true>}) {
    set_smem_once(kern, Tr::kSmem, smem_set[build++]);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, Tr::kThreads, Tr::kSmem));
    lowest = per_sm < lowest ? per_sm : lowest;
  }
  return lowest;
}

}  // namespace oscar
