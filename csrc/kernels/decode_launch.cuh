// Launch templates for the decode kernels, explicitly instantiated per head_dim in decode_d*.cu so
// that the instantiations compile in parallel.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "kernels/launch_utils.cuh"
#include "kernels/decode.cuh"

namespace oscar {

template <int D>
void launch_rotate_q(const DecodeParams& p, cudaStream_t stream) {
  using Tr = RotateQTraits<D>;
  auto kern = rotate_q_kernel<D>;
  static std::atomic<uint64_t> smem_set{0};
  set_smem_once(kern, Tr::kSmem, smem_set);
  const dim3 grid((p.batch * p.num_q_heads + Tr::kRows - 1) / Tr::kRows, D / Tr::kCols);
  kern<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One linear grid of (s_win + s_int) * num_kv_heads * batch CTAs, INT2 CTAs first (decode_kernel says why).
inline dim3 decode_grid(const DecodeParams& p) {
  return dim3(static_cast<unsigned>((p.s_win + p.s_int) * p.num_kv_heads * p.batch));
}

// pdl: launch with programmatic stream serialization (sm_90+), so that the CTAs start while
// rotate_q_kernel, launched just before on the same stream, is still running.
template <int D, int NT>
void launch_decode(const DecodeParams& p, cudaStream_t stream, bool pdl) {
  using Tr = DecodeTraits<D, NT>;
  auto kern = decode_kernel<D, NT>;
  static std::atomic<uint64_t> smem_set{0};
  set_smem_once(kern, Tr::kSmem, smem_set);
  if (!pdl) {
    kern<<<decode_grid(p), Tr::kThreads, Tr::kSmem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = decode_grid(p);
  cfg.blockDim = dim3(Tr::kThreads);
  cfg.dynamicSmemBytes = Tr::kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, p));
}

}  // namespace oscar
