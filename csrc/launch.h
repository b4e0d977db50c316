// Launchers implemented in the .cu files, called by the op layer in ops.cpp.
//
// Why the split: every TORCH_CHECK (and anything else that formats through iostreams) lives in
// g++-compiled ops.cpp. On the GPU image (GCC 13 host compiler, CUDA 13.0) nvcc-compiled host code
// that streamed an int64 into an error message crashed inside libstdc++'s locale facets (a num_put
// lookup landing on a codecvt facet), so the .cu files only launch and check CUDA return codes.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/params.h"

namespace oscar {

void launch_store(const StoreParams& p, int head_dim, cudaStream_t stream);
// rotate_q_kernel, then decode_kernel (with programmatic dependent launch when `pdl`).
void launch_decode(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream);
// The two halves, for store_and_decode, which launches the store kernel between them.
void launch_rotate_q_for(const DecodeParams& p, int head_dim, cudaStream_t stream);
void launch_decode_kernel_for(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream);
void launch_gather(const GatherParams& p, int head_dim, cudaStream_t stream);

// DecodeTraits constants the op layer and Python need (head_dim must be 64, 128 or 256).
int decode_window_tile_for(int head_dim);
int decode_max_split_heads_for(int head_dim, int group);
int decode_ctas_per_sm_for(int head_dim, int group);
// decode_kernel's window CTA count for an item of n_tiles INT2 tiles in a resident grid (window_thresholds), with
// up to 8 query heads per KV head (above, the choice is off: DecodeTraits::kWinTileCost).
int decode_window_ctas_for(int64_t n_tiles, int num_splits, int window_splits, int head_dim);
// Needs a CUDA device: the occupancy the current device gives the decode kernel of that variant.
int decode_occupancy_for(int head_dim, int group, bool params_u8);

}  // namespace oscar
