// Split-K decode attention over the OSCAR cache: INT2 middle (paged, vllm_oscar/layout.py) plus the
// BF16 sink/recent window (paged window cache), merged in one log-sum-exp reduction.
// Raw pointers only; launchers and argument checks live in csrc/decode.cu.
//
// Two kernels per call:
//   rotate_q_kernel  q_rot = q @ R_K into an fp32 workspace. R_K is 64 KB: loading it
//                    in every attention CTA (up to ~2000 at batch 256) would cost more L2 traffic than
//                    the INT2 cache itself at 4K context, so it is done once, here.
//   decode_kernel    grid (S_win + S_int splits, Hkv, B). A window split attends over up to kWinTile
//                    window rows, an INT2 split over a contiguous run of kTile-token tiles of
//                    [sink, seq_len - recent). Each writes (O/l, log2-sum-exp) for its G query heads
//                    to the workspace; the last CTA of a (b, kv head) (atomic counter, reset by that
//                    CTA, so the kernel is CUDA-graph replayable) merges the splits, applies R_V^T and
//                    writes bf16 out. Launched with programmatic dependent launch on sm_90, so it
//                    issues its first cache loads while rotate_q_kernel is still running.
//
// Why tensor cores: a (token, kv head) of INT2 K+V is 72 bytes at d=128 and needs 2*d*G flops
// per K and per V; the m16n8k16 MMA pads G to 8 query heads, so the kernel issues 4096 MMA flops per
// 72 bytes, ~170 TFLOP/s at 3 TB/s, far above what FMA units give alongside the unpacking.
//
// INT2 tile math (per warp, 16 tokens x 8 query heads per MMA):
//   S^T[token, head] = Kcodes[token, dim] . Q'^T[dim, head]            (A = codes, B = q fragments)
//   score = scale_k[token] * S^T + offset_k[token] * sum_dim(q[head])  (K dequantized for free)
//   O^T[dim, head] += Vcodes^T[dim, token] . (p * scale_v)^T[token, head]
//   O[head, dim] = O^T / w(dim) + sum_token p * offset_v                (V dequantized for free)
// so codes enter the MMAs as exact bf16 values 128 + w*c (the 128 comes off S^T and O^T afterwards,
// see int2_pair_biased) and no element is ever dequantized.
// The dims inside a 16-wide MMA k-step and the token rows inside a 16-row tile are permuted so
// that each thread's operand bytes are contiguous in shared memory and the four code loads of a
// warp hit 32 different banks (see tau() and the K/V fragment comments below).
#pragma once

#include "kernels/common.cuh"
#include "kernels/params.h"
#include "kernels/window_ctas.h"

namespace oscar {


__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// PB: bytes of a row's (scale, offset): kParamBytesFp16 (4) or kParamBytesU8 (2), the cache's params format.
template <int D, int NT, int PB = kParamBytesFp16>
struct DecodeTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kQB = D / 4;               // INT2 code bytes of one row
  static constexpr int kTokBytes = 2 * kQB + 2 * PB;  // K codes + V codes + K and V (scale, offset)
  static constexpr int kTile = D <= 128 ? 256 : 128;  // tokens per pipeline stage
  static constexpr int kTM = kTile / (16 * kWarps);   // 16-token MMA tiles per warp per stage
  static constexpr int kStages = 4;                   // 3 stages (55 KB at d=128) in flight per CTA
  static constexpr int kStageBytes = kTile * kTokBytes;
  static constexpr int kWinTile = D <= 128 ? 128 : 64;  // window rows per window split
  static constexpr int kWinBytes = kWinTile * 4 * D;    // K and V rows, bf16
  // A window tile's time in a CTA of a resident grid, in quarters of an INT2 tile's (window_thresholds).
  // From benchmarks/trace/split_order.py --costs on the H100 (2026-11-25, costs 5, 6 and 7 against one CTA
  // per window tile, same call): Qwen3-8B batch 2 at 16K (63 INT2 tiles, 13 + 3 CTAs per item) took one
  // window CTA at 5, 4.2% slower than one CTA per window tile, and two at 6 and 7 (+0.6%); every other
  // configuration's time agreed within 3% at 5, 6 and 7. d=64 takes the same (the earlier rule that gave
  // SmolLM2 batch 4 one window CTA at 5 cost it 4% at 16K). d=256 (Gemma 3's global layers, one CTA per SM,
  // resident grids since decode_num_splits keeps them at short contexts) takes 8: with the Gemma 3 12B shape
  // (16 / 8 heads, 11 INT2 + 5 window splits at batch 1, 3 + 5 at batch 2; the same call, no R_V) cost 8 against
  // one CTA per window tile gave batch 1 17.0 / 19.6 / 23.2 / 31.3 us against 17.1-17.3 / 20.3 / 25.8 / 37.8-38.0
  // at 4K / 8K / 16K / 32K and batch 2 19.9 against 23.7 at 4K, while 4 and 6 cost 2% at 8K and 6% at 16K
  // (27.5 us: one window CTA of 5 tiles). 0 keeps the choice off for more than 8 query heads per KV head
  // (NT = 2, one CTA per SM): no multi-tile case was run or timed there.
  static constexpr int kWinTileCost = NT != 1 ? 0 : D <= 128 ? 6 : 8;
  static constexpr bool kRInSmem = D <= 128;            // R_V staged in shared memory for the epilogue
  static constexpr int kRBytes = kRInSmem ? D * D * 4 : 0;
  static constexpr int kGP = 8 * NT;  // query heads padded to the MMA n dimension
  static constexpr int kMergeBytes = kWarps * kGP * (D + 2) * 4;
  static constexpr int kFinalScratch = 256 * (16 + 8);  // replica (sum, max, weight) of the final merge
  // Sized for the fp16 stage whatever PB (the u8 stage is 4 bytes per token smaller), so that both formats
  // have one ring, one shared-memory size (2 CTAs per SM either way) and one kMaxSplitHeads.
  static constexpr int kRing = cmax(cmax(kStages * kTile * (2 * kQB + 2 * kParamBytesFp16), kWinBytes),
                                    cmax(kRBytes + kFinalScratch, kMergeBytes));
  // after the ring: q_rot [kGP][D], sum(q) [kGP], K bias [kGP], 4 flag words
  static constexpr int kSmem = kRing + (kGP * D + 2 * kGP + 4) * 4;
  static constexpr int kKC = D / 16;  // MMA k-steps of QK^T == MMA m-tiles of PV
  static constexpr int kNW = D / 64;  // 32-bit K code words per token per thread
  static constexpr int kBV = D / 32;  // V code bytes per token per thread
  static constexpr int kNX = kBV / 2; // interleaved V words per token pair
  static constexpr int kMinBlocks = (D <= 128 && NT == 1) ? 2 : 1;
  // Split x head limit of the op (decode_num_splits stays far below it). It dates from a final merge
  // that staged one fp32 weight per (split, head) next to R_V; the online merge stores none.
  static constexpr int kMaxSplitHeads = (kRing - kRBytes - 4096 - 16) / 4;
};

// Row permutation inside a 16-token tile: S^T row r <-> token tau(r) (and r+8 <-> tau(r)+8).
// With it the K loads of a half warp (rows 0-3 or 4-7) and the V loads of a warp (rows tau(2t),
// tau(2t+1)) each touch 32 distinct banks at d=128 (rows are 32 bytes).
OSCAR_DEVICE int tau(int r) { return r ^ ((r >> 2) & 1); }

// Lazy rescaling of the running softmax: the max a warp subtracts is raised (and the accumulators
// rescaled) only when some head's max grows by more than this many log2 units, so p = exp2(s - m) stays
// <= 2^8, far inside fp32 and bf16 range.
constexpr float kRescaleSlack = 8.f;

