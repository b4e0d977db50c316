// Registers the oscar:: ops. Loading vllm_oscar._C runs this; the fake (meta) implementations for
// torch.compile live in vllm_oscar/ops/_library.py and the documented wrappers in vllm_oscar/ops.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(oscar, m) {
  m.def(
      "store_kv(Tensor key, Tensor value, Tensor! kv_cache, Tensor slot_mapping, Tensor? rotation_k, "
      "Tensor? rotation_v, float k_clip_ratio, float v_clip_ratio, Tensor!? window_cache=None, "
      "Tensor? window_slot_mapping=None, int levels=0, int params=0) -> ()");
  m.impl("store_kv", torch::kCUDA, &oscar::store_kv);

  m.def(
      "decode(Tensor! out, Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor? window_cache, Tensor? window_block_table, Tensor? rotation_k, Tensor? rotation_v, "
      "int sink, int recent, float scale, Tensor! workspace, Tensor! semaphores, int num_splits, int params=0) -> ()");
  m.impl("decode", torch::kCUDA, &oscar::decode);
  m.def(
      "store_and_decode(Tensor! out, Tensor q, Tensor key, Tensor value, Tensor! kv_cache, Tensor slot_mapping, "
      "Tensor block_table, Tensor seq_lens, Tensor!? window_cache, Tensor? window_slot_mapping, "
      "Tensor? window_block_table, Tensor? rotation_k, Tensor? rotation_v, Tensor? output_rotation_v, "
      "float k_clip_ratio, float v_clip_ratio, int levels, int sink, int recent, float scale, Tensor! workspace, "
      "Tensor! semaphores, int num_splits, int params=0) -> ()");
  m.impl("store_and_decode", torch::kCUDA, &oscar::store_and_decode);

  m.def(
      "gather_prefix(Tensor! key_out, Tensor! value_out, Tensor kv_cache, Tensor block_table, "
      "Tensor cu_seqlens, Tensor? prefix_lens, Tensor? window_cache, Tensor? window_block_table, "
      "Tensor? window_starts, int sink, int params=0) -> ()");
  m.impl("gather_prefix", torch::kCUDA, &oscar::gather_prefix);

  // Sizes the Python workspace helpers need (no tensors: usable on any machine).
  m.def("decode_window_tile(int head_dim) -> int", &oscar::decode_window_tile);
  m.def("decode_max_split_heads(int head_dim, int group) -> int", &oscar::decode_max_split_heads);
  m.def("decode_ctas_per_sm(int head_dim, int group) -> int", &oscar::decode_ctas_per_sm);
  m.def("decode_window_ctas(int n_tiles, int num_splits, int window_splits, int head_dim) -> int",
        &oscar::decode_window_ctas);
  // The one query that needs a GPU: the device's occupancy of the decode kernel decode_ctas_per_sm assumes.
  m.def("decode_occupancy(int head_dim, int group, int params=0) -> int", &oscar::decode_occupancy);
}

// `import vllm_oscar._C` needs a module init; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
