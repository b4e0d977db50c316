// The oscar:: op layer: argument checks (TORCH_CHECK messages name the argument and the expectation),
// parameter blocks, dispatch to the CUDA launchers. Compiled by g++ only (see launch.h for why).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <cmath>
#include <cstdlib>

#include "checks.h"
#include "launch.h"
#include "ops.h"

namespace oscar {

// ---------------------------------------------------------------------------------------------
// store_kv
// ---------------------------------------------------------------------------------------------

namespace {
// reference.clip_index: ratio <= 0 disables clipping, else min(int(ratio * d), d - 1).
int clip_index(double ratio, int64_t d) {
  if (!(ratio > 0)) return -1;
  const int64_t idx = static_cast<int64_t>(ratio * static_cast<double>(d));
  return static_cast<int>(idx < d - 1 ? idx : d - 1);
}
}  // namespace

namespace {
// store_kv's checks and parameter block (num_tokens 0: nothing to store).
StoreParams make_store_params(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
                              const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& rotation_k,
                              const std::optional<torch::Tensor>& rotation_v, double k_clip_ratio,
                              double v_clip_ratio, const std::optional<torch::Tensor>& window_cache,
                              const std::optional<torch::Tensor>& window_slot_mapping, int64_t levels,
                              int64_t params) {
  const auto dev = key.device();
  const int params_u8 = param_format_u8(params);
  check_cuda(key, "key", dev);
  TORCH_CHECK(key.scalar_type() == at::kBFloat16 || key.scalar_type() == at::kHalf,
              "oscar: key must be bfloat16 or float16, got ", key.scalar_type());
  check_dim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  const int64_t Hkv = key.size(1), D = key.size(2);
  check_head_dim(D, "key.shape[2]");
  TORCH_CHECK(key.stride(2) == 1, "oscar: key must be contiguous in its last dimension, got strides ",
              list_str(key.strides()));
  check_cuda(value, "value", dev);
  TORCH_CHECK(value.scalar_type() == key.scalar_type(), "oscar: value must have key's dtype ", key.scalar_type(),
              ", got ", value.scalar_type());
  TORCH_CHECK(value.sizes() == key.sizes(), "oscar: value must have key's shape ", shape_str(key), ", got ",
              shape_str(value));
  TORCH_CHECK(value.stride(2) == 1, "oscar: value must be contiguous in its last dimension, got strides ",
              list_str(value.strides()));
  check_kv_cache(kv_cache, dev, Hkv);
  const int64_t bs = int2_block_size(kv_cache, D, params_u8);
  check_cuda(slot_mapping, "slot_mapping", dev);
  check_dtype(slot_mapping, "slot_mapping", at::kLong);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.is_contiguous() && slot_mapping.size(0) <= key.size(0),
              "oscar: slot_mapping must be a contiguous 1-D int64 tensor with at most num_tokens = ", num(key.size(0)),
              " entries, got shape ", shape_str(slot_mapping));
  const int64_t T = slot_mapping.size(0);  // like vLLM's reshape_and_cache: key may be padded beyond it
  check_rotation(rotation_k, "rotation_k", dev, D);
  check_rotation(rotation_v, "rotation_v", dev, D);
  const bool has_win = window_cache.has_value();
  if (has_win) {
    const auto& w = *window_cache;
    check_window_cache(w, dev, Hkv, D);
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
                "oscar: window_cache must be bfloat16 or float16, got ", w.scalar_type());
    TORCH_CHECK(window_slot_mapping.has_value(), "oscar: window_slot_mapping is required with window_cache");
    const auto& ws = *window_slot_mapping;
    check_cuda(ws, "window_slot_mapping", dev);
    check_dtype(ws, "window_slot_mapping", at::kLong);
    TORCH_CHECK(ws.dim() == 1 && ws.is_contiguous() && ws.size(0) >= T, "oscar: window_slot_mapping must be a "
                "contiguous 1-D int64 tensor with at least ", num(T), " entries, got shape ", shape_str(ws));
  }
  TORCH_CHECK(levels == kLevelsMinmax || levels == kLevelsMse, "oscar: levels must be ", num(kLevelsMinmax),
              " (minmax) or ", num(kLevelsMse), " (mse), got ", num(levels));
  TORCH_CHECK(levels == kLevelsMinmax || (!(k_clip_ratio > 0) && !(v_clip_ratio > 0)),
              "oscar: levels mse fits the grid to the whole row and does not clip; k_clip_ratio and "
              "v_clip_ratio must be 0, got ", num(k_clip_ratio), " and ", num(v_clip_ratio));
  TORCH_CHECK(T * Hkv < (int64_t{1} << 31), "oscar: store_kv supports fewer than 2^31 rows, got ", num(T * Hkv));

