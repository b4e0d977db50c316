"""Backend selection per layer, KV-cache specs, and vLLM's own block/capacity math for oscar_int2.

Capacities come from vLLM's ``get_kv_cache_configs`` / ``get_kv_cache_capacity`` (what the engine logs
as "GPU KV cache size" and "Maximum concurrency"), on specs collected the way the V2 model runner
collects them, from real ``Attention`` layers.
"""

from __future__ import annotations

import pytest
import torch
from oscar_testing import build_attention_layers, collect_specs, engine_config

from vllm_oscar.attention.backend import OscarAttentionBackend
from vllm_oscar.attention.specs import OscarFullAttentionSpec, int2_block_size
from vllm_oscar.attention.window import OscarWindowLayer, OscarWindowSpec
from vllm_oscar.layout import Int2PageLayout

GIB = 1 << 30


def _kv_config(vllm_config, memory: int):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    vllm_config.compilation_config.static_forward_context.clear()
    build_attention_layers(vllm_config)
    specs = collect_specs(vllm_config)
    kv = get_kv_cache_configs(vllm_config, [specs], [memory])[0]
    tokens, concurrency = get_kv_cache_capacity(vllm_config, kv)
    return specs, kv, tokens, concurrency


def test_selection_routes_oscar_and_skip_layers(tiny_model):
    cfg = engine_config(tiny_model, kv_cache_dtype_skip_layers=["0"])
    layers = build_attention_layers(cfg)
    ctx = cfg.compilation_config.static_forward_context
    assert layers[0].kv_cache_dtype == "auto" and layers[0].attn_backend is not OscarAttentionBackend
    assert getattr(layers[0], "oscar_window_name", None) is None
    assert layers[0].layer_name + ".oscar_window" not in ctx
    for layer in layers[1:]:
        assert layer.kv_cache_dtype == "oscar_int2" and layer.attn_backend is OscarAttentionBackend
        companion = ctx[layer.oscar_window_name]
        assert isinstance(companion, OscarWindowLayer) and companion.primary_name == layer.layer_name
    # The backend name must be the enum member vLLM indexes with (attention.py does Enum[get_name()]).
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    assert layers[1].backend is AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize("d", [64, 128])
def test_specs_carry_the_true_page_sizes(model_factory, d):
    cfg = engine_config(model_factory(f"d{d}", head_dim=d, num_kv_heads=2))
    build_attention_layers(cfg)
    specs = collect_specs(cfg)
    int2 = specs["model.layers.1.self_attn.attn"]
    win = specs["model.layers.1.self_attn.attn.oscar_window"]
    assert isinstance(int2, OscarFullAttentionSpec) and isinstance(win, OscarWindowSpec)
    assert int2.block_size == int2_block_size(16) == 128 and win.block_size == 16
    layout = Int2PageLayout(head_dim=d, block_size=128, num_kv_heads=2)
    assert int2.page_size_bytes == layout.page_bytes  # never FullAttentionSpec's 2*d bytes per uint8 token
    assert win.real_page_size_bytes == 16 * 2 * 2 * d * 2  # BF16 K+V
    assert win.page_size_bytes == int2.page_size_bytes  # padded: one page size for the whole pool
    assert (win.sliding_window, win.sink_tokens, win.sink_blocks) == (256, 64, 4)
    assert win.indexes_kv_by_block_stride and int2.indexes_kv_by_block_stride
    # The backends' tensor shapes fill exactly one page per block.
    shape = OscarAttentionBackend.get_kv_cache_shape(7, 128, 2, d)
    assert shape == (7, 2, layout.head_page_bytes) and torch.Size(shape[1:]).numel() == layout.page_bytes


@pytest.mark.parametrize("d, ratio", [(128, 512 / 72), (64, 256 / 40)])
def test_int2_pages_hold_7_1x_and_6_4x_bf16_tokens(model_factory, d, ratio):
    model = model_factory(f"cap{d}", head_dim=d, num_kv_heads=2)
    off = {"oscar": {"sink_tokens": 0, "recent_tokens": 0}}  # INT2 pages only
    _, kv_oscar, tok_oscar, _ = _kv_config(engine_config(model, additional_config=off), GIB)
    _, kv_bf16, tok_bf16, _ = _kv_config(engine_config(model, kv_cache_dtype="auto"), GIB)
    assert len(kv_oscar.kv_cache_groups) == 1
    physical = kv_oscar.num_blocks * 128 / (kv_bf16.num_blocks * 16)
    assert physical == pytest.approx(ratio, rel=2e-3)  # 7.11x at d=128, 6.40x at d=64
    assert tok_oscar / tok_bf16 == pytest.approx(ratio, rel=2e-3)


