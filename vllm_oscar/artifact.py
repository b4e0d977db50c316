"""Rotation artifacts: ``rotations.safetensors`` + ``oscar_config.json`` (+ a model card).

``rotations.safetensors`` holds, for ``L`` layers and head dim ``d``::

    k_rotation     fp32 [L, d, d]   R_K (row-vector convention: k_rot = k @ R_K)
    v_rotation     fp32 [L, d, d]   R_V
    k_eigenvalues  fp32 [L, d]      eigenvalues of the K target, ascending (as eigh gives them)
    v_eigenvalues  fp32 [L, d]      eigenvalues of the V target

The OSCAR authors' RotationZoo files (``k_rotation_qqt_r_h_pbr.pt`` / ``v_rotation_sst_r_h_pbr.pt``,
``torch.save`` dicts ``{"format_version": 1, "layers": {id: {"rotation", "eigenvalues"}}}``) are read
with ``torch.load(weights_only=True)``, so a pickle holding anything but plain tensors and containers
is refused, and :func:`convert_zoo` turns them into this format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_oscar.config import (
    CARD_FILENAME,
    CONFIG_FILENAME,
    ROTATIONS_FILENAME,
    BaseModelInfo,
    OscarArtifactConfig,
    QuantizationConfig,
    RotationConfig,
    RotationMode,
    WindowConfig,
)

#: max |R R^T - I| accepted for an fp32 rotation; fp32 round-off of a fitted d=128 matrix is ~1e-6.
ORTHOGONALITY_TOLERANCE = 1e-4
ZOO_K_FILENAME = "k_rotation_qqt_r_h_pbr.pt"
ZOO_V_FILENAME = "v_rotation_sst_r_h_pbr.pt"
TENSOR_KEYS = ("k_rotation", "v_rotation", "k_eigenvalues", "v_eigenvalues")


class ArtifactError(ValueError):
    """A rotation artifact is missing, malformed, or made for another model."""


def check_rotations(rotations: torch.Tensor, what: str, *, num_layers: int | None = None,
                    head_dim: int | None = None) -> None:
    """Validate a stack of rotations ``[L, d, d]``: shape, finiteness and orthogonality."""
    if rotations.dim() != 3 or rotations.shape[1] != rotations.shape[2]:
        raise ArtifactError(f"{what}: expected a [num_layers, head_dim, head_dim] tensor, got {tuple(rotations.shape)}")
    if num_layers is not None and rotations.shape[0] != num_layers:
        raise ArtifactError(f"{what}: has {rotations.shape[0]} layers, the model has {num_layers}")
    if head_dim is not None and rotations.shape[1] != head_dim:
        raise ArtifactError(f"{what}: head_dim {rotations.shape[1]}, the model has head_dim {head_dim}")
    if not torch.isfinite(rotations).all():
        bad = sorted({int(i) for i in (~torch.isfinite(rotations)).nonzero()[:, 0]})
        raise ArtifactError(f"{what}: NaN or inf in layer(s) {bad[:8]}")
    r = rotations.to(torch.float64)
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    err = (r @ r.transpose(1, 2) - eye).abs().amax((1, 2))
    worst = int(err.argmax())
    if float(err[worst]) > ORTHOGONALITY_TOLERANCE:
        raise ArtifactError(
            f"{what}: layer {worst} is not orthogonal: max|R R^T - I| = {float(err[worst]):.3g} > "
            f"{ORTHOGONALITY_TOLERANCE:g}"
        )


@dataclass
class RotationArtifact:
    """Per-layer K and V rotations plus the configuration serving needs."""

    config: OscarArtifactConfig
    k_rotation: torch.Tensor  # fp32 [L, d, d]
    v_rotation: torch.Tensor  # fp32 [L, d, d]
    k_eigenvalues: torch.Tensor  # fp32 [L, d]
    v_eigenvalues: torch.Tensor  # fp32 [L, d]

    def __post_init__(self) -> None:
        m = self.config.base_model
        for name in ("k_rotation", "v_rotation"):
            t = getattr(self, name).to(torch.float32).contiguous()
            check_rotations(t, name, num_layers=m.num_layers, head_dim=m.head_dim)
            setattr(self, name, t)
        for name in ("k_eigenvalues", "v_eigenvalues"):
            t = getattr(self, name).to(torch.float32).contiguous()
            if tuple(t.shape) != (m.num_layers, m.head_dim):
                raise ArtifactError(f"{name}: expected shape {(m.num_layers, m.head_dim)}, got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ArtifactError(f"{name}: contains NaN or inf")
            setattr(self, name, t)

    # ---------------------------------------------------------------------------------- identity

    @property
    def num_layers(self) -> int:
        return self.config.base_model.num_layers

    @property
    def head_dim(self) -> int:
        return self.config.base_model.head_dim

    def check_compatible(self, model_id: str | None, revision: str | None, num_layers: int, head_dim: int) -> None:
        """Raise :class:`ArtifactError` if this artifact was made for another model or revision."""
        m = self.config.base_model
        if num_layers != m.num_layers or head_dim != m.head_dim:
            raise ArtifactError(
                f"rotations for {m.id} ({m.num_layers} layers, head_dim {m.head_dim}) do not fit this model "
                f"({num_layers} layers, head_dim {head_dim}); calibrate for it with "
                f"`vllm-oscar calibrate --model {model_id or 'MODEL'} --output DIR`"
            )
        if self.config.rotation.mode != RotationMode.OSCAR:
            return  # data-free rotations fit any model of the right shape
        if model_id is not None and _model_name(model_id) != _model_name(m.id):
            raise ArtifactError(
                f"rotations were calibrated for {m.id!r}, not {model_id!r}; calibrate for this model with "
                f"`vllm-oscar calibrate --model {model_id} --output DIR`"
            )
        if revision is not None and m.revision is not None and revision != m.revision:
            raise ArtifactError(
                f"rotations were calibrated for {m.id} at revision {m.revision!r}, the model is at {revision!r}; "
                "re-calibrate, or load the model at the artifact's revision"
            )

    # ---------------------------------------------------------------------------------- file I/O

    def save(self, directory: str | os.PathLike, card: str | None = None) -> Path:
        """Write the artifact folder atomically: a temporary sibling folder is renamed into place."""
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            save_file(
                {k: getattr(self, k) for k in TENSOR_KEYS},
                str(tmp / ROTATIONS_FILENAME),
                metadata={"format": "pt", "producer": "vllm-oscar"},
            )
            (tmp / CONFIG_FILENAME).write_text(self.config.model_dump_json(indent=2) + "\n")
            if card is not None:
                (tmp / CARD_FILENAME).write_text(card)
            if out.exists():
                if not (out / CONFIG_FILENAME).exists() and any(out.iterdir()):
                    raise ArtifactError(f"{out} exists and is not an OSCAR artifact folder; refusing to replace it")
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RotationArtifact":
        """Read a folder in this package's format (:data:`ROTATIONS_FILENAME` + :data:`CONFIG_FILENAME`)."""
        d = Path(directory)
        cfg_path, rot_path = d / CONFIG_FILENAME, d / ROTATIONS_FILENAME
        for p in (cfg_path, rot_path):
            if not p.is_file():
                raise ArtifactError(
                    f"{p} is missing: an OSCAR artifact folder holds {ROTATIONS_FILENAME} and {CONFIG_FILENAME} "
                    f"(or the RotationZoo files {ZOO_K_FILENAME} and {ZOO_V_FILENAME})"
                )
        try:
            config = OscarArtifactConfig.model_validate(json.loads(cfg_path.read_text()))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{cfg_path}: not valid JSON ({exc})") from exc
        except ValidationError as exc:
            raise ArtifactError(f"{cfg_path}: invalid OSCAR config:\n{exc}") from exc
        try:
            tensors = load_file(str(rot_path))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{rot_path}: not a readable safetensors file ({exc})") from exc
        missing = [k for k in TENSOR_KEYS if k not in tensors]
        if missing:
            raise ArtifactError(f"{rot_path}: missing tensors {missing}; expected {list(TENSOR_KEYS)}")
        try:
            return cls(config=config, **{k: tensors[k] for k in TENSOR_KEYS})
        except ArtifactError as exc:
            raise ArtifactError(f"{rot_path}: {exc}") from exc