  StoreParams p{};
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.k_s0 = key.stride(0);
  p.k_s1 = key.stride(1);
  p.v_s0 = value.stride(0);
  p.v_s1 = value.stride(1);
  p.in_fp16 = key.scalar_type() == at::kHalf;
  p.kv = kv_cache.data_ptr<uint8_t>();
  p.kv_s0 = kv_cache.stride(0);
  p.kv_s1 = kv_cache.stride(1);
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.rot_k = rotation_k.has_value() ? rotation_k->data_ptr<float>() : nullptr;
  p.rot_v = rotation_v.has_value() ? rotation_v->data_ptr<float>() : nullptr;
  p.k_idx = clip_index(k_clip_ratio, D);
  p.v_idx = clip_index(v_clip_ratio, D);
  p.levels = static_cast<int>(levels);
  p.num_tokens = static_cast<int>(T);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.block_size = static_cast<int>(bs);
  p.params_u8 = params_u8;
  p.num_slots = kv_cache.size(0) * bs;
  if (has_win) {
    const auto& w = *window_cache;
    p.win = w.data_ptr();
    p.w_s0 = w.stride(0);
    p.w_s1 = w.stride(1);
    p.w_s2 = w.stride(2);
    p.w_s3 = w.stride(3);
    p.win_fp16 = w.scalar_type() == at::kHalf;
    p.wslots = window_slot_mapping->data_ptr<int64_t>();
    p.win_block_size = static_cast<int>(w.size(2));
    p.num_win_slots = w.size(0) * w.size(2);
  }
  return p;
}
}  // namespace

void store_kv(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
              const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& rotation_k,
              const std::optional<torch::Tensor>& rotation_v, double k_clip_ratio, double v_clip_ratio,
              const std::optional<torch::Tensor>& window_cache,
              const std::optional<torch::Tensor>& window_slot_mapping, int64_t levels, int64_t params) {
  const StoreParams p = make_store_params(key, value, kv_cache, slot_mapping, rotation_k, rotation_v, k_clip_ratio,
                                          v_clip_ratio, window_cache, window_slot_mapping, levels, params);
  if (p.num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(key.device());
  launch_store(p, static_cast<int>(key.size(2)), c10::cuda::getCurrentCUDAStream());
}

// ---------------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------------

int64_t decode_window_tile(int64_t head_dim) {
  check_head_dim(head_dim, "head_dim");
  return decode_window_tile_for(static_cast<int>(head_dim));
}

int64_t decode_max_split_heads(int64_t head_dim, int64_t group) {
  check_head_dim(head_dim, "head_dim");
  check_group(group);
  return decode_max_split_heads_for(static_cast<int>(head_dim), static_cast<int>(group));
}

int64_t decode_ctas_per_sm(int64_t head_dim, int64_t group) {
  check_head_dim(head_dim, "head_dim");
  check_group(group);
  return decode_ctas_per_sm_for(static_cast<int>(head_dim), static_cast<int>(group));
}

int64_t decode_window_ctas(int64_t n_tiles, int64_t num_splits, int64_t window_splits, int64_t head_dim) {
  check_head_dim(head_dim, "head_dim");
  TORCH_CHECK(n_tiles >= 0 && n_tiles <= (int64_t{1} << 24), "oscar: n_tiles must be in [0, 2^24], got ", num(n_tiles));
  TORCH_CHECK(num_splits >= 1 && num_splits <= 65536, "oscar: num_splits must be in [1, 65536], got ", num(num_splits));
  TORCH_CHECK(window_splits >= 0 && window_splits <= 65536, "oscar: window_splits must be in [0, 65536], got ",
              num(window_splits));
  return decode_window_ctas_for(n_tiles, static_cast<int>(num_splits), static_cast<int>(window_splits),
                                static_cast<int>(head_dim));
}

int64_t decode_occupancy(int64_t head_dim, int64_t group, int64_t params) {
  check_head_dim(head_dim, "head_dim");
  check_group(group);
  TORCH_CHECK(params == 0 || params == 1, "oscar: params must be 0 (fp16 pairs) or 1 (u8 pairs), got ", num(params));
  TORCH_CHECK(c10::cuda::device_count() > 0, "oscar: decode_occupancy needs a CUDA device");
  return decode_occupancy_for(static_cast<int>(head_dim), static_cast<int>(group), params == 1);
}

namespace {
// Programmatic dependent launch needs sm_90. OSCAR_KERNELS_NO_PDL=1 launches the decode kernel plainly
// (A/B and debugging). Cached: no runtime query under CUDA-graph capture.
bool use_pdl(c10::DeviceIndex dev) {
  static const bool disabled = [] {
    const char* e = std::getenv("OSCAR_KERNELS_NO_PDL");
    return e != nullptr && e[0] == '1';
  }();
  static std::atomic<int> cc_major_cache[64];
  if (disabled || dev < 0 || dev >= 64) return false;
  int cc = cc_major_cache[dev].load();
  if (cc == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc, cudaDevAttrComputeCapabilityMajor, dev));
    cc_major_cache[dev].store(cc);
  }
  return cc >= 9;
}
}  // namespace

