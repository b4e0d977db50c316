"""Plugin registration: the entry point, idempotence, spawn safety, and what each patch installs."""

from __future__ import annotations

import importlib.metadata
import pickle
import subprocess
import sys
import textwrap
import typing

import pytest
import torch

import vllm_oscar
from vllm_oscar import vllm_patches


def _patched_objects():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention import selector
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    return (selector._cached_get_attn_backend, Attention.__init__, Attention.get_kv_cache_spec,
            EngineArgs.create_engine_config, KVCacheSpecRegistry.__dict__["_ensure_registered"].__func__)


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "oscar"]
    assert len(ours) == 1 and ours[0].value == "vllm_oscar:register"
    assert ours[0].load() is vllm_oscar.register


def test_register_is_idempotent():
    from vllm.config.cache import CacheDType
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_oscar.register()
    first = _patched_objects()
    args_first = typing.get_args(CacheDType)
    # A second register() and a direct second apply() (e.g. a reloaded plugin) must change nothing.
    vllm_oscar.register()
    vllm_patches._applied = False
    vllm_patches.apply()
    assert _patched_objects() == first
    assert typing.get_args(CacheDType) == args_first
    assert typing.get_args(CacheDType).count("oscar_int2") == 1
    assert all(vllm_patches.is_wrapped(f) for f in first)
    # Wrappers are not stacked: each one wraps vLLM's original, not a previous wrapper.
    assert all(not vllm_patches.is_wrapped(f.__wrapped__) for f in first)
    assert STR_DTYPE_TO_TORCH_DTYPE["oscar_int2"] is torch.uint8
    assert AttentionBackendEnum.CUSTOM.get_path() == vllm_patches.OSCAR_BACKEND_QUALNAME


def test_import_does_not_import_vllm():
    # vLLM imports every general plugin's module to find `register`; importing vLLM from there would
    # resolve current_platform while vLLM's plugin loader is still running.
    code = "import sys, vllm_oscar; assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if 'vllm' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugin_loads_through_vllm_in_a_fresh_process():
    # What every spawned vLLM process (API server, engine core, workers) does at start-up.
    code = textwrap.dedent("""
        import typing, pickle
        from vllm.plugins import load_general_plugins
        from vllm.config.cache import CacheDType, CacheConfig
        assert "oscar_int2" not in typing.get_args(CacheDType)
        load_general_plugins()
        assert "oscar_int2" in typing.get_args(CacheDType)
        cfg = CacheConfig(cache_dtype="oscar_int2", block_size=16)
        assert pickle.loads(pickle.dumps(cfg)).cache_dtype == "oscar_int2"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok")


def test_cache_config_accepts_and_pickles_oscar_int2():
    from pydantic import ValidationError
    from vllm.config.cache import CacheConfig

    vllm_oscar.register()
    cfg = CacheConfig(cache_dtype="oscar_int2")
    assert pickle.loads(pickle.dumps(cfg)).cache_dtype == "oscar_int2"
    with pytest.raises(ValidationError):
        CacheConfig(cache_dtype="oscar_int3")


def test_selector_routes_only_oscar_dtype():
    from vllm.v1.attention.selector import AttentionSelectorConfig, _cached_get_attn_backend

    from vllm_oscar.attention.backend import OscarAttentionBackend

    vllm_oscar.register()
    cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="oscar_int2", block_size=None)
    assert _cached_get_attn_backend(None, cfg) is OscarAttentionBackend
    bf16 = cfg._replace(kv_cache_dtype="auto")
    assert _cached_get_attn_backend(None, bf16) is not OscarAttentionBackend


def test_taken_custom_slot_disables_the_plugin_without_breaking_vllm(monkeypatch, caplog):
    import logging

    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES, AttentionBackendEnum

    monkeypatch.setitem(_ATTN_OVERRIDES, AttentionBackendEnum.CUSTOM, "another.plugin.Backend")
    monkeypatch.setattr(vllm_patches, "_applied", False)
    with caplog.at_level(logging.ERROR, logger="vllm.oscar"):
        vllm_patches.apply()
    assert "CUSTOM attention-backend slot is taken by another.plugin.Backend" in caplog.text
    assert vllm_patches._applied is False
    assert _ATTN_OVERRIDES[AttentionBackendEnum.CUSTOM] == "another.plugin.Backend"


def test_missing_vllm_object_disables_the_plugin(monkeypatch, caplog):
    import logging

    bogus = vllm_patches.PatchTarget("vllm.config.cache", "NoSuchThing", "literal", "test")
    monkeypatch.setattr(vllm_patches, "PATCH_TARGETS", (*vllm_patches.PATCH_TARGETS, bogus))
    monkeypatch.setattr(vllm_patches, "_applied", False)
    with caplog.at_level(logging.ERROR, logger="vllm.oscar"):
        vllm_patches.apply()
    assert "vllm.config.cache.NoSuchThing" in caplog.text and "oscar_int2` is unavailable" in caplog.text
    assert vllm_patches._applied is False