// ---------------------------------------------------------------------------------------------
// q rotation
// ---------------------------------------------------------------------------------------------
// A CTA of 256 threads rotates a block of kRows q rows x kCols columns of q_rot. Each output is summed by
// kParts threads (lanes next to each other), each over every kParts-th of the D products; a thread
// takes kCols4 = 4 or 1 adjacent columns. Two shapes (launch_rotate_q picks by row count):
//   32 x 32, 1 part, 4 columns: large batches, where R_K is read once per 32 rows;
//   8 x 8, 4 parts, 1 column: small batches. At batch 1 (Qwen3-8B: 32 rows) the 32 x 32 blocks made
//   4 CTAs of 128-long FMA chains that took 5.9 us, and the decode CTAs wait for q_rot (globaltimer
//   trace, docs/kernels.md); 8 x 8 blocks make 64 CTAs with chains of D/4.
template <int D, int kRows_, int kCols_, int kParts_>
struct RotateQTraits {
  static constexpr int kRows = kRows_, kCols = kCols_, kParts = kParts_, kThreads = 256;
  static constexpr int kCols4 = kRows * kCols * kParts / kThreads;  // adjacent columns per thread
  static_assert(kCols4 == 1 || kCols4 == 4, "a thread takes 1 or 4 columns");
  static_assert(D % kParts == 0 && kCols % kCols4 == 0, "rotate_q block shape");
  static constexpr int kSmem = (D * kCols + kRows * (D + 1)) * 4;
};

// store_and_decode's newest K/V rows (DecodeParams::new_rows) for one CTA of rotate_q_kernel's grid:
// kNewRows rows of one side (K or V) x the CTA's CB columns, each output summed exactly as store_kernel
// sums it (kRotationBlocks block chains of D / kRotationBlocks FMAs from zero, added in block order
// with rounded adds), so the rows are bitwise those the store writes to the window cache after the
// decode. A pass covers 4 rows x 8 columns, thread (block k, row r, column c), c fastest: the R reads
// of a warp are 8 consecutive words. 4 rows per CTA with the small q blocks (8 columns: one pass), 16
// with the large ones (32 columns: 16 passes), so that the newest rows' CTAs stay about as many as
// the q rows' (at batch 64 one row per CTA made 4096 of them next to 256 for q).
template <int D, int CB>
struct RotateNewestTraits {
  static constexpr int kPassCols = 8, kPassRows = 256 / (kRotationBlocks * kPassCols);
  static_assert(kPassRows == 4 && CB % kPassCols == 0, "newest-row pass shape");
  static constexpr int kNewRows = CB == 8 ? 4 : 16;
  // R columns [D][CB], staged rows [kNewRows][D + 1], one pass's block sums [kRotationBlocks][4][8]
  static constexpr int kSmem = (D * CB + kNewRows * (D + 1) + kRotationBlocks * kPassRows * kPassCols) * 4;
  __host__ __device__ static int blocks_per_side(const DecodeParams& p) {
    return (p.batch * p.num_kv_heads + kNewRows - 1) / kNewRows;
  }
};

template <int D, int CB>
OSCAR_DEVICE void rotate_newest_rows(const DecodeParams& p, int blk, float* smem) {
  using Tr = RotateNewestTraits<D, CB>;
  constexpr int NR = Tr::kNewRows, PR = Tr::kPassRows, PC = Tr::kPassCols, kRB = D / kRotationBlocks;
  const int tid = threadIdx.x;
  const int rows = p.batch * p.num_kv_heads, per_side = Tr::blocks_per_side(p);
  const bool is_v = blk >= per_side;
  const int row0 = (is_v ? blk - per_side : blk) * NR, col0 = blockIdx.y * CB;
  const float* rot = is_v ? p.new_rot_v : p.rot_k;
  const void* src = is_v ? p.new_v : p.new_k;
  const int64_t s0 = is_v ? p.nv_s0 : p.nk_s0, s1 = is_v ? p.nv_s1 : p.nk_s1;
  float* sR = smem;               // [D][CB]
  float* sx = smem + D * CB;      // [NR][D + 1]
  float* sp = sx + NR * (D + 1);  // [kRotationBlocks][PR][PC]
  if (rot != nullptr) {
    for (int e = tid; e < D * CB / 4; e += 256) {
      const int i = e / (CB / 4), c4 = e % (CB / 4);
      *reinterpret_cast<float4*>(sR + i * CB + 4 * c4) = __ldg(reinterpret_cast<const float4*>(rot + i * D + col0) + c4);
    }
  }
  for (int e = tid; e < NR * D; e += 256) {
    const int r = e / D, d = e % D, row = row0 + r;
    float v = 0.f;
    if (row < rows) {
      const int64_t off = static_cast<int64_t>(row / p.num_kv_heads) * s0 + (row % p.num_kv_heads) * s1 + d;
      v = p.new_fp16 ? __half2float(static_cast<const __half*>(src)[off])
                     : __bfloat162float(static_cast<const __nv_bfloat16*>(src)[off]);
    }
    sx[r * (D + 1) + d] = v;
  }
  __syncthreads();
  const int c = tid % PC, r = (tid / PC) % PR, k = tid / (PC * PR);
  for (int pass = 0; pass < (NR / PR) * (CB / PC); ++pass) {
    const int pr = (pass / (CB / PC)) * PR + r, pc = (pass % (CB / PC)) * PC + c;  // row, column in the CTA's
    if (rot != nullptr) {
      float acc = 0.f;
#pragma unroll 4
      for (int i = k * kRB; i < (k + 1) * kRB; ++i) acc = fmaf(sx[pr * (D + 1) + i], sR[i * CB + pc], acc);
      sp[(k * PR + r) * PC + c] = acc;
    }
    __syncthreads();
    if (k == 0 && row0 + pr < rows) {
      float y;
      if (rot != nullptr) {
        y = sp[r * PC + c];
        for (int kb = 1; kb < kRotationBlocks; ++kb) y = __fadd_rn(y, sp[(kb * PR + r) * PC + c]);
      } else {
        y = sx[pr * (D + 1) + col0 + pc];  // the store's unrotated rows
      }
      p.new_rows[(static_cast<int64_t>(is_v ? rows : 0) + row0 + pr) * D + col0 + pc] = y;
    }
    __syncthreads();  // sp is rewritten by the next pass
  }
}

