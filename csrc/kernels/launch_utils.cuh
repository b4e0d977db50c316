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

}  // namespace oscar
