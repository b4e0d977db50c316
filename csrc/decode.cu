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
// A decode kernel variant: head_dim D, NT 16-wide MMA tiles of query heads (2 for more than 8 query heads per
// KV head; head_dim 256 has only NT = 1) and PB bytes per (scale, offset) pair (fp16 or u8 params).
template <int D_, int NT_, int PB_>
struct DecodeVariant {
  static constexpr int D = D_, NT = NT_, PB = PB_;
  using Traits = DecodeTraits<D_, NT_, PB_>;
};

template <int D, int NT, typename F>
auto with_params(bool params_u8, F f) {
  return params_u8 ? f(DecodeVariant<D, NT, kParamBytesU8>{}) : f(DecodeVariant<D, NT, kParamBytesFp16>{});
}

// f(DecodeVariant<...>{}) for the variant that serves (head_dim, group, params): the one place that maps
// runtime arguments to template instances, for the launch, the occupancy query and the traits' constants.
template <typename F>
auto with_decode_variant(int head_dim, int group, bool params_u8, F f) {
  const bool nt2 = group > 8;
  switch (head_dim) {
    case 64: return nt2 ? with_params<64, 2>(params_u8, f) : with_params<64, 1>(params_u8, f);
    case 128: return nt2 ? with_params<128, 2>(params_u8, f) : with_params<128, 1>(params_u8, f);
    default: return with_params<256, 1>(params_u8, f);
  }
}
}  // namespace

// Both constants are the same for both params formats (DecodeTraits::kRing is sized for the fp16 stage).
int decode_max_split_heads_for(int head_dim, int group) {
  return with_decode_variant(head_dim, group, false, [](auto v) { return decltype(v)::Traits::kMaxSplitHeads; });
}

int decode_ctas_per_sm_for(int head_dim, int group) {
  return with_decode_variant(head_dim, group, false, [](auto v) { return decltype(v)::Traits::kMinBlocks; });
}

int decode_occupancy_for(int head_dim, int group, bool params_u8) {
  return with_decode_variant(head_dim, group, params_u8, [](auto v) {
    using V = decltype(v);
    return decode_occupancy<V::D, V::NT, V::PB>();
  });
}

int decode_window_ctas_for(int64_t n_tiles, int num_splits, int window_splits, int head_dim) {
  return with_decode_variant(head_dim, 1, false, [&](auto v) {
    DecodeParams p{};
    p.s_win = window_splits;
    p.s_int = num_splits;
    window_thresholds(p, true, decltype(v)::Traits::kWinTileCost);
    return window_ctas(p, static_cast<int>(n_tiles));  // n_tiles <= 2^24 (decode_window_ctas checks)
  });
}

void launch_rotate_q_for(const DecodeParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: launch_rotate_q<64>(p, stream); break;
    case 128: launch_rotate_q<128>(p, stream); break;
    default: launch_rotate_q<256>(p, stream); break;
  }
}

void launch_decode_kernel_for(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream) {
  with_decode_variant(head_dim, p.group, p.params_u8, [&](auto v) {
    using V = decltype(v);
    launch_decode<V::D, V::NT, V::PB>(p, stream, pdl);
  });
}

void launch_decode(const DecodeParams& p, int head_dim, bool pdl, cudaStream_t stream) {
  launch_rotate_q_for(p, head_dim, stream);
  launch_decode_kernel_for(p, head_dim, pdl, stream);
}

}  // namespace oscar
