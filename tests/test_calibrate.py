"""Calibration on tiny random models of every supported family (fast, CPU): capture, streaming moments."""

import pytest
import torch

from vllm_oscar.calibrate import data as data_mod
from vllm_oscar.calibrate.capture import attention_override, causal_sdpa, check_architecture, layer_index
from vllm_oscar.calibrate.models import model_info
from vllm_oscar.calibrate.pipeline import calibrate, collect_moments, fit_rotations, model_card
from vllm_oscar.ops import reference as ref

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    "MistralForCausalLM": ("MistralConfig", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_model(arch: str, hq=6, hkv=2, d=16):
    cfg_name, cls_name = FAMILIES[arch]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=97, hidden_size=hq * d, intermediate_size=64, num_hidden_layers=2, num_attention_heads=hq,
        num_key_value_heads=hkv, head_dim=d, max_position_embeddings=256, architectures=[arch],
    )
    model = getattr(transformers, cls_name)(cfg).eval()
    return model


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_capture_is_transparent_and_streaming_targets_match_brute_force(arch):
    model = tiny_model(arch)
    info = model_info(model.config, "test/tiny", None)
    seqs = torch.randint(0, 97, (3, 100))
    with torch.inference_mode():
        plain = model(seqs[:1]).logits
        with attention_override(model, causal_sdpa):
            hooked = model(seqs[:1]).logits
    assert torch.allclose(plain, hooked, atol=1e-5)

    captured = {i: {"q": [], "k": [], "v": []} for i in range(2)}

    def grab(module, q, k, v):
        c = captured[layer_index(module)]
        for name, x in (("q", q), ("k", k), ("v", v)):
            c[name].append(x[0].transpose(0, 1).double())
        return causal_sdpa(module, q, k, v)

    with attention_override(model, grab), torch.inference_mode():
        for s in seqs:
            model(s[None])
    moments = collect_moments(model, seqs, info, progress=False)
    for i, m in enumerate(moments):
        q, k, v = (torch.cat(captured[i][n]) for n in ("q", "k", "v"))
        assert q.shape == (300, 6, 16) and k.shape == (300, 2, 16)
        assert torch.allclose(m.k_target(), ref.k_target(q, 2), rtol=1e-9, atol=1e-12)
        assert torch.allclose(m.v_target(), ref.v_target(q, k, v), rtol=1e-9, atol=1e-12)
    tensors = fit_rotations(moments)
    assert tensors["k_rotation"].shape == (2, 16, 16)


def test_qwen3_capture_sees_post_norm_post_rope_queries():
    model = tiny_model("Qwen3ForCausalLM")
    seq = torch.randint(0, 97, (1, 20))
    seen = {}

    def grab(module, q, k, v):
        seen.setdefault(layer_index(module), (q, k))
        return causal_sdpa(module, q, k, v)

    with attention_override(model, grab), torch.inference_mode():
        model(seq)
    q, k = seen[0]
    attn = model.model.layers[0].self_attn
    h = model.model.embed_tokens(seq)
    h = model.model.layers[0].input_layernorm(h)
    raw_q = attn.q_norm(attn.q_proj(h).view(1, 20, 6, 16)).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, torch.arange(20)[None])
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    roped_q, _ = apply_rotary_pos_emb(raw_q, raw_q, cos, sin)
    assert torch.allclose(q, roped_q, atol=1e-5)
    assert not torch.allclose(q, raw_q, atol=1e-3)


def test_calibrate_builds_a_valid_artifact(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    info = model_info(model.config, "test/tiny", "rev1")
    art = calibrate(model, torch.randint(0, 97, (4, 80)), info, source="random tokens", progress=False)
    assert art.config.calibration.num_tokens == 320
    assert art.config.base_model.revision == "rev1"
    r = art.k_rotation.double()
    assert (r @ r.transpose(1, 2) - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5
    out = art.save(tmp_path / "a", card=model_card(art, "acme/tiny"))
    card = (out / "README.md").read_text()
    assert "base_model: test/tiny" in card and '"rotations": "acme/tiny"' in card


def test_unsupported_architecture_is_refused():
    cfg = transformers.GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        check_architecture(cfg)


def test_too_short_or_empty_calibration_sets(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    info = model_info(model.config, "test/tiny", None)
    with pytest.raises(ValueError, match="calibration set too short"):
        collect_moments(model, torch.randint(0, 97, (1, 10)), info, progress=False)

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 97 for c in text]}

    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="is empty"):
        data_mod.token_sequences(Tok(), str(empty), 16, 1)
    short = tmp_path / "short.txt"
    short.write_text("x" * 100)
    with pytest.raises(ValueError, match="room for 3 sequences of 32, 4 requested"):
        data_mod.token_sequences(Tok(), str(short), 32, 4)
    with pytest.raises(ValueError, match="unknown Shakespeare genre 'poems'"):
        data_mod.load_text("shakespeare:poems")
    with pytest.raises(ValueError, match="neither a file, a folder, nor a named set"):
        data_mod.load_text(str(tmp_path / "missing.txt"))


def test_shakespeare_sets_are_disjoint_and_clean():
    comedies, names_c = data_mod.load_text("shakespeare:comedies")
    tragedies, names_t = data_mod.load_text("shakespeare:tragedies")
    assert not set(names_c) & set(names_t)
    assert "hamlet" in names_t and "twelfth-night" in names_c
    assert "**" not in tragedies and "\n#" not in tragedies
    assert len(tragedies) > 500_000
