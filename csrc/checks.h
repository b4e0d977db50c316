// Argument checks of the op layer (ops.cpp, g++ only): every message names the argument and the expectation.
#pragma once

#include <torch/all.h>

#include <cstdio>
#include <optional>
#include <string>
#include <type_traits>

namespace oscar {

// Every number in a message is formatted with std::to_string / snprintf, never streamed: on the GPU
// image the extension ends up with its own static copy of libstdc++, whose num_put facet is not
// registered in the process-wide locale, and streaming an int64 into a TORCH_CHECK message crashed
// the process (seen on the H100, 2026-11-23; reproduced here with -static-libstdc++, where the
// message is cut at the first number). Strings, ScalarType and Device format fine.
template <typename T>
std::string num(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    return buf;
  } else {
    return std::to_string(static_cast<long long>(v));
  }
}

inline std::string list_str(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

inline std::string shape_str(const torch::Tensor& t) { return list_str(t.sizes()); }

inline void check_cuda(const torch::Tensor& t, const char* name, const torch::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "oscar: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == dev, "oscar: ", name, " is on ", t.device(), " but the other arguments are on ",
              dev);
}

inline void check_dtype(const torch::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "oscar: ", name, " must be ", c10::toString(want), ", got ",
              t.scalar_type());
}

inline void check_dim(const torch::Tensor& t, const char* name, int64_t dims, const char* layout) {
  TORCH_CHECK(t.dim() == dims, "oscar: ", name, " must be ", num(dims), "-D ", layout, ", got shape ", shape_str(t));
}

// Last dim contiguous, other strides multiples of `elems` elements, data 16-byte aligned.
inline void check_rows_aligned(const torch::Tensor& t, const char* name, int64_t elems) {
  TORCH_CHECK(t.stride(-1) == 1, "oscar: ", name, " must be contiguous in its last dimension, got strides ",
              list_str(t.strides()));
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    TORCH_CHECK(t.size(i) == 1 || t.stride(i) % elems == 0, "oscar: ", name, " stride ", num(t.stride(i)),
                " of dim ", num(i), " must be a multiple of ", num(elems), " elements (16-byte rows)");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "oscar: ", name,
              " data must be 16-byte aligned");
}

inline void check_head_dim(int64_t d, const char* name) {
  TORCH_CHECK(d == 64 || d == 128 || d == 256, "oscar: unsupported head_dim ", num(d), " (from ", name,
              "); the INT2 kernels support 64, 128 and 256");
}

// Query heads per KV head, as the decode size queries take it (decode_max_split_heads, decode_ctas_per_sm,
// decode_occupancy).
inline void check_group(int64_t group) {
  TORCH_CHECK(group >= 1, "oscar: group (query heads per KV head) must be >= 1, got ", num(group));
}

// INT2 block size implied by the cache's head page size (vllm_oscar.layout.Int2PageLayout).
// `params`: the cache's (scale, offset) format, vllm_oscar.layout.PARAM_FORMATS in order (0 fp16, 1 u8).
inline int param_format_u8(int64_t params) {
  TORCH_CHECK(params == 0 || params == 1, "oscar: params must be 0 (fp16 scale and offset) or 1 (u8), got ",
              num(params));
  return static_cast<int>(params);
}

inline int64_t int2_block_size(const torch::Tensor& kv_cache, int64_t d, int params_u8) {
  const int64_t per_token = 2 * (d / 4 + (params_u8 ? 2 : 4));
  const int64_t page = kv_cache.size(2);
  TORCH_CHECK(page % per_token == 0 && (page / per_token) % 16 == 0 && page > 0, "oscar: kv_cache head page of ",
              num(page), " bytes is not block_size * ", num(per_token), " bytes with block_size a positive multiple "
              "of 16 for head_dim ", num(d), " and ", params_u8 ? "u8" : "fp16", " params");
  return page / per_token;
}

inline void check_kv_cache(const torch::Tensor& kv_cache, const torch::Device& dev, int64_t hkv) {
  check_cuda(kv_cache, "kv_cache", dev);
  check_dtype(kv_cache, "kv_cache", at::kByte);
  check_dim(kv_cache, "kv_cache", 3, "[num_blocks, num_kv_heads, head_page_bytes]");
  TORCH_CHECK(kv_cache.size(1) == hkv, "oscar: kv_cache has ", num(kv_cache.size(1)), " kv heads, expected ", num(hkv));
  check_rows_aligned(kv_cache, "kv_cache", 16);
}

inline void check_rotation(const std::optional<torch::Tensor>& r, const char* name, const torch::Device& dev,
                           int64_t d) {
  if (!r.has_value()) return;
  check_cuda(*r, name, dev);
  check_dtype(*r, name, at::kFloat);
  TORCH_CHECK(r->dim() == 2 && r->size(0) == d && r->size(1) == d && r->is_contiguous(), "oscar: ", name,
              " must be a contiguous float32 [", num(d), ", ", num(d), "] matrix, got shape ", shape_str(*r));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(r->data_ptr()) % 16 == 0, "oscar: ", name, " data must be 16-byte aligned");
}

// Window cache [num_blocks, 2, block_size, Hkv, d], bf16 or fp16.
inline void check_window_cache(const torch::Tensor& w, const torch::Device& dev, int64_t hkv, int64_t d) {
  check_cuda(w, "window_cache", dev);
  TORCH_CHECK(w.dim() == 5 && w.size(1) == 2 && w.size(3) == hkv && w.size(4) == d, "oscar: window_cache must be "
              "[num_blocks, 2, block_size, ", num(hkv), ", ", num(d), "], got shape ", shape_str(w));
  check_rows_aligned(w, "window_cache", 8);
}

}  // namespace oscar
