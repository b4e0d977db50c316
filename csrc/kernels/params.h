// Kernel parameter blocks shared by the g++-compiled op layer (ops.cpp) and the CUDA launchers.
// Plain C++ only (no CUDA or torch headers): 16-bit tensors travel as void pointers.
#pragma once

#include <cstdint>

namespace oscar {

// StoreParams::levels: how a row's (scale, offset) is chosen (vllm_oscar.ops.LEVELS_CODES mirrors these).
constexpr int kLevelsMinmax = 0;
constexpr int kLevelsMse = 1;

// How a row's (scale, offset) is stored (vllm_oscar.layout.PARAM_FORMATS; the ops' `params_u8`):
// 0 = two fp16 (4 bytes), 1 = "u8" (2 bytes: 8-bit float scale code, offset in sixteenths of the scale).
constexpr int kParamBytesFp16 = 4;
constexpr int kParamBytesU8 = 2;

// DecodeParams::win_from: thresholds of the window CTA count (window_ctas.h), so at most this
// many window CTAs of an item are given to its INT2 tiles.
constexpr int kWinFromSlots = 8;

struct StoreParams {
  const void* key;  // [T, Hkv, d] bf16 or fp16
  const void* value;
  int64_t k_s0, k_s1, v_s0, v_s1;  // elements
  bool in_fp16;                    // key/value dtype: fp16 (true) or bf16
  uint8_t* kv;
  int64_t kv_s0, kv_s1;  // bytes
  const int64_t* slots;
  const float* rot_k;  // nullptr: identity
  const float* rot_v;
  int k_idx, v_idx;  // clip index (reference.clip_index) or -1 for no clipping
  int levels;        // kLevelsMinmax or kLevelsMse (reference.LEVELS); MSE implies no clipping
  int params_u8;     // 1: (scale, offset) rounded to and stored as the u8 pair (reference.round_params_u8)
  void* win;         // nullptr: no window write
  int64_t w_s0, w_s1, w_s2, w_s3;  // elements of [blocks, 2, block_size, Hkv, d]
  bool win_fp16;
  const int64_t* wslots;
  int num_tokens, num_kv_heads, block_size, win_block_size;
  int64_t num_slots, num_win_slots;  // out-of-range slots are skipped
  // Set by store_and_decode, which launches this kernel after the decode kernel with programmatic
  // dependent launch: its CTAs start in the slots the decode's CTAs free, store without waiting (the
  // decode reads none of the rows written here), then wait for the decode to complete, so that this grid
  // never completes before it (the next kernel on the stream may read the decode's output).
  int pdl_after_decode;
};

struct DecodeParams {
  void* out;  // [B, Hq, d] bf16
  int64_t out_s0, out_s1;  // elements
  const void* q;           // [B, Hq, d] bf16
  int64_t q_s0, q_s1;      // elements
  const uint8_t* kv;
  int64_t kv_s0, kv_s1;  // bytes
  const int32_t* block_table;
  int64_t bt_s0;
  const int32_t* seq_lens;
  const void* win;  // bf16; nullptr: no window cache, every row is read from INT2
  int64_t w_s0, w_s1, w_s2, w_s3;  // elements of [blocks, 2, block_size, Hkv, d]
  const int32_t* wbt;
  int64_t wbt_s0;
  const float* rot_k;  // nullptr: identity
  const float* rot_v;  // nullptr: output stays in the rotated space
  float* q_rot;        // [B * Hq, D]
  float* part_o;       // [B * Hkv, S, G, D]
  float* part_lse;     // [B * Hkv, S, G]   (log2 domain), then new_rows
  int32_t* sem;        // [B * Hkv], zero between calls
  int batch, num_q_heads, num_kv_heads, group, block_size, win_block_size, sink, recent, s_win, s_int;
  int params_u8;    // the cache's (scale, offset) format: selects decode_kernel's PB (launch_decode_kernel_for)
  int block_shift;  // log2(block_size) when it is a power of two, else -1 (integer division is ~20
                    // instructions and runs 3x per stage per thread)
  float scale_log2;
  int win_first;  // set by launch_decode: window CTAs first in the grid (the whole grid is resident)
  // Set by launch_decode (window_thresholds): an item takes s_win - j window CTAs once its INT2 tiles reach
  // win_from[j - 1] (ascending; INT_MAX where unused).
  int win_from[kWinFromSlots];
  // store_and_decode with a window cache (rotate_q -> decode -> store): the step's newest K/V rows
  // (sequence b's at new_k/new_v row b) are rotated by rotate_q_kernel with the store's arithmetic into
  // new_rows, and the window CTA covering position seq_len - 1 reads that row from there instead of the
  // window cache, which the store writes after this kernel. nullptr: every row from the caches.
  const void* new_k;
  const void* new_v;
  int64_t nk_s0, nk_s1, nv_s0, nv_s1;  // elements
  int new_fp16;                        // new_k/new_v dtype: fp16 (1) or bf16 (0)
  const float* new_rot_v;              // the store's R_V (rot_v is null when o_proj absorbed it)
  float* new_rows;                     // [2, B * Hkv, D]: K rows, then V rows (rotated, fp32)
};

struct GatherParams {
  void* k_out;  // [rows, Hkv, d] bf16
  void* v_out;
  int64_t ko_s0, ko_s1, vo_s0, vo_s1;  // elements
  const uint8_t* kv;
  int64_t kv_s0, kv_s1;  // bytes
  const int32_t* block_table;
  int64_t bt_s0;
  const int32_t* cu;           // [num_seqs + 1]
  const int32_t* prefix_lens;  // [num_seqs] or nullptr (= cu[i+1] - cu[i])
  const void* win;             // bf16; nullptr: every row from INT2
  int64_t w_s0, w_s1, w_s2, w_s3;
  const int32_t* wbt;
  int64_t wbt_s0;
  const int32_t* wstarts;  // [num_seqs]
  int num_seqs, total_rows, num_kv_heads, block_size, win_block_size, sink;
  int params_u8;  // the cache's (scale, offset) format
};

}  // namespace oscar
