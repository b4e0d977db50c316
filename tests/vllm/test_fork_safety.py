"""The front-end's rotation handling must leave the process safe to fork (vLLM's LLM() default)."""

import multiprocessing as mp

import torch

from vllm_oscar import runtime_config as rc
from vllm_oscar.config import RotationMode


def _child():
    x = torch.zeros(20_000_000)  # a parallel CPU fill: hangs if the parent's OpenMP pool was forked
    assert float(x.sum()) == 0.0


def test_fork_after_data_free_artifact_does_not_hang(monkeypatch):
    if torch.get_num_threads() < 2:
        torch.set_num_threads(2)
    facts = type("Facts", (), {})()
    resolved = type("Resolved", (), {"mode": RotationMode.HADAMARD})()
    from vllm_oscar.config import BaseModelInfo

    info = BaseModelInfo(id="m", architecture="LlamaForCausalLM", num_layers=30, num_attention_heads=9,
                         num_kv_heads=3, head_dim=64)
    monkeypatch.setattr(rc, "_base_model_info", lambda f: info)
    art = rc.data_free_artifact(resolved, facts)
    assert art.k_rotation.shape == (30, 64, 64)
    p = mp.get_context("fork").Process(target=_child)
    p.start()
    p.join(60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "forked child hung: the parent ran multi-threaded CPU math (OpenMP pool after fork)"
    assert p.exitcode == 0
