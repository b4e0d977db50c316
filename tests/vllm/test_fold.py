"""Folding R_V into o_proj (vllm_oscar/attention/fold.py): exact math, idempotence, refusals (CPU)."""

from __future__ import annotations

import torch
from torch import nn

from tests.kernels.kernel_utils import DecodeCase
from vllm_oscar.attention import fold
from vllm_oscar.attention.backend import OscarAttentionImpl
from vllm_oscar.ops import reference as ref


class UnquantizedLinearMethod:  # stands in for vLLM's class: fold checks the class name
    pass


class Fp8LinearMethod:
    pass


class FakeOProj(nn.Module):
    def __init__(self, out_features, in_features, dtype=torch.float32, method=UnquantizedLinearMethod, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=gen).to(dtype),
                                   requires_grad=False)
        self.quant_method = method()


def _impl(head_dim: int) -> OscarAttentionImpl:
    impl = object.__new__(OscarAttentionImpl)  # no engine config needed for the fold itself
    impl.head_size = head_dim
    impl._value_rotation_folded = False
    return impl


def _parent(cls_name: str, heads: int, d: int, rv: torch.Tensor, **o_proj_kw) -> nn.Module:
    parent = type(cls_name, (nn.Module,), {})()
    parent.o_proj = FakeOProj(48, heads * d, **o_proj_kw)
    parent.attn = nn.Module()
    parent.attn.impl = _impl(d)
    parent.attn.register_buffer("oscar_rotation_v", rv)
    return parent


def _model(d: int, **layers: tuple[str, dict]) -> nn.Module:
    """A module with one attention parent per keyword, ``name=(attention class name, o_proj kwargs)``,
    all with 4 heads and one random R_V."""
    rv = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    model = nn.Module()
    for name, (cls_name, o_proj_kw) in layers.items():
        setattr(model, name, _parent(cls_name, 4, d, rv, **o_proj_kw))
    return model


def test_folded_o_proj_on_the_rotated_decode_output_equals_the_original_model():
    """reference.paged_decode without R_V, through the folded o_proj == with R_V, through the original."""
    case = DecodeCase(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=[700, 65, 330],
                      sink=64, recent=256, seed=4)
    args = (case.q.float(), case.kv_cache, case.block_table, torch.tensor(case.seq_lens), case.layout,
            case.window_cache, case.window_block_table, case.sink, case.recent, case.rot_k)
    o_model = ref.paged_decode(*args, case.rot_v, case.scale)
    o_rot = ref.paged_decode(*args, None, case.scale)
    o_proj = FakeOProj(40, case.hq * case.d, dtype=torch.float64)
    w = o_proj.weight.detach().clone()
    assert fold.fold_value_rotation(o_proj, case.rot_v.double(), case.d)
    y_model = o_model.double().reshape(case.batch, -1) @ w.T
    y_folded = o_rot.double().reshape(case.batch, -1) @ o_proj.weight.T
    torch.testing.assert_close(y_folded, y_model, rtol=1e-4, atol=1e-4)  # fp32 attention and fold


def test_fold_rounds_once_and_is_idempotent_until_the_weights_change():
    gen = torch.Generator().manual_seed(1)
    rv = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))[0].float()
    o_proj = FakeOProj(32, 3 * 64, dtype=torch.bfloat16)
    w0 = o_proj.weight.detach().clone()
    want = (w0.float().view(32, 3, 64) @ rv).view(32, -1).to(torch.bfloat16)
    assert fold.fold_value_rotation(o_proj, rv, 64)
    assert torch.equal(o_proj.weight, want)
    assert not fold.fold_value_rotation(o_proj, rv, 64)  # a second weight-processing pass: no double fold
    assert torch.equal(o_proj.weight, want)
    with torch.no_grad():
        o_proj.weight.copy_(w0)  # weights reloaded (e.g. an RL refit): fold again
    assert fold.fold_value_rotation(o_proj, rv, 64)
    assert torch.equal(o_proj.weight, want)


