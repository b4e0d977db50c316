"""Artifacts: save/load, validation errors, RotationZoo files, Hub resolution (offline) and publishing."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from vllm_oscar.artifact import (
    ArtifactError,
    RotationArtifact,
    hadamard_artifact,
    load_zoo,
)
from vllm_oscar.config import (
    CONFIG_FILENAME,
    ROTATIONS_FILENAME,
    BaseModelInfo,
    CalibrationInfo,
    OscarArtifactConfig,
    QuantizationConfig,
    RotationMode,
)
from vllm_oscar.hub import load_rotations, publish, resolve_rotations_dir
from vllm_oscar.ops import reference as ref

L, D = 3, 16


def _info(**kw):
    base = dict(id="org/tiny-llama", revision="abc123", architecture="LlamaForCausalLM", num_layers=L,
                num_attention_heads=4, num_kv_heads=2, head_dim=D)
    base.update(kw)
    return BaseModelInfo(**base)


def _config(**kw):
    return OscarArtifactConfig(
        base_model=_info(),
        quantization=QuantizationConfig(group_size=D),
        calibration=CalibrationInfo(source="test", num_tokens=100, sequence_length=50, num_sequences=2),
        **kw,
    )


def _rotations(n=L, d=D):
    return torch.stack([ref.fit_rotation(torch.cov(torch.randn(d, 5 * d)))[0] for _ in range(n)]).float()


def _artifact():
    return RotationArtifact(_config(), _rotations(), _rotations(), torch.rand(L, D), torch.rand(L, D))


def test_save_load_bit_exact(tmp_path):
    art = _artifact()
    out = art.save(tmp_path / "art", card="# card\n")
    back = RotationArtifact.load(out)
    for name in ("k_rotation", "v_rotation", "k_eigenvalues", "v_eigenvalues"):
        assert torch.equal(getattr(art, name), getattr(back, name))
    assert back.config == art.config
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILENAME, ROTATIONS_FILENAME, "README.md"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    art = _artifact()
    import vllm_oscar.artifact as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        art.save(tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "precious.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not an OSCAR artifact folder"):
        _artifact().save(tmp_path / "art")
    assert (tmp_path / "art" / "precious.txt").exists()


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t["k_rotation"][:, :, :-1].contiguous(), r"expected a \[num_layers, head_dim, head_dim\]"),
    (lambda t: t["k_rotation"][:2].contiguous(), "has 2 layers, the model has 3"),
    (lambda t: t["k_rotation"] * 1.01, "not orthogonal"),
    (lambda t: t["k_rotation"].index_put((torch.tensor([1]),), torch.tensor(float("nan"))), "NaN or inf"),
])
def test_bad_tensors_are_refused_with_the_file_named(tmp_path, mutate, match):
    from safetensors.torch import load_file, save_file

    out = _artifact().save(tmp_path / "art")
    t = load_file(str(out / ROTATIONS_FILENAME))
    t["k_rotation"] = mutate(t)
    save_file(t, str(out / ROTATIONS_FILENAME))
    with pytest.raises(ArtifactError, match=match) as exc:
        RotationArtifact.load(out)
    assert ROTATIONS_FILENAME in str(exc.value)


def test_head_dim_mismatch(tmp_path):
    with pytest.raises(ArtifactError, match="head_dim 8, the model has head_dim 16"):
        RotationArtifact(_config(), _rotations(d=8), _rotations(), torch.rand(L, D), torch.rand(L, D))


def test_missing_files(tmp_path):
    with pytest.raises(ArtifactError, match=f"{CONFIG_FILENAME} is missing"):
        RotationArtifact.load(tmp_path)
    with pytest.raises(ArtifactError, match="holds no OSCAR rotations"):
        load_rotations(str(tmp_path))


def test_unknown_format_version_and_unknown_keys(tmp_path):
    out = _artifact().save(tmp_path / "art")
    cfg = json.loads((out / CONFIG_FILENAME).read_text())
    cfg["format_version"] = 99
    (out / CONFIG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="unknown format_version 99"):
        RotationArtifact.load(out)
    cfg["format_version"] = 1
    cfg["quantization"]["k_clip"] = 0.9  # typo of k_clip_ratio
    (out / CONFIG_FILENAME).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="k_clip"):
        RotationArtifact.load(out)
    (out / CONFIG_FILENAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        RotationArtifact.load(out)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="group_size == head_dim"):
        OscarArtifactConfig(base_model=_info(), quantization=QuantizationConfig(group_size=8),
                            calibration=CalibrationInfo(source="x", num_tokens=1, sequence_length=1,
                                                        num_sequences=1))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        _info(num_attention_heads=5, num_kv_heads=2)
    with pytest.raises(ValueError, match="needs a 'calibration' section"):
        OscarArtifactConfig(base_model=_info(), quantization=QuantizationConfig(group_size=D))
    with pytest.raises(ValueError, match="less than or equal to 1"):
        QuantizationConfig(group_size=D, k_clip_ratio=1.5)


def test_check_compatible():
    art = _artifact()
    art.check_compatible("org/tiny-llama", "abc123", L, D)
    art.check_compatible("/local/copy/Tiny-Llama", None, L, D)  # local copy of the same model
    with pytest.raises(ArtifactError, match="calibrated for 'org/tiny-llama', not 'org/other'"):
        art.check_compatible("org/other", None, L, D)
    with pytest.raises(ArtifactError, match="at revision 'abc123', the model is at 'def456'"):
        art.check_compatible("org/tiny-llama", "def456", L, D)
    with pytest.raises(ArtifactError, match="do not fit this model"):
        art.check_compatible("org/tiny-llama", None, L + 1, D)
    hadamard_artifact(_info()).check_compatible("org/anything", "zzz", L, D)  # data-free fits any model


def test_hadamard_and_identity_artifacts():
    h = hadamard_artifact(_info())
    assert h.config.rotation.mode == RotationMode.HADAMARD
    assert torch.allclose(h.k_rotation[1], ref.hadamard(D, torch.float32))
    ident = hadamard_artifact(_info(), mode=RotationMode.NONE)
    assert torch.equal(ident.v_rotation[0], torch.eye(D))


def _write_zoo(folder: Path, k=None, v=None, fmt=1):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rots in (("k_rotation_qqt_r_h_pbr.pt", k), ("v_rotation_sst_r_h_pbr.pt", v)):
        rots = _rotations() if rots is None else rots
        torch.save({"format_version": fmt, "objective": "x", "source_grouping": "layer",
                    "layers": {i: {"layer_id": i, "rotation": rots[i], "eigenvalues": torch.rand(D)}
                               for i in range(rots.shape[0])}}, folder / name)


def test_rotation_zoo_loads_and_converts(tmp_path):
    k = _rotations()
    _write_zoo(tmp_path / "zoo", k=k)
    art = load_rotations(str(tmp_path / "zoo"), base_model=_info())
    assert torch.equal(art.k_rotation, k)
    out = art.save(tmp_path / "converted")
    assert torch.equal(RotationArtifact.load(out).k_rotation, k)


def test_cli_convert_zoo(tmp_path):
    from vllm_oscar.cli import main

    _write_zoo(tmp_path / "zoo")
    assert main(["convert-zoo", str(tmp_path / "zoo"), "--output", str(tmp_path / "out")]) == 0
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert RotationArtifact.load(tmp_path / "out").num_layers == L


def test_rotation_zoo_refuses_foreign_pickles(tmp_path):
    folder = tmp_path / "zoo"
    _write_zoo(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "k_rotation_qqt_r_h_pbr.pt").write_bytes(pickle.dumps({"format_version": 1, "layers": Evil()}))
    with pytest.raises(ArtifactError, match="not a plain-tensor pickle"):
        load_zoo(folder)


def test_rotation_zoo_bad_contents(tmp_path):
    _write_zoo(tmp_path / "a", fmt=2)
    with pytest.raises(ArtifactError, match="unknown RotationZoo format_version 2"):
        load_zoo(tmp_path / "a")
    _write_zoo(tmp_path / "b", k=torch.randn(L, D, D))
    with pytest.raises(ArtifactError, match="not orthogonal"):
        load_zoo(tmp_path / "b")
    (tmp_path / "c").mkdir()
    torch.save({"format_version": 1, "layers": {0: {"rotation": torch.eye(D)[None].expand(2, D, D)}}},
               tmp_path / "c" / "k_rotation_qqt_r_h_pbr.pt")
    with pytest.raises(ArtifactError, match="per-head rotations are not supported"):
        load_zoo(tmp_path / "c")


def _fake_hub_cache(cache: Path, repo: str, commit: str, files: Path) -> None:
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_hub_offline_cache_resolution(tmp_path, monkeypatch):
    out = _artifact().save(tmp_path / "art")
    cache = tmp_path / "hf"
    _fake_hub_cache(cache, "acme/oscar-tiny", "0123456789abcdef0123456789abcdef01234567", out)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    art = load_rotations("acme/oscar-tiny")
    assert torch.equal(art.k_rotation, RotationArtifact.load(out).k_rotation)
    art = load_rotations("acme/oscar-tiny@0123456789abcdef0123456789abcdef01234567")
    assert art.num_layers == L
    with pytest.raises(ArtifactError, match="HF_HUB_OFFLINE is set and the cache has no copy"):
        load_rotations("acme/not-cached")


def test_bad_source_strings(tmp_path):
    with pytest.raises(ArtifactError, match="neither an existing folder nor a Hub repo id"):
        resolve_rotations_dir("no such/thing/here")
    with pytest.raises(ArtifactError, match="empty revision"):
        resolve_rotations_dir("org/name@")


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return type("Info", (), {"commit_url": "https://hub.example/acme/x/commit/1"})()


def test_publish_hands_the_exact_operations_to_hfapi(tmp_path):
    out = _artifact().save(tmp_path / "art", card="# card\n")
    api = RecordingApi()
    url = publish(out, "acme/oscar-tiny", api=api)
    assert url.endswith("/commit/1")
    (op1, kw1), (op2, kw2) = api.calls
    assert op1 == "create_repo" and kw1 == {"repo_id": "acme/oscar-tiny", "repo_type": "model", "private": False,
                                            "exist_ok": True}
    assert op2 == "upload_folder"
    assert kw2["repo_id"] == "acme/oscar-tiny" and kw2["folder_path"] == str(out)
    assert set(kw2["allow_patterns"]) == {CONFIG_FILENAME, ROTATIONS_FILENAME, "README.md"}


def test_publish_validates_before_upload(tmp_path):
    api = RecordingApi()
    with pytest.raises(ArtifactError):
        publish(tmp_path, "acme/x", api=api)
    out = _artifact().save(tmp_path / "art")
    with pytest.raises(ArtifactError, match="not a Hub repo id"):
        publish(out, "not a repo", api=api)
    assert api.calls == []
