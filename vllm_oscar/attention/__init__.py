"""The OSCAR attention backend for vLLM (imports vLLM; loaded lazily by ``vllm_oscar.vllm_patches``).

* :mod:`~vllm_oscar.attention.backend`: ``OscarAttentionBackend`` / ``Impl`` / ``Metadata`` / ``MetadataBuilder``
* :mod:`~vllm_oscar.attention.window`: the BF16 sink + recent windows as a KV-cache group of their own
* :mod:`~vllm_oscar.attention.specs`: KV-cache specs and the block-size rule
* :mod:`~vllm_oscar.attention.selection`: which layers OSCAR serves, and the start-up errors for the rest
* :mod:`~vllm_oscar.attention.kernels`: the single adapter to ``vllm_oscar.ops`` and FlashAttention
"""
