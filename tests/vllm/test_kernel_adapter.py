"""The backend's single door to the kernels: start-up refusal without them, and call signatures.

The CUDA kernels cannot run here; these tests check that the adapter (vllm_oscar/attention/kernels.py)
calls ``vllm_oscar.ops`` with arguments its functions accept, so a signature change there fails in CI.
"""

from __future__ import annotations

import dataclasses
import inspect
import types

import pytest
import torch

from vllm_oscar import ops
from vllm_oscar.attention import kernels
from vllm_oscar.layout import Int2PageLayout


def test_cpu_worker_is_refused_at_startup():
    with pytest.raises(kernels.KernelsUnavailable, match="needs a CUDA GPU.*no slow fallback"):
        kernels.require_kernels("cpu")


def test_missing_extension_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(ops, "kernels_available", lambda: False)
    monkeypatch.setattr(ops, "kernels_unavailable_reason", lambda: "vllm_oscar._C was not built")
    with pytest.raises(kernels.KernelsUnavailable, match=r"vllm_oscar._C was not built.*CUDA toolkit"):
        kernels.require_kernels("cuda:0")


def _recorder(monkeypatch, name):
    """Replace ops.<name> by a stub that checks the call against the real signature."""
    sig = inspect.signature(getattr(ops, name))
    calls = []

    def stub(*args, **kwargs):
        calls.append(sig.bind(*args, **kwargs).arguments)

    monkeypatch.setattr(ops, name, stub)
    return calls


def _args(d=64):
    r = torch.eye(d)
    return kernels.OscarLayerArgs(layout=Int2PageLayout(head_dim=d, block_size=128, num_kv_heads=2), rotation_k=r,
                                  rotation_v=r, k_clip_ratio=0.96, v_clip_ratio=0.92, sink_tokens=64,
                                  recent_tokens=256, scale=0.125)


def test_store_call_matches_ops_signature(monkeypatch):
    calls = _recorder(monkeypatch, "store_kv")
    k = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
    win, wslots = torch.zeros(4, 2, 16, 2, 64, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.long)
    kernels.store(k, k, torch.zeros(4, 2, 5120, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), win, wslots,
                  _args())
    (a,) = calls
    assert a["k_clip_ratio"] == 0.96 and a["v_clip_ratio"] == 0.92
    assert a["window_cache"] is win and a["window_slot_mapping"] is wslots


def test_decode_call_matches_ops_signature(monkeypatch):
    calls = _recorder(monkeypatch, "decode")
    out, q = torch.zeros(2, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    ws = object()
    kernels.decode(out, q, torch.zeros(1), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                   None, None, _args(), ws)
    (a,) = calls
    assert a["out"] is out and a["workspace"] is ws and (a["sink"], a["recent"], a["scale"]) == (64, 256, 0.125)


@pytest.mark.parametrize("rotate_output", [True, False])
def test_store_and_decode_call_matches_ops_signature(monkeypatch, rotate_output):
    calls = _recorder(monkeypatch, "store_and_decode")
    out, q = torch.zeros(2, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(5, 2, 64, dtype=torch.bfloat16)
    slots, wslots = torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)
    win, wbt = torch.zeros(4, 2, 16, 2, 64, dtype=torch.bfloat16), torch.zeros(2, 9, dtype=torch.int32)
    ws = object()
    args = dataclasses.replace(_args(), levels="mse", k_clip_ratio=0.0, v_clip_ratio=0.0, rotate_output=rotate_output)
    kernels.store_and_decode(out, q, k, k, torch.zeros(1), slots, torch.zeros(2, 3, dtype=torch.int32),
                             torch.ones(2, dtype=torch.int32), win, wslots, wbt, args, ws)
    (a,) = calls
    assert a["out"] is out and a["q"] is q and a["key"] is k and a["workspace"] is ws
    assert a["slot_mapping"] is slots and a["window_slot_mapping"] is wslots and a["window_block_table"] is wbt
    assert a["rotation_v"] is args.rotation_v and a["rotate_output"] is rotate_output
    assert (a["levels"], a["k_clip_ratio"], a["sink"], a["recent"], a["scale"]) == ("mse", 0.0, 64, 256, 0.125)


def test_gather_call_matches_ops_signature(monkeypatch):
    calls = _recorder(monkeypatch, "gather_prefix")
    starts = torch.zeros(2, dtype=torch.int32)
    win = torch.zeros(1)
    kernels.gather_prefix(torch.zeros(1), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                          torch.zeros(3, dtype=torch.int32), starts, win, torch.zeros(2, 9, dtype=torch.int32), _args(),
                          torch.zeros(1), torch.zeros(1))
    (a,) = calls
    assert a["window_starts"] is starts and a["head_dim"] == 64 and a["sink"] == 64
    # Without windows no window arguments are passed (the kernel requires all three together).
    kernels.gather_prefix(torch.zeros(1), torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, dtype=torch.int32),
                          torch.zeros(3, dtype=torch.int32), starts, None, None, _args(), torch.zeros(1), torch.zeros(1))
    assert calls[1]["window_starts"] is None and calls[1]["window_cache"] is None


