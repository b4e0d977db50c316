"""The front-end's rotation handling must leave the process safe to fork (vLLM's LLM() default).

Runs in a fresh interpreter: the pytest process has already run multi-threaded CPU math in other
tests, so forking it would hang whatever the code under test does.
"""

import subprocess
import sys

SCRIPT = r'''
import multiprocessing as mp, torch
torch.set_num_threads(2)
from vllm_oscar import runtime_config as rc
from vllm_oscar.config import BaseModelInfo, RotationMode
info = BaseModelInfo(id="m", architecture="LlamaForCausalLM", num_layers=30, num_attention_heads=9,
                     num_kv_heads=3, head_dim=64)
rc._base_model_info = lambda f: info
resolved = type("R", (), {"mode": RotationMode.HADAMARD, "levels": "mse", "k_clip_ratio": 0.0, "v_clip_ratio": 0.0,
                          "scale_dtype": "float16"})()
art = rc.data_free_artifact(resolved, None)
assert art.k_rotation.shape == (30, 64, 64)
def child():
    assert float(torch.zeros(20_000_000).sum()) == 0.0  # parallel fill: hangs on a forked OpenMP pool
p = mp.get_context("fork").Process(target=child); p.start(); p.join(60)
alive = p.is_alive()
if alive: p.kill()
print("HUNG" if alive else f"EXIT {p.exitcode}")
'''


def test_fork_after_data_free_artifact_does_not_hang():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("EXIT 0"), (out.stdout, "forked child hung: OpenMP pool after fork")
