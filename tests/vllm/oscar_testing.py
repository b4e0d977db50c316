"""Helpers shared by the CPU tests of the vLLM integration (imported by the tests and conftest)."""

from __future__ import annotations

import json

import torch


def write_model(path, *, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, architecture="LlamaForCausalLM",
                max_position_embeddings=4096, **extra) -> str:
    """A Llama-shaped ``config.json`` (what vLLM needs to build a config; weights are never loaded)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": [architecture], "model_type": "llama" if "Llama" in architecture else "qwen3",
        "hidden_size": num_heads * head_dim, "intermediate_size": 2 * num_heads * head_dim,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "num_hidden_layers": num_layers, "vocab_size": 1024, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "rope_theta": 10000.0, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, **extra,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def engine_config(model: str, *, kv_cache_dtype: str = "oscar_int2", block_size: int = 16, max_model_len: int = 2048,
                  **kwargs):
    """``EngineArgs(...).create_engine_config()`` for a weightless model (the first call takes ~8 s: vLLM
    inspects the model registry once per process)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, kv_cache_dtype=kv_cache_dtype, skip_tokenizer_init=True, load_format="dummy",
                      max_model_len=max_model_len, block_size=block_size, **kwargs).create_engine_config()


def build_attention_layers(vllm_config, num_layers: int | None = None):
    """Construct the model's ``Attention`` layers the way a model does (under the current config)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    mc = vllm_config.model_config
    text = mc.hf_text_config
    n = num_layers if num_layers is not None else text.num_hidden_layers
    hq, hkv, d = text.num_attention_heads, text.num_key_value_heads, mc.get_head_size()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(mc.dtype)  # model construction runs under the model dtype
    try:
        with set_current_vllm_config(vllm_config):
            return [Attention(hq, d, d**-0.5, hkv, cache_config=vllm_config.cache_config,
                              prefix=f"model.layers.{i}.self_attn.attn") for i in range(n)]
    finally:
        torch.set_default_dtype(prev)


def collect_specs(vllm_config):
    """KV-cache specs as a CUDA worker makes them: after loading the model the executor lets the platform
    settle the block size (``Platform.update_block_size_for_backend``; the CUDA platform uses the base
    implementation, vLLM's CPU platform its own), then the V2 model runner collects one spec per layer."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms.interface import Platform
    from vllm.v1.worker.gpu.attn_utils import get_kv_cache_spec

    Platform.update_block_size_for_backend.__func__(Platform, vllm_config)
    with set_current_vllm_config(vllm_config):
        return get_kv_cache_spec(vllm_config)


# ------------------------------------------------------------------------------------------------
# Driving vLLM's KV-cache manager the way the scheduler does
# ------------------------------------------------------------------------------------------------


def build_kv_manager(model: str, *, oscar: dict, num_blocks: int | None = None, memory: int = 64 << 20,
                     max_model_len: int = 2048):
    """``(vllm_config, kv_cache_config, KVCacheManager)`` for ``model`` under oscar_int2."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    cfg = engine_config(model, max_model_len=max_model_len, additional_config={"oscar": dict(oscar)})
    cfg.compilation_config.static_forward_context.clear()
    build_attention_layers(cfg)
    specs = collect_specs(cfg)
    if num_blocks is not None:
        cfg.cache_config.num_gpu_blocks_override = num_blocks
    kv = get_kv_cache_configs(cfg, [specs], [memory])[0]
    return cfg, kv, make_manager(cfg, kv)


def make_manager(cfg, kv):
    """vLLM's scheduler-side ``KVCacheManager`` for a ``KVCacheConfig``, with prefix caching."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import init_none_hash, resolve_kv_cache_block_sizes

    sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv, cfg)
    init_none_hash(sha256)
    return KVCacheManager(kv, max_model_len=cfg.model_config.max_model_len, scheduler_block_size=sched_bs,
                          hash_block_size=hash_bs, max_in_flight_tokens=cfg.max_in_flight_tokens, enable_caching=True)


class KVSim:
    """A minimal scheduler loop over ``KVCacheManager`` (one request per call, no async steps)."""

    def __init__(self, cfg, kv, mgr):
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher

        self.cfg, self.kv, self.mgr = cfg, kv, mgr
        self.hasher = get_request_block_hasher(mgr.coordinator.hash_block_size, sha256)
        self.total_blocks = self.free_blocks()
        self.last_chunk = 0
        self._pending_hit: dict[str, tuple] = {}

    @property
    def max_concurrency(self) -> float:
        from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

        return get_kv_cache_capacity(self.cfg, self.kv)[1]

    def charged_blocks_per_request(self) -> int:
        """Blocks vLLM charges one max_model_len request (what its logged concurrency divides by)."""
        page = self.kv.kv_cache_groups[0].kv_cache_spec.page_size_bytes
        return sum(-(-g.kv_cache_spec.max_memory_usage_bytes(self.cfg) // page) for g in self.kv.kv_cache_groups)

    def free_blocks(self) -> int:
        return self.mgr.block_pool.get_num_free_blocks()

    def add(self, rid: str, tokens: list[int]):
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        return Request(rid, list(tokens), SamplingParams(max_tokens=1 << 20), None, block_hasher=self.hasher)

    def hit(self, req):
        blocks, n, _ = self.mgr.get_computed_blocks(req)
        return blocks, n

    def step(self, req, num_new_tokens: int, hit=None):
        """Schedule ``num_new_tokens`` of ``req`` (after an optional prefix hit) and 'run' them.

        Raises ``AssertionError`` when the pool has no room (the scheduler would wait or preempt)."""
        blocks, n_hit = hit if hit is not None else (None, 0)
        out = self.mgr.allocate_slots(req, num_new_tokens, num_new_computed_tokens=n_hit, new_computed_blocks=blocks)
        assert out is not None, f"no free KV blocks for {req.request_id} (+{num_new_tokens} tokens)"
        req.num_computed_tokens += n_hit + num_new_tokens
        self.last_chunk = num_new_tokens
        if req.num_computed_tokens >= req.num_tokens:
            req.append_output_token_ids(5)  # the sampled token: the next step decodes it
        return out

    def preempt(self, req) -> None:
        self.mgr.free(req)
        req.num_computed_tokens = 0

    def block_ids(self, req) -> tuple[list[int], ...]:
        return self.mgr.get_block_ids(req.request_id)