namespace {
// decode's checks and parameter block (batch 0: nothing to compute).
DecodeParams make_decode_params(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_cache,
                                const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                                const std::optional<torch::Tensor>& window_cache,
                                const std::optional<torch::Tensor>& window_block_table,
                                const std::optional<torch::Tensor>& rotation_k,
                                const std::optional<torch::Tensor>& rotation_v, int64_t sink, int64_t recent,
                                double scale, torch::Tensor& workspace, torch::Tensor& semaphores,
                                int64_t num_splits, int64_t params) {
  const auto dev = q.device();
  const int params_u8 = param_format_u8(params);
  check_cuda(q, "q", dev);
  check_dtype(q, "q", at::kBFloat16);
  check_dim(q, "q", 3, "[batch, num_q_heads, head_dim]");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  check_head_dim(D, "q.shape[2]");
  check_rows_aligned(q, "q", 8);
  check_cuda(out, "out", dev);
  check_dtype(out, "out", at::kBFloat16);
  TORCH_CHECK(out.sizes() == q.sizes(), "oscar: out must have the shape of q ", shape_str(q), ", got ",
              shape_str(out));
  TORCH_CHECK(out.stride(2) == 1, "oscar: out must be contiguous in its last dimension, got strides ",
              list_str(out.strides()));

  check_cuda(kv_cache, "kv_cache", dev);
  check_dim(kv_cache, "kv_cache", 3, "[num_blocks, num_kv_heads, head_page_bytes]");
  const int64_t Hkv = kv_cache.size(1);
  check_kv_cache(kv_cache, dev, Hkv);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "oscar: num_q_heads (q.shape[1] = ", num(Hq),
              ") must be a multiple of num_kv_heads (kv_cache.shape[1] = ", num(Hkv), ")");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G <= 16 && (D < 256 || G <= 8), "oscar: decode supports up to ", D < 256 ? "16" : "8",
              " query heads per kv head at head_dim ", num(D), ", got ", num(G));
  const int64_t bs = int2_block_size(kv_cache, D, params_u8);
  TORCH_CHECK(B <= 65535, "oscar: decode batch must be at most 65535, got ", num(B));

  check_cuda(block_table, "block_table", dev);
  check_dtype(block_table, "block_table", at::kInt);
  check_dim(block_table, "block_table", 2, "[batch, max_blocks_per_seq]");
  TORCH_CHECK(block_table.size(0) >= B && block_table.stride(1) == 1, "oscar: block_table must have at least ",
              num(B), " rows and contiguous rows, got shape ", shape_str(block_table), " strides ",
              list_str(block_table.strides()));
  // The kernel's address math is 32-bit below the page base (decode.cuh, issue_int2).
  TORCH_CHECK(kv_cache.stride(0) < (int64_t{1} << 31), "oscar: kv_cache pages of ", num(kv_cache.stride(0)),
              " bytes (stride(0)) exceed the decode kernel's 2^31-byte limit; use a smaller block size");
  TORCH_CHECK(block_table.stride(0) * B < (int64_t{1} << 31), "oscar: block_table has ", num(B), " rows of stride ",
              num(block_table.stride(0)), ", beyond the decode kernel's 2^31-entry limit");
  check_cuda(seq_lens, "seq_lens", dev);
  check_dtype(seq_lens, "seq_lens", at::kInt);
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) >= B && seq_lens.is_contiguous(),
              "oscar: seq_lens must be a contiguous 1-D int32 tensor of at least ", num(B), " entries, got shape ",
              shape_str(seq_lens));

  const bool has_win = window_cache.has_value();
  TORCH_CHECK(sink >= 0 && recent >= 0, "oscar: sink and recent must be >= 0, got ", num(sink), " and ", num(recent));
  if (has_win) {
    check_window_cache(*window_cache, dev, Hkv, D);
    check_dtype(*window_cache, "window_cache", at::kBFloat16);
    TORCH_CHECK(window_block_table.has_value(), "oscar: window_block_table is required with window_cache");
    const auto& wbt = *window_block_table;
    check_cuda(wbt, "window_block_table", dev);
    check_dtype(wbt, "window_block_table", at::kInt);
    check_dim(wbt, "window_block_table", 2, "[batch, max_window_blocks_per_seq]");
    TORCH_CHECK(wbt.size(0) >= B && wbt.stride(1) == 1, "oscar: window_block_table must have at least ", num(B),
                " rows and contiguous rows, got shape ", shape_str(wbt));
  }
  check_rotation(rotation_k, "rotation_k", dev, D);
  check_rotation(rotation_v, "rotation_v", dev, D);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "oscar: scale must be a positive finite number, got ", num(scale));
  TORCH_CHECK(num_splits >= 1, "oscar: num_splits must be >= 1, got ", num(num_splits));

  const int64_t wt = decode_window_tile(D);
  const int64_t s_win = has_win ? (sink + recent + wt - 1) / wt : 0;
  const int64_t s_total = s_win + num_splits;
  const int64_t max_sh = decode_max_split_heads(D, G);
  TORCH_CHECK(s_total * G <= max_sh, "oscar: (num_splits + window splits) * query heads per kv head = ",
              num(s_total), " * ", num(G), " exceeds ", num(max_sh), " for head_dim ", num(D), "; use fewer splits");
  // q_rot, partial outputs and log-sum-exps, store_and_decode's newest K/V rows (vllm_oscar.ops sizes the same)
  const int64_t need = B * Hq * D + B * Hkv * s_total * G * (D + 1) + 2 * B * Hkv * D;
  check_cuda(workspace, "workspace", dev);
  check_dtype(workspace, "workspace", at::kFloat);
  TORCH_CHECK(workspace.is_contiguous() && workspace.numel() >= need, "oscar: workspace must be a contiguous "
              "float32 tensor of at least ", num(need), " elements for batch ", num(B), " and ", num(s_total),
              " splits, got ", num(workspace.numel()), " (allocate it with vllm_oscar.ops.make_decode_workspace)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 16 == 0, "oscar: workspace must be 16-byte aligned");
  check_cuda(semaphores, "semaphores", dev);
  check_dtype(semaphores, "semaphores", at::kInt);
  TORCH_CHECK(semaphores.is_contiguous() && semaphores.numel() >= B * Hkv, "oscar: semaphores must be a contiguous "
              "int32 tensor of at least ", num(B * Hkv), " zeros, got ", num(semaphores.numel()), " elements");

  DecodeParams p{};
  p.out = out.data_ptr();
  p.out_s0 = out.stride(0);
  p.out_s1 = out.stride(1);
  p.q = q.data_ptr();
  p.q_s0 = q.stride(0);
  p.q_s1 = q.stride(1);
  p.kv = kv_cache.data_ptr<uint8_t>();
  p.kv_s0 = kv_cache.stride(0);
  p.kv_s1 = kv_cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_s0 = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  if (has_win) {
    const auto& w = *window_cache;
    p.win = w.data_ptr();
    p.w_s0 = w.stride(0);
    p.w_s1 = w.stride(1);
    p.w_s2 = w.stride(2);
    p.w_s3 = w.stride(3);
    p.win_block_size = static_cast<int>(w.size(2));
    p.wbt = window_block_table->data_ptr<int32_t>();
    p.wbt_s0 = window_block_table->stride(0);
  }
  p.rot_k = rotation_k.has_value() ? rotation_k->data_ptr<float>() : nullptr;
  p.rot_v = rotation_v.has_value() ? rotation_v->data_ptr<float>() : nullptr;
  float* ws = workspace.data_ptr<float>();
  p.q_rot = ws;
  p.part_o = ws + B * Hq * D;
  p.part_lse = p.part_o + B * Hkv * s_total * G * D;
  p.sem = semaphores.data_ptr<int32_t>();
  p.batch = static_cast<int>(B);
  p.num_q_heads = static_cast<int>(Hq);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.group = static_cast<int>(G);
  p.block_size = static_cast<int>(bs);
  p.params_u8 = params_u8;
  p.block_shift = (bs & (bs - 1)) == 0 ? __builtin_ctzll(static_cast<unsigned long long>(bs)) : -1;
  p.sink = static_cast<int>(sink);
  p.recent = static_cast<int>(recent);
  p.s_win = static_cast<int>(s_win);
  p.s_int = static_cast<int>(num_splits);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}
}  // namespace

void decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_cache,
            const torch::Tensor& block_table, const torch::Tensor& seq_lens,
            const std::optional<torch::Tensor>& window_cache,
            const std::optional<torch::Tensor>& window_block_table,
            const std::optional<torch::Tensor>& rotation_k, const std::optional<torch::Tensor>& rotation_v,
            int64_t sink, int64_t recent, double scale, torch::Tensor& workspace, torch::Tensor& semaphores,
            int64_t num_splits, int64_t params) {
  const DecodeParams p = make_decode_params(out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table,
                                            rotation_k, rotation_v, sink, recent, scale, workspace, semaphores,
                                            num_splits, params);
  if (p.batch == 0) return;
  const auto dev = q.device();
  const c10::cuda::CUDAGuard guard(dev);
  launch_decode(p, static_cast<int>(q.size(2)), use_pdl(dev.index()), c10::cuda::getCurrentCUDAStream());
}

// ---------------------------------------------------------------------------------------------
// store_and_decode
// ---------------------------------------------------------------------------------------------

// With a window cache: rotate_q (which also rotates the decoded sequences' newest K/V rows, key[b] and
// value[b], into the workspace with the store's arithmetic), the decode (whose window CTA covering
// position seq_len - 1 takes that row from the workspace: decode.cuh, new_rows), then the store, chained
// by programmatic dependent launch: the store's CTAs start in the slots the decode's CTAs free and
// wait for the decode only at their end. Without PDL (OSCAR_KERNELS_NO_PDL=1 or before sm_90) the
// three kernels run one after another. Without a window cache, or without a recent window (the newest
// row is then an INT2 row, read from the cache by the last INT2 split), the decode would have to quantize
// the newest row itself: the op then runs store_kv, then decode.
void store_and_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& key,
                      const torch::Tensor& value, torch::Tensor& kv_cache, const torch::Tensor& slot_mapping,
                      const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                      const std::optional<torch::Tensor>& window_cache,
                      const std::optional<torch::Tensor>& window_slot_mapping,
                      const std::optional<torch::Tensor>& window_block_table,
                      const std::optional<torch::Tensor>& rotation_k, const std::optional<torch::Tensor>& rotation_v,
                      const std::optional<torch::Tensor>& output_rotation_v, double k_clip_ratio,
                      double v_clip_ratio, int64_t levels, int64_t sink, int64_t recent, double scale,
                      torch::Tensor& workspace, torch::Tensor& semaphores, int64_t num_splits, int64_t params) {
  StoreParams ps = make_store_params(key, value, kv_cache, slot_mapping, rotation_k, rotation_v, k_clip_ratio,
                                     v_clip_ratio, window_cache, window_slot_mapping, levels, params);
  DecodeParams pd = make_decode_params(out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table,
                                       rotation_k, output_rotation_v, sink, recent, scale, workspace, semaphores,
                                       num_splits, params);
  TORCH_CHECK(key.device() == q.device(), "oscar: key must be on q's device ", q.device(), ", got ", key.device());
  TORCH_CHECK(key.size(2) == q.size(2), "oscar: key's head_dim (key.shape[2] = ", num(key.size(2)),
              ") must equal q's (q.shape[2] = ", num(q.size(2)), ")");
  const auto dev = q.device();
  const int D = static_cast<int>(q.size(2));
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool pdl = use_pdl(dev.index());
  if (pd.batch == 0 || !window_cache.has_value() || recent <= 0) {
    if (ps.num_tokens > 0) launch_store(ps, D, stream);
    if (pd.batch > 0) launch_decode(pd, D, pdl, stream);
    return;
  }
  TORCH_CHECK(ps.num_tokens >= pd.batch, "oscar: store_and_decode takes the newest token of decoded sequence b "
              "at key[b] (decodes first in the batch), so slot_mapping needs at least q.shape[0] = ",
              num(pd.batch), " entries, got ", num(ps.num_tokens));
  pd.new_k = ps.key;
  pd.new_v = ps.value;
  pd.nk_s0 = ps.k_s0;
  pd.nk_s1 = ps.k_s1;
  pd.nv_s0 = ps.v_s0;
  pd.nv_s1 = ps.v_s1;
  pd.new_fp16 = ps.in_fp16;
  pd.new_rot_v = ps.rot_v;
  pd.new_rows = pd.part_lse + pd.batch * static_cast<int64_t>(pd.num_kv_heads) * (pd.s_win + pd.s_int) * pd.group;
  launch_rotate_q_for(pd, D, stream);
  launch_decode_kernel_for(pd, D, pdl, stream);
  ps.pdl_after_decode = pdl;
  launch_store(ps, D, stream);
}

