// Host helpers for the .cu launchers (no TORCH_CHECK here: see launch.h for why).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace oscar {

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) once per (kernel, device): a launch inside CUDA-graph
// capture then makes no runtime call but the launch itself. `done_mask` is a static of the caller's
// launch template, i.e. one per kernel instantiation.
template <typename Kernel>
void set_smem_once(Kernel kern, int bytes, std::atomic<uint64_t>& done_mask) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = uint64_t{1} << (dev & 63);
  if ((done_mask.load() & bit) == 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    done_mask.fetch_or(bit);
  }
}

// CTAs of `kern` resident on the current device at once (occupancy x SMs), cached per device.
template <typename Kernel>
int resident_ctas(Kernel kern, int threads, int smem_bytes, std::atomic<int> (&cache)[64]) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int v = dev >= 0 && dev < 64 ? cache[dev].load() : 0;
  if (v == 0) {
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, threads, smem_bytes));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    v = per_sm * sms;
    if (dev >= 0 && dev < 64) cache[dev].store(v);
  }
  return v;
}

// Launch `kern` with programmatic stream serialization (sm_90+): its CTAs may start once every CTA of
// the kernel before it on `stream` has run griddepcontrol.launch_dependents (or exited), and
// griddepcontrol.wait in them waits for that kernel to complete.
template <typename Kernel, typename Params>
void launch_pdl(Kernel kern, dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream, const Params& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, p));
}

}  // namespace oscar