def test_decode_plan_sizes_for_the_largest_batch_and_split_count(monkeypatch):
    # The split heuristic and sizing are the kernel library's; stand in for its two device queries.
    fake_ops = types.SimpleNamespace(decode_window_tile=lambda d: 64, decode_max_split_heads=lambda d, g: 256,
                                     decode_ctas_per_sm=lambda d, g: 2)
    monkeypatch.setattr(ops, "_ops", lambda: fake_ops)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(multi_processor_count=132))
    plan = kernels.DecodePlan(256, 32, 8, 128, 32768, 64, 256, True, torch.device("cpu"))
    assert plan.num_splits(1) >= plan.num_splits(8) >= plan.num_splits(256) >= 1
    biggest = ops.make_decode_workspace(256, 32, 8, 128, 32768, sink=64, recent=256, device="meta",
                                        num_splits=plan.num_splits(1))
    assert plan.buffer_numel == biggest.buffer.numel()
    for batch in (1, 2, 3, 8, 16, 32, 100, 256):
        need = ops.make_decode_workspace(batch, 32, 8, 128, 32768, sink=64, recent=256, device="meta",
                                         num_splits=plan.num_splits(batch))
        assert need.buffer.numel() <= plan.buffer_numel
    # The medium-batch rule: the INT2 splits of a batch of 8 fill one wave of 264 slots (64 items x 4).
    assert plan.num_splits(8) == 4 and plan.num_splits(16) == 2
    # store_and_decode while the INT2 CTAs fit in one wave of 264 slots: batch 32 has 256 (32 x 8 x 1 split),
    # batch 64 has 512. Eager batches decide as the capture size they pad to.
    assert [plan.overlaps_store(b) for b in (1, 5, 8, 16, 32, 33, 64, 256)] == [True] * 5 + [False] * 3
    # Without the BF16 window the op would run the store, then the decode: the backend calls them itself.
    no_window = kernels.DecodePlan(256, 32, 8, 128, 32768, 0, 0, False, torch.device("cpu"))
    assert not any(no_window.overlaps_store(b) for b in (1, 8, 32))
    sink_only = kernels.DecodePlan(256, 32, 8, 128, 32768, 64, 0, True, torch.device("cpu"))  # newest row is INT2
    assert not any(sink_only.overlaps_store(b) for b in (1, 8, 32))
    ws = plan.bind([torch.zeros(plan.buffer_numel)], 8)
    assert ws.num_splits == plan.num_splits(8) and ws.semaphores is plan.semaphores
    # Eager batches and the capture sizes they pad to (the next power of two at most) agree.
    assert plan.num_splits(5) == plan.num_splits(8) and plan.num_splits(17) == plan.num_splits(24) == plan.num_splits(32)
    assert int(plan.semaphores.abs().sum()) == 0
