"""What OSCAR does for one served model: the user's settings, per-model defaults and the rotations.

Users configure the plugin through vLLM's sanctioned channel for plugin settings::

    vllm serve MODEL --kv-cache-dtype oscar_int2 \\
        --additional-config '{"oscar": {"rotations": "org/name@rev", "levels": "mse"}}'

    LLM(MODEL, kv_cache_dtype="oscar_int2", additional_config={"oscar": {...}})

Each setting is taken from the first place that has it:

1. ``--additional-config '{"oscar": {...}}'`` (:class:`OscarUserConfig`);
2. the rotation artifact's own ``oscar_config.json`` (quantizer and windows it was calibrated with);
3. the per-model defaults in ``configs/models/*.json`` matched on the HF config (:class:`ModelDefaults`);
4. the method's defaults (sink 64, recent 256; ``levels`` "mse" without an artifact; with
   ``levels: "minmax"``, K clip 0.96 and V clip 0.92; ``scale_dtype`` :data:`DEFAULT_SCALE_DTYPE`
   without an artifact).

``scale_dtype`` picks how each INT2 row's (scale, offset) is stored: ``"float16"`` (4 bytes, the paper's)
or ``"u8"`` (2 bytes; :mod:`vllm_oscar.layout`). It sets the KV page size, so every process of an engine
uses the resolved value.

``levels`` picks the INT2 grid: ``"mse"`` (per-row MSE-fitted, no clipping; the data-free default)
or ``"minmax"`` (the paper's clipped min-max grid; what ``method: paper`` artifacts record). Clip
ratios only apply to ``"minmax"``: with ``"mse"`` they resolve to 0, and a user-set ratio above 0 is
an error.

Without calibrated rotations the model is served in the data-free mode (a normalized Hadamard rotation
for every layer, the MSE-fitted grid) with **one** startup warning, unless ``"require_calibrated": true``.

Resolution happens once, in the process that builds the engine config (the API server for
``vllm serve``, the user's process for ``LLM``); the result is stored in
``vllm_config.additional_config["oscar"]["_resolved"]`` so engine-core and worker processes, which
receive a pickled copy, use exactly the same settings and do not warn again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_oscar.config import LEVELS, Levels, RotationMode

# A child of vLLM's "vllm" logger: same handler, format and level as vLLM's own messages.
logger = logging.getLogger("vllm.oscar")

ADDITIONAL_CONFIG_KEY = "oscar"
RESOLVED_KEY = "_resolved"
CALIBRATE_COMMAND = "vllm-oscar calibrate --model {model} --output DIR"

#: The method's defaults, used when nothing else says otherwise. The clip ratios are the OSCAR paper's
#: (authors' eval scripts) and apply to levels "minmax" only; without an artifact the grid is "mse"
#: (docs/accuracy.md: +2.0/+2.5/+1.0% perplexity vs +9.2/+10.8/+5.7% for minmax + clipping, SmolLM2).
DEFAULT_LEVELS = "mse"
DEFAULT_K_CLIP_RATIO = 0.96
DEFAULT_V_CLIP_RATIO = 0.92
DEFAULT_SINK_TOKENS = 64
#: Without an artifact. Artifacts record their own (every artifact written before "u8" existed: "float16").
DEFAULT_SCALE_DTYPE = "float16"
DEFAULT_RECENT_TOKENS = 256


class OscarConfigError(ValueError):
    """An OSCAR setting is invalid, or OSCAR cannot serve this model/engine configuration."""


# ------------------------------------------------------------------------------------------------
# User-facing settings
# ------------------------------------------------------------------------------------------------


class OscarUserConfig(BaseModel):
    """``--additional-config '{"oscar": {...}}'``. Every field is optional; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rotations: str | None = Field(
        default=None,
        description="calibrated rotations: a local artifact folder, a RotationZoo folder, or a Hub repo "
                    "'org/name' / 'org/name@revision'",
    )
    subfolder: str | None = Field(default=None, description="folder inside `rotations` holding the files")
    rotation: RotationMode | None = Field(
        default=None,
        description="'oscar' (calibrated), 'hadamard' (data-free) or 'none' (naive INT2, a baseline); "
                    "default: 'oscar' when rotations are found, else 'hadamard' with a warning",
    )
    levels: Levels | None = Field(
        default=None,
        description="INT2 grid: 'mse' (per-row MSE fit, no clipping) or 'minmax' (the paper's clipped min-max); "
                    "default: the artifact's, else 'mse'",
    )
    k_clip_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="K row clip quantile for levels 'minmax'; 0 = off"
    )
    v_clip_ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="V row clip quantile for levels 'minmax'; 0 = off"
    )
    scale_dtype: Literal["float16", "u8"] | None = Field(
        default=None,
        description="each INT2 row's (scale, offset): 'float16' (4 bytes) or 'u8' (2 bytes: more tokens per GB); "
                    "default: the artifact's, else " + DEFAULT_SCALE_DTYPE,
    )
    sink_tokens: int | None = Field(default=None, ge=0, description="first tokens of a request kept in BF16")
    recent_tokens: int | None = Field(default=None, ge=0, description="most recent tokens kept in BF16")
    skip_layers: list[int | str] | None = Field(
        default=None,
        description="layers kept in BF16, as vLLM's --kv-cache-dtype-skip-layers (indices or 'sliding_window')",
    )
    require_calibrated: bool = Field(
        default=False, description="refuse to start without calibrated rotations instead of the data-free mode"
    )
    fold_value_rotation: bool = Field(
        default=True,
        description="multiply each layer's o_proj input columns by the value rotation after loading, so that "
                    "decode skips o @ R_V^T (only where exact: unquantized o_proj fed directly by attention, no "
                    "LoRA; elsewhere the kernels keep applying it)",
    )

    @model_validator(mode="after")
    def _mse_does_not_clip(self) -> "OscarUserConfig":
        if self.levels == "mse":
            for key in ("k_clip_ratio", "v_clip_ratio"):
                if (getattr(self, key) or 0) > 0:
                    raise ValueError(
                        f"{key}={getattr(self, key)} clips rows, which levels 'mse' does not do (it fits the grid "
                        f"to the whole row); drop {key}, or use \"levels\": \"minmax\""
                    )
        return self

    @field_validator("skip_layers")
    @classmethod
    def _skip_entries(cls, v):
        if v is None:
            return v
        out = []
        for item in v:
            s = str(item).strip()
            if not (s.isdigit() or s == "sliding_window"):
                raise ValueError(f"skip_layers entry {item!r} must be a layer index or 'sliding_window'")
            out.append(s)
        return out


