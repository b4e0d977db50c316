"""Canaries: fail loudly when vLLM moves or reshapes anything vllm-oscar patches or relies on.

A failure here means "re-verify the integration against this vLLM", not a flaky test. Each check names
the object and what the plugin assumes about it (see vllm_oscar/vllm_patches.py and
docs/vllm-integration.md).
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing

import pytest

from vllm_oscar import vllm_patches
from vllm_oscar.attention.fold import FOLDABLE_ATTENTION_CLASSES


def _params(fn) -> list[str]:
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def test_vllm_is_the_pinned_release():
    import vllm

    assert vllm.__version__ == vllm_patches.SUPPORTED_VLLM_VERSION, (
        f"vllm-oscar is pinned to vLLM {vllm_patches.SUPPORTED_VLLM_VERSION}; re-run these canaries and update "
        "the pin only once they all pass on the new version"
    )


@pytest.mark.parametrize("target", vllm_patches.PATCH_TARGETS, ids=lambda t: f"{t.module}.{t.attr}")
def test_patch_target_exists(target):
    target.resolve()  # ImportError / AttributeError = vLLM moved it


def test_cache_dtype_is_still_a_closed_literal():
    from vllm.config import cache

    assert typing.get_origin(cache.CacheDType) is typing.Literal
    # If CacheConfig.cache_dtype ever accepts any str (or vLLM ships register_kv_cache_dtype), the
    # Literal patch should give way to the official route in vllm_patches._register_cache_dtype.
    assert cache.CacheConfig.__dataclass_fields__["cache_dtype"].type in ("CacheDType", cache.CacheDType)
    assert not hasattr(cache, "register_kv_cache_dtype")
    assert hasattr(cache.CacheConfig, "__pydantic_validator__")


def test_selector_calls_the_cached_function_by_module_global_name():
    from vllm.v1.attention import selector

    assert _params(selector._cached_get_attn_backend) == ["backend", "attn_selector_config", "num_heads"]
    # get_attn_backend looks the function up in the module namespace at call time, so replacing the
    # module attribute is enough (a `from ... import` elsewhere would bypass the wrapper).
    assert "_cached_get_attn_backend(" in inspect.getsource(selector.get_attn_backend)
    assert {"kv_cache_dtype", "use_mla", "has_sink", "has_sliding_window", "attn_type", "head_size", "dtype",
            "use_kv_connector", "use_pcp"} <= set(selector.AttentionSelectorConfig._fields)


def test_backend_class_choice_sees_the_engine_config():
    """The wrapped selector picks the backend class by the engine's resolved scale_dtype (its
    get_kv_cache_shape gets sizes only), reading the config Attention.__init__ runs under."""
    from vllm.config import get_current_vllm_config_or_none, set_current_vllm_config
    from vllm.model_executor.layers.attention import attention

    assert get_current_vllm_config_or_none() is None  # outside any engine config: None, no assertion
    assert "get_attn_backend(" in inspect.getsource(attention.Attention.__init__)
    assert "vllm_config" in _params(set_current_vllm_config)


def test_attention_layer_contract():
    from vllm.model_executor.layers.attention.attention import Attention

    init = inspect.unwrap(Attention.__init__)
    assert {"num_heads", "head_size", "scale", "num_kv_heads", "cache_config", "prefix"} <= set(_params(init))
    src = inspect.getsource(init)
    # The window companion relies on: skip layers get "auto" here, the layer registers itself by prefix,
    # and the backend name indexes AttentionBackendEnum.
    assert 'kv_cache_dtype = "auto"' in src
    assert "compilation_config.static_forward_context[prefix] = self" in src
    assert "AttentionBackendEnum[self.attn_backend.get_name()]" in src
    assert _params(Attention.get_kv_cache_spec) == ["self", "vllm_config"]
    assert _params(Attention.process_weights_after_loading) == ["self", "act_dtype"]


def test_engine_args_and_spec_registry_signatures():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert _params(EngineArgs.create_engine_config) == ["self", "usage_context", "headless"]
    assert "create_engine_config" not in AsyncEngineArgs.__dict__  # `vllm serve` inherits the wrapped method
    raw = KVCacheSpecRegistry.__dict__["_ensure_registered"]
    assert isinstance(raw, classmethod) and _params(raw.__func__) == ["cls", "vllm_config"]
    assert _params(KVCacheSpecRegistry.register) == ["kvcache_spec_cls", "manager_class", "uniform_type_base_spec"]


def test_custom_backend_slot():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert AttentionBackendEnum.CUSTOM.value is None


def test_sliding_window_manager_hooks_the_window_manager_overrides():
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    expected = {
        "remove_skipped_blocks": ["self", "request_id", "processed_computed_tokens", "num_prompt_tokens"],
        "get_num_blocks_to_allocate": ["self", "request_id", "num_tokens", "new_computed_blocks",
                                       "total_computed_tokens", "num_local_computed_tokens", "num_tokens_main_model",
                                       "apply_admission_cap"],
        "add_local_computed_blocks": ["self", "request_id", "new_computed_blocks", "num_local_computed_tokens",
                                      "num_external_computed_tokens"],
        "find_longest_cache_hit": ["cls", "block_hashes", "max_length", "kv_cache_group_ids", "block_pool",
                                   "kv_cache_spec", "drop_eagle_block", "alignment_tokens", "dcp_world_size",
                                   "pcp_world_size"],
        "reachable_block_mask": ["cls", "start_block", "end_block", "alignment_tokens", "kv_cache_spec", "use_eagle",
                                 "retention_interval", "reachable_boundaries"],
        "_remove_blocks_in_range": ["self", "request_id", "first_block", "last_block"],
        "get_num_skipped_tokens": ["self", "num_computed_tokens"],
    }
    for name, params in expected.items():
        fn = getattr(SlidingWindowManager, name)
        got = _params(fn.__func__ if inspect.ismethod(fn) else fn)
        assert got == params, f"SlidingWindowManager.{name}{got} changed (OscarWindowManager overrides it)"


def test_kv_cache_utils_behaviour_the_windows_rely_on():
    from vllm.v1.core import kv_cache_utils, single_type_kv_cache_manager
    from vllm.v1.kv_cache_interface import AttentionSpec, SlidingWindowSpec

    # One page size for every group; padding allowed for block-stride-indexed backends.
    assert "indexes_kv_by_block_stride" in inspect.getsource(kv_cache_utils.unify_kv_cache_spec_page_size)
    assert {"page_size_padded", "indexes_kv_by_block_stride"} <= set(AttentionSpec.__dataclass_fields__)
    # The admission cap comes from the spec for every SlidingWindowSpec subclass.
    src = inspect.getsource(single_type_kv_cache_manager.get_manager_for_kv_cache_spec)
    assert "max_admission_blocks_per_request" in src and "SlidingWindowSpec" in src
    assert _params(SlidingWindowSpec.max_admission_blocks_per_request) == [
        "self", "max_in_flight_tokens", "max_model_len"]
    assert _params(SlidingWindowSpec.max_memory_usage_bytes) == ["self", "vllm_config"]


def test_start_up_pool_check_is_called_by_name_with_the_groups():
    """Patch 9 relies on get_kv_cache_configs calling the module-global check with vLLM's
    ``partial(_max_memory_usage_bytes_from_groups, vllm_config, groups)`` (our check reads its args)."""
    from vllm.v1.core import kv_cache_utils

    assert _params(kv_cache_utils._check_enough_kv_cache_memory) == [
        "available_memory", "get_needed_memory", "max_model_len", "estimate_max_model_len"]
    src = inspect.getsource(kv_cache_utils.get_kv_cache_configs)
    assert "_check_enough_kv_cache_memory(" in src
    assert "partial(_max_memory_usage_bytes_from_groups, vllm_config, groups)" in src
    assert _params(kv_cache_utils._pool_bytes_per_block) == ["vllm_config", "kv_cache_groups"]


def test_runtime_objects_the_impl_reads():
    from vllm.forward_context import ForwardContext
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.worker.gpu.attn_utils import _reshape_attention_kv_cache

    # The OSCAR impl finds its window companion's cache, metadata and slot mapping here.
    assert {"no_compile_layers", "attn_metadata", "slot_mapping"} <= set(ForwardContext.__dataclass_fields__)
    assert {"seq_lens_cpu_upper_bound", "query_start_loc_cpu", "block_table_tensor",
            "slot_mapping"} <= set(CommonAttentionMetadata.__dataclass_fields__)
    # The companion implements every abstract method of the layer base class.
    assert AttentionLayerBase.__abstractmethods__ == {"get_attn_backend", "get_kv_cache_spec"}
    # Padded window pages are viewed with the block stride.
    assert "page_size_padded" in inspect.getsource(_reshape_attention_kv_cache)


def test_weight_processing_hook_is_what_the_loader_calls():
    from vllm.model_executor.model_loader import base_loader
    from vllm.model_executor.model_loader import utils as loader_utils

    assert _params(loader_utils.process_weights_after_loading) == ["model", "model_config", "target_device"]
    # BaseModelLoader.load_model calls the name base_loader imported; the fold wrapper replaces both bindings.
    assert "process_weights_after_loading(model, model_config, target_device)" in inspect.getsource(
        base_loader.BaseModelLoader.load_model)
    # The attention layers load their rotations in this function, before the fold runs after it.
    assert "module.process_weights_after_loading(model_config.dtype)" in inspect.getsource(
        inspect.unwrap(loader_utils.process_weights_after_loading))


@pytest.mark.parametrize("cls_name", sorted(FOLDABLE_ATTENTION_CLASSES))
def test_foldable_attention_feeds_o_proj_directly(cls_name):
    """R_V folds into o_proj only if the attention output reaches o_proj unchanged (attention/fold.py)."""
    cls = getattr(importlib.import_module(FOLDABLE_ATTENTION_CLASSES[cls_name]), cls_name)
    src = inspect.getsource(cls.forward)
    body = [ln.strip() for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    i = next((k for k, ln in enumerate(body) if re.fullmatch(r"attn_output = self\.attn\(.*\)", ln)), None)
    assert i is not None, f"{cls_name}.forward no longer computes `attn_output = self.attn(...)`"
    assert re.fullmatch(r"output, _ = self\.o_proj\(attn_output\)", body[i + 1]), (
        f"{cls_name}.forward does something between attention and o_proj ({body[i + 1]!r}): folding R_V into "
        "o_proj would be wrong; drop it from FOLDABLE_ATTENTION_CLASSES"
    )
