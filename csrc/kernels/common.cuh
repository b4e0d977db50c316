// Device helpers shared by the OSCAR kernels: raw pointers only, no torch headers.
//
// Inline PTX used here and why:
//   cp.async (sm_80+)            global -> shared copies that cost no registers, so a CTA can keep
//                                3 stages (55 KB) of KV in flight while it computes on a fourth.
//   mma.sync m16n8k16 bf16       the only way to keep up with HBM at INT2: at 4 query heads per KV head
//                                the dot products are ~57 flop per cache byte (see decode.cuh).
//   movmatrix.trans (sm_75+)     turns the QK^T accumulator fragment into the PV operand fragment in
//                                registers (the score tile is computed transposed, S^T = K Q^T).
//   ldmatrix(.trans)             BF16 window tiles from shared memory.
//   griddepcontrol (sm_90)       programmatic dependent launch: the decode kernel starts streaming
//                                the cache while the q-rotation kernel before it is still running.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#define OSCAR_DEVICE __device__ __forceinline__

namespace oscar {

constexpr float kNegInf = -__builtin_huge_valf();

// The store's rotation y = x R sums each output as kRotationBlocks block sums of D / kRotationBlocks
// products (each an FMA chain from zero, in order), added in block order with rounded adds
// (store_kernel). rotate_q_kernel repeats it for store_and_decode's newest rows, which must be bitwise
// the window rows the store writes.
constexpr int kRotationBlocks = 8;

OSCAR_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; with pred == false nothing is read and the destination is zero-filled.
OSCAR_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred = true) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(n)
               : "memory");
}
OSCAR_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
OSCAR_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
OSCAR_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// D += A * B with A 16x16 (row), B 16x8 (col), bf16 in, fp32 accumulate.
OSCAR_DEVICE void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                           uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// D = A * B + C with a separate C (the first MMA of a chain starts from a given accumulator).
OSCAR_DEVICE void mma_bf16_c(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1, const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// Transpose of an 8x8 b16 matrix held as a fragment (thread (g,t) holds row g, cols 2t, 2t+1).
OSCAR_DEVICE uint32_t movmatrix_trans(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

OSCAR_DEVICE void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}
OSCAR_DEVICE void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

OSCAR_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 2^x on the special-function unit (2 ulp); -inf gives +0, which the softmax relies on.
OSCAR_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

OSCAR_DEVICE float warp_max_xor_g(float v) {  // over the 8 lanes sharing lane % 4
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
  return v;
}
OSCAR_DEVICE float warp_sum_xor_g(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 16);
  return v;
}

OSCAR_DEVICE float4 ld_cg_f4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

