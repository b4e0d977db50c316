"""Every change vllm-oscar makes to vLLM internals, in one module (vLLM 0.26.0).

vLLM 0.26 has no extension point for a new ``--kv-cache-dtype`` (RFC #51751 / PR #52670 propose one),
so the plugin patches the few places that decide what a cache dtype is and which backend serves a
layer. Each patch names its target in :data:`PATCH_TARGETS`; ``tests/vllm/test_canaries.py`` checks
every target still exists with the shape the patch expects, so a vLLM upgrade that moves one fails
loudly in CI instead of silently at serve time.

=====  ==========================================================  ====================================
 #     target (vLLM 0.26.0)                                        why
=====  ==========================================================  ====================================
 1     ``config.cache.CacheDType`` (+ pydantic rebuild of           argparse choices, pydantic validation
       ``CacheConfig`` and ``SpeculativeConfig``)                   and the selector's assert accept
                                                                    ``oscar_int2``
 2     ``utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE``               the storage dtype (``uint8``)
 3     ``v1.attention.backends.registry`` ``CUSTOM`` slot           ``AttentionBackendEnum[get_name()]``
 4     ``v1.attention.selector._cached_get_attn_backend``           OSCAR layers get the OSCAR backend;
                                                                    skip layers keep vLLM's choice
 5     ``Attention.__init__``                                       attach the BF16-window companion
                                                                    layer to every OSCAR layer
 6     ``Attention.get_kv_cache_spec``                              the true INT2 page size
 7     ``EngineArgs.create_engine_config``                          resolve ``--additional-config``,
                                                                    refuse unsupported setups early
 8     ``KVCacheSpecRegistry._ensure_registered``                   register the window spec/manager
                                                                    after vLLM's built-ins, lazily
 9     ``v1.core.kv_cache_utils._check_enough_kv_cache_memory``     refuse pools that cannot admit one
                                                                    request (window admission cap)
10     ``model_executor.model_loader.utils`` and ``.base_loader``   fold R_V into ``o_proj`` after the
       ``process_weights_after_loading``                            weights are processed
                                                                    (``attention/fold.py``)
11     ``platforms.interface.Platform``                             skip-listed BF16 layers pad to the
       ``._align_heterogeneous_kv_block_size``                      real INT2 page (vLLM sizes uint8 at
                                                                    2d bytes a token and doubled the
                                                                    block size)
=====  ==========================================================  ====================================

:func:`apply` is idempotent (every wrapper is marked, so a second call is a no-op) and spawn-safe (it
only touches Python objects, never CUDA or ``current_platform``), as vLLM calls general plugins in
the API server, the engine core and every worker.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any

# A child of vLLM's "vllm" logger: same handler, format and level as vLLM's own messages.
logger = logging.getLogger("vllm.oscar")

OSCAR_CACHE_DTYPE = "oscar_int2"
#: The vLLM release every patch below was written and verified against.
SUPPORTED_VLLM_VERSION = "0.26.0"
#: Marker attribute on every wrapper this module installs (idempotency).
_WRAPPED = "__vllm_oscar_wrapped__"
#: Qualified name of the OSCAR backend, as vLLM's registry wants it.
OSCAR_BACKEND_QUALNAME = "vllm_oscar.attention.backend.OscarAttentionBackend"


@dataclass(frozen=True)
class PatchTarget:
    """One object in vLLM that :func:`apply` changes; ``kind`` says what the canary checks."""

    module: str
    attr: str
    kind: str  # "literal" | "dict" | "function" | "method" | "classmethod" | "enum-member"
    why: str

    def resolve(self) -> Any:
        obj: Any = importlib.import_module(self.module)
        for part in self.attr.split("."):
            obj = getattr(obj, part)
        return obj


PATCH_TARGETS: tuple[PatchTarget, ...] = (
    PatchTarget("vllm.config.cache", "CacheDType", "literal", "the cache dtype Literal (argparse, pydantic)"),
    PatchTarget("vllm.config.cache", "CacheConfig", "pydantic-dataclass", "rebuilt after the Literal grows"),
    PatchTarget("vllm.config.speculative", "SpeculativeConfig", "pydantic-dataclass", "has a CacheDType field"),
    PatchTarget("vllm.utils.torch_utils", "STR_DTYPE_TO_TORCH_DTYPE", "dict", "cache dtype -> storage dtype"),
    PatchTarget("vllm.v1.attention.backends.registry", "AttentionBackendEnum.CUSTOM", "enum-member",
                "the out-of-tree backend slot"),
    PatchTarget("vllm.v1.attention.backends.registry", "register_backend", "function", "fills the CUSTOM slot"),
    PatchTarget("vllm.v1.attention.selector", "_cached_get_attn_backend", "function",
                "per-layer backend choice (called by name from get_attn_backend)"),
    PatchTarget("vllm.model_executor.layers.attention.attention", "Attention.__init__", "method",
                "attaches the window companion"),
    PatchTarget("vllm.model_executor.layers.attention.attention", "Attention.get_kv_cache_spec", "method",
                "INT2 page size"),
    PatchTarget("vllm.engine.arg_utils", "EngineArgs.create_engine_config", "method",
                "config resolution + startup refusals"),
    PatchTarget("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered", "classmethod",
                "lazy spec/manager registration"),
    PatchTarget("vllm.v1.core.kv_cache_utils", "_check_enough_kv_cache_memory", "function",
                "start-up pool check (called by name from get_kv_cache_configs)"),
    PatchTarget("vllm.model_executor.model_loader.utils", "process_weights_after_loading", "function",
                "folds R_V into o_proj once the weights are processed"),
    PatchTarget("vllm.model_executor.model_loader.base_loader", "process_weights_after_loading", "function",
                "the same function, imported by name: what BaseModelLoader.load_model calls"),
    PatchTarget("vllm.platforms.interface", "Platform._align_heterogeneous_kv_block_size", "classmethod",
                "block size and padded page of skip-listed BF16 layers sharing the pool"),
)

_applied = False


def missing_targets() -> list[str]:
    """Patch targets that do not exist in the installed vLLM (empty when every patch can apply)."""
    missing = []
    for t in PATCH_TARGETS:
        try:
            t.resolve()
        except (ImportError, AttributeError) as exc:
            missing.append(f"{t.module}.{t.attr} ({type(exc).__name__}: {exc})")
    return missing


def apply() -> None:
    """Install every patch once per process; later calls return immediately."""
    global _applied
    if _applied:
        return
    import vllm

    if vllm.__version__ != SUPPORTED_VLLM_VERSION:
        logger.warning(
            "vllm-oscar was written and tested against vLLM %s; this is vLLM %s. The patches are applied "
            "if their targets exist; run `pytest tests/vllm/test_canaries.py` to check this vLLM.",
            SUPPORTED_VLLM_VERSION, vllm.__version__,
        )
    missing = missing_targets()
    if missing:
        # Never half-patch: without these objects the OSCAR path cannot work, and a partial patch could
        # break plain vLLM use. Leaving `oscar_int2` unregistered makes vLLM reject the dtype by name.
        logger.error(
            "vllm-oscar is disabled: this vLLM (%s) lacks objects the plugin patches: %s. "
            "`--kv-cache-dtype oscar_int2` is unavailable; install vllm==%s.",
            vllm.__version__, "; ".join(missing), SUPPORTED_VLLM_VERSION,
        )
        return
    other = _custom_slot_owner()
    if other is not None and other != OSCAR_BACKEND_QUALNAME:
        logger.error(
            "vllm-oscar is disabled: vLLM's single CUSTOM attention-backend slot is taken by %s. Uninstall that "
            "plugin or leave it out of VLLM_PLUGINS to use --kv-cache-dtype oscar_int2.", other,
        )
        return
    _register_cache_dtype()
    _register_storage_dtype()
    _register_backend()
    _wrap_selector()
    _wrap_attention_init()
    _wrap_attention_kv_cache_spec()
    _wrap_create_engine_config()
    _wrap_spec_registry()
    _wrap_kv_memory_check()
    _wrap_weight_processing()
    _wrap_heterogeneous_block_alignment()
    _applied = True


def is_wrapped(obj: Any) -> bool:
    return getattr(obj, _WRAPPED, False)


def _mark(fn):
    setattr(fn, _WRAPPED, True)
    return fn


# ------------------------------------------------------------------------------------------------
# 1-2. The dtype name and its storage dtype (the compat shim)
# ------------------------------------------------------------------------------------------------


def _register_cache_dtype() -> None:
    """Make ``oscar_int2`` a valid ``CacheDType``.

    Compat shim: a vLLM with the proposed ``register_kv_cache_dtype`` API (PR #52670) gets the official
    call; vLLM 0.26 gets the Literal extended in place (the selector asserts against
    ``get_args(CacheDType)`` of the same object) plus a pydantic rebuild, because the Literal is compiled
    into ``CacheConfig``'s schema when the class is created.
    """
    from vllm.config import cache as cache_mod

    official = getattr(cache_mod, "register_kv_cache_dtype", None)
    if official is not None:  # pragma: no cover - not in vLLM 0.26
        official(OSCAR_CACHE_DTYPE)
        return
    lit = cache_mod.CacheDType
    if OSCAR_CACHE_DTYPE in lit.__args__:
        return
    lit.__args__ = (*lit.__args__, OSCAR_CACHE_DTYPE)
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config.speculative import SpeculativeConfig

    rebuild_dataclass(cache_mod.CacheConfig, force=True)
    rebuild_dataclass(SpeculativeConfig, force=True)


def _register_storage_dtype() -> None:
    import torch
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    # The cache is raw bytes: INT2 codes and fp16 scale/offset pairs laid out by Int2PageLayout.
    STR_DTYPE_TO_TORCH_DTYPE.setdefault(OSCAR_CACHE_DTYPE, torch.uint8)


# ------------------------------------------------------------------------------------------------
# 3-4. Backend registration and per-layer selection
# ------------------------------------------------------------------------------------------------


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, OSCAR_BACKEND_QUALNAME)


def _custom_slot_owner() -> str | None:
    """The class registered in vLLM's CUSTOM backend slot, if any."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:
        return None


def _wrap_selector() -> None:
    from vllm.v1.attention import selector

    original = selector._cached_get_attn_backend
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def _cached_get_attn_backend(backend, attn_selector_config, num_heads=None):
        # Only layers whose effective dtype is oscar_int2 come here; skip-listed layers already had their
        # dtype reset to "auto" by Attention.__init__ and keep vLLM's normal choice (FA3, FlashInfer...).
        if attn_selector_config.kv_cache_dtype == OSCAR_CACHE_DTYPE:
            from vllm.config import get_current_vllm_config_or_none

            from vllm_oscar.attention.selection import select_oscar_backend
            from vllm_oscar.runtime_config import get_resolved

            # Called while the model is built, under the engine's config: its resolved scale_dtype picks
            # the backend class whose get_kv_cache_shape matches the pages (OscarAttentionBackendU8).
            # Without an engine config (direct calls, as in tests) there are no pages to match.
            vllm_config = get_current_vllm_config_or_none()
            params = "fp16" if vllm_config is None or vllm_config.model_config is None else (
                get_resolved(vllm_config).layout_params)
            return select_oscar_backend(attn_selector_config, num_heads, params)
        return original(backend, attn_selector_config, num_heads)

    selector._cached_get_attn_backend = _mark(_cached_get_attn_backend)


# ------------------------------------------------------------------------------------------------
# 5-6. The Attention layer: window companion and KV-cache spec
# ------------------------------------------------------------------------------------------------


def _wrap_attention_init() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.__init__
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self, "kv_cache_dtype", None) == OSCAR_CACHE_DTYPE:
            from vllm_oscar.attention.window import attach_window_companion

            attach_window_companion(self)

    Attention.__init__ = _mark(__init__)


