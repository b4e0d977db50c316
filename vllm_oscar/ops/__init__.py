"""OSCAR ops: the plain-PyTorch spec (:mod:`vllm_oscar.ops.reference`) and the CUDA kernels."""