def _model_name(model_id: str) -> str:
    """Compare model ids by their last path component, case-insensitively (local copies of Hub models)."""
    return Path(model_id.rstrip("/")).name.lower()


def hadamard_artifact(
    base_model: BaseModelInfo,
    quantization: QuantizationConfig | None = None,
    windows: WindowConfig | None = None,
    mode: RotationMode = RotationMode.HADAMARD,
) -> RotationArtifact:
    """The data-free artifact: the normalized Hadamard (or identity, ``mode=NONE``) for every layer."""
    from vllm_oscar.ops.reference import hadamard  # noqa: PLC0415

    L, d = base_model.num_layers, base_model.head_dim
    if mode == RotationMode.OSCAR:
        raise ValueError("hadamard_artifact makes data-free artifacts; mode must be 'hadamard' or 'none'")
    r = hadamard(d, torch.float32) if mode == RotationMode.HADAMARD else torch.eye(d)
    stack = r.expand(L, d, d).contiguous()
    ones = torch.ones(L, d)
    composition = "h" if mode == RotationMode.HADAMARD else "identity"
    return RotationArtifact(
        config=OscarArtifactConfig(
            base_model=base_model,
            quantization=quantization or QuantizationConfig(group_size=d),
            windows=windows or WindowConfig(),
            rotation=RotationConfig(mode=mode, k_target="none", v_target="none", composition=composition),
        ),
        k_rotation=stack,
        v_rotation=stack.clone(),
        k_eigenvalues=ones,
        v_eigenvalues=ones.clone(),
    )


