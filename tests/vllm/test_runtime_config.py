"""`--additional-config '{"oscar": {...}}'`: validation messages, per-model defaults, rotations, refusals."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from oscar_testing import engine_config

from vllm_oscar import runtime_config as rc
from vllm_oscar.artifact import RotationArtifact
from vllm_oscar.config import (
    BaseModelInfo,
    CalibrationInfo,
    OscarArtifactConfig,
    QuantizationConfig,
    RotationConfig,
    RotationMode,
    WindowConfig,
)


def _facts(name="tiny", layers=4, d=64, arch="LlamaForCausalLM", **hf):
    return rc.ModelFacts(model=f"/models/{name}", revision=None, architectures=(arch,), num_layers=layers,
                         num_attention_heads=4, num_kv_heads=2, head_dim=d, hf_config={"num_hidden_layers": layers, **hf})


def _calibrated_artifact(folder, model_id, layers=4, d=64, revision=None, k_clip=0.9, windows=(32, 128)):
    q, _ = torch.linalg.qr(torch.randn(layers, d, d, dtype=torch.float64))
    cfg = OscarArtifactConfig(
        base_model=BaseModelInfo(id=model_id, revision=revision, architecture="LlamaForCausalLM", num_layers=layers,
                                 num_attention_heads=4, num_kv_heads=2, head_dim=d),
        quantization=QuantizationConfig(group_size=d, k_clip_ratio=k_clip, v_clip_ratio=0.9),
        windows=WindowConfig(sink_tokens=windows[0], recent_tokens=windows[1]),
        rotation=RotationConfig(mode=RotationMode.OSCAR),
        calibration=CalibrationInfo(source="test", num_tokens=1, sequence_length=1, num_sequences=1),
    )
    art = RotationArtifact(cfg, q.float(), q.flip(0).float().contiguous(), torch.ones(layers, d), torch.ones(layers, d))
    return str(art.save(folder))


# ------------------------------------------------------------------------------------------------ parsing


def test_unknown_key_lists_valid_keys():
    with pytest.raises(rc.OscarConfigError) as exc:
        rc.parse_user_config({"oscar": {"window": 64}})
    msg = str(exc.value)
    assert "unknown key 'window'" in msg
    for key in ("rotations", "rotation", "sink_tokens", "recent_tokens", "k_clip_ratio", "require_calibrated"):
        assert f"'{key}'" in msg


def test_bad_rotation_mode_lists_options():
    with pytest.raises(rc.OscarConfigError, match=r"'quarot' is not a valid option; valid options: "
                                                  r"\['oscar', 'hadamard', 'none'\]"):
        rc.parse_user_config({"oscar": {"rotation": "quarot"}})


@pytest.mark.parametrize("bad, pattern", [
    ({"k_clip_ratio": 1.5}, r"k_clip_ratio: .*less than or equal to 1"),
    ({"sink_tokens": -1}, r"sink_tokens: .*greater than or equal to 0"),
    ({"skip_layers": ["first"]}, r"must be a layer index or 'sliding_window'"),
])
def test_value_errors_name_the_field(bad, pattern):
    with pytest.raises(rc.OscarConfigError, match=pattern):
        rc.parse_user_config({"oscar": bad})


def test_oscar_entry_must_be_an_object():
    with pytest.raises(rc.OscarConfigError, match="must be a JSON object"):
        rc.parse_user_config({"oscar": "hadamard"})
    assert rc.parse_user_config(None) == rc.OscarUserConfig()
    assert rc.parse_user_config({"other_plugin": 1}) == rc.OscarUserConfig()


# ------------------------------------------------------------------------------------------------ defaults


def test_shipped_model_defaults_are_valid_and_match_by_hf_config():
    files = dict(rc.load_model_defaults())
    assert {"qwen3-8b.json", "qwen3-32b.json", "smollm2-135m-instruct.json"} <= set(files)
    qwen32 = _facts("Qwen3-32B", layers=64, d=128, arch="Qwen3ForCausalLM", hidden_size=5120, num_attention_heads=64,
                    num_key_value_heads=8)
    name, d = rc.match_model_defaults(qwen32)
    assert name == "qwen3-32b.json" and d.oscar.v_clip_ratio == 0.96
    assert rc.match_model_defaults(_facts("unknown")) is None


def test_most_specific_defaults_win_and_ties_are_errors(tmp_path):
    base = {"match": {"architectures": ["LlamaForCausalLM"]}, "oscar": {"levels": "minmax", "v_clip_ratio": 0.5}}
    specific = {"match": {"architectures": ["LlamaForCausalLM"], "hf_config": {"num_hidden_layers": 4}},
                "oscar": {"levels": "minmax", "v_clip_ratio": 0.7}}
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(specific))
    rc.load_model_defaults.cache_clear()
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(), defaults_dir=str(tmp_path), warn=False)
    assert resolved.v_clip_ratio == 0.7 and resolved.defaults_file == "b.json"
    (tmp_path / "c.json").write_text(json.dumps({**specific, "oscar": {}}))
    rc.load_model_defaults.cache_clear()
    with pytest.raises(rc.OscarConfigError, match="both match"):
        rc.resolve(_facts(), rc.OscarUserConfig(), defaults_dir=str(tmp_path), warn=False)


def test_broken_defaults_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"match": {"architectures": []}}))
    rc.load_model_defaults.cache_clear()
    with pytest.raises(rc.OscarConfigError, match="bad.json"):
        rc.load_model_defaults(str(tmp_path))


# ------------------------------------------------------------------------------------------------ resolution


def test_data_free_mode_warns_once_naming_model_and_command(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm.oscar"):
        resolved, art = rc.resolve(_facts("my-model"), rc.OscarUserConfig())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "/models/my-model" in warnings[0] and "calibrated OSCAR rotations were not found" in warnings[0]
    assert "vllm-oscar calibrate --model /models/my-model --output DIR" in warnings[0]
    assert "MSE-fitted INT2 grid" in warnings[0]
    assert resolved.rotation == "hadamard" and resolved.rotations is None
    h = art.k_rotation[0]
    assert torch.allclose(h.abs(), torch.full_like(h, 64**-0.5))  # normalized Hadamard
    # the data-free default: the MSE-fitted grid, which does not clip
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio, resolved.sink_tokens,
            resolved.recent_tokens) == ("mse", 0.0, 0.0, 64, 256)


def test_require_calibrated_turns_the_warning_into_an_error():
    with pytest.raises(rc.OscarConfigError, match=r"require_calibrated.*vllm-oscar calibrate --model /models/m"):
        rc.resolve(_facts("m"), rc.OscarUserConfig(require_calibrated=True))
    with pytest.raises(rc.OscarConfigError, match="contradicts"):
        rc.resolve(_facts("m"), rc.OscarUserConfig(require_calibrated=True, rotation="hadamard"))


def test_rotation_none_is_identity_and_rejects_a_rotation_source(tmp_path):
    resolved, art = rc.resolve(_facts(), rc.OscarUserConfig(rotation="none"), warn=False)
    assert resolved.mode == RotationMode.NONE and torch.equal(art.v_rotation[2], torch.eye(64))
    with pytest.raises(rc.OscarConfigError, match="data-free"):
        rc.resolve(_facts(), rc.OscarUserConfig(rotation="none", rotations=str(tmp_path)), warn=False)


def test_calibrated_artifact_supplies_clips_and_windows_user_overrides(tmp_path):
    folder = _calibrated_artifact(tmp_path / "rot", "tiny", k_clip=0.9, windows=(32, 128))
    resolved, art = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=folder, recent_tokens=96), warn=False)
    assert resolved.rotation == "oscar" and resolved.rotations == folder
    assert resolved.k_clip_ratio == 0.9 and resolved.sink_tokens == 32  # from the artifact
    assert resolved.recent_tokens == 96  # the user's value wins
    assert art.k_rotation.shape == (4, 64, 64)


def test_levels_precedence_user_artifact_defaults_method(tmp_path):
    """levels: user > artifact > model defaults > method default ("mse" without an artifact); clip ratios
    only apply to "minmax" and resolve to 0 with "mse"."""
    paper = _calibrated_artifact(tmp_path / "paper", "tiny", k_clip=0.9)  # format 2, levels "minmax" (default)
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=paper), warn=False)
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio) == ("minmax", 0.9, 0.9)  # paper keeps clip
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=paper, levels="mse"), warn=False)
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio) == ("mse", 0.0, 0.0)  # user overrides
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(levels="minmax"), warn=False)
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio) == ("minmax", 0.96, 0.92)
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(levels="minmax", k_clip_ratio=0.0), warn=False)
    assert (resolved.k_clip_ratio, resolved.v_clip_ratio) == (0.0, 0.92)

    # an artifact recording "mse" (format 2)
    q, _ = torch.linalg.qr(torch.randn(4, 64, 64, dtype=torch.float64))
    cfg = OscarArtifactConfig(
        base_model=BaseModelInfo(id="tiny", architecture="LlamaForCausalLM", num_layers=4, num_attention_heads=4,
                                 num_kv_heads=2, head_dim=64),
        quantization=QuantizationConfig(group_size=64, levels="mse"),
        calibration=CalibrationInfo(source="test", num_tokens=1, sequence_length=1, num_sequences=1),
    )
    assert (cfg.quantization.k_clip_ratio, cfg.quantization.v_clip_ratio) == (0.0, 0.0)
    mse_art = str(RotationArtifact(cfg, q.float(), q.float(), torch.ones(4, 64), torch.ones(4, 64)).save(tmp_path / "m"))
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=mse_art), warn=False)
    assert (resolved.levels, resolved.k_clip_ratio) == ("mse", 0.0)
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=mse_art, levels="minmax"), warn=False)
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio) == ("minmax", 0.96, 0.92)

    # model defaults sit between the artifact and the method default
    (tmp_path / "defaults").mkdir()
    (tmp_path / "defaults" / "tiny.json").write_text(json.dumps(
        {"match": {"architectures": ["LlamaForCausalLM"]}, "oscar": {"levels": "minmax", "k_clip_ratio": 0.8}}))
    rc.load_model_defaults.cache_clear()
    d = str(tmp_path / "defaults")
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(), defaults_dir=d, warn=False)
    assert (resolved.levels, resolved.k_clip_ratio, resolved.v_clip_ratio) == ("minmax", 0.8, 0.92)
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=mse_art), defaults_dir=d, warn=False)
    assert resolved.levels == "mse"  # the artifact beats the defaults file
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(levels="mse"), defaults_dir=d, warn=False)
    assert (resolved.levels, resolved.k_clip_ratio) == ("mse", 0.0)  # the defaults' clip belongs to minmax
    rc.load_model_defaults.cache_clear()


def test_levels_errors_list_the_options_and_refuse_clipping_with_mse(tmp_path):
    with pytest.raises(rc.OscarConfigError, match=r"levels: 'lloyd_max' is not a valid option; valid options: "
                                                  r"\['minmax', 'mse'\]"):
        rc.parse_user_config({"oscar": {"levels": "lloyd_max"}})
    with pytest.raises(rc.OscarConfigError, match=r"k_clip_ratio=0.96 clips rows, which levels 'mse' does not do"):
        rc.parse_user_config({"oscar": {"levels": "mse", "k_clip_ratio": 0.96}})
    assert rc.parse_user_config({"oscar": {"levels": "mse", "k_clip_ratio": 0}}).levels == "mse"
    # a clip ratio alone in the data-free mode (default "mse") says how to get clipping
    with pytest.raises(rc.OscarConfigError, match=r'v_clip_ratio=0.9 clips rows, but levels is .mse. \(the default '
                                                  r'without an artifact\).*add "levels": "minmax"'):
        rc.resolve(_facts(), rc.OscarUserConfig(v_clip_ratio=0.9), warn=False)
    paper = _calibrated_artifact(tmp_path / "paper", "tiny")
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=paper, v_clip_ratio=0.8), warn=False)
    assert (resolved.levels, resolved.v_clip_ratio) == ("minmax", 0.8)  # with a paper artifact: minmax clips


def test_scale_dtype_precedence_and_errors(tmp_path):
    """scale_dtype: user > artifact > defaults file > DEFAULT_SCALE_DTYPE; it names the pages' layout and is
    recorded in the data-free artifact; a bad value lists the options."""
    resolved, art = rc.resolve(_facts(), rc.OscarUserConfig(), warn=False)
    assert resolved.scale_dtype == rc.DEFAULT_SCALE_DTYPE and art.config.quantization.scale_dtype == rc.DEFAULT_SCALE_DTYPE
    resolved, art = rc.resolve(_facts(), rc.OscarUserConfig(scale_dtype="u8"), warn=False)
    assert (resolved.scale_dtype, resolved.layout_params, art.config.quantization.scale_dtype) == ("u8", "u8", "u8")
    assert rc.ResolvedOscarConfig.from_dict(resolved.to_dict()) == resolved
    old = {k: v for k, v in resolved.to_dict().items() if k != "scale_dtype"}  # recorded before scale_dtype existed
    assert rc.ResolvedOscarConfig.from_dict(old).layout_params == "fp16"
    paper = _calibrated_artifact(tmp_path / "paper", "tiny")  # records "float16", as every earlier artifact
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=paper), warn=False)
    assert (resolved.scale_dtype, resolved.layout_params) == ("float16", "fp16")
    resolved, _ = rc.resolve(_facts("tiny"), rc.OscarUserConfig(rotations=paper, scale_dtype="u8"), warn=False)
    assert resolved.scale_dtype == "u8"  # the user's value wins
    with pytest.raises(rc.OscarConfigError, match=r"scale_dtype: Input should be 'float16' or 'u8'"):
        rc.parse_user_config({"oscar": {"scale_dtype": "fp8"}})


def test_artifact_config_versions_and_levels():
    from vllm_oscar.config import FORMAT_VERSION

    base = dict(base_model=dict(id="m", architecture="LlamaForCausalLM", num_layers=2, num_attention_heads=4,
                                num_kv_heads=2, head_dim=64),
                rotation=dict(mode="hadamard", composition="h"))
    v1 = OscarArtifactConfig.model_validate({**base, "format_version": 1,
                                             "quantization": dict(group_size=64, k_clip_ratio=0.96, v_clip_ratio=0.92)})
    assert v1.format_version == FORMAT_VERSION == 2 and v1.quantization.levels == "minmax"  # read as version 2
    assert OscarArtifactConfig.model_validate_json(v1.model_dump_json()) == v1  # round-trips
    with pytest.raises(ValueError, match="unknown format_version 3; .* reads format_version 1, 2"):
        OscarArtifactConfig.model_validate({**base, "format_version": 3, "quantization": dict(group_size=64)})
    with pytest.raises(ValueError, match="levels 'mse' .* does not clip; k_clip_ratio must be 0"):
        QuantizationConfig(group_size=64, levels="mse", k_clip_ratio=0.96)
    with pytest.raises(ValueError, match="Input should be 'minmax' or 'mse'"):
        QuantizationConfig(group_size=64, levels="lm")
    q = QuantizationConfig(group_size=64, levels="mse", v_clip_ratio=0)
    assert (q.k_clip_ratio, q.v_clip_ratio) == (0.0, 0.0)


def test_resolved_config_round_trips_and_reads_pre_levels_dicts():
    resolved, _ = rc.resolve(_facts(), rc.OscarUserConfig(), warn=False)
    assert rc.ResolvedOscarConfig.from_dict(resolved.to_dict()) == resolved
    old = {k: v for k, v in resolved.to_dict().items() if k != "levels"}
    old.update(k_clip_ratio=0.96, v_clip_ratio=0.92)
    assert rc.ResolvedOscarConfig.from_dict(old).levels == "minmax"


@pytest.mark.parametrize("kw, pattern", [
    (dict(model_id="other-model"), "calibrated for 'other-model'"),
    (dict(model_id="tiny", layers=6), "6 layers"),
    (dict(model_id="tiny", revision="abc"), "revision 'abc'"),
])
def test_artifact_for_another_model_or_revision_is_refused(tmp_path, kw, pattern):
    layers = kw.pop("layers", 4)
    folder = _calibrated_artifact(tmp_path / "rot", layers=layers, **kw)
    facts = _facts("tiny")
    facts = rc.ModelFacts(**{**facts.__dict__, "revision": "def" if "revision" in kw else None})
    with pytest.raises(rc.OscarConfigError, match=pattern):
        rc.resolve(facts, rc.OscarUserConfig(rotations=folder), warn=False)


def test_missing_rotation_source_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(rc.OscarConfigError, match="cannot be used"):
        rc.resolve(_facts(), rc.OscarUserConfig(rotations=str(tmp_path / "nowhere")), warn=False)


def test_sink_without_recent_is_refused():
    with pytest.raises(rc.OscarConfigError, match="recent_tokens >= 1"):
        rc.resolve(_facts(), rc.OscarUserConfig(sink_tokens=64, recent_tokens=0), warn=False)


# ------------------------------------------------------------------------------------------------ engine-level refusals


def test_speculative_decoding_is_refused(tiny_model):
    with pytest.raises(ValueError, match="speculative decoding is not supported"):
        engine_config(tiny_model, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                      "prompt_lookup_max": 2})


def test_kv_connector_is_refused(tiny_model):
    with pytest.raises(ValueError, match="KV connectors"):
        engine_config(tiny_model, kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"})


def test_custom_attention_backend_flag_is_refused(tiny_model):
    with pytest.raises(ValueError, match="--attention-backend CUSTOM must not be set"):
        engine_config(tiny_model, attention_backend="CUSTOM")


def test_disabled_hybrid_allocator_is_refused(tiny_model, monkeypatch):
    from vllm.platforms import current_platform

    # On a GPU platform the windows need vLLM's hybrid KV-cache manager; turning it off must fail early.
    monkeypatch.setattr(type(current_platform), "support_hybrid_kv_cache", classmethod(lambda cls: True))
    with pytest.raises(ValueError, match="hybrid KV-cache manager is disabled"):
        engine_config(tiny_model, disable_hybrid_kv_cache_manager=True)


def test_unsupported_head_dim_is_refused(model_factory):
    model = model_factory("head96", head_dim=96)
    with pytest.raises(ValueError, match=r"head_dim 96 is not supported \(supported: \[64, 128, 256\]\)"):
        engine_config(model)


def test_rotations_for_another_model_fail_at_engine_config(tiny_model, tmp_path):
    folder = _calibrated_artifact(tmp_path / "rot", "some-other-model")
    with pytest.raises(ValueError, match="calibrated for 'some-other-model'"):
        engine_config(tiny_model, additional_config={"oscar": {"rotations": folder}})