def _wrap_attention_kv_cache_spec() -> None:
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        if getattr(self, "kv_cache_dtype", None) == OSCAR_CACHE_DTYPE:
            from vllm_oscar.attention.specs import oscar_layer_spec

            return oscar_layer_spec(self, vllm_config)
        if vllm_config.cache_config.cache_dtype == OSCAR_CACHE_DTYPE:
            from vllm_oscar.attention.specs import check_skip_layer

            check_skip_layer(self, vllm_config)  # a BF16 layer sharing the block pool with INT2 pages
        return original(self, vllm_config)

    Attention.get_kv_cache_spec = _mark(get_kv_cache_spec)


# ------------------------------------------------------------------------------------------------
# 7. Engine configuration: resolve the OSCAR settings once, refuse what cannot work
# ------------------------------------------------------------------------------------------------


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        if vllm_config.cache_config.cache_dtype == OSCAR_CACHE_DTYPE:
            from vllm_oscar.runtime_config import prepare_engine_config

            # In the front-end process, before any worker starts: errors surface as a plain ValueError
            # from `vllm serve` / `LLM(...)`, and the data-free warning is printed exactly once.
            prepare_engine_config(vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = _mark(create_engine_config)


# ------------------------------------------------------------------------------------------------
# 8. KV-cache spec registry
# ------------------------------------------------------------------------------------------------


def _wrap_spec_registry() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    original = KVCacheSpecRegistry.__dict__["_ensure_registered"].__func__
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def _ensure_registered(cls, vllm_config=None):
        # vLLM fills its built-in specs only while the registry is empty, so registering ours at plugin
        # load would leave FullAttentionSpec & co. unregistered. Hooking the lazy fill registers ours
        # right after vLLM's, in whichever process first looks a spec up (engine core, tests).
        original(cls, vllm_config)
        from vllm_oscar.attention.window import register_window_spec

        register_window_spec()

    KVCacheSpecRegistry._ensure_registered = classmethod(_mark(_ensure_registered))


# ------------------------------------------------------------------------------------------------
# 9. Start-up KV pool check
# ------------------------------------------------------------------------------------------------


def _wrap_kv_memory_check() -> None:
    from vllm.v1.core import kv_cache_utils

    original = kv_cache_utils._check_enough_kv_cache_memory
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def _check_enough_kv_cache_memory(available_memory, get_needed_memory, max_model_len, estimate_max_model_len):
        original(available_memory, get_needed_memory, max_model_len, estimate_max_model_len)
        from vllm_oscar.attention.window import check_pool_admits_one_request

        check_pool_admits_one_request(available_memory, get_needed_memory, max_model_len)

    # get_kv_cache_configs looks the name up in the module at call time: replacing the attribute suffices.
    kv_cache_utils._check_enough_kv_cache_memory = _mark(_check_enough_kv_cache_memory)


def _wrap_weight_processing() -> None:
    from vllm.model_executor.model_loader import base_loader
    from vllm.model_executor.model_loader import utils as loader_utils

    original = loader_utils.process_weights_after_loading
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def process_weights_after_loading(model, model_config, target_device):
        original(model, model_config, target_device)
        # After every layer's own processing: the attention layers have loaded their rotations by now.
        from vllm_oscar.attention.fold import fold_after_loading

        fold_after_loading(model)

    wrapped = _mark(process_weights_after_loading)
    loader_utils.process_weights_after_loading = wrapped
    # BaseModelLoader.load_model calls the name it imported, so that module's binding is replaced as well.
    base_loader.process_weights_after_loading = wrapped


# ------------------------------------------------------------------------------------------------
# 11. Skip-listed BF16 layers sharing the block pool with INT2 pages
# ------------------------------------------------------------------------------------------------


def _wrap_heterogeneous_block_alignment() -> None:
    from vllm.platforms.interface import Platform

    original = Platform.__dict__["_align_heterogeneous_kv_block_size"].__func__
    if is_wrapped(original):
        return

    @functools.wraps(original)
    def _align_heterogeneous_kv_block_size(cls, vllm_config, backend_cls):
        # vLLM sizes the primary cache by its storage dtype (uint8: 2 * head_dim bytes a token and KV head),
        # so with skip layers it doubled the block size to cover a BF16 page, and sliding-window skip layers
        # (16-token pages either way) were padded to an INT2 page twice their size: 2.1x their memory on a
        # Gemma 3 model, where they are 40 of 48 layers. OSCAR's pages already cover a BF16 page of the
        # cache block size (attention/specs.py): keep the block size, pad the skip layers to the INT2 page.
        if vllm_config.cache_config.cache_dtype != OSCAR_CACHE_DTYPE:
            return original(cls, vllm_config, backend_cls)
        from vllm_oscar.attention.specs import align_skip_layer_pages

        align_skip_layer_pages(vllm_config)

    Platform._align_heterogeneous_kv_block_size = classmethod(_mark(_align_heterogeneous_kv_block_size))
