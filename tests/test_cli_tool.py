"""The `vllm-oscar` command line (calibration side) and the environment-variable registry."""

import json

import pytest
import torch

from vllm_oscar import cli, envs
from vllm_oscar.artifact import RotationArtifact
from vllm_oscar.calibrate import models as models_mod
from vllm_oscar.calibrate.models import LoadedModel, model_info

transformers = pytest.importorskip("transformers")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


@pytest.fixture
def tiny(monkeypatch):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(cfg).eval()
    lm = LoadedModel(model, CharTokenizer(), model_info(cfg, "test/tiny", None), "tiny")
    calls = []

    def fake_load(spec, revision=None, device="cpu", dtype=torch.float32):
        calls.append(spec)
        return lm

    monkeypatch.setattr(models_mod, "load_model", fake_load)
    return calls


def test_calibrate_command_writes_an_artifact(tiny, tmp_path, capsys):
    rc = cli.main(["calibrate", "--model", "tiny", "--tokens", "512", "--seq-len", "128", "--output",
                   str(tmp_path / "art"), "--k-clip", "0.9", "--sink", "8", "--recent", "32"])
    assert rc == 0, capsys.readouterr().err
    art = RotationArtifact.load(tmp_path / "art")
    assert art.config.quantization.k_clip_ratio == 0.9
    assert art.config.windows.sink_tokens == 8 and art.config.windows.recent_tokens == 32
    assert art.config.calibration.num_tokens == 512 and art.config.calibration.source == "shakespeare:comedies"
    assert (tmp_path / "art" / "README.md").exists()
    assert art.config.quantization.levels == "minmax"  # the paper's grid unless asked otherwise


def test_calibrate_levels_mse_records_no_clipping(tiny, tmp_path, capsys):
    rc = cli.main(["calibrate", "--model", "tiny", "--tokens", "256", "--seq-len", "128", "--output",
                   str(tmp_path / "art"), "--levels", "mse"])
    assert rc == 0, capsys.readouterr().err
    q = RotationArtifact.load(tmp_path / "art").config.quantization
    assert (q.levels, q.k_clip_ratio, q.v_clip_ratio) == ("mse", 0.0, 0.0)
    assert "| INT2 grid (`levels`) | mse" in (tmp_path / "art" / "README.md").read_text()
    assert q.scale_dtype == "float16"  # the paper's 4-byte pair unless asked otherwise


def test_calibrate_scale_dtype_u8_is_recorded(tiny, tmp_path, capsys):
    rc = cli.main(["calibrate", "--model", "tiny", "--tokens", "256", "--seq-len", "128", "--output",
                   str(tmp_path / "art"), "--levels", "mse", "--scale-dtype", "u8"])
    assert rc == 0, capsys.readouterr().err
    assert RotationArtifact.load(tmp_path / "art").config.quantization.scale_dtype == "u8"
    assert "| scale and offset (`scale_dtype`) | u8" in (tmp_path / "art" / "README.md").read_text()


def test_eval_ppl_command_writes_results(tiny, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = cli.main(["eval-ppl", "--model", "tiny", "--tokens", "256", "--seq-len", "64", "--num-seqs", "1",
                   "--methods", "exact,naive_int2,oscar", "--sink", "4", "--recent", "8",
                   "--output-json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"exact", "naive_int2", "oscar"}
    assert res["settings"]["sequence_length"] == 64 and res["settings"]["sink_tokens"] == 4
    assert res["methods"]["naive_int2"]["perplexity"] != res["methods"]["exact"]["perplexity"]
    assert "| `oscar` |" in capsys.readouterr().out


def test_eval_ppl_with_data_free_methods_skips_calibration(tiny, tmp_path, capsys, monkeypatch):
    def no_calibration(*args, **kwargs):
        raise AssertionError("data-free methods must not calibrate")

    monkeypatch.setattr(cli, "_calibrate_loaded", no_calibration)
    out = tmp_path / "res.json"
    rc = cli.main(["eval-ppl", "--model", "tiny", "--seq-len", "64", "--num-seqs", "1",
                   "--methods", "exact,hadamard_mse,hadamard_int2_windows", "--sink", "4", "--recent", "8",
                   "--k-clip", "0.9", "--output-json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    settings = res["settings"]
    assert settings["rotations"] == "none: every method is data-free" and settings["calibration"] is None
    assert (settings["sink_tokens"], settings["recent_tokens"], settings["k_clip_ratio"]) == (4, 8, 0.9)
    assert res["methods"]["hadamard_mse"]["perplexity"] != res["methods"]["exact"]["perplexity"]
    with pytest.raises(AssertionError, match="must not calibrate"):  # calibrated rotations: it calibrates
        cli.main(["eval-ppl", "--model", "tiny", "--seq-len", "64", "--num-seqs", "1", "--methods", "exact,oscar"])


def test_eval_ppl_rejects_unknown_methods_and_overlapping_sets(capsys):
    assert cli.main(["eval-ppl", "--methods", "exact,int3"]) == 2
    assert "unknown method(s) ['int3']" in capsys.readouterr().err
    assert cli.main(["eval-ppl", "--eval-data", "shakespeare:comedies"]) == 2
    assert "also the calibration set" in capsys.readouterr().err


def test_cli_reports_artifact_errors_without_traceback(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "holds no OSCAR rotations" in capsys.readouterr().err


def test_env_command(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "VLLM_OSCAR_SKIP_CUDA_BUILD=" in out and "torch:" in out
    assert "kernels: " in out


def test_env_registry(monkeypatch):
    monkeypatch.setenv("VLLM_OSCAR_NUM_THREADS", "3")
    assert envs.get("VLLM_OSCAR_NUM_THREADS") == 3
    monkeypatch.setenv("VLLM_OSCAR_SKIP_CUDA_BUILD", "maybe")
    with pytest.raises(ValueError, match="VLLM_OSCAR_SKIP_CUDA_BUILD='maybe'"):
        envs.get("VLLM_OSCAR_SKIP_CUDA_BUILD")
    with pytest.raises(KeyError, match="not a vllm-oscar environment variable"):
        envs.get("VLLM_OSCAR_NOPE")