def _field_help(model: type[BaseModel]) -> str:
    return "; ".join(f"{name}: {f.description}" for name, f in model.model_fields.items())


def _format_validation_error(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    lines = []
    valid = sorted(model.model_fields)
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key {loc!r}; valid keys: {valid}")
        elif err["type"] == "enum":
            allowed = [m.value for m in RotationMode]
            lines.append(f"{loc}: {err['input']!r} is not a valid option; valid options: {allowed}")
        elif err["type"] == "literal_error" and loc.endswith("levels"):
            lines.append(f"{loc}: {err['input']!r} is not a valid option; valid options: {list(LEVELS)}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid {where}:\n  " + "\n  ".join(lines) + f"\nSettings: {_field_help(model)}"


def parse_user_config(additional_config: Any) -> OscarUserConfig:
    """The ``"oscar"`` entry of vLLM's ``additional_config`` (missing = all defaults)."""
    if additional_config is None:
        return OscarUserConfig()
    if not isinstance(additional_config, dict):
        raise OscarConfigError(
            f"--additional-config must be a JSON object for oscar_int2, got {type(additional_config).__name__}"
        )
    raw = additional_config.get(ADDITIONAL_CONFIG_KEY, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OscarConfigError(
            f'--additional-config "oscar" must be a JSON object such as {{"oscar": {{"rotations": "DIR"}}}}, '
            f"got {raw!r}"
        )
    raw = {k: v for k, v in raw.items() if k != RESOLVED_KEY}
    try:
        return OscarUserConfig.model_validate(raw)
    except ValidationError as exc:
        raise OscarConfigError(
            _format_validation_error(exc, "--additional-config '{\"oscar\": {...}}'", OscarUserConfig)
        ) from None


# ------------------------------------------------------------------------------------------------
# Per-model defaults: configs/models/*.json, matched on the HF config (data, not code)
# ------------------------------------------------------------------------------------------------


class ModelMatch(BaseModel):
    """Which models a defaults file applies to. Every listed constraint must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architectures: list[str] = Field(min_length=1, description="any of the HF config's `architectures`")
    model_names: list[str] = Field(
        default_factory=list,
        description="model id or folder names, compared on the last path component, case-insensitively",
    )
    hf_config: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="HF text-config attributes that must be equal"
    )

    def specificity(self) -> int:
        return 1 + bool(self.model_names) + len(self.hf_config)


class ModelDefaults(BaseModel):
    """One ``configs/models/<name>.json`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    match: ModelMatch
    oscar: OscarUserConfig = OscarUserConfig()


def model_configs_dir():
    """Where the per-model defaults live: the ``vllm_oscar.model_configs`` package data when installed
    from a wheel (``configs/models`` mapped in pyproject.toml), ``configs/models`` in a checkout."""
    from importlib import resources

    try:
        return resources.files("vllm_oscar.model_configs")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs" / "models"


@functools.lru_cache(maxsize=4)
def load_model_defaults(directory: str | None = None) -> tuple[tuple[str, ModelDefaults], ...]:
    """Every defaults file, validated (a broken file is an error naming the file, never skipped)."""
    d = Path(directory) if directory is not None else model_configs_dir()
    files = sorted((f for f in d.iterdir() if f.name.endswith(".json")), key=lambda f: f.name) if d.is_dir() else []
    out = []
    for path in files:
        try:
            out.append((path.name, ModelDefaults.model_validate(json.loads(path.read_text()))))
        except json.JSONDecodeError as exc:
            raise OscarConfigError(f"{path}: not valid JSON ({exc})") from None
        except ValidationError as exc:
            raise OscarConfigError(_format_validation_error(exc, f"model defaults file {path}", ModelDefaults)) from None
    return tuple(out)


@dataclass(frozen=True)
class ModelFacts:
    """What OSCAR needs to know about the served model (from vLLM's ``ModelConfig``)."""

    model: str
    revision: str | None
    architectures: tuple[str, ...]
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hf_config: dict

    @classmethod
    def from_model_config(cls, model_config) -> ModelFacts:
        text = model_config.hf_text_config
        archs = tuple(model_config.architectures or getattr(model_config.hf_config, "architectures", None) or ())
        return cls(
            model=str(model_config.model),
            revision=model_config.revision,
            architectures=archs,
            num_layers=int(text.num_hidden_layers),
            num_attention_heads=int(text.num_attention_heads),
            num_kv_heads=int(model_config.get_total_num_kv_heads()),
            head_dim=int(model_config.get_head_size()),
            hf_config=text.to_dict() if hasattr(text, "to_dict") else dict(vars(text)),
        )

    @property
    def name(self) -> str:
        return Path(self.model.rstrip("/")).name.lower()


def match_model_defaults(facts: ModelFacts, directory: str | None = None) -> tuple[str, ModelDefaults] | None:
    """The most specific defaults file matching the model; two equally specific matches are an error."""
    hits = []
    for fname, d in load_model_defaults(directory):
        m = d.match
        if not set(m.architectures) & set(facts.architectures):
            continue
        if m.model_names and facts.name not in {Path(n.rstrip("/")).name.lower() for n in m.model_names}:
            continue
        if any(facts.hf_config.get(k) != v for k, v in m.hf_config.items()):
            continue
        hits.append((m.specificity(), fname, d))
    if not hits:
        return None
    hits.sort(key=lambda h: -h[0])
    if len(hits) > 1 and hits[0][0] == hits[1][0]:
        raise OscarConfigError(
            f"model defaults {hits[0][1]} and {hits[1][1]} both match {facts.model} equally; make one of them "
            "more specific (add model_names or hf_config attributes)"
        )
    return hits[0][1], hits[0][2]


# ------------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedOscarConfig:
    """The settings every process uses; JSON-serializable (stored in ``additional_config``)."""

    model: str
    rotation: str  # RotationMode value
    rotations: str | None  # artifact source for 'oscar'; None for the data-free modes
    subfolder: str | None
    levels: str  # config.LEVELS value
    k_clip_ratio: float
    v_clip_ratio: float
    sink_tokens: int
    recent_tokens: int
    skip_layers: tuple[str, ...]
    defaults_file: str | None
    fold_value_rotation: bool = True  # attention/fold.py
    scale_dtype: str = "float16"  # config.QuantizationConfig.scale_dtype value

    @property
    def layout_params(self) -> str:
        """The INT2 pages' :data:`vllm_oscar.layout.PARAM_FORMATS` key."""
        from vllm_oscar.layout import params_for_scale_dtype

        return params_for_scale_dtype(self.scale_dtype)

    @property
    def mode(self) -> RotationMode:
        return RotationMode(self.rotation)

    @property
    def windows_enabled(self) -> bool:
        return self.sink_tokens > 0 or self.recent_tokens > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip_layers"] = list(self.skip_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ResolvedOscarConfig:
        d = dict(d)
        d["skip_layers"] = tuple(d.get("skip_layers", ()))
        d.setdefault("levels", "minmax")  # recorded before levels existed: the clipped min-max grid
        return cls(**d)


def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _base_model_info(facts: ModelFacts):
    from vllm_oscar.config import BaseModelInfo

    return BaseModelInfo(
        id=facts.model, revision=facts.revision,
        architecture=facts.architectures[0] if facts.architectures else "unknown",
        num_layers=facts.num_layers, num_attention_heads=facts.num_attention_heads,
        num_kv_heads=facts.num_kv_heads, head_dim=facts.head_dim,
    )


def resolve(facts: ModelFacts, user: OscarUserConfig, *, defaults_dir: str | None = None,
            warn: bool = True) -> tuple[ResolvedOscarConfig, Any]:
    """Settings and rotation artifact for a model. Raises :class:`OscarConfigError` on any conflict."""
    matched = match_model_defaults(facts, defaults_dir)
    defaults_file, defaults = (matched[0], matched[1].oscar) if matched else (None, OscarUserConfig())

    source = user.rotations or defaults.rotations
    subfolder = user.subfolder if user.rotations else defaults.subfolder
    mode = user.rotation or defaults.rotation
    cmd = CALIBRATE_COMMAND.format(model=facts.model)

    if user.require_calibrated and mode not in (None, RotationMode.OSCAR):
        raise OscarConfigError(
            f'"require_calibrated": true contradicts "rotation": "{mode.value}"; drop one of them'
        )
    if mode in (RotationMode.HADAMARD, RotationMode.NONE) and user.rotations:
        raise OscarConfigError(
            f'"rotation": "{mode.value}" is data-free but "rotations" is set to {user.rotations!r}; '
            'drop "rotations", or use "rotation": "oscar" to serve them'
        )
    artifact = None
    if mode in (None, RotationMode.OSCAR) and source:
        artifact = load_artifact(source, subfolder, facts)
        mode = RotationMode.OSCAR
    elif mode == RotationMode.OSCAR or user.require_calibrated:
        why = '"require_calibrated": true' if user.require_calibrated else '"rotation": "oscar"'
        raise OscarConfigError(
            f"calibrated OSCAR rotations are required for {facts.model} ({why}) but none were given "
            "(--additional-config '{\"oscar\": {\"rotations\": \"DIR or org/name@rev\"}}') and no defaults file "
            f"in configs/models names any. Make them with `{cmd}`, or use \"rotation\": \"hadamard\" (data-free)."
        )
    elif mode is None:
        mode = RotationMode.HADAMARD
        if warn:
            logger.warning(
                "vllm-oscar: calibrated OSCAR rotations were not found for %s; serving oscar_int2 in the "
                "data-free mode (a normalized Hadamard rotation for every layer, the per-row MSE-fitted INT2 "
                "grid and the BF16 windows). Make calibrated rotations with `%s` and pass them with "
                "--additional-config '{\"oscar\": {\"rotations\": \"DIR\"}}'; set \"require_calibrated\": true "
                "to refuse to start without them.", facts.model, cmd,
            )

    art_q = artifact.config.quantization if artifact is not None else None
    art_w = artifact.config.windows if artifact is not None else None
    levels = _first(user.levels, art_q and art_q.levels, defaults.levels, DEFAULT_LEVELS)
    if levels == "mse":
        # Clip ratios belong to "minmax": an artifact's or a defaults file's are not used with "mse".
        for key in ("k_clip_ratio", "v_clip_ratio"):
            if (getattr(user, key) or 0) > 0:
                why = ("set by you" if user.levels else "the artifact's" if art_q is not None else
                       f"from configs/models/{defaults_file}" if defaults.levels else "the default without an artifact")
                raise OscarConfigError(
                    f"{key}={getattr(user, key)} clips rows, but levels is 'mse' ({why}), which fits the grid to "
                    f'the whole row and does not clip; add "levels": "minmax" to clip, or drop {key}'
                )
        k_clip, v_clip = 0.0, 0.0
    else:  # an "mse" artifact records clip 0, which says nothing about the min-max grid asked for here
        art_c = art_q if art_q is not None and art_q.levels == "minmax" else None
        k_clip = _first(user.k_clip_ratio, art_c and art_c.k_clip_ratio, defaults.k_clip_ratio, DEFAULT_K_CLIP_RATIO)
        v_clip = _first(user.v_clip_ratio, art_c and art_c.v_clip_ratio, defaults.v_clip_ratio, DEFAULT_V_CLIP_RATIO)
    resolved = ResolvedOscarConfig(
        model=facts.model,
        rotation=mode.value,
        rotations=source if mode == RotationMode.OSCAR else None,
        subfolder=subfolder if mode == RotationMode.OSCAR else None,
        levels=levels,
        k_clip_ratio=float(k_clip),
        v_clip_ratio=float(v_clip),
        sink_tokens=int(_first(user.sink_tokens, art_w and art_w.sink_tokens, defaults.sink_tokens,
                               DEFAULT_SINK_TOKENS)),
        recent_tokens=int(_first(user.recent_tokens, art_w and art_w.recent_tokens, defaults.recent_tokens,
                                 DEFAULT_RECENT_TOKENS)),
        skip_layers=tuple(_first(user.skip_layers, defaults.skip_layers, [])),
        defaults_file=defaults_file,
        fold_value_rotation=user.fold_value_rotation,
        scale_dtype=_first(user.scale_dtype, art_q and art_q.scale_dtype, defaults.scale_dtype, DEFAULT_SCALE_DTYPE),
    )
    if resolved.sink_tokens > 0 and resolved.recent_tokens == 0:
        raise OscarConfigError(
            f"sink_tokens={resolved.sink_tokens} needs recent_tokens >= 1 (the token being decoded is always "
            "attended exactly); set both to 0 to turn the BF16 windows off"
        )
    if artifact is None:
        artifact = data_free_artifact(resolved, facts)
    return resolved, artifact


@contextlib.contextmanager
def fork_safe_torch():
    """Run CPU tensor math single-threaded.

    ``LLM(...)`` forks vLLM's engine-core process from the process that resolves this config. If that
    process has run a multi-threaded CPU op, the GNU OpenMP thread pool does not survive the fork and
    the child hangs in its first parallel region (seen on the H100: EngineCore stuck forever in
    ``torch.zeros(..., pin_memory=True)`` after the data-free artifact's orthogonality check;
    reproduced on CPU by tests/vllm/test_fork_safety.py). The matrices here are a few MB: one thread
    costs milliseconds.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def data_free_artifact(resolved: ResolvedOscarConfig, facts: ModelFacts):
    from vllm_oscar.artifact import hadamard_artifact

    with fork_safe_torch():
        from vllm_oscar.config import QuantizationConfig

        info = _base_model_info(facts)
        q = QuantizationConfig(group_size=info.head_dim, levels=resolved.levels, k_clip_ratio=resolved.k_clip_ratio,
                               v_clip_ratio=resolved.v_clip_ratio, scale_dtype=resolved.scale_dtype)
        return hadamard_artifact(info, mode=resolved.mode, quantization=q)


def load_artifact(source: str, subfolder: str | None, facts: ModelFacts):
    """Load calibrated rotations and check they were made for this model (shape, id, revision)."""
    from vllm_oscar.artifact import ArtifactError
    from vllm_oscar.hub import load_rotations

    try:
        # RotationZoo files carry no model identity: the served model's facts fill it in (shape still checked).
        with fork_safe_torch():
            art = load_rotations(source, subfolder=subfolder, base_model=_base_model_info(facts))
        art.check_compatible(facts.model, facts.revision, facts.num_layers, facts.head_dim)
    except ArtifactError as exc:
        raise OscarConfigError(f"OSCAR rotations {source!r} cannot be used for {facts.model}: {exc}") from None
    return art


# ------------------------------------------------------------------------------------------------
# Engine integration
# ------------------------------------------------------------------------------------------------


def engine_refusals(vllm_config) -> list[str]:
    """Engine-level settings OSCAR cannot serve (checked before any worker starts)."""
    from vllm.platforms import current_platform

    reasons = []
    mc, pc, sc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.scheduler_config
    if vllm_config.speculative_config is not None:
        reasons.append("speculative decoding is not supported yet (drop --speculative-config)")
    if vllm_config.kv_transfer_config is not None:
        reasons.append("KV connectors / KV offloading are not supported yet (drop --kv-transfer-config and "
                       "--kv-offloading-*)")
    if mc is not None:
        if mc.use_mla:
            reasons.append("MLA models (DeepSeek-V2/V3 style latent attention) are not supported")
        if mc.is_hybrid or getattr(mc, "has_inner_state", False):
            reasons.append("hybrid / Mamba / linear-attention models are not supported")
        if mc.is_attention_free:
            reasons.append("the model has no attention layers")
        import torch

        if mc.dtype != torch.bfloat16:
            reasons.append(f"model dtype {mc.dtype} is not supported (the kernels run bfloat16; use --dtype bfloat16)")
        hd = mc.get_head_size()
        from vllm_oscar.layout import SUPPORTED_HEAD_DIMS

        if hd not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"head_dim {hd} is not supported (supported: {list(SUPPORTED_HEAD_DIMS)})")
        text = mc.hf_text_config
        v_dim = getattr(text, "v_head_dim", None)
        if v_dim is not None and v_dim != hd:
            reasons.append(f"K and V head dims differ ({hd} vs {v_dim}); OSCAR needs them equal")
    if pc.decode_context_parallel_size > 1 or pc.prefill_context_parallel_size > 1:
        reasons.append("decode/prefill context parallelism is not supported")
    backend = vllm_config.attention_config.backend
    if backend is not None and getattr(backend, "name", None) == "CUSTOM":
        reasons.append("--attention-backend CUSTOM must not be set: OSCAR layers get the OSCAR backend "
                       "automatically and skip-listed layers need vLLM's default backend")
    if sc.disable_hybrid_kv_cache_manager and current_platform.support_hybrid_kv_cache():
        reasons.append("the hybrid KV-cache manager is disabled, but the BF16 sink/recent windows live in "
                       "their own KV-cache group (drop --disable-hybrid-kv-cache-manager)")
    return reasons


def resolved_from_config(vllm_config) -> ResolvedOscarConfig | None:
    ac = vllm_config.additional_config
    if isinstance(ac, dict) and isinstance(ac.get(ADDITIONAL_CONFIG_KEY), dict):
        raw = ac[ADDITIONAL_CONFIG_KEY].get(RESOLVED_KEY)
        if raw is not None:
            return ResolvedOscarConfig.from_dict(raw)
    return None


def prepare_engine_config(vllm_config, *, defaults_dir: str | None = None) -> ResolvedOscarConfig:
    """Validate, resolve and record the OSCAR settings in a fresh ``VllmConfig`` (front-end process)."""
    user = parse_user_config(vllm_config.additional_config)
    reasons = engine_refusals(vllm_config)
    if reasons:
        raise OscarConfigError("--kv-cache-dtype oscar_int2 cannot serve this configuration: " + "; ".join(reasons))
    facts = ModelFacts.from_model_config(vllm_config.model_config)
    resolved, _ = resolve(facts, user, defaults_dir=defaults_dir)
    cc = vllm_config.cache_config
    for s in resolved.skip_layers:
        if s not in cc.kv_cache_dtype_skip_layers:
            cc.kv_cache_dtype_skip_layers.append(s)
    if vllm_config.additional_config is None:
        vllm_config.additional_config = {}
    entry = dict(vllm_config.additional_config.get(ADDITIONAL_CONFIG_KEY) or {})
    entry[RESOLVED_KEY] = resolved.to_dict()
    vllm_config.additional_config[ADDITIONAL_CONFIG_KEY] = entry
    logger.info(
        "vllm-oscar: %s with rotation=%s%s, levels=%s%s, scale_dtype=%s, BF16 windows sink %d + recent %d%s%s",
        facts.model, resolved.rotation, f" ({resolved.rotations})" if resolved.rotations else "", resolved.levels,
        f" (clip K/V {resolved.k_clip_ratio:.2f}/{resolved.v_clip_ratio:.2f})" if resolved.levels == "minmax" else "",
        resolved.scale_dtype,
        resolved.sink_tokens, resolved.recent_tokens,
        f", BF16 layers {list(cc.kv_cache_dtype_skip_layers)}" if cc.kv_cache_dtype_skip_layers else "",
        f", defaults from configs/models/{resolved.defaults_file}" if resolved.defaults_file else "",
    )
    return resolved


def get_resolved(vllm_config) -> ResolvedOscarConfig:
    """The settings of this engine; resolves them here if the config did not come from ``EngineArgs``."""
    resolved = resolved_from_config(vllm_config)
    if resolved is None:
        resolved = prepare_engine_config(vllm_config)
    return resolved


@functools.lru_cache(maxsize=2)
def _artifact_for(resolved: ResolvedOscarConfig, model: str, revision: str | None, architectures: tuple[str, ...],
                  num_layers: int, num_attention_heads: int, num_kv_heads: int, head_dim: int):
    facts = ModelFacts(model, revision, architectures, num_layers, num_attention_heads, num_kv_heads, head_dim, {})
    if resolved.mode == RotationMode.OSCAR:
        return load_artifact(resolved.rotations, resolved.subfolder, facts)
    return data_free_artifact(resolved, facts)


def artifact_for(vllm_config):
    """The rotation artifact of this engine, loaded once per process (worker side, at weight loading)."""
    resolved = get_resolved(vllm_config)
    f = ModelFacts.from_model_config(vllm_config.model_config)
    return _artifact_for(resolved, f.model, f.revision, f.architectures, f.num_layers, f.num_attention_heads,
                         f.num_kv_heads, f.head_dim)