# ---------------------------------------------------------------------------------- RotationZoo


def _load_zoo_file(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing (RotationZoo folders hold {ZOO_K_FILENAME} and {ZOO_V_FILENAME})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError... for refused content
        raise ArtifactError(
            f"{path}: refused to load: it is not a plain-tensor pickle (torch.load weights_only=True failed: "
            f"{str(exc).splitlines()[0]})"
        ) from exc
    if not isinstance(obj, dict) or "layers" not in obj:
        raise ArtifactError(f"{path}: expected a dict with 'format_version' and 'layers', got {type(obj).__name__}")
    if obj.get("format_version") != 1:
        raise ArtifactError(f"{path}: unknown RotationZoo format_version {obj.get('format_version')!r}; known: 1")
    layers = obj["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ArtifactError(f"{path}: 'layers' must be a non-empty dict of layer id -> {{rotation, eigenvalues}}")
    ids = sorted(int(k) for k in layers)
    if ids != list(range(len(ids))):
        raise ArtifactError(f"{path}: layer ids must be 0..L-1 without gaps, got {ids[:4]}...{ids[-2:]}")
    rots, eigs = [], []
    for i in ids:
        entry = layers.get(i, layers.get(str(i)))
        if not isinstance(entry, dict) or not isinstance(entry.get("rotation"), torch.Tensor):
            raise ArtifactError(f"{path}: layer {i} has no 'rotation' tensor")
        r = entry["rotation"]
        if r.dim() != 2 or r.shape[0] != r.shape[1]:
            raise ArtifactError(
                f"{path}: layer {i} rotation has shape {tuple(r.shape)}; expected one [head_dim, head_dim] matrix "
                "per layer (per-head rotations are not supported)"
            )
        e = entry.get("eigenvalues")
        rots.append(r.float())
        eigs.append(e.float() if isinstance(e, torch.Tensor) else torch.ones(r.shape[0]))
    return torch.stack(rots), torch.stack(eigs)


def is_zoo_folder(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / ZOO_K_FILENAME).exists() or (d / ZOO_V_FILENAME).exists()


def load_zoo(
    directory: str | os.PathLike,
    base_model: BaseModelInfo | None = None,
    quantization: QuantizationConfig | None = None,
    windows: WindowConfig | None = None,
) -> RotationArtifact:
    """Read an OSCAR-authors RotationZoo folder. Model facts the files lack come from ``base_model``;
    without it the id is the folder name and the head counts are unknown (recorded as 1)."""
    d = Path(directory)
    k_rot, k_eig = _load_zoo_file(d / ZOO_K_FILENAME)
    v_rot, v_eig = _load_zoo_file(d / ZOO_V_FILENAME)
    if k_rot.shape != v_rot.shape:
        raise ArtifactError(f"{d}: K rotations {tuple(k_rot.shape)} and V rotations {tuple(v_rot.shape)} differ")
    L, hd = k_rot.shape[0], k_rot.shape[1]
    if base_model is None:
        base_model = BaseModelInfo(id=d.name, architecture="unknown", num_layers=L, num_attention_heads=1,
                                   num_kv_heads=1, head_dim=hd)
    from vllm_oscar.config import CalibrationInfo  # noqa: PLC0415

    cfg = OscarArtifactConfig(
        base_model=base_model,
        quantization=quantization or QuantizationConfig(group_size=hd),
        windows=windows or WindowConfig(),
        rotation=RotationConfig(),
        calibration=CalibrationInfo(source=f"OSCAR RotationZoo ({d.name})", num_tokens=0, sequence_length=0,
                                    num_sequences=0),
    )
    try:
        return RotationArtifact(cfg, k_rot, v_rot, k_eig, v_eig)
    except ArtifactError as exc:
        raise ArtifactError(f"{d}: {exc}") from exc
