"""Every environment variable vllm-oscar reads, in one typed registry.

Environment variables are for operational toggles only; the method's settings live in the rotation
artifact and in ``--additional-config``. Read them through :func:`get` (or attribute access on this
module), never with ``os.environ`` elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {v!r}")


@dataclass(frozen=True)
class EnvVar:
    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


REGISTRY: dict[str, EnvVar] = {
    v.name: v
    for v in (
        EnvVar("VLLM_OSCAR_SKIP_CUDA_BUILD", _bool, False,
               "Install without compiling csrc/ (setup.py). Kernels then raise on first use."),
        EnvVar("VLLM_OSCAR_CACHE_DIR", str, os.path.join(os.path.expanduser("~"), ".cache", "vllm-oscar"),
               "Where the CLI keeps derived files (converted GGUF models, default artifacts)."),
        EnvVar("VLLM_OSCAR_NUM_THREADS", int, 0,
               "torch CPU threads for calibration/eval on CPU; 0 keeps torch's default."),
        EnvVar("OSCAR_KERNELS_NO_PDL", _bool, False,
               "Debug: decode and store_and_decode without programmatic dependent launch (read by csrc/ops.cpp "
               "once per process, at the first such call)."),
    )
}


def get(name: str) -> Any:
    """The parsed value of a registered variable (its default when unset)."""
    try:
        var = REGISTRY[name]
    except KeyError:
        raise KeyError(f"{name} is not a vllm-oscar environment variable; known: {sorted(REGISTRY)}") from None
    raw = os.environ.get(name)
    if raw is None:
        return var.default
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r}: {exc}") from None


def __getattr__(name: str) -> Any:
    if name in REGISTRY:
        return get(name)
    raise AttributeError(name)
