// gather_prefix launch (kernel in kernels/gather.cuh).
#include <c10/cuda/CUDAException.h>

#include "kernels/gather.cuh"
#include "launch.h"

namespace oscar {

namespace {
template <int D>
void launch_gather_t(const GatherParams& p, cudaStream_t stream) {
  const int64_t threads = static_cast<int64_t>(p.total_rows) * p.num_kv_heads * 2 * (D / 16);
  gather_kernel<D><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace

void launch_gather(const GatherParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: launch_gather_t<64>(p, stream); break;
    case 128: launch_gather_t<128>(p, stream); break;
    default: launch_gather_t<256>(p, stream); break;
  }
}

}  // namespace oscar
