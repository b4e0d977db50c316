"""The rotation artifact's configuration: ``oscar_config.json``, a versioned pydantic schema.

The artifact *is* the runtime configuration: serving reads the quantizer (``levels`` and clip
ratios), the windows and the model identity from here, next to ``rotations.safetensors``. Unknown keys
are errors (a typo must not silently fall back to a default), and a newer ``format_version`` than this
package knows is refused.

Versions: 1 had no ``quantization.levels`` (every version-1 artifact is the paper's clipped min-max
grid, ``levels: "minmax"``, and still loads); 2 added it. This package writes version 2, so an older
vllm-oscar refuses a new artifact with its "unknown format_version" message instead of an unknown key.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_oscar import __version__

FORMAT_VERSION = 2
#: Versions this package reads (1: before ``quantization.levels``, which then defaults to "minmax").
READABLE_FORMAT_VERSIONS = (1, 2)  # 1 is upgraded to 2 on load
CONFIG_FILENAME = "oscar_config.json"
ROTATIONS_FILENAME = "rotations.safetensors"
CARD_FILENAME = "README.md"

#: Hugging Face architectures whose attention the calibrator can capture (post-QK-norm, post-RoPE).
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RotationMode(str, Enum):
    """How the per-layer rotations were made."""

    OSCAR = "oscar"  # calibrated: R = U H P_br from the attention-aware targets
    HADAMARD = "hadamard"  # data-free: the normalized Hadamard for every layer (QuaRot-style)
    NONE = "none"  # identity (naive INT2), a baseline


class Method(str, Enum):
    """Which variant of the method made the rotations (issue: keep the faithful method selectable)."""

    PAPER = "paper"  # the authors' code: K target qqt, V target sst (diagonal proxy), r_h_pbr


class BaseModelInfo(_Strict):
    id: str = Field(description="Hugging Face model id or the local path it was calibrated from")
    revision: str | None = Field(default=None, description="commit hash or tag of the model, if known")
    architecture: str
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _gqa(self) -> "BaseModelInfo":
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        return self


#: How a row's (scale, offset) is chosen; both store ``code * scale + offset`` with an fp16 pair.
LEVELS = ("minmax", "mse")
Levels = Literal["minmax", "mse"]


class QuantizationConfig(_Strict):
    bits: Literal[2] = 2
    group_size: int = Field(gt=0, description="elements sharing one scale/offset; must equal head_dim")
    levels: Levels = Field(
        default="minmax",
        description="'minmax': clip rows, then span [min, max] (the paper); 'mse': no clipping, the "
                    "per-row MSE-fitted grid (reference.quantize_int2_mse)",
    )
    k_clip_ratio: float = Field(default=0.96, ge=0.0, le=1.0, description="row quantile clip for K; 0 = off")
    v_clip_ratio: float = Field(default=0.92, ge=0.0, le=1.0, description="row quantile clip for V; 0 = off")
    scale_dtype: Literal["float16", "u8"] = Field(
        default="float16",
        description="how each row's (scale, offset) is stored: 'float16' (two fp16, 4 bytes; the paper's) or "
                    "'u8' (an 8-bit float scale and an 8-bit offset in sixteenths of it, 2 bytes; "
                    "vllm_oscar/layout.py)",
    )

    @model_validator(mode="before")
    @classmethod
    def _mse_does_not_clip(cls, data):
        # The clip defaults are the paper's (min-max) ratios: with "mse" they default to 0 instead.
        if isinstance(data, dict) and data.get("levels") == "mse":
            data = dict(data)
            for key in ("k_clip_ratio", "v_clip_ratio"):
                ratio = data.setdefault(key, 0.0)
                if isinstance(ratio, (int, float)) and ratio > 0:
                    raise ValueError(
                        f"levels 'mse' fits the grid to the whole row and does not clip; {key} must be 0, got "
                        f"{ratio} (clip ratios belong to levels 'minmax')"
                    )
        return data


class WindowConfig(_Strict):
    sink_tokens: int = Field(default=64, ge=0, description="first tokens of every request kept in BF16")
    recent_tokens: int = Field(default=256, ge=0, description="most recent tokens kept in BF16")


class RotationConfig(_Strict):
    mode: RotationMode = RotationMode.OSCAR
    method: Method = Method.PAPER
    k_target: Literal["qqt", "none"] = "qqt"
    v_target: Literal["sst", "none"] = "sst"
    composition: Literal["r_h_pbr", "h", "identity"] = "r_h_pbr"


class CalibrationInfo(_Strict):
    source: str = Field(description="what text the statistics came from")
    num_tokens: int = Field(ge=0)
    sequence_length: int = Field(ge=0)
    num_sequences: int = Field(ge=0)
    seed: int = 0


class ToolInfo(_Strict):
    name: str = "vllm-oscar"
    version: str = __version__


class OscarArtifactConfig(_Strict):
    """Everything serving needs besides the matrices. ``format_version`` guards the schema."""

    format_version: int = FORMAT_VERSION
    base_model: BaseModelInfo
    quantization: QuantizationConfig
    windows: WindowConfig = WindowConfig()
    rotation: RotationConfig = RotationConfig()
    calibration: CalibrationInfo | None = None
    tool: ToolInfo = ToolInfo()

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"unknown format_version {v}; this vllm-oscar ({__version__}) reads format_version "
                f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Upgrade vllm-oscar, or re-create the artifact "
                "with `vllm-oscar calibrate`."
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, data):
        # Version 1 is version 2 without quantization.levels (so "minmax"): read it as version 2, so
        # that saving it again writes a file that round-trips.
        if isinstance(data, dict) and data.get("format_version") == 1:
            data = {**data, "format_version": 2}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "OscarArtifactConfig":
        if self.quantization.group_size != self.base_model.head_dim:
            raise ValueError(
                f"quantization.group_size={self.quantization.group_size} is not supported: only one "
                f"scale per row, group_size == head_dim ({self.base_model.head_dim})"
            )
        if self.rotation.mode == RotationMode.OSCAR and self.calibration is None:
            raise ValueError("rotation.mode 'oscar' needs a 'calibration' section (what the rotations were fit on)")
        return self
