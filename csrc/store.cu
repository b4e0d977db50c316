// store_kv launch (kernel in kernels/store.cuh).
#include "kernels/launch_utils.cuh"
#include "kernels/store.cuh"
#include "launch.h"

namespace oscar {

namespace {
template <int D, int RPW, bool kTeam>
void launch_store_t(const StoreParams& p, int64_t rows, cudaStream_t stream) {
  using Tr = StoreTraits<D, RPW, kTeam>;
  auto kern = store_kernel<D, RPW, kTeam>;
  static std::atomic<uint64_t> smem_set{0};
  set_smem_once(kern, Tr::kSmem, smem_set);
  const dim3 grid(static_cast<unsigned>((rows + Tr::kCtaRows - 1) / Tr::kCtaRows), 2);
  if (!p.pdl_after_decode) {
    kern<<<grid, 256, Tr::kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  launch_pdl(kern, grid, dim3(256), Tr::kSmem, stream, p);
}

// Team mode (levels "mse") while it needs at most this many CTAs per K/V side: each CTA stages the
// whole rotation (64 KB at d=128), so beyond about one wave of CTAs the plain mode's 8 rows per R load
// wins. 128 covers decode batches up to 16 (Qwen3-8B shape, 8 KV heads) and 85 (SmolLM2, 3 KV heads).
constexpr int64_t kTeamMaxCtas = 128;

template <int D>
void launch_store_d(const StoreParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  constexpr int kP = StoreTraits<D, 1>::kP;
  if (p.levels == kLevelsMse && (rows + kP - 1) / kP <= kTeamMaxCtas) {
    launch_store_t<D, 1, true>(p, rows, stream);
  } else if (rows >= 4096) {
    // Many rows (prefill): four per warp pass, so each R load from shared memory feeds four rows.
    launch_store_t<D, 4, false>(p, rows, stream);
  } else {
    // Few rows: one per warp pass, so that more warps share the work.
    launch_store_t<D, 1, false>(p, rows, stream);
  }
}
}  // namespace

void launch_store(const StoreParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: launch_store_d<64>(p, stream); break;
    case 128: launch_store_d<128>(p, stream); break;
    default: launch_store_d<256>(p, stream); break;
  }
}

}  // namespace oscar
