"""oscar::decode against reference.paged_decode (GPU).

Tolerance (the FlashAttention rule): the kernel's max error against the fp32 reference must be at most
twice the error of the same attention computed in bf16 (:meth:`DecodeCase.reference_bf16`), plus a
small atol. Outputs and the workspace are NaN-poisoned before every run.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from kernel_utils import DecodeCase, max_err, requires_gpu

from vllm_oscar import ops

pytestmark = requires_gpu


def _lens(*xs):
    return list(xs)


def _random_lens(n, hi, seed, must=()):
    rnd = random.Random(seed)
    out = list(must) + [rnd.randint(1, hi) for _ in range(n - len(must))]
    rnd.shuffle(out)
    return out


# (id, DecodeCase kwargs, num_splits or None for the heuristic). Together they cover head_dim 64/128
# (and 256), block sizes 16/32/64/128 (and 48: the producer's per-chunk page lookup with a division;
# power-of-two sizes >= 32 take its one-lookup-per-warp path, 16 at d <= 128 its shift path), 1/3/4/8
# (and 16) query heads per kv head, batch 1/7/64 (and 48 at d=256) and context lengths 1, 63, 64, 65, 320, 4097, 33000,
# with and without the window and the rotations.
W = dict(sink=64, recent=256)
CASES = [
    ("ctx1-g1", dict(batch=1, num_q_heads=8, num_kv_heads=8, head_dim=128, block_size=16, seq_lens=[1], **W), None),
    ("ctx63-g3-d64", dict(batch=7, num_q_heads=24, num_kv_heads=8, head_dim=64, block_size=32,
                          seq_lens=_lens(63, 1, 64, 65, 63, 2, 40), **W), None),
    ("ctx64-65-smallwin-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=64,
                                  seq_lens=_lens(64, 65, 63, 320, 321, 1, 100), sink=16, recent=32,
                                  window_block_size=16), None),
    ("ctx320-g8-d64-bs128", dict(batch=2, num_q_heads=16, num_kv_heads=2, head_dim=64, block_size=128,
                                 seq_lens=_lens(320, 321), **W), None),
    ("ctx4097-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, window_block_size=32,
                        seq_lens=_lens(4097, 4000, 17, 4096, 1000, 2049, 3333), **W), None),
    ("ctx4097-g4-bs48", dict(batch=3, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=48,
                             seq_lens=_lens(4097, 1000, 65), **W), None),
    ("ctx4097-g4-1split", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                               seq_lens=_lens(4097, 4000, 17, 4096, 1000, 2049, 3333), **W), 1),
    ("ctx4097-g4-many-splits", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32,
                                    seq_lens=_lens(4097, 4000, 17, 4096, 1000, 2049, 3333), **W), 200),
    ("b64-ctx4097-g3-d64", dict(batch=64, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32,
                                seq_lens=_random_lens(64, 1500, 1, must=(4097, 1, 64, 65)), **W), None),
    ("b64-ctx4097-g8-bs64", dict(batch=64, num_q_heads=16, num_kv_heads=2, head_dim=128, block_size=64,
                                 seq_lens=_random_lens(64, 1500, 2, must=(4097, 320, 63)), **W), None),
    ("ctx33000-g4", dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                         seq_lens=[33000], **W), None),
    ("b7-ctx33000-g8-bs128-norotv", dict(batch=7, num_q_heads=16, num_kv_heads=2, head_dim=128, block_size=128,
                                         window_block_size=16, seq_lens=_lens(33000, 32999, 16000, 1, 320, 500, 8191),
                                         rot_v=False, **W), None),
    ("nowindow-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, window=False,
                         seq_lens=_lens(1, 63, 64, 65, 320, 4097, 2000), sink=0, recent=0), None),
    ("norot-g1-d64", dict(batch=7, num_q_heads=4, num_kv_heads=4, head_dim=64, block_size=16, rot_k=False,
                          rot_v=False, seq_lens=_lens(1, 63, 64, 65, 320, 4097, 700), **W), None),
    ("seq0", dict(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                  seq_lens=_lens(0, 5, 0), **W), None),
    ("g16-nt2", dict(batch=2, num_q_heads=32, num_kv_heads=2, head_dim=128, block_size=16,
                     seq_lens=_lens(4097, 100), **W), None),
    ("d256-g4", dict(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=256, block_size=16,
                     seq_lens=_lens(4097, 321), **W), None),
    # 768 q rows: rotate_q's 32 x 32 blocks at d=256 (up to 512 rows it takes 8 x 8 blocks)
    ("b48-d256-g8", dict(batch=48, num_q_heads=16, num_kv_heads=2, head_dim=256, block_size=16,
                         seq_lens=_random_lens(48, 700, 3, must=(1, 321)), **W), None),
]


def _run(case: DecodeCase, num_splits, q=None):
    args = case.cuda_args()
    q = (case.q if q is None else q).cuda()
    max_len = args["block_table"].shape[1] * case.layout.block_size
    ws = ops.make_decode_workspace(
        case.batch, case.hq, case.hkv, case.d, max_len, sink=case.sink, recent=case.recent,
        window=case.window, device="cuda", num_splits=num_splits,
    )
    ws.buffer.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    ops.decode(q, workspace=ws, out=out, sink=case.sink, recent=case.recent, scale=case.scale, **args)
    torch.cuda.synchronize()
    return out, ws, args


def _check(out, case, q=None):
    truth = case.reference(q)
    low = case.reference_bf16(q)
    got = out.float().cpu()
    assert not torch.isnan(got).any(), f"NaN in rows {torch.isnan(got).any(-1).nonzero().tolist()[:8]}"
    err = max_err(got, truth)
    err_bf16 = max_err(low, truth)
    atol = 1e-3 * truth.abs().max().item() + 1e-5
    per_seq = [round(max_err(got[b], truth[b]), 5) for b in range(got.shape[0])]
    assert err <= 2 * err_bf16 + atol, (
        f"kernel error {err:.3e} > 2 x bf16-reference error {err_bf16:.3e} + {atol:.1e}; per sequence {per_seq}"
    )
    return err, err_bf16


@pytest.mark.parametrize("name,kwargs,num_splits", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(name, kwargs, num_splits):
    case = DecodeCase(seed=zlib.crc32(name.encode()) % 1000, **kwargs)
    out, ws, args = _run(case, num_splits)
    _check(out, case)
    # semaphores are back at zero and the result is bitwise reproducible
    assert ws.semaphores.abs().sum().item() == 0
    out2 = ops.decode(case.q.cuda(), workspace=ws, sink=case.sink, recent=case.recent, scale=case.scale, **args)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("window", [True, False])
def test_decode_cuda_graph(window):
    """Captured once, replayed with new queries (and, without a window cache, new lengths)."""
    lens = [4097, 63, 1000, 2]
    case = DecodeCase(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, seq_lens=lens,
                      window=window, sink=64 if window else 0, recent=256 if window else 0, seed=11)
    args = case.cuda_args()
    q = case.q.cuda()
    ws = ops.make_decode_workspace(4, 32, 8, 128, 4112, sink=case.sink, recent=case.recent, window=window,
                                   device="cuda")
    out = torch.full_like(q, float("nan"))
    kw = dict(workspace=ws, out=out, sink=case.sink, recent=case.recent, scale=case.scale, **args)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            ops.decode(q, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode(q, **kw)
    for step in range(3):
        new_q = (torch.randn(q.shape, generator=torch.Generator().manual_seed(step)) * 2).to(torch.bfloat16)
        q.copy_(new_q)
        if not window:
            case.seq_lens = [max(1, n - 7 * step) for n in lens]
            args["seq_lens"].copy_(torch.tensor(case.seq_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, case, new_q)


def test_decode_opcheck():
    case = DecodeCase(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=[70, 5],
                      sink=4, recent=8, seed=5)
    a = case.cuda_args()
    q = case.q.cuda()
    ws = ops.make_decode_workspace(2, 8, 2, 64, 80, sink=4, recent=8, device="cuda")
    out = torch.empty_like(q)
    torch.library.opcheck(
        torch.ops.oscar.decode.default,
        (out, q, a["kv_cache"], a["block_table"], a["seq_lens"], a["window_cache"], a["window_block_table"],
         a["rotation_k"], a["rotation_v"], 4, 8, case.scale, ws.buffer, ws.semaphores, ws.num_splits),
    )


def test_decode_workspace_helpers():
    assert torch.ops.oscar.decode_window_tile(128) == 128
    s = ops.decode_num_splits(1, 32, 8, 128, 32768, sink=64, recent=256, num_sms=132)
    assert 1 <= s <= 128
    assert ops.decode_num_splits(256, 32, 8, 128, 32768, sink=64, recent=256, num_sms=132) == 1
    # Medium batches: the INT2 splits fill one wave of 2 x 132 slots (the split sweep's best counts).
    splits = {b: ops.decode_num_splits(b, 32, 8, 128, 32768, sink=64, recent=256, num_sms=132) for b in (1, 8, 16, 32)}
    assert splits == {1: 30, 8: 4, 16: 2, 32: 1}, splits
    assert ops.decode_num_splits(64, 9, 3, 64, 32768, sink=64, recent=256, num_sms=132) == 2  # 192 items
    assert ops.decode_num_splits(8, 9, 3, 64, 32768, sink=64, recent=256, num_sms=132) == 8  # whole grid, one wave


def test_decode_errors():
    case = DecodeCase(batch=1, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=[10],
                      sink=4, recent=4, seed=9)
    a = case.cuda_args()
    q = case.q.cuda()
    ws = ops.make_decode_workspace(1, 8, 2, 64, 16, sink=4, recent=4, device="cuda")
    kw = dict(sink=4, recent=4)

    def call(**over):
        args = dict(a, **{k: v for k, v in over.items() if k in a})
        return ops.decode(over.get("q", q), workspace=over.get("workspace", ws), **args, **kw)

    with pytest.raises(RuntimeError, match="q must be BFloat16"):
        call(q=q.float())
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        call(q=q.cpu())
    with pytest.raises(RuntimeError, match="unsupported head_dim 96"):
        call(q=torch.zeros(1, 8, 96, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(RuntimeError, match="must be a multiple of num_kv_heads"):
        call(q=torch.zeros(1, 7, 64, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(RuntimeError, match="block_table must be Int"):
        call(block_table=a["block_table"].long())
    with pytest.raises(RuntimeError, match="window_block_table is required"):
        call(window_block_table=None)
    with pytest.raises(RuntimeError, match="rotation_v must be a contiguous float32"):
        call(rotation_v=a["rotation_v"].T)
    with pytest.raises(RuntimeError, match="workspace must be a contiguous float32 tensor of at least"):
        small = ops.DecodeWorkspace(ws.buffer[:10], ws.semaphores, ws.num_splits, 1)
        call(workspace=small)
    with pytest.raises(RuntimeError, match="supports up to 16 query heads"):
        big = ops.make_decode_workspace(1, 64, 2, 64, 16, sink=4, recent=4, device="cuda", num_splits=1)
        call(q=torch.zeros(1, 64, 64, dtype=torch.bfloat16, device="cuda"), workspace=big)
