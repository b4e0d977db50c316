// Decode launch dispatch (kernels in kernels/decode.cuh, instantiated per head_dim in decode_d*.cu).
#include "kernels/decode.cuh"
#include "launch.h"

namespace oscar {

template <int D>
void launch_rotate_q(const DecodeParams& p, cudaStream_t stream);
template <int D, int NT, int PB>
void launch_decode(const DecodeParams& p, cudaStream_t stream, bool pdl);
template <int D, int NT, int PB>
int decode_occupancy();

int decode_window_tile_for(int head_dim) {
  return head_dim <= 128 ? DecodeTraits<128, 1>::kWinTile : DecodeTraits<256, 1>::kWinTile;
}

namespace {
template <int D, int NT>
void launch_decode_pb(const DecodeParams& p, cudaStream_t stream, bool pdl) {
  if (p.params_u8) {
    launch_decode<D, NT, kParamBytesU8>(p, stream, pdl);
  } else {
    launch_decode<D, NT, kParamBytesFp16>(p, stream, pdl);
  }
}
}  // namespace

namespace {
// One constant of the DecodeTraits variant launch_decode_kernel_for runs for (head_dim, group): more than 8
// query heads per KV head take the two-tile variant (NT = 2); head_dim 256 has one. `get` reads it from a
// value of that type, e.g. [](auto tr) { return decltype(tr)::kMinBlocks; }.
template <typename Get>
int decode_traits_constant(int head_dim, int group, Get get) {
  const bool nt2 = group > 8;
  switch (head_dim) {
    case 64: return nt2 ? get(DecodeTraits<64, 2>{}) : get(DecodeTraits<64, 1>{});
    case 128: return nt2 ? get(DecodeTraits<128, 2>{}) : get(DecodeTraits<128, 1>{});
    default: return get(DecodeTraits<256, 1>{});
  }
}
}  // namespace

// The same for both params formats (DecodeTraits::kRing).
int decode_max_split_heads_for(int head_dim, int group) {
  return decode_traits_constant(head_dim, group, [](auto tr) { return decltype(tr)::kMaxSplitHeads; });
}

int decode_ctas_per_sm_for(int head_dim, int group) {
  return decode_traits_constant(head_dim, group, [](auto tr) { return decltype(tr)::kMinBlocks; });
}

namespace {
template <int D, int NT>
int decode_occupancy_pb(bool params_u8) {
  return params_u8 ? decode_occupancy<D, NT, kParamBytesU8>() : decode_occupancy<D, NT, kParamBytesFp16>();
}
}  // namespace

int decode_occupancy_for(int head_dim, int group, bool params_u8) {
  const bool nt2 = group > 8;
  switch (head_dim) {
    case 64: return nt2 ? decode_occupancy_pb<64, 2>(params_u8) : decode_occupancy_pb<64, 1>(params_u8);
    case 128: return nt2 ? decode_occupancy_pb<128, 2>(params_u8) : decode_occupancy_pb<128, 1>(params_u8);
    default: return decode_occupancy_pb<256, 1>(params_u8);
  }
}

void launch_rotate_q_for(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: launch_rotate_q<64>(p, stream); break;
    case 128: launch_rotate_q<128>(p, stream); break;
    default: launch_rotate_q<256>(p, stream); break;
  }
}

void launch_decode_kernel_for(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream) {
  const bool nt2 = p.group > 8;
  switch (head_dim) {
    case 64: nt2 ? launch_decode_pb<64, 2>(p, stream, pdl) : launch_decode_pb<64, 1>(p, stream, pdl); break;
    case 128: nt2 ? launch_decode_pb<128, 2>(p, stream, pdl) : launch_decode_pb<128, 1>(p, stream, pdl); break;
    default: launch_decode_pb<256, 1>(p, stream, pdl); break;
  }
}

void launch_decode(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream) {
  launch_rotate_q_for(p, head_dim, stream);
  launch_decode_kernel_for(p, head_dim, pdl, stream);
}

}  // namespace oscar