// Programmatic dependent launch (sm_90). Both are no-ops when the launch has no PDL attribute.
OSCAR_DEVICE void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
OSCAR_DEVICE void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// INT2 code extraction straight into MMA operands.
//
// A 32-bit word x holds four bytes b0..b3 of a quartered-packed row; byte j holds codes
// (c0, c1, c2, c3) of elements (j, Q+j, 2Q+j, 3Q+j) in bits [1:0], [3:2], [5:4], [7:6].
// int2_pair_biased(x, p, q, magic = 0x43004300) returns a bf16x2 whose low half is 128 + w*c for code
// c = code q of byte p and whose high half is the same for byte p+2 (p in {0,1}), w = int2_weight(p, q)
// in {1, 4, 16}: (x' & mask) | 0x4300 puts two code bits in the bf16 mantissa of 128.0 (ulp 1 at 128,
// 7 mantissa bits), so the value is exact. Each 16-bit half of x holds 8 codes at bits [15:0]; three
// views of x cover them with two shifts per word:
//   x       bits [5:0]  -> (p0,q0) w=1, (p0,q1) w=4, (p0,q2) w=16
//   x >> 6  bits [5:0]  -> (p0,q3) w=1, (p1,q0) w=4, (p1,q1) w=16
//   x >> 12 bits [3:0]  -> (p1,q2) w=1, (p1,q3) w=4
// (bits 6-7 of a half cannot be used in place: bit 7 is the exponent's lowest bit). The previous views
// x, x >> 8, x >> 6, x >> 14 took three shifts per word: 48 of the ~500 instructions per warp and
// stage at d=128 (sm_90a SASS), now 32. The weight is undone for free: K codes meet a query
// pre-divided by w (exact, w is a power of two), V accumulators are divided by w in the epilogue.
// The 128 is not subtracted per pair (an fma.bf16x2 each, 128 of the 777 instructions per warp and
// stage at d=128): the decode kernel removes it per head instead, from the scores by starting the
// score accumulator at -128 * sum(q/w), and once per (split, head) from the outputs (128 * sum over
// tokens of P', which an all-ones MMA adds up). The products stay exact in the MMA; the bias only adds
// fp32 accumulation error, ~1e-6 relative.
// ---------------------------------------------------------------------------------------------
// (x & mask) | magic as one LOP3: with both constants as immediates the compiler emits two LOP3s
// (an instruction takes one immediate), measured in the SASS: 265 LOP3 per stage instead of ~130.
template <uint32_t kMask>
OSCAR_DEVICE uint32_t and_or(uint32_t x, uint32_t magic) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(x), "n"(kMask), "r"(magic));
  return d;
}

// Which view of the word (right shift) and which 2-bit field of it (weight 4^k) hold code q of byte p.
__host__ __device__ constexpr int int2_shift(int p, int q) { return p == 0 ? (q < 3 ? 0 : 6) : (q < 2 ? 6 : 12); }
__host__ __device__ constexpr int int2_weight_log4(int p, int q) {
  return p == 0 ? (q < 3 ? q : 0) : (q < 2 ? q + 1 : q - 2);
}

OSCAR_DEVICE uint32_t int2_pair_biased(uint32_t x, int p, int q, uint32_t magic) {
  const int sh = int2_shift(p, q), k = int2_weight_log4(p, q);
  const uint32_t b = sh == 0 ? x : (sh == 6 ? (x >> 6) : (x >> 12));
  if (k == 0) return and_or<0x00030003u>(b, magic);
  if (k == 1) return and_or<0x000C000Cu>(b, magic);
  return and_or<0x00300030u>(b, magic);
}
constexpr float kInt2PairBias = 128.f;
__host__ __device__ constexpr float int2_weight(int p, int q) {
  return int2_weight_log4(p, q) == 1 ? 4.f : (int2_weight_log4(p, q) == 2 ? 16.f : 1.f);
}
__host__ __device__ constexpr float int2_inv_weight(int p, int q) { return 1.f / int2_weight(p, q); }

// ---------------------------------------------------------------------------------------------
// params "u8" (vllm_oscar/layout.py): a row's (scale, offset) as the 16-bit word m | u << 8, with
// scale = 2^(m/16 - 10) * (1 + (m%16)/16) and offset = scale * (u - 152) / 16 (reference.decode_params).
// ---------------------------------------------------------------------------------------------
// The fp32 bits of scale / 32 are (m << 19) | (112 << 23): the exponent field 112 + m/16 needs no carry
// (112's low 4 bits are zero), so one shift and one LOP3 (with kU8ScaleMagic in a register: and_or says
// why). The factor 32 is folded into the decode's constants.
constexpr uint32_t kU8ScaleMagic = 112u << 23;
OSCAR_DEVICE float u8_scale_div32(uint32_t w, uint32_t magic) {
  return __uint_as_float(and_or<0x07F80000u>(w << 19, magic));
}
// u - 152, exact: the byte permute builds the fp32 2^23 + u, then one FADD.
OSCAR_DEVICE float u8_offset_units(uint32_t w) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7541)) - 8388760.f;  // 2^23 + 152
}

}  // namespace oscar