def test_fold_model_folds_only_where_exact_and_says_why():
    model = _model(64, ok=("Qwen3Attention", {}), gated=("Qwen3NextAttention", {}),
                   fp8=("LlamaAttention", {"method": Fp8LinearMethod}))
    w_ok, w_gated = model.ok.o_proj.weight.clone(), model.gated.o_proj.weight.clone()

    report = fold.fold_model(model, lora_enabled=False)
    assert report.folded == ["ok"]
    assert "not known to feed the attention output straight into o_proj" in report.skipped["gated"]
    assert "quantized (Fp8LinearMethod)" in report.skipped["fp8"]
    assert model.ok.attn.impl.value_rotation_folded
    assert not model.gated.attn.impl.value_rotation_folded and not model.fp8.attn.impl.value_rotation_folded
    assert not torch.equal(model.ok.o_proj.weight, w_ok)
    assert torch.equal(model.gated.o_proj.weight, w_gated)

    again = fold.fold_model(model, lora_enabled=False)
    assert again.folded == [] and again.already == ["ok"]

    lora = _model(64, ok=("LlamaAttention", {}))
    report = fold.fold_model(lora, lora_enabled=True)
    assert report.folded == [] and "LoRA" in report.skipped["ok"]


def test_layer_state_counts_layers_by_kv_cache_dtype_and_folds():
    """What benchmarks.run and the GPU end-to-end cases record about a served model."""
    model = _model(64, a=("Qwen3Attention", {}), b=("Qwen3NextAttention", {}), bf16=("LlamaAttention", {}))
    model.bf16.attn.impl = object()  # a layer kept in BF16 (a skip layer): another backend's impl
    for name, dtype in (("a", "oscar_int2"), ("b", "oscar_int2"), ("bf16", "auto")):
        getattr(model, name).attn.kv_cache_dtype = dtype
    fold.fold_model(model, lora_enabled=False)
    assert fold.layer_state(model) == {"by_kv_cache_dtype": {"oscar_int2": 2, "auto": 1}, "oscar_layers": 2,
                                       "r_v_folded_into_o_proj": 1}


def test_folded_layers_get_no_output_rotation():
    from vllm_oscar.attention.backend import OscarLayerArgsCache

    class Resolved:
        k_clip_ratio = v_clip_ratio = 0.0
        sink_tokens, recent_tokens, levels = 64, 256, "mse"
        layout_params = "fp16"

    layer = nn.Module()
    layer.oscar_rotation_k = torch.eye(64)
    layer.oscar_rotation_v = torch.eye(64)
    cache = torch.zeros(4, 2, 16 * 40)  # 16 tokens per page at d=64 (40 bytes per token and kv head)
    args = OscarLayerArgsCache(Resolved(), 64, 2, 0.125)
    assert args.get(layer, cache).output_rotation_v is layer.oscar_rotation_v
    folded = args.get(layer, cache, rotate_output=False)
    assert folded.output_rotation_v is None and folded.rotation_v is layer.oscar_rotation_v  # the store keeps R_V


def test_vllm_loader_hook_folds_after_the_weights_are_processed(monkeypatch):
    """vllm_patches wraps the function BaseModelLoader.load_model calls; the wrapper folds after it."""
    import types

    from vllm.model_executor.model_loader import base_loader

    from vllm_oscar import runtime_config, vllm_patches

    vllm_patches.apply()
    hook = base_loader.process_weights_after_loading
    assert vllm_patches.is_wrapped(hook)

    d = 64
    rv = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()
    model = nn.Module()
    model.layer = _parent("LlamaAttention", 2, d, rv)
    impl = model.layer.attn.impl
    impl._vllm_config = types.SimpleNamespace(lora_config=None)
    w0 = model.layer.o_proj.weight.detach().clone()
    model_config = types.SimpleNamespace(dtype=torch.float32, quantization=None)

    monkeypatch.setattr(runtime_config, "get_resolved", lambda cfg: types.SimpleNamespace(fold_value_rotation=False))
    hook(model, model_config, torch.device("cpu"))
    assert not impl.value_rotation_folded and torch.equal(model.layer.o_proj.weight, w0)  # "fold_value_rotation": false

    monkeypatch.setattr(runtime_config, "get_resolved", lambda cfg: types.SimpleNamespace(fold_value_rotation=True))
    hook(model, model_config, torch.device("cpu"))
    assert impl.value_rotation_folded
    torch.testing.assert_close(model.layer.o_proj.weight, (w0.view(48, 2, d) @ rv).view(48, -1))