// q_rot[r, c] = sum_i q[r, i] * R_K[i, c] for one kRows x kCols block. The softmax scale is applied
// to the scores, not here: q_rot is rounded to bf16 for the MMA, and without a rotation a bf16 q is
// then exact; folding scale * log2(e) in first made that rounding real, and with the large score
// cancellations of unrotated INT2 rows (offset term ~ +-100 against the code term) it cost 10x the
// error of a bf16 implementation (CPU emulation of the kernel arithmetic, d=64 unrotated case).
template <int D, int RB, int CB, int KS>
__global__ void __launch_bounds__(256) rotate_q_kernel(const DecodeParams p) {
  pdl_launch_dependents();  // the decode kernel may start issuing its cache loads now
  using Tr = RotateQTraits<D, RB, CB, KS>;
  constexpr int NC = Tr::kCols4;
  extern __shared__ __align__(16) float rq_smem[];
  // Blocks past the q rows' rotate store_and_decode's newest K/V rows (grid set by launch_rotate_q).
  const int q_blocks = (p.batch * p.num_q_heads + RB - 1) / RB;
  if (static_cast<int>(blockIdx.x) >= q_blocks) {
    rotate_newest_rows<D, CB>(p, blockIdx.x - q_blocks, rq_smem);
    return;
  }
  float* sR = rq_smem;           // [D][CB]
  float* sq = rq_smem + D * CB;  // [RB][D + 1]
  const int tid = threadIdx.x;
  const int rows = p.batch * p.num_q_heads;
  const int row0 = blockIdx.x * RB, col0 = blockIdx.y * CB;
  for (int e = tid; e < RB * D / 2; e += 256) {
    const int r = e / (D / 2), d2 = e % (D / 2);
    const int row = row0 + r;
    float2 v = make_float2(0.f, 0.f);
    if (row < rows) {
      const int bb = row / p.num_q_heads, hq = row % p.num_q_heads;
      v = __bfloat1622float2(
          *reinterpret_cast<const __nv_bfloat162*>(static_cast<const __nv_bfloat16*>(p.q) + bb * p.q_s0 +
                                                   hq * p.q_s1 + 2 * d2));
    }
    sq[r * (D + 1) + 2 * d2] = v.x;
    sq[r * (D + 1) + 2 * d2 + 1] = v.y;
  }
  if (p.rot_k != nullptr) {
    for (int e = tid; e < D * CB / 4; e += 256) {
      const int i = e / (CB / 4), c4 = e % (CB / 4);
      *reinterpret_cast<float4*>(sR + i * CB + 4 * c4) =
          __ldg(reinterpret_cast<const float4*>(p.rot_k + i * D + col0) + c4);
    }
  }
  __syncthreads();
  // Thread (output group, part): part = tid % KS takes i = part, part + KS, ... (consecutive parts
  // read consecutive words of sq and of sR: no bank conflicts).
  const int part = tid % KS, grp = tid / KS;
  const int r = grp / (CB / NC), c = (grp % (CB / NC)) * NC;
  float acc[NC];
#pragma unroll
  for (int k = 0; k < NC; ++k) acc[k] = 0.f;
  if (p.rot_k != nullptr) {
#pragma unroll 8
    for (int i = part; i < D; i += KS) {
      const float x = sq[r * (D + 1) + i];
      if constexpr (NC == 4) {
        const float4 w = *reinterpret_cast<const float4*>(sR + i * CB + c);
        acc[0] = fmaf(x, w.x, acc[0]);
        acc[1] = fmaf(x, w.y, acc[1]);
        acc[2] = fmaf(x, w.z, acc[2]);
        acc[3] = fmaf(x, w.w, acc[3]);
      } else {
        acc[0] = fmaf(x, sR[i * CB + c], acc[0]);
      }
    }
#pragma unroll
    for (int off = 1; off < KS; off <<= 1) {
#pragma unroll
      for (int k = 0; k < NC; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
    }
  } else {
#pragma unroll
    for (int k = 0; k < NC; ++k) acc[k] = sq[r * (D + 1) + col0 + c + k];
  }
  const int row = row0 + r;
  if (row < rows && part == 0) {
    float* dst = p.q_rot + static_cast<int64_t>(row) * D + col0 + c;
    if constexpr (NC == 4) {
      *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
    } else {
      *dst = acc[0];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// shared-memory operand loads
// ---------------------------------------------------------------------------------------------
// K: thread t of a row holds bytes [t*D/16, (t+1)*D/16) of the row's D/4 code bytes.
template <int D>
OSCAR_DEVICE void load_k_words(const uint8_t* p, uint32_t (&w)[D / 64]) {
  if constexpr (D == 64) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (D == 128) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

// V: thread g takes bytes [g*D/32, (g+1)*D/32) of rows a and b and interleaves them so that each
// int2_pair_biased() result holds the same element of the two tokens (the PV MMA reduces over tokens).
// x[v] = bytes (2v, 2v+1) of a, then (2v, 2v+1) of b.
template <int D>
OSCAR_DEVICE void load_v_pair(const uint8_t* sV, int ra, int rb, int g, uint32_t (&x)[D / 64 > 0 ? D / 64 : 1]) {
  constexpr int QB = D / 4, BV = D / 32;
  const uint8_t* pa = sV + ra * QB + g * BV;
  const uint8_t* pb = sV + rb * QB + g * BV;
  if constexpr (D == 64) {
    const uint32_t wa = *reinterpret_cast<const uint16_t*>(pa);
    const uint32_t wb = *reinterpret_cast<const uint16_t*>(pb);
    x[0] = __byte_perm(wa, wb, 0x5410);
  } else if constexpr (D == 128) {
    const uint32_t wa = *reinterpret_cast<const uint32_t*>(pa);
    const uint32_t wb = *reinterpret_cast<const uint32_t*>(pb);
    x[0] = __byte_perm(wa, wb, 0x5410);
    x[1] = __byte_perm(wa, wb, 0x7632);
  } else {
    const uint2 wa = *reinterpret_cast<const uint2*>(pa);
    const uint2 wb = *reinterpret_cast<const uint2*>(pb);
    x[0] = __byte_perm(wa.x, wb.x, 0x5410);
    x[1] = __byte_perm(wa.x, wb.x, 0x7632);
    x[2] = __byte_perm(wa.y, wb.y, 0x5410);
    x[3] = __byte_perm(wa.y, wb.y, 0x7632);
  }
}

// ---------------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------------
// kWinPasses: window CTAs may take several window tiles (window_ctas; the launcher picks this build when its
// thresholds let any item give window CTAs to INT2 tiles). The other build keeps one window tile per CTA
// and no rescaling between tiles. The tile loop changes how the whole kernel compiles: the INT2 stage loop
// is 803 SASS instructions at d=128 in its build against 795 without (static counts, benchmarks/sass_loop.py;
// 831 in a first form of one build for both), and with that first form Qwen3-8B batch 64-256 decoded up
// to 9% slower at 4K-32K in a same-call A/B, where no grid is resident and the loop is never used.
template <int D, int NT, int PB, bool kWinPasses>
__global__ void __launch_bounds__(256, DecodeTraits<D, NT, PB>::kMinBlocks) decode_kernel(const DecodeParams p) {
  using Tr = DecodeTraits<D, NT, PB>;
  constexpr bool kU8 = PB == kParamBytesU8;
  constexpr int TPC = 16 / PB;  // tokens whose (scale, offset) one 16-byte chunk holds
  constexpr int QB = Tr::kQB, TILE = Tr::kTile, TM = Tr::kTM, STAGES = Tr::kStages, KC = Tr::kKC;
  constexpr int GP = Tr::kGP, NX = Tr::kNX, WT = Tr::kWinTile, BV = Tr::kBV;
  constexpr int RW = 16 * TM;  // INT2 rows of a stage that one warp loads and computes on
  // store_and_decode launches the store after this kernel: it may start once every CTA got here, in the
  // slots that finished CTAs free (no store row is read here: DecodeParams::new_rows). Otherwise only a
  // kernel launched next with programmatic serialization sees it, and such a kernel must (as PDL
  // requires) run griddepcontrol.wait before it reads this kernel's output.
  pdl_launch_dependents();
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* ring = smem;
  float* sQ = reinterpret_cast<float*>(smem + Tr::kRing);  // [GP][D] q_rot, later merge scratch
  float* sQsum = sQ + GP * D;                                // [GP]
  float* sKBias = sQsum + GP;                                // [GP] 128 * sum(bf16(q/w)), see int2_pair_biased
  int* sFlag = reinterpret_cast<int*>(sKBias + GP);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  // Passed to int2_pair_biased as a register operand: its LOP3 takes the code mask as the one immediate.
  constexpr uint32_t kMagic = 0x43004300u;
  const int s_total = p.s_win + p.s_int;
  // One linear grid: every INT2 CTA first, then every window CTA. The CTA scheduler hands out blocks
  // in about this order, so the long INT2 CTAs start in the first wave and the short window CTAs fill
  // the slots left over (at batch 64 the 512 INT2 CTAs of Qwen3-8B take 2 waves of 264 slots, leaving
  // 16 idle in the second). A 3-D grid (split, head, batch) interleaved them per (b, h) instead.
  // When the whole grid is resident at once (win_first, set by the launcher), the order only decides
  // which CTAs start first, and the window CTAs, the slowest of a one-tile split, go first.
  int split, h, b, bid = blockIdx.x;  // bid: this CTA's index in the INT2-first numbering
  {
    const int n_int = p.s_int * p.num_kv_heads * p.batch;
    if (p.win_first) {
      const int n_win = p.s_win * p.num_kv_heads * p.batch;
      bid = bid < n_win ? n_int + bid : bid - n_win;  // back to the INT2-first numbering
    }
    const int per = bid < n_int ? p.s_int : p.s_win;
    const int idx = bid < n_int ? bid : bid - n_int;
    split = (bid < n_int ? p.s_win : 0) + idx % per;
    h = (idx / per) % p.num_kv_heads;
    b = idx / per / p.num_kv_heads;
  }
  const int G = p.group;
  const int bh = b * p.num_kv_heads + h;
  const int n = max(p.seq_lens[b], 0);
  const bool has_win = p.win != nullptr;
  const int ws = has_win ? min(p.sink, n) : 0;           // INT2 rows are [ws, rs)
  const int rs = has_win ? max(n - p.recent, ws) : n;
  const int n_win = ws + (n - rs);                       // window rows (slots [0, n_win))
  const int t_int0 = ws / TILE, n_tiles = rs > ws ? (rs + TILE - 1) / TILE - t_int0 : 0;
  const int win_cta = kWinPasses ? window_ctas(p, n_tiles) : p.s_win;
  const bool is_win = split < win_cta;

  // This CTA's rows: window slots [lo, hi) (its first window tile; a window CTA takes tiles split,
  // split + win_cta, ...) or INT2 positions [lo, hi) within tiles [tile_lo, tile_hi).
  int lo, hi, tile_lo = 0, tile_hi = 0;
  if (is_win) {
    lo = split * WT;
    hi = max(lo, min(lo + WT, n_win));
  } else {
    lo = ws;
    hi = rs;
    if (hi > lo) {
      // Tiles dealt as evenly as possible: the first n % s splits take one more. With ceil(n / s) tiles
      // each, the last splits were short or empty (Qwen3-8B batch 1 at 32K: 127 tiles in 30 splits
      // gave 25 splits of 5, one of 2 and 4 empty CTAs), and two 5-tile CTAs could share an SM.
      const int idx = split - win_cta, n_split = s_total - win_cta;
      const int base = n_tiles / n_split, extra = n_tiles % n_split;
      tile_lo = t_int0 + idx * base + min(idx, extra);
      tile_hi = tile_lo + base + (idx < extra ? 1 : 0);
    }
  }

  // store_and_decode: the window row of position n - 1 comes from p.new_rows (copied in below, after
  // rotate_q completed), not from the window cache, which the store writes after this kernel.
  const int newest_slot = p.new_rows != nullptr && is_win && n > 0 ? (n - 1 < ws ? n - 1 : ws + (n - 1 - rs)) : -1;
  // that row's index in the window tile of slots [wlo, whi), or -1
  auto newest_in = [&](int wlo, int whi) { return newest_slot >= wlo && newest_slot < whi ? newest_slot - wlo : -1; };
  const int newest_r = is_win ? newest_in(lo, hi) : -1;  // in this window CTA's first tile

  const int32_t* bt = p.block_table + b * static_cast<int>(p.bt_s0);  // the host checks 32-bit sizes
  const uint8_t* kv_h = p.kv + static_cast<int64_t>(h) * p.kv_s1;
  const int bs = p.block_size;
  // Page addresses in 32-bit unsigned math plus one wide multiply-add (the host checks that a page's
  // stride fits in 31 bits): with int64 strides and a page lookup per 16-byte chunk the producer was
  // ~110-150 of the loop's ~720 instructions per warp and stage (sm_90a SASS, block size 16).
  const uint32_t page_stride = static_cast<uint32_t>(p.kv_s0);
  auto page_of = [&](int pos, uint32_t& row_in_page) {
    int bi;
    if (p.block_shift >= 0) {
      bi = pos >> p.block_shift;
      row_in_page = static_cast<uint32_t>(pos & (bs - 1));
    } else {
      bi = pos / bs;
      row_in_page = static_cast<uint32_t>(pos - bi * bs);
    }
    return kv_h + static_cast<uint64_t>(static_cast<uint32_t>(__ldg(bt + bi))) * page_stride;
  };
  // A warp's RW rows of a stage start at a multiple of RW, so they share one page when the block size is
  // a power of two and a multiple of RW (vLLM's INT2 pages are 8 x 16 = 128 tokens, attention/specs.py):
  // one page lookup per warp and stage instead of one per chunk.
  const bool warp_one_page = p.block_shift >= 0 && bs % RW == 0;

  // One stage = TILE tokens laid out as [K codes TILE x QB | V codes TILE x QB | K params | V params],
  // whatever the block size: pages are cut into 16-byte chunks that each lie inside one block.
  // Each warp loads only the RW rows it computes on (rows [warp*RW, (warp+1)*RW) of every region), so
  // the ring needs no CTA barrier: a warp waits for its own copies and reuses its own rows.
  auto issue_int2 = [&](int tile, int buf) {
    uint8_t* st = ring + buf * Tr::kStageBytes + warp * RW * QB;  // this warp's K code rows
    uint8_t* stp = ring + buf * Tr::kStageBytes + 2 * TILE * QB + warp * RW * PB;  // its K params
    const int pos0 = tile * TILE + warp * RW;
    constexpr int kCodeChunks = RW * QB / 16;
    constexpr int kParChunks = RW * PB / 16;  // per K or V; TPC tokens per chunk, inside one block
    if (warp_one_page) {
      if (pos0 >= hi || pos0 + RW <= lo) return;  // warp-uniform
      const bool whole = pos0 >= lo && pos0 + RW <= hi;
      // The warp's K code rows are contiguous in the page (V rows bs*QB later, then the params), so
      // every address is the page's plus a 32-bit offset.
      const uint8_t* page =
          kv_h + static_cast<uint64_t>(static_cast<uint32_t>(__ldg(bt + (pos0 >> p.block_shift)))) * page_stride;
      const uint32_t row0 = static_cast<uint32_t>(pos0 & (bs - 1)), v_off = bs * QB;
      if (whole) {  // every stage but a split's first and last: no per-chunk range checks
#pragma unroll
        for (int k0 = 0; k0 < kCodeChunks; k0 += 32) {
          const int k = k0 + lane;
          if (kCodeChunks % 32 == 0 || k < kCodeChunks) {
            const uint32_t off = row0 * QB + k * 16;
            cp_async_16(st + k * 16, page + off);
            cp_async_16(st + TILE * QB + k * 16, page + (off + v_off));
          }
        }
        if (lane < 2 * kParChunks) {
          const int c = lane % kParChunks, is_v = lane / kParChunks;
          cp_async_16(stp + is_v * TILE * PB + c * 16, page + (2 * v_off + is_v * PB * bs + (row0 + c * TPC) * PB));
        }
        return;
      }
#pragma unroll
      for (int k0 = 0; k0 < kCodeChunks; k0 += 32) {
        const int k = k0 + lane;
        const int byte = k * 16;
        const int pos = pos0 + byte / QB;
        if ((kCodeChunks % 32 == 0 || k < kCodeChunks) && pos >= lo && pos < hi) {
          const uint32_t off = row0 * QB + byte;
          cp_async_16(st + byte, page + off);
          cp_async_16(st + TILE * QB + byte, page + (off + v_off));
        }
      }
      if (lane < 2 * kParChunks) {
        const int c = lane % kParChunks, is_v = lane / kParChunks;
        const int pos = pos0 + c * TPC;
        if (pos < hi && pos + TPC > lo) {
          cp_async_16(stp + is_v * TILE * PB + c * 16, page + (2 * v_off + is_v * PB * bs + (row0 + c * TPC) * PB));
        }
      }
      return;
    }
#pragma unroll
    for (int k0 = 0; k0 < kCodeChunks; k0 += 32) {
      const int k = k0 + lane;
      if (kCodeChunks % 32 == 0 || k < kCodeChunks) {
        const int byte = k * 16;
        const int pos = pos0 + byte / QB;
        if (pos >= lo && pos < hi) {
          uint32_t r;
          const uint8_t* page = page_of(pos, r);
          const uint8_t* src = page + (r * QB + byte % QB);
          cp_async_16(st + byte, src);
          cp_async_16(st + TILE * QB + byte, src + bs * QB);
        }
      }
    }
    if (lane < 2 * kParChunks) {
      const int c = lane % kParChunks, is_v = lane / kParChunks;
      const int pos = pos0 + c * TPC;
      if (pos < hi && pos + TPC > lo) {
        uint32_t r;
        const uint8_t* page = page_of(pos, r);
        const uint8_t* src = page + (2 * bs * QB + is_v * PB * bs + r * PB);
        cp_async_16(stp + is_v * TILE * PB + c * 16, src);
      }
    }
  };

  // Window rows: [K rows WT x D | V rows WT x D] bf16, 16-byte chunk c of row r stored at c ^ (r & 7)
  // so that ldmatrix reads 8 rows without bank conflicts. Rows past the window are zero-filled:
  // freed window blocks may hold anything, and 0 * NaN would poison the PV product.
  auto issue_win = [&](int wlo, int whi, int nr) {
    constexpr int CPR = D / 8;                      // 16-byte chunks per row
    static_assert(Tr::kWinBytes + WT * 8 <= Tr::kRing && WT <= 256, "window row bases fit behind the tile");
    // Each row's base address is computed once, by one thread, into the ring behind the window tile; the
    // copies then add 32-bit offsets. Computing it per 16-byte chunk (a block-table load, two divisions
    // and 64-bit products, 16 chunks per thread at d=128) took the window CTAs 4.5-7 us to issue at
    // batch 1, against 0.8 us for an INT2 split's copies (globaltimer trace, docs/kernels.md).
    const __nv_bfloat16** row_base = reinterpret_cast<const __nv_bfloat16**>(ring + Tr::kWinBytes);
    if (tid < WT) {
      const int slot = wlo + tid;
      const __nv_bfloat16* src = nullptr;
      if (slot < whi) {
        const int pos = slot < ws ? slot : rs + (slot - ws);
        const int64_t blk = __ldg(p.wbt + static_cast<int64_t>(b) * p.wbt_s0 + pos / p.win_block_size);
        src = static_cast<const __nv_bfloat16*>(p.win) + blk * p.w_s0 + (pos % p.win_block_size) * p.w_s2 +
              h * p.w_s3;
      }
      row_base[tid] = src;
    }
    __syncthreads();
    for (int k = tid; k < WT * 2 * CPR; k += 256) {
      const int c = k % CPR, kvsel = (k / CPR) & 1, r = k / (2 * CPR);
      const __nv_bfloat16* src = row_base[r];
      const bool valid = src != nullptr;
      if (r != nr) {  // that row is copied in from new_rows after rotate_q
        cp_async_16(ring + kvsel * (WT * 2 * D) + r * 2 * D + ((c ^ (r & 7)) * 16),
                    valid ? src + (kvsel ? p.w_s1 : 0) + c * 8 : static_cast<const __nv_bfloat16*>(p.win), valid);
      }
    }
  };
  // store_and_decode's newest row (rotated by rotate_q: after pdl_wait_primary) into the current tile,
  // rounded as the store rounds its window rows; issue_win skipped it.
  auto copy_newest = [&](int nr) {
    const float* src = p.new_rows + static_cast<int64_t>(bh) * D;
    const int64_t v_off = static_cast<int64_t>(p.batch) * p.num_kv_heads * D;
    for (int e = tid; e < 2 * D; e += 256) {
      const int kvsel = e / D, d = e % D;
      *reinterpret_cast<__nv_bfloat16*>(ring + kvsel * (WT * 2 * D) + nr * 2 * D + (((d / 8) ^ (nr & 7)) * 16) +
                                        (d % 8) * 2) =
          __float2bfloat16_rn(__ldcg(src + (kvsel ? v_off : 0) + d));
    }
  };

  if (is_win) {
    if (hi > lo) issue_win(lo, hi, newest_r);
    cp_async_commit();
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (tile_lo + s < tile_hi) issue_int2(tile_lo + s, s);
      cp_async_commit();
    }
  }

  // q_rot (and new_rows) come from rotate_q_kernel: wait for it only now, after the first cache loads are out.
  pdl_wait_primary();
  {
    const float* qr = p.q_rot + static_cast<int64_t>(b * p.num_q_heads + h * G) * D;
    for (int e = tid; e < GP * D / 4; e += 256) {
      const int head = e / (D / 4);
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (head < G) v = ld_cg_f4(qr + 4 * e);
      reinterpret_cast<float4*>(sQ)[e] = v;
    }
  }
  if (newest_r >= 0) copy_newest(newest_r);
  __syncthreads();
  for (int head = warp; head < GP; head += Tr::kWarps) {
    // Sums of the bf16-rounded q the MMAs see: score = q_bf16 . (scale * code + offset), and the K
    // codes enter as 128 + w*c against q/w (int2_pair_biased), so 128 * sum(q/w) comes off the score.
    float s = 0.f, sb = 0.f;
    for (int d = lane; d < D; d += 32) {
      s += __bfloat162float(__float2bfloat16_rn(sQ[head * D + d]));
      sb += __bfloat162float(__float2bfloat16_rn(sQ[head * D + d] * int2_inv_weight((d % QB) & 1, d / QB)));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
      sb += __shfl_xor_sync(0xffffffffu, sb, off);
    }
    if (lane == 0) {
      sQsum[head] = s;
      sKBias[head] = kInt2PairBias * sb;
    }
  }
  __syncthreads();

  float o_acc[NT][KC][4];
  float m_run[NT][2], l_run[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < KC; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) o_acc[nt][i][k] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      m_run[nt][j] = kNegInf;
      l_run[nt][j] = 0.f;
    }
  }
  float* sMO = reinterpret_cast<float*>(ring);  // merge scratch [kWarps][GP][D] (ring is free by then)
  float* sML = sMO + Tr::kWarps * GP * D;       // [kWarps][GP][2] = (m, l)

  if (!is_win) {
    // ---------------------------------------------------------------- INT2 splits
    // Q fragments in the permuted dim order of the K code fragments: k-step c takes, for thread t,
    // code q0 (slots 2t, 2t+1) and q0+1 (slots 2t+8, 2t+9) of bytes p, p+2 of word w of its bytes.
    uint32_t qf[NT][KC][2];
    // vb_acc: sum over tokens of the bf16 P' = p * scale_v the PV MMA sees, per head (every row of the
    // accumulator holds it: an MMA with an all-ones A operand, one per 16 tokens). The V codes enter as
    // 128 + w*c (int2_pair_biased), so 128 * vb_acc comes off every output element at the end. Summing
    // the bf16 halves of P' on the ALUs instead cost 16 instructions per warp and stage.
    // kb_init: -128 * sum(q/w) per head, in the accumulator layout: the K MMAs start from it instead
    // of zero, so the bias needs no subtraction per score (16 FADDs per warp and stage).
    // Scores are kept relative to mu = m_run (0 while m_run is -inf): the K epilogue subtracts it in the
    // FMA that adds the offset term, so exp2 takes the score as is (16 FADDs per warp and stage less),
    // and only a rescale (rare, lazy) shifts a stage's scores. qs_sl: sum(q) * softmax scale * log2(e);
    // with u8 params sum(q) / 16 instead (the offset comes as (u - 152) / 16 scales: score =
    // scale * (S' + (u - 152) * sum(q) / 16), the same two FMAs per score).
    float qs_sl[NT][2], kb_init[NT][4], ov_run[NT][2], vb_acc[NT][4], mu[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float* qrow = sQ + (g + 8 * nt) * D;
#pragma unroll
      for (int c = 0; c < KC; ++c) {
#pragma unroll
        for (int bi = 0; bi < 2; ++bi) {
          const int w = c >> 2, pb = (c >> 1) & 1, q = 2 * (c & 1) + bi;
          const int dlo = t * (D / 16) + 4 * w + pb + q * QB;  // bytes dlo % QB and +2: parity pb
          const float inv = int2_inv_weight(pb, q);
          qf[nt][c][bi] = pack_bf16x2(qrow[dlo] * inv, qrow[dlo + 2] * inv);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        qs_sl[nt][j] = sQsum[2 * t + j + 8 * nt] * (kU8 ? 0.0625f : p.scale_log2);
        mu[nt][j] = 0.f;
        kb_init[nt][j] = kb_init[nt][2 + j] = -sKBias[2 * t + j + 8 * nt];
        ov_run[nt][j] = 0.f;
        vb_acc[nt][j] = vb_acc[nt][2 + j] = 0.f;
      }
    }
    constexpr uint32_t kOnesBf16x2 = 0x3F803F80u;  // bf16 1.0 in both halves
    constexpr uint32_t kU8Magic = kU8ScaleMagic;     // a register operand of u8_scale_div32's LOP3
    const float sl32 = p.scale_log2 * 32.f;          // u8: the K scale / 32 times 32 * softmax scale * log2(e)

    for (int it = 0, tile = tile_lo; tile < tile_hi; ++it, ++tile) {
      cp_async_wait<STAGES - 2>();
      __syncwarp();  // this warp's rows of stage `it` have landed; its reads of stage it-1 are done
      {
        const int nxt = tile + STAGES - 1;
        if (nxt < tile_hi) issue_int2(nxt, (it + STAGES - 1) % STAGES);
        cp_async_commit();
      }
      const uint8_t* st = ring + (it % STAGES) * Tr::kStageBytes;
      const uint8_t* sK = st;
      const uint8_t* sV = st + TILE * QB;
      const uint8_t* sKP = st + 2 * TILE * QB;
      const uint8_t* sVP = sKP + TILE * PB;
      const int pos_base = tile * TILE;
      // Every row of the stage is a valid INT2 position (all but a split's first and last stage): the
      // masking below is skipped. CTA-uniform.
      const bool full = pos_base >= lo && pos_base + TILE <= hi;

      float sc[TM][NT][4];
#pragma unroll
      for (int mt = 0; mt < TM; ++mt) {
        const int r0 = (warp * TM + mt) * 16 + tau(g), r1 = r0 + 8;
        uint32_t k0[Tr::kNW], k1[Tr::kNW];
        load_k_words<D>(sK + r0 * QB + t * (D / 16), k0);
        load_k_words<D>(sK + r1 * QB + t * (D / 16), k1);
        float acc[NT][4];
#pragma unroll
        for (int c = 0; c < KC; ++c) {
          const int w = c >> 2, pb = (c >> 1) & 1, q0 = 2 * (c & 1);
          const uint32_t a0 = int2_pair_biased(k0[w], pb, q0, kMagic);
          const uint32_t a2 = int2_pair_biased(k0[w], pb, q0 + 1, kMagic);
          const uint32_t a1 = int2_pair_biased(k1[w], pb, q0, kMagic);
          const uint32_t a3 = int2_pair_biased(k1[w], pb, q0 + 1, kMagic);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (c == 0) {
              mma_bf16_c(acc[nt], a0, a1, a2, a3, qf[nt][c][0], qf[nt][c][1], kb_init[nt]);
            } else {
              mma_bf16(acc[nt], a0, a1, a2, a3, qf[nt][c][0], qf[nt][c][1]);
            }
          }
        }
        // (scale, offset) of the two K rows; scores in the log2 domain (softmax scale * log2(e)),
        // relative to mu: (scale * S' + offset * sum(q)) * sl - mu, with S' already unbiased (kb_init).
        if constexpr (kU8) {
          const uint32_t w0 = *reinterpret_cast<const uint16_t*>(sKP + r0 * 2);
          const uint32_t w1 = *reinterpret_cast<const uint16_t*>(sKP + r1 * 2);
          const float s0 = u8_scale_div32(w0, kU8Magic) * sl32, s1 = u8_scale_div32(w1, kU8Magic) * sl32;
          const float u0 = u8_offset_units(w0), u1 = u8_offset_units(w1);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            sc[mt][nt][0] = fmaf(fmaf(u0, qs_sl[nt][0], acc[nt][0]), s0, -mu[nt][0]);
            sc[mt][nt][1] = fmaf(fmaf(u0, qs_sl[nt][1], acc[nt][1]), s0, -mu[nt][1]);
            sc[mt][nt][2] = fmaf(fmaf(u1, qs_sl[nt][0], acc[nt][2]), s1, -mu[nt][0]);
            sc[mt][nt][3] = fmaf(fmaf(u1, qs_sl[nt][1], acc[nt][3]), s1, -mu[nt][1]);
          }
        } else {
          const float2 f0 = __half22float2(*reinterpret_cast<const __half2*>(sKP + r0 * 4));
          const float2 f1 = __half22float2(*reinterpret_cast<const __half2*>(sKP + r1 * 4));
          const float s0 = f0.x * p.scale_log2, s1 = f1.x * p.scale_log2;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            sc[mt][nt][0] = fmaf(acc[nt][0], s0, fmaf(f0.y, qs_sl[nt][0], -mu[nt][0]));
            sc[mt][nt][1] = fmaf(acc[nt][1], s0, fmaf(f0.y, qs_sl[nt][1], -mu[nt][1]));
            sc[mt][nt][2] = fmaf(acc[nt][2], s1, fmaf(f1.y, qs_sl[nt][0], -mu[nt][0]));
            sc[mt][nt][3] = fmaf(acc[nt][3], s1, fmaf(f1.y, qs_sl[nt][1], -mu[nt][1]));
          }
        }
      }
      if (!full) {  // rows outside [lo, hi) were not loaded: their scores are garbage
#pragma unroll
        for (int mt = 0; mt < TM; ++mt) {
          const int r0 = (warp * TM + mt) * 16 + tau(g), r1 = r0 + 8;
          const int p0 = pos_base + r0, p1 = pos_base + r1;
          const bool v0 = p0 >= lo && p0 < hi, v1 = p1 >= lo && p1 < hi;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (!v0) sc[mt][nt][0] = sc[mt][nt][1] = kNegInf;
            if (!v1) sc[mt][nt][2] = sc[mt][nt][3] = kNegInf;
          }
        }
      }

      // online softmax over this stage's 16*TM tokens (thread (g, t) owns heads 2t, 2t+1)
      float mnew[NT][2];
      bool grow = false;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float mx = fmaxf(sc[0][nt][j], sc[0][nt][2 + j]);
#pragma unroll
          for (int mt = 1; mt < TM; ++mt) mx = fmaxf(mx, fmaxf(sc[mt][nt][j], sc[mt][nt][2 + j]));
          mx = warp_max_xor_g(mx) + mu[nt][j];  // absolute (-inf stays -inf)
          mnew[nt][j] = fmaxf(m_run[nt][j], mx);
          grow |= mnew[nt][j] > m_run[nt][j] + kRescaleSlack;
        }
      }
      if (__any_sync(0xffffffffu, grow)) {  // warp-uniform: 40 FMULs (o_acc, l, ov, vb) + 8 score shifts
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float muse = mnew[nt][j] == kNegInf ? 0.f : mnew[nt][j];
            const float alpha = fast_exp2(m_run[nt][j] - muse);
            const float shift = mu[nt][j] - muse;  // re-base this stage's scores on the new max
#pragma unroll
            for (int mt = 0; mt < TM; ++mt) {
              sc[mt][nt][j] += shift;
              sc[mt][nt][2 + j] += shift;
            }
            m_run[nt][j] = mnew[nt][j];
            mu[nt][j] = muse;
            l_run[nt][j] *= alpha;
            ov_run[nt][j] *= alpha;
            vb_acc[nt][j] *= alpha;
            vb_acc[nt][2 + j] *= alpha;
#pragma unroll
            for (int i = 0; i < KC; ++i) {
              o_acc[nt][i][j] *= alpha;
              o_acc[nt][i][2 + j] *= alpha;
            }
          }
        }
      }