// ---------------------------------------------------------------------------------------------
// gather_prefix
// ---------------------------------------------------------------------------------------------

namespace {
void check_int32_vec(const torch::Tensor& t, const char* name, const torch::Device& dev, int64_t n) {
  check_cuda(t, name, dev);
  check_dtype(t, name, at::kInt);
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous() && t.size(0) == n, "oscar: ", name,
              " must be a contiguous 1-D int32 tensor of ", num(n), " entries, got shape ", shape_str(t));
}
}  // namespace

void gather_prefix(torch::Tensor& key_out, torch::Tensor& value_out, const torch::Tensor& kv_cache,
                   const torch::Tensor& block_table, const torch::Tensor& cu_seqlens,
                   const std::optional<torch::Tensor>& prefix_lens,
                   const std::optional<torch::Tensor>& window_cache,
                   const std::optional<torch::Tensor>& window_block_table,
                   const std::optional<torch::Tensor>& window_starts, int64_t sink, int64_t params) {
  const auto dev = kv_cache.device();
  const int params_u8 = param_format_u8(params);
  check_cuda(key_out, "key_out", dev);
  check_dtype(key_out, "key_out", at::kBFloat16);
  check_dim(key_out, "key_out", 3, "[total_tokens, num_kv_heads, head_dim]");
  const int64_t rows = key_out.size(0), Hkv = key_out.size(1), D = key_out.size(2);
  check_head_dim(D, "key_out.shape[2]");
  check_rows_aligned(key_out, "key_out", 8);
  check_cuda(value_out, "value_out", dev);
  check_dtype(value_out, "value_out", at::kBFloat16);
  TORCH_CHECK(value_out.sizes() == key_out.sizes(), "oscar: value_out must have key_out's shape ",
              shape_str(key_out), ", got ", shape_str(value_out));
  check_rows_aligned(value_out, "value_out", 8);
  check_kv_cache(kv_cache, dev, Hkv);
  const int64_t bs = int2_block_size(kv_cache, D, params_u8);
  check_cuda(cu_seqlens, "cu_seqlens", dev);
  check_dtype(cu_seqlens, "cu_seqlens", at::kInt);
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.is_contiguous() && cu_seqlens.size(0) >= 1,
              "oscar: cu_seqlens must be a contiguous 1-D int32 tensor [num_seqs + 1], got shape ",
              shape_str(cu_seqlens));
  const int64_t N = cu_seqlens.size(0) - 1;
  check_cuda(block_table, "block_table", dev);
  check_dtype(block_table, "block_table", at::kInt);
  check_dim(block_table, "block_table", 2, "[num_seqs, max_blocks_per_seq]");
  TORCH_CHECK(block_table.size(0) >= N && block_table.stride(1) == 1, "oscar: block_table must have at least ",
              num(N), " rows and contiguous rows, got shape ", shape_str(block_table));
  if (prefix_lens.has_value()) check_int32_vec(*prefix_lens, "prefix_lens", dev, N);
  const bool has_win = window_cache.has_value();
  if (has_win) {
    check_window_cache(*window_cache, dev, Hkv, D);
    check_dtype(*window_cache, "window_cache", at::kBFloat16);
    TORCH_CHECK(window_block_table.has_value() && window_starts.has_value(),
                "oscar: window_block_table and window_starts are required with window_cache");
    const auto& wbt = *window_block_table;
    check_cuda(wbt, "window_block_table", dev);
    check_dtype(wbt, "window_block_table", at::kInt);
    check_dim(wbt, "window_block_table", 2, "[num_seqs, max_window_blocks_per_seq]");
    TORCH_CHECK(wbt.size(0) >= N && wbt.stride(1) == 1, "oscar: window_block_table must have at least ", num(N),
                " rows and contiguous rows, got shape ", shape_str(wbt));
    check_int32_vec(*window_starts, "window_starts", dev, N);
  }
  TORCH_CHECK(sink >= 0, "oscar: sink must be >= 0, got ", num(sink));
  TORCH_CHECK(rows < (int64_t{1} << 31), "oscar: gather_prefix supports fewer than 2^31 rows, got ", num(rows));
  if (rows == 0 || N == 0) return;

  const c10::cuda::CUDAGuard guard(dev);
  GatherParams p{};
  p.k_out = key_out.data_ptr();
  p.v_out = value_out.data_ptr();
  p.ko_s0 = key_out.stride(0);
  p.ko_s1 = key_out.stride(1);
  p.vo_s0 = value_out.stride(0);
  p.vo_s1 = value_out.stride(1);
  p.kv = kv_cache.data_ptr<uint8_t>();
  p.kv_s0 = kv_cache.stride(0);
  p.kv_s1 = kv_cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_s0 = block_table.stride(0);
  p.cu = cu_seqlens.data_ptr<int32_t>();
  p.prefix_lens = prefix_lens.has_value() ? prefix_lens->data_ptr<int32_t>() : nullptr;
  if (has_win) {
    const auto& w = *window_cache;
    p.win = w.data_ptr();
    p.w_s0 = w.stride(0);
    p.w_s1 = w.stride(1);
    p.w_s2 = w.stride(2);
    p.w_s3 = w.stride(3);
    p.win_block_size = static_cast<int>(w.size(2));
    p.wbt = window_block_table->data_ptr<int32_t>();
    p.wbt_s0 = window_block_table->stride(0);
    p.wstarts = window_starts->data_ptr<int32_t>();
  }
  p.num_seqs = static_cast<int>(N);
  p.total_rows = static_cast<int>(rows);
  p.num_kv_heads = static_cast<int>(Hkv);
  p.block_size = static_cast<int>(bs);
  p.params_u8 = params_u8;
  p.sink = static_cast<int>(sink);
  launch_gather(p, static_cast<int>(D), c10::cuda::getCurrentCUDAStream());
}

}  // namespace oscar
