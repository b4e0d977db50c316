"""`vllm serve`'s real argument parser and `create_engine_config()` with oscar_int2."""

from __future__ import annotations

import json

import pytest
from oscar_testing import engine_config


def _serve_parser():
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # make_arg_parser -> AsyncEngineArgs.add_cli_args loads the general plugins before building the
    # --kv-cache-dtype choices from CacheConfig's Literal, exactly as `vllm serve` does.
    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def test_serve_parser_accepts_oscar_int2_and_builds_the_engine_config(tiny_model):
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = _serve_parser()
    args = parser.parse_args([
        "--model", tiny_model, "--kv-cache-dtype", "oscar_int2", "--skip-tokenizer-init", "--load-format", "dummy",
        "--max-model-len", "2048", "--block-size", "16",
        "--additional-config", json.dumps({"oscar": {"sink_tokens": 32, "recent_tokens": 128, "levels": "minmax",
                                                     "v_clip_ratio": 0.96}}),
    ])
    assert args.kv_cache_dtype == "oscar_int2"
    cfg = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert cfg.cache_config.cache_dtype == "oscar_int2"
    resolved = cfg.additional_config["oscar"]["_resolved"]
    assert (resolved["sink_tokens"], resolved["recent_tokens"], resolved["v_clip_ratio"]) == (32, 128, 0.96)
    assert resolved["levels"] == "minmax"
    assert resolved["rotation"] == "hadamard"  # no calibrated rotations for this model: data-free mode


def test_serve_parser_rejects_unknown_dtype_and_lists_oscar_int2(capsys):
    parser = _serve_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "oscar_int3"])
    err = capsys.readouterr().err
    assert "invalid choice: 'oscar_int3'" in err and "'oscar_int2'" in err


def test_llm_style_engine_args(tiny_model):
    # LLM(model, kv_cache_dtype="oscar_int2", additional_config=...) builds EngineArgs the same way.
    cfg = engine_config(tiny_model, additional_config={"oscar": {"rotation": "none"}})
    assert cfg.cache_config.cache_dtype == "oscar_int2"
    assert cfg.additional_config["oscar"]["_resolved"]["rotation"] == "none"
    # The resolved settings reach other processes inside the pickled VllmConfig.
    import pickle

    clone = pickle.loads(pickle.dumps(cfg))
    assert clone.additional_config["oscar"]["_resolved"] == cfg.additional_config["oscar"]["_resolved"]


def test_invalid_additional_config_fails_in_create_engine_config(tiny_model):
    with pytest.raises(ValueError, match=r"unknown key 'sink'.*valid keys: \[.*'sink_tokens'"):
        engine_config(tiny_model, additional_config={"oscar": {"sink": 64}})


def test_skip_layers_from_additional_config_reach_cache_config(tiny_model):
    cfg = engine_config(tiny_model, additional_config={"oscar": {"skip_layers": [0, 3]}})
    assert set(cfg.cache_config.kv_cache_dtype_skip_layers) >= {"0", "3"}
