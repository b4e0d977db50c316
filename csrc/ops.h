// Host entry points of the oscar:: ops (registered in torch_bindings.cpp).
#pragma once

#include <torch/all.h>

#include <optional>

namespace oscar {

void store_kv(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& kv_cache,
              const torch::Tensor& slot_mapping, const std::optional<torch::Tensor>& rotation_k,
              const std::optional<torch::Tensor>& rotation_v, double k_clip_ratio, double v_clip_ratio,
              const std::optional<torch::Tensor>& window_cache,
              const std::optional<torch::Tensor>& window_slot_mapping, int64_t levels, int64_t params);

void decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv_cache,
            const torch::Tensor& block_table, const torch::Tensor& seq_lens,
            const std::optional<torch::Tensor>& window_cache,
            const std::optional<torch::Tensor>& window_block_table,
            const std::optional<torch::Tensor>& rotation_k, const std::optional<torch::Tensor>& rotation_v,
            int64_t sink, int64_t recent, double scale, torch::Tensor& workspace, torch::Tensor& semaphores,
            int64_t num_splits, int64_t params);

// rotate_q -> store_kv -> decode with the decode overlapping the store (ops.cpp says how). Contract: in
// every sequence the decode reads, the store writes at most the newest row (position seq_lens[b] - 1);
// its other slots belong to sequences this decode does not read (e.g. prefill tokens of the same batch).
void store_and_decode(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& key,
                      const torch::Tensor& value, torch::Tensor& kv_cache, const torch::Tensor& slot_mapping,
                      const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                      const std::optional<torch::Tensor>& window_cache,
                      const std::optional<torch::Tensor>& window_slot_mapping,
                      const std::optional<torch::Tensor>& window_block_table,
                      const std::optional<torch::Tensor>& rotation_k, const std::optional<torch::Tensor>& rotation_v,
                      const std::optional<torch::Tensor>& output_rotation_v, double k_clip_ratio,
                      double v_clip_ratio, int64_t levels, int64_t sink, int64_t recent, double scale,
                      torch::Tensor& workspace, torch::Tensor& semaphores, int64_t num_splits, int64_t params);
void gather_prefix(torch::Tensor& key_out, torch::Tensor& value_out, const torch::Tensor& kv_cache,
                   const torch::Tensor& block_table, const torch::Tensor& cu_seqlens,
                   const std::optional<torch::Tensor>& prefix_lens,
                   const std::optional<torch::Tensor>& window_cache,
                   const std::optional<torch::Tensor>& window_block_table,
                   const std::optional<torch::Tensor>& window_starts, int64_t sink, int64_t params);

// `params` (every op above): the cache's (scale, offset) format, 0 = fp16 pair, 1 = u8 pair
// (vllm_oscar.layout.PARAM_FORMATS in order).

// Sizes the Python side mirrors (vllm_oscar/ops/__init__.py asserts they agree at load time).
int64_t decode_window_tile(int64_t head_dim);
int64_t decode_max_split_heads(int64_t head_dim, int64_t group);
int64_t decode_ctas_per_sm(int64_t head_dim, int64_t group);
// Not a mirror: decode_kernel's window CTAs of an item with n_tiles INT2 tiles when the grid is resident
// (tests check the launcher's thresholds against a brute-force search).
int64_t decode_window_ctas(int64_t n_tiles, int64_t num_splits, int64_t window_splits, int64_t head_dim);
// Not a mirror: the current CUDA device's occupancy of that decode kernel (tests compare the two).
int64_t decode_occupancy(int64_t head_dim, int64_t group, int64_t params);

}  // namespace oscar
