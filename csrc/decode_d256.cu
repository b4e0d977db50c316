// decode kernels for head_dim 256 (see kernels/decode.cuh).
#include "kernels/decode_launch.cuh"

namespace oscar {
template void launch_rotate_q<256>(const DecodeParams&, cudaStream_t);
template void launch_decode<256, 1, kParamBytesFp16>(const DecodeParams&, cudaStream_t, bool);
template void launch_decode<256, 1, kParamBytesU8>(const DecodeParams&, cudaStream_t, bool);
template int decode_occupancy<256, 1, kParamBytesFp16>();
template int decode_occupancy<256, 1, kParamBytesU8>();
}  // namespace oscar
