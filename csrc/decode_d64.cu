// decode kernels for head_dim 64 (see kernels/decode.cuh).
#include "kernels/decode_launch.cuh"

namespace oscar {
template void launch_rotate_q<64>(const DecodeParams&, cudaStream_t);
template void launch_decode<64, 1, kParamBytesFp16>(const DecodeParams&, cudaStream_t, bool);
template void launch_decode<64, 1, kParamBytesU8>(const DecodeParams&, cudaStream_t, bool);
template void launch_decode<64, 2, kParamBytesFp16>(const DecodeParams&, cudaStream_t, bool);
template void launch_decode<64, 2, kParamBytesU8>(const DecodeParams&, cudaStream_t, bool);
template int decode_occupancy<64, 1, kParamBytesFp16>();
template int decode_occupancy<64, 1, kParamBytesU8>();
template int decode_occupancy<64, 2, kParamBytesFp16>();
template int decode_occupancy<64, 2, kParamBytesU8>();
}  // namespace oscar