def test_qwen3_8b_shape_capacity_at_32k_with_windows(model_factory):
    """The acceptance figure: vLLM's logged max concurrency for 32K requests, Qwen3-8B shape.

    Per request and layer (one KV head): BF16 32768 x 512 B; OSCAR 256 INT2 pages of 128 x 72 B plus the
    window group's pages (4 sink + 17-18 window blocks of 16 BF16 tokens, each padded to the 9216 B INT2
    page). The issue's bar is >= 6.3x; the physical ceiling with a 320-token window is ~6.6x.
    """
    model = model_factory("qwen3-8b-shape", architecture="Qwen3ForCausalLM", num_layers=36, num_heads=32,
                          num_kv_heads=8, head_dim=128, max_position_embeddings=40960)
    cfg = engine_config(model, max_model_len=32768)
    _, kv_o, _, conc_o = _kv_config(cfg, 40 * GIB)
    _, _, _, conc_b = _kv_config(engine_config(model, kv_cache_dtype="auto", max_model_len=32768), 40 * GIB)
    assert [type(g.kv_cache_spec) for g in kv_o.kv_cache_groups] == [OscarFullAttentionSpec, OscarWindowSpec]
    assert all(len(g.layer_names) == 36 for g in kv_o.kv_cache_groups)
    win = kv_o.kv_cache_groups[1].kv_cache_spec
    steady_window_blocks = win.max_memory_usage_bytes(cfg) // win.page_size_bytes
    # sink + the next query's window (255 tokens) + one decode token per batch in flight + 1 (unaligned start)
    assert steady_window_blocks == 4 + -(-(255 + cfg.max_concurrent_batches) // 16) + 1
    per_req = 32768 // 128 + steady_window_blocks
    assert conc_o == pytest.approx(kv_o.num_blocks / per_req, rel=1e-6)
    ratio = conc_o / conc_b
    expected = (32768 * 512) / (per_req * 9216)
    assert ratio == pytest.approx(expected, rel=1e-3)
    assert 6.3 <= ratio < 512 / 72


@pytest.mark.parametrize("d, ratio", [(128, 512 / 68), (64, 256 / 36)])
def test_u8_scale_dtype_pages_hold_7_5x_and_7_1x_bf16_tokens(model_factory, d, ratio):
    """``"scale_dtype": "u8"``: 2-byte (scale, offset) pairs. The spec, the window padding and the backend's
    tensor shape all take the smaller page, and vLLM's capacity follows (68 instead of 72 bytes per token
    and KV head at d=128, 36 instead of 40 at d=64)."""
    from vllm_oscar.attention.backend import OscarAttentionBackendU8
    from vllm_oscar.attention.specs import OscarFullAttentionSpecU8

    model = model_factory(f"capu8{d}", head_dim=d, num_kv_heads=2)
    u8 = {"oscar": {"scale_dtype": "u8"}}
    specs, kv, _, _ = _kv_config(engine_config(model, additional_config={"oscar": {**u8["oscar"], "sink_tokens": 0,
                                                                                    "recent_tokens": 0}}), GIB)
    _, kv_bf16, _, _ = _kv_config(engine_config(model, kv_cache_dtype="auto"), GIB)
    assert kv.num_blocks * 128 / (kv_bf16.num_blocks * 16) == pytest.approx(ratio, rel=2e-3)
    cfg = engine_config(model, additional_config=u8)
    specs, kv, _, _ = _kv_config(cfg, GIB)
    int2 = specs["model.layers.0.self_attn.attn"]
    win = specs["model.layers.0.self_attn.attn.oscar_window"]
    layout = Int2PageLayout(head_dim=d, block_size=128, num_kv_heads=2, params="u8")
    assert type(int2) is OscarFullAttentionSpecU8 and int2.layout == layout
    assert int2.page_size_bytes == layout.page_bytes == win.page_size_bytes
    assert type(int2).merge([int2, int2]).layout == layout  # vLLM merges specs by cls(...): the format stays
    cfg.compilation_config.static_forward_context.clear()
    layers = build_attention_layers(cfg)
    assert all(layer.attn_backend is OscarAttentionBackendU8 for layer in layers)
    shape = OscarAttentionBackendU8.get_kv_cache_shape(7, 128, 2, d)
    assert shape == (7, 2, layout.head_page_bytes)


def test_u8_pairs_with_a_512_token_window_hold_the_defaults_32k_requests(model_factory):
    """README *Choosing a setting*: ``{"scale_dtype": "u8", "recent_tokens": 512}`` spends the 4 bytes per token
    and KV head the u8 pairs save on 256 more BF16 window rows, and a 32K request then takes what it takes
    with the defaults (on the H100, vLLM logged 78.87 against 78.78 concurrent 32K requests). Per request
    and layer: 256 INT2 pages of 128 x 68 B plus the window's pages (4 sink + 33-34 window blocks of 16
    BF16 tokens, each padded to the INT2 page of 8704 B per KV head) against 256 x 9216 B plus 4 + 17-18
    blocks."""
    model = model_factory("qwen3-8b-shape-u8-r512", architecture="Qwen3ForCausalLM", num_layers=36, num_heads=32,
                          num_kv_heads=8, head_dim=128, max_position_embeddings=40960)
    conc = {}
    for name, extra in (("default", {}), ("u8_r512", {"oscar": {"scale_dtype": "u8", "recent_tokens": 512}})):
        cfg = engine_config(model, max_model_len=32768, additional_config=extra)
        _, kv, _, conc[name] = _kv_config(cfg, 40 * GIB)
        win = kv.kv_cache_groups[1].kv_cache_spec
        recent = 512 if extra else 256
        steady = win.max_memory_usage_bytes(cfg) // win.page_size_bytes
        assert win.sliding_window == recent
        assert steady == 4 + -(-(recent - 1 + cfg.max_concurrent_batches) // 16) + 1
        assert win.page_size_bytes == 8 * (8704 if extra else 9216)  # 8 KV heads
        assert conc[name] == pytest.approx(kv.num_blocks / (32768 // 128 + steady), rel=1e-6)
    assert 1.0 <= conc["u8_r512"] / conc["default"] < 1.005  # 1.0010 here, 78.87 / 78.78 = 1.0011 on the H100


def test_skip_layer_backend_that_cannot_pad_is_refused(model_factory):
    # vLLM's CPU backend cannot read padded pages; on CUDA the BF16 layers run FlashAttention, which can.
    cfg = engine_config(model_factory("skip-cpu", head_dim=128), additional_config={"oscar": {"skip_layers": [0]}})
    build_attention_layers(cfg)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.attn is kept in BF16.*cannot pad"):
        collect_specs(cfg)


def test_skip_layers_share_the_pool_with_padded_bf16_pages(model_factory, monkeypatch):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    # Stand in for FlashAttention (num-blocks-first layout, reads pages by the block stride).
    monkeypatch.setattr(CPUAttentionBackend, "indexes_kv_by_block_stride", classmethod(lambda cls: True))
    model = model_factory("skip", num_layers=4, head_dim=128)
    cfg = engine_config(model, additional_config={"oscar": {"skip_layers": [0, 3]}})
    _, kv, _, _ = _kv_config(cfg, GIB)
    kinds = sorted(type(g.kv_cache_spec).__name__ for g in kv.kv_cache_groups)
    assert kinds == ["FullAttentionSpec", "OscarFullAttentionSpec", "OscarWindowSpec"]
    # vLLM would double the block size here (it sizes a uint8 cache at 2*d bytes a token, so a 16-token
    # quantized page would not cover a BF16 one); patch 11 keeps 16: the 128-token INT2 page already covers
    # a 16-token BF16 page, which pads up to it (9216 against 8192 bytes per KV head at d=128).
    assert cfg.cache_config.block_size == 16
    pages = {g.kv_cache_spec.page_size_bytes for g in kv.kv_cache_groups}
    assert pages == {Int2PageLayout(head_dim=128, block_size=128, num_kv_heads=2).page_bytes}
    assert cfg.cache_config.skip_page_size_padded == Int2PageLayout(128, 128, 2).page_bytes
    bf16 = next(g for g in kv.kv_cache_groups if type(g.kv_cache_spec).__name__ == "FullAttentionSpec")
    assert sorted(bf16.layer_names) == ["model.layers.0.self_attn.attn", "model.layers.3.self_attn.attn"]


def test_sliding_window_skip_layers_pad_to_the_int2_page_not_twice_it(tmp_path, monkeypatch):
    """A Gemma 3-shaped model (head_dim 256, five sliding-window layers per global one): its sliding-window
    layers stay BF16 (``--kv-cache-dtype-skip-layers sliding_window``) and pick their block within
    ``skip_page_size_padded``. Before patch 11 that was vLLM's estimate (a 32-token uint8 page = a
    16-token BF16 page) while OSCAR's pages followed the doubled block size (256 INT2 tokens), so every
    sliding-window page was padded to 2.1x its size: on the H100 a Gemma 3 12B shape held 8.5 requests
    of 8K against BF16's 15.4 (benchmarks/results/e2e-h100-gemma3-12b.json, earlier run)."""
    import json

    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    monkeypatch.setattr(CPUAttentionBackend, "indexes_kv_by_block_stride", classmethod(lambda cls: True))
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 2
    cfg_json = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1024,
                "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 256, "vocab_size": 1024, "max_position_embeddings": 8192, "sliding_window": 1024,
                "layer_types": layer_types, "query_pre_attn_scalar": 256, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))

    def kv_config(kv_cache_dtype, **kw):
        cfg = engine_config(str(tmp_path), kv_cache_dtype=kv_cache_dtype, max_model_len=8192, **kw)
        cfg.compilation_config.static_forward_context.clear()
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with set_current_vllm_config(cfg):
                for i, kind in enumerate(layer_types):
                    Attention(16, 256, 256**-0.5, 8, cache_config=cfg.cache_config, prefix=f"model.layers.{i}.self_attn.attn",
                              per_layer_sliding_window=1024 if kind == "sliding_attention" else None)
        finally:
            torch.set_default_dtype(prev)
        specs = collect_specs(cfg)
        kv = get_kv_cache_configs(cfg, [specs], [GIB])[0]
        return specs, kv, get_kv_cache_capacity(cfg, kv)[1]

    specs, kv, conc = kv_config("oscar_int2", kv_cache_dtype_skip_layers=["sliding_window"])
    int2_page = Int2PageLayout(head_dim=256, block_size=128, num_kv_heads=8).page_bytes
    assert {type(s).__name__: (s.block_size, s.page_size_bytes) for s in specs.values()} == {
        "SlidingWindowSpec": (16, int2_page), "OscarFullAttentionSpec": (128, int2_page),
        "OscarWindowSpec": (16, int2_page)}
    assert int2_page == 8 * 17408 and 16 * 8 * 256 * 4 == 8 * 16384  # BF16 pages padded by 6.25%
    _, _, conc_bf16 = kv_config("auto")
    # At 8K the sliding-window layers are charged min(window + a prefill chunk, 8K) = all 8K tokens (vLLM's
    # sliding-window accounting, the same in both caches), 10 of 12 layers: OSCAR's 2 global layers alone
    # cannot lift the total by much, but it must not fall below BF16.
    assert conc > conc_bf16, (conc, conc_bf16)


@pytest.mark.parametrize("change, reason", [
    ({"use_mla": True}, "MLA"),
    ({"has_sliding_window": True}, "sliding-window layers are not supported"),
    ({"has_sink": True}, "attention-sink"),
    ({"head_size": 96}, r"head_dim 96 is not supported \(supported: \[64, 128, 256\]\)"),
    ({"dtype": torch.float16}, "use --dtype bfloat16"),
    ({"attn_type": "encoder_only"}, "decoder self-attention only"),
])
def test_layers_oscar_cannot_serve_are_refused_with_the_fix(change, reason):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_oscar.attention.selection import select_oscar_backend

    cfg = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="oscar_int2", block_size=None)
    assert select_oscar_backend(cfg) is OscarAttentionBackend
    with pytest.raises(ValueError, match=reason) as exc:
        select_oscar_backend(cfg._replace(**change))
    assert "--kv-cache-dtype-skip-layers" in str(exc.value)


def test_sliding_window_layers_fail_at_construction_unless_skip_listed(tiny_model):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    def make(cfg, name):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with set_current_vllm_config(cfg):
                return Attention(4, 64, 0.125, 2, cache_config=cfg.cache_config, per_layer_sliding_window=512,
                                 prefix=name)
        finally:
            torch.set_default_dtype(prev)

    with pytest.raises(ValueError, match="sliding-window layers are not supported.*'sliding_window'"):
        make(engine_config(tiny_model), "model.layers.0.self_attn.attn")
    layer = make(engine_config(tiny_model, kv_cache_dtype_skip_layers=["sliding_window"]),
                 "model.layers.1.self_attn.attn")
    assert layer.kv_cache_dtype == "auto" and layer.attn_backend is not OscarAttentionBackend
