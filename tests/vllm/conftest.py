"""CPU tests of the vLLM integration (vLLM 0.26.0, no GPU).

vLLM's CUDA wheel detects no platform on a CPU-only machine ("Failed to infer device type"), so this
conftest installs vLLM's CPU platform before any test touches ``vllm.platforms.current_platform`` (the
integration notes, section 6). Model configs are tiny ``config.json`` files (no weights, no tokenizer).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM prints an INFO line per config otherwise


def _force_cpu_platform() -> None:
    from vllm import platforms
    from vllm.platforms.cpu import CpuPlatform

    if not isinstance(platforms._current_platform, CpuPlatform):
        platforms._current_platform = CpuPlatform()


_force_cpu_platform()

# Imported after the platform is forced: the helpers import vLLM modules that read current_platform.
from oscar_testing import write_model


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")

    def make(name: str = "tiny", **kw) -> str:
        return write_model(root / name, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> str:
    return model_factory("tiny-llama")