#pragma unroll
      for (int mt = 0; mt < TM; ++mt) {
        const int rbase = (warp * TM + mt) * 16;
        const int r0 = rbase + tau(g), r1 = r0 + 8;
        float sv0, ofs0, sv1, ofs1;  // u8 params: scale / 32 and u - 152
        if constexpr (kU8) {  // any two bytes decode to finite values and p is 0 outside [lo, hi): no masking
          const uint32_t w0 = *reinterpret_cast<const uint16_t*>(sVP + r0 * 2);
          const uint32_t w1 = *reinterpret_cast<const uint16_t*>(sVP + r1 * 2);
          sv0 = u8_scale_div32(w0, kU8Magic);
          sv1 = u8_scale_div32(w1, kU8Magic);
          ofs0 = u8_offset_units(w0);
          ofs1 = u8_offset_units(w1);
        } else {
          const float2 e0 = __half22float2(*reinterpret_cast<const __half2*>(sVP + r0 * 4));
          const float2 e1 = __half22float2(*reinterpret_cast<const __half2*>(sVP + r1 * 4));
          sv0 = e0.x, ofs0 = e0.y, sv1 = e1.x, ofs1 = e1.y;
          if (!full) {  // p is 0 there, but the unloaded (scale, offset) may be inf or NaN: 0 * NaN
            const int p0 = pos_base + r0, p1 = pos_base + r1;
            if (!(p0 >= lo && p0 < hi)) sv0 = ofs0 = 0.f;
            if (!(p1 >= lo && p1 < hi)) sv1 = ofs1 = 0.f;
          }
        }
        uint32_t pb[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float x0 = fast_exp2(sc[mt][nt][0]);
          const float x1 = fast_exp2(sc[mt][nt][1]);
          const float x2 = fast_exp2(sc[mt][nt][2]);
          const float x3 = fast_exp2(sc[mt][nt][3]);
          l_run[nt][0] += x0 + x2;
          l_run[nt][1] += x1 + x3;
          const float y0 = x0 * sv0, y1 = x1 * sv0, y2 = x2 * sv1, y3 = x3 * sv1;  // P' = p * scale (u8: / 32)
          if constexpr (kU8) {  // p * offset = 2 * (p * scale / 32) * (u - 152): the 2 comes in at the end
            ov_run[nt][0] = fmaf(y0, ofs0, fmaf(y2, ofs1, ov_run[nt][0]));
            ov_run[nt][1] = fmaf(y1, ofs0, fmaf(y3, ofs1, ov_run[nt][1]));
          } else {
            ov_run[nt][0] = fmaf(x0, ofs0, fmaf(x2, ofs1, ov_run[nt][0]));
            ov_run[nt][1] = fmaf(x1, ofs0, fmaf(x3, ofs1, ov_run[nt][1]));
          }
          // P'^T rows (tokens) x cols (heads) -> B operand (k = tokens, n = heads) of the PV MMA
          const uint32_t p01 = pack_bf16x2(y0, y1), p23 = pack_bf16x2(y2, y3);
          pb[nt][0] = movmatrix_trans(p01);
          pb[nt][1] = movmatrix_trans(p23);
          mma_bf16(vb_acc[nt], kOnesBf16x2, kOnesBf16x2, kOnesBf16x2, kOnesBf16x2, pb[nt][0], pb[nt][1]);
        }
        // V^T A operand: m = 16 dims, k = tokens (tau(2t), tau(2t+1)) and the same + 8.
        const int ra = rbase + tau(2 * t), rb2 = rbase + tau(2 * t + 1);
        uint32_t xab[NX], xcd[NX];
        load_v_pair<D>(sV, ra, rb2, g, xab);
        load_v_pair<D>(sV, ra + 8, rb2 + 8, g, xcd);
#pragma unroll
        for (int i = 0; i < KC; ++i) {
          const int beta = i >> 1, v = beta >> 1, pbit = beta & 1, q0 = 2 * (i & 1);
          const uint32_t a0 = int2_pair_biased(xab[v], pbit, q0, kMagic);
          const uint32_t a1 = int2_pair_biased(xab[v], pbit, q0 + 1, kMagic);
          const uint32_t a2 = int2_pair_biased(xcd[v], pbit, q0, kMagic);
          const uint32_t a3 = int2_pair_biased(xcd[v], pbit, q0 + 1, kMagic);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_bf16(o_acc[nt][i], a0, a1, a2, a3, pb[nt][0], pb[nt][1]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // every warp is done with the ring: reuse it as merge scratch

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        l_run[nt][j] = warp_sum_xor_g(l_run[nt][j]);
        ov_run[nt][j] = warp_sum_xor_g(ov_run[nt][j]) * (kU8 ? 2.f : 1.f);
        vb_acc[nt][j] *= kInt2PairBias;  // already summed over the warp's tokens by the MMA
      }
#pragma unroll
      for (int i = 0; i < KC; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int q = 2 * (i & 1) + half;
          const int dim = g * BV + (i >> 1) + q * QB;  // byte g*BV + (i>>1): parity (i>>1)&1 (BV is even)
          const float inv = int2_inv_weight((i >> 1) & 1, q) * (kU8 ? 32.f : 1.f);  // u8: P' was p * scale / 32
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int head = 2 * t + j + 8 * nt;
            sMO[(warp * GP + head) * D + dim] = fmaf(o_acc[nt][i][2 * half + j] - vb_acc[nt][j], inv, ov_run[nt][j]);
          }
        }
      }
    }
  } else {
    // ---------------------------------------------------------------- window CTAs
    // One window tile (WT rows) at a time: tiles split, split + win_cta, ... of the item's window
    // (window_ctas; one tile without kWinPasses), each folded into the running softmax of the warp's 16 rows.
    const uint8_t* sWK = ring;
    const uint8_t* sWV = ring + WT * 2 * D;
    const int row0 = warp * 16;
    int wlo = lo, whi = hi;  // the current window tile's slots
    for (int tile_w = split;;) {
      cp_async_wait_all();
      __syncthreads();
      if (row0 < WT && wlo + row0 < whi) {  // warp-uniform
        uint32_t qn[NT][KC][2];             // natural dim order: k-step c covers dims 16c .. 16c+15
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float* qrow = sQ + (g + 8 * nt) * D;
#pragma unroll
          for (int c = 0; c < KC; ++c) {
            qn[nt][c][0] = pack_bf16x2(qrow[16 * c + 2 * t], qrow[16 * c + 2 * t + 1]);
            qn[nt][c][1] = pack_bf16x2(qrow[16 * c + 2 * t + 8], qrow[16 * c + 2 * t + 9]);
          }
        }
        const int mat = lane >> 3, rr = lane & 7;
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
        for (int c = 0; c < KC; ++c) {
          const int row = row0 + (mat & 1) * 8 + rr, ch = 2 * c + (mat >> 1);
          uint32_t a0, a1, a2, a3;
          ldmatrix_x4(a0, a1, a2, a3, sWK + row * 2 * D + ((ch ^ rr) * 16));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_bf16(acc[nt], a0, a1, a2, a3, qn[nt][c][0], qn[nt][c][1]);
        }
        const bool v0 = wlo + row0 + g < whi, v1 = wlo + row0 + g + 8 < whi;
        uint32_t pb[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float sl = p.scale_log2;
          float s[4] = {v0 ? acc[nt][0] * sl : kNegInf, v0 ? acc[nt][1] * sl : kNegInf,
                        v1 ? acc[nt][2] * sl : kNegInf, v1 ? acc[nt][3] * sl : kNegInf};
          float x[4];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float mx = warp_max_xor_g(fmaxf(s[j], s[2 + j]));  // finite: row0 has a valid row
            if constexpr (kWinPasses) {
              // alpha is 0 on the warp's first tile (m_run = -inf), where o_acc and l_run are 0
              const float m = fmaxf(m_run[nt][j], mx), alpha = fast_exp2(m_run[nt][j] - m);
              m_run[nt][j] = m;
              x[j] = fast_exp2(s[j] - m);
              x[2 + j] = fast_exp2(s[2 + j] - m);
              l_run[nt][j] = fmaf(l_run[nt][j], alpha, warp_sum_xor_g(x[j] + x[2 + j]));
#pragma unroll
              for (int i = 0; i < KC; ++i) {
                o_acc[nt][i][j] *= alpha;
                o_acc[nt][i][2 + j] *= alpha;
              }
            } else {
              m_run[nt][j] = mx;
              x[j] = fast_exp2(s[j] - mx);
              x[2 + j] = fast_exp2(s[2 + j] - mx);
              l_run[nt][j] = warp_sum_xor_g(x[j] + x[2 + j]);
            }
          }
          pb[nt][0] = movmatrix_trans(pack_bf16x2(x[0], x[1]));
          pb[nt][1] = movmatrix_trans(pack_bf16x2(x[2], x[3]));
        }
#pragma unroll
        for (int i = 0; i < KC; ++i) {
          const int row = row0 + (mat >> 1) * 8 + rr, ch = 2 * i + (mat & 1);
          uint32_t a0, a1, a2, a3;
          ldmatrix_x4_trans(a0, a1, a2, a3, sWV + row * 2 * D + ((ch ^ rr) * 16));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_bf16(o_acc[nt][i], a0, a1, a2, a3, pb[nt][0], pb[nt][1]);
        }
      }
      if constexpr (!kWinPasses) break;
      tile_w += win_cta;
      if (tile_w * WT >= n_win) break;  // CTA-uniform
      __syncthreads();  // every warp's ldmatrix reads of this tile are done before the next copies land
      wlo = tile_w * WT;
      whi = min(wlo + WT, n_win);
      const int nr = newest_in(wlo, whi);
      issue_win(wlo, whi, nr);
      cp_async_commit();
      if (nr >= 0) copy_newest(nr);
    }
    __syncthreads();  // all ldmatrix reads done before the ring becomes merge scratch
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < KC; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int head = 2 * t + j + 8 * nt;
            sMO[(warp * GP + head) * D + 16 * i + g + 8 * half] = o_acc[nt][i][2 * half + j];
          }
        }
      }
    }
  }
  if (g == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int head = 2 * t + j + 8 * nt;
        sML[(warp * GP + head) * 2] = m_run[nt][j];
        sML[(warp * GP + head) * 2 + 1] = l_run[nt][j];
      }
    }
  }
  __syncthreads();

  // ---------------------------------------------------------------- merge the 8 warps
  float* sScale = sQ;                        // [kWarps][GP]
  float* sHead = sQ + Tr::kWarps * GP;       // [GP][2] = (max, sum)
  if (tid < G) {
    float M = kNegInf;
#pragma unroll
    for (int w = 0; w < Tr::kWarps; ++w) M = fmaxf(M, sML[(w * GP + tid) * 2]);
    float L = 0.f;
#pragma unroll
    for (int w = 0; w < Tr::kWarps; ++w) {
      const float s = M == kNegInf ? 0.f : fast_exp2(sML[(w * GP + tid) * 2] - M);
      sScale[w * GP + tid] = s;
      L = fmaf(s, sML[(w * GP + tid) * 2 + 1], L);
    }
    sHead[2 * tid] = M;
    sHead[2 * tid + 1] = L;
  }
  __syncthreads();
  {
    float* po = p.part_o + (static_cast<int64_t>(bh) * s_total + split) * G * D;
    for (int e = tid; e < G * D; e += 256) {
      const int head = e / D, dim = e % D;
      float o = 0.f;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) o = fmaf(sMO[(w * GP + head) * D + dim], sScale[w * GP + head], o);
      const float L = sHead[2 * head + 1];
      po[e] = L > 0.f ? o / L : 0.f;
    }
    if (tid < G) {
      const float L = sHead[2 * tid + 1];
      p.part_lse[(static_cast<int64_t>(bh) * s_total + split) * G + tid] =
          L > 0.f ? sHead[2 * tid] + __log2f(L) : kNegInf;
    }
  }

  // ---------------------------------------------------------------- last CTA of (b, h): merge splits
  __threadfence();
  __syncthreads();
  if (tid == 0) *sFlag = atomicAdd(p.sem + bh, 1) == s_total - 1;
  __syncthreads();
  if (*sFlag == 0) return;
  __threadfence();

  const bool rotv = p.rot_v != nullptr;
  if constexpr (Tr::kRInSmem) {
    if (rotv) {  // R_V row j, 16-byte chunk c at c ^ (j & 7): conflict-free row reads below
      for (int e = tid; e < D * D / 4; e += 256) {
        const int j = e / (D / 4), c = e % (D / 4);
        cp_async_16(ring + j * 4 * D + ((c ^ (j & 7)) * 16), p.rot_v + j * D + c * 4);
      }
    }
    cp_async_commit();
  }
  // Online merge of the splits: thread (rep, e) owns float4 e of the G x D output and folds splits
  // rep, rep + R, ... into a running (max, weight sum, weighted sum); the R replicas are combined after.
  // The log-sum-exps and partial outputs are read in the same loop (before, weights were staged, reduced
  // per head, then applied: three dependent steps).
  const float* lse = p.part_lse + static_cast<int64_t>(bh) * s_total * G;
  const float* po = p.part_o + static_cast<int64_t>(bh) * s_total * G * D;
  float* sOf = sQ;  // [G][D] merged output, rotated space
  {
    constexpr int kPerHead = D / 4;  // float4 per head
    const int E = G * kPerHead;
    const int R = E >= 256 ? 1 : 256 / E;
    float4* sRep = reinterpret_cast<float4*>(ring + Tr::kRBytes);      // [R][E] weighted sums
    float2* sRepMW = reinterpret_cast<float2*>(sRep + 256);            // [R][E] (max, weight sum)
    for (int base = 0; base < E * R; base += 256) {
      const int idx = base + tid, rep = idx / E, e = idx % E, head = e / kPerHead;
      if (rep >= R) continue;
      float m = kNegInf, wsum = 0.f;
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
      // kMergeBatch splits' loads are issued before any is used: one L2 round trip per batch. With
      // one split at a time this merge took 4.6 us of the 21 us call at batch 1 (Qwen3-8B, 4K, 18 splits)
      // and 6.4 of 17 (SmolLM2, 16K, 66 splits): globaltimer trace, docs/kernels.md.
      constexpr int kMergeBatch = 8;
      for (int sp0 = rep; sp0 < s_total; sp0 += kMergeBatch * R) {
        float lb[kMergeBatch];
        float4 vb[kMergeBatch];
#pragma unroll
        for (int k = 0; k < kMergeBatch; ++k) {
          const int sp = sp0 + k * R;
          const bool in = sp < s_total;
          lb[k] = in ? __ldcg(lse + sp * G + head) : kNegInf;
          vb[k] = in ? ld_cg_f4(po + static_cast<int64_t>(sp) * G * D + 4 * e) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        float mb = m;
#pragma unroll
        for (int k = 0; k < kMergeBatch; ++k) mb = fmaxf(mb, lb[k]);
        if (mb == kNegInf) continue;  // only empty splits so far
        const float f = fast_exp2(m - mb);  // 0 while m is -inf
        a.x *= f;
        a.y *= f;
        a.z *= f;
        a.w *= f;
        wsum *= f;
        m = mb;
#pragma unroll
        for (int k = 0; k < kMergeBatch; ++k) {
          const float w = fast_exp2(lb[k] - m);  // 0 for an empty split (lse -inf, partial 0)
          a.x = fmaf(w, vb[k].x, a.x);
          a.y = fmaf(w, vb[k].y, a.y);
          a.z = fmaf(w, vb[k].z, a.z);
          a.w = fmaf(w, vb[k].w, a.w);
          wsum += w;
        }
      }
      if (R == 1) {
        const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
        reinterpret_cast<float4*>(sOf)[e] = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
      } else {
        sRep[rep * E + e] = a;
        sRepMW[rep * E + e] = make_float2(m, wsum);
      }
    }
    if (R > 1) {
      __syncthreads();
      if (tid < E) {
        float M = kNegInf;
        for (int r = 0; r < R; ++r) M = fmaxf(M, sRepMW[r * E + tid].x);
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        float wsum = 0.f;
        if (M != kNegInf) {
          for (int r = 0; r < R; ++r) {
            const float2 mw = sRepMW[r * E + tid];
            const float f = fast_exp2(mw.x - M);  // 0 for a replica that saw only empty splits
            const float4 v = sRep[r * E + tid];
            a.x = fmaf(f, v.x, a.x);
            a.y = fmaf(f, v.y, a.y);
            a.z = fmaf(f, v.z, a.z);
            a.w = fmaf(f, v.w, a.w);
            wsum = fmaf(f, mw.y, wsum);
          }
        }
        const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
        reinterpret_cast<float4*>(sOf)[tid] = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();

  // out[head, j] = sum_i O[head, i] * R_V[j, i]   (O @ R_V^T), or O itself. Thread (hs, j) takes heads
  // hs, hs + kHS, ... two at a time with four partial sums each: 8 independent FMA chains of D/4
  // instead of one chain of D per head (this epilogue runs once per (b, kv head), on the critical path
  // at small batch).
  __nv_bfloat16* outp = static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(b) * p.out_s0 + static_cast<int64_t>(h * G) * p.out_s1;
  constexpr int kHS = 256 / D > 1 ? 256 / D : 1;
  const int j = tid % D, hs = tid / D;
  // 16-byte chunk c of R_V row j: staged in shared memory (swizzled, see the cp.async above) up to
  // d=128, read from global memory at d=256.
  auto rv_chunk = [&](int c) -> float4 {
    if constexpr (Tr::kRInSmem) {
      return *reinterpret_cast<const float4*>(ring + j * 4 * D + ((c ^ (j & 7)) * 16));
    } else {
      return __ldg(reinterpret_cast<const float4*>(p.rot_v + static_cast<int64_t>(j) * D) + c);
    }
  };
  if (hs < kHS) {
    for (int head = hs; head < G; head += 2 * kHS) {
      const int h1 = head + kHS;
      const int h1c = h1 < G ? h1 : head;  // a lone last head repeats itself (result not written)
      float r0, r1;
      if (rotv) {
        float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
        for (int c = 0; c < D / 4; ++c) {
          const float4 r = rv_chunk(c);
          const float4 o0 = reinterpret_cast<const float4*>(sOf + head * D)[c];
          const float4 o1 = reinterpret_cast<const float4*>(sOf + h1c * D)[c];
          a0[0] = fmaf(o0.x, r.x, a0[0]);
          a0[1] = fmaf(o0.y, r.y, a0[1]);
          a0[2] = fmaf(o0.z, r.z, a0[2]);
          a0[3] = fmaf(o0.w, r.w, a0[3]);
          a1[0] = fmaf(o1.x, r.x, a1[0]);
          a1[1] = fmaf(o1.y, r.y, a1[1]);
          a1[2] = fmaf(o1.z, r.z, a1[2]);
          a1[3] = fmaf(o1.w, r.w, a1[3]);
        }
        r0 = (a0[0] + a0[1]) + (a0[2] + a0[3]);
        r1 = (a1[0] + a1[1]) + (a1[2] + a1[3]);
      } else {
        r0 = sOf[head * D + j];
        r1 = sOf[h1c * D + j];
      }
      outp[static_cast<int64_t>(head) * p.out_s1 + j] = __float2bfloat16_rn(r0);
      if (h1 < G) outp[static_cast<int64_t>(h1) * p.out_s1 + j] = __float2bfloat16_rn(r1);
    }
  }
  if (tid == 0) p.sem[bh] = 0;
}

}  // namespace oscar
