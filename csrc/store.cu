// store_kv launch (kernel in kernels/store.cuh).
#include "kernels/launch_utils.cuh"
#include "kernels/store.cuh"
#include "launch.h"

namespace oscar {

namespace {
template <int D, int RPW>
void launch_store_t(const StoreParams& p, cudaStream_t stream) {
  using Tr = StoreTraits<D, RPW>;
  auto kern = store_kernel<D, RPW>;
  static std::atomic<uint64_t> smem_set{0};
  set_smem_once(kern, Tr::kSmem, smem_set);
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  const int64_t per_cta = Tr::kWarps * Tr::kRows;
  const dim3 grid(static_cast<unsigned>((rows + per_cta - 1) / per_cta), 2);
  kern<<<grid, 256, Tr::kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

// Few rows (decode steps): one row per warp pass so that more warps share the work; many rows
// (prefill): four, so each rotation-matrix load from shared memory feeds four rows.
void launch_store(const StoreParams& p, int head_dim, bool many_rows, cudaStream_t stream) {
  switch (head_dim) {
    case 64: many_rows ? launch_store_t<64, 4>(p, stream) : launch_store_t<64, 1>(p, stream); break;
    case 128: many_rows ? launch_store_t<128, 4>(p, stream) : launch_store_t<128, 1>(p, stream); break;
    default: many_rows ? launch_store_t<256, 4>(p, stream) : launch_store_t<256, 1>(p, stream); break;
  }
}

}  // namespace oscar
