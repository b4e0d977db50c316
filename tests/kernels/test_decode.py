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
from kernel_utils import DecodeCase, kv_rows, max_err, poisoned_int2_cache, requires_gpu

from vllm_oscar import ops
from vllm_oscar.ops import reference as ref

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
# params "u8" (2-byte (scale, offset), the decode's kParamBytesU8 instantiations): every head_dim and NT,
# block sizes 16/32/64/128 (one 16-byte chunk holds 8 tokens' pairs), partial stages, no window.
U8 = dict(params="u8")
CASES += [
    ("u8-ctx63-g3-d64", dict(batch=7, num_q_heads=24, num_kv_heads=8, head_dim=64, block_size=32,
                             seq_lens=_lens(63, 1, 64, 65, 63, 2, 40), **W, **U8), None),
    ("u8-ctx64-65-smallwin-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=64,
                                     seq_lens=_lens(64, 65, 63, 320, 321, 1, 100), sink=16, recent=32,
                                     window_block_size=16, **U8), None),
    ("u8-ctx4097-g4-bs48", dict(batch=3, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=48,
                                seq_lens=_lens(4097, 1000, 65), **W, **U8), None),
    ("u8-b7-ctx33000-g8-bs128-norotv", dict(batch=7, num_q_heads=16, num_kv_heads=2, head_dim=128, block_size=128,
                                            window_block_size=16, rot_v=False, **W, **U8,
                                            seq_lens=_lens(33000, 32999, 16000, 1, 320, 500, 8191)), None),
    ("u8-nowindow-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, window=False,
                            seq_lens=_lens(1, 63, 64, 65, 320, 4097, 2000), sink=0, recent=0, **U8), None),
    ("u8-g16-nt2-d64", dict(batch=2, num_q_heads=32, num_kv_heads=2, head_dim=64, block_size=16,
                            seq_lens=_lens(4097, 100), **W, **U8), None),
    ("u8-g16-nt2", dict(batch=2, num_q_heads=32, num_kv_heads=2, head_dim=128, block_size=16,
                        seq_lens=_lens(4097, 100), **W, **U8), None),
    ("u8-d256-g4", dict(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=256, block_size=16,
                        seq_lens=_lens(4097, 321), **W, **U8), None),
    ("u8-b64-ctx4097-g3-d64", dict(batch=64, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32,
                                   seq_lens=_random_lens(64, 1500, 1, must=(4097, 1, 64, 65)), **W, **U8), None),
]
# A 512-token recent window (`{"scale_dtype": "u8", "recent_tokens": 512}`: the bits the u8 pairs save spent
# on BF16 rows): 5 window splits of 128 rows each (the window tile at d <= 128); sequences shorter and
# longer than the windows.
R512 = {"sink": 64, "recent": 512}
CASES += [
    ("u8-r512-g4", dict(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=128, window_block_size=16,
                        seq_lens=_lens(33000, 577, 576, 300), **R512, **U8), None),
    ("u8-r512-g3-d64", dict(batch=5, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=16,
                            seq_lens=_lens(4097, 577, 576, 65, 1), **R512, **U8), None),
    ("r512-g4", dict(batch=3, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                     seq_lens=_lens(4097, 1000, 513), **R512), None),
]
# Window CTAs that take several window tiles in turn (csrc/kernels/window_ctas.h: in a grid resident at
# once with few INT2 splits, fewer window CTAs leave more CTAs for the INT2 tiles). Few INT2 splits make the
# trade at short contexts: 3 window CTAs for 5 tiles (2, 2 and 1) at d=128, one for 3 at d=64, while the
# shorter sequences of each keep one CTA per tile. At d=256 (DecodeTraits::kWinTileCost 8) winpasses-d256-g4
# runs 2 window CTAs for 5 tiles of 64 rows (3 and 2). ctx4097-g4-1split (one window CTA, 3 INT2 CTAs) and
# store_and_decode's b4-ctx33000-g4-winpasses and u8-r512-b3-g4 (the newest row in a later tile) take them too.
CASES += [
    ("winpasses-r512-g4", dict(batch=2, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                               seq_lens=_lens(4097, 700), **R512), 2),
    ("winpasses-g3-d64", dict(batch=2, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32,
                              seq_lens=_lens(9000, 400), **W), 4),
    ("winpasses-d256-g4", dict(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=256, block_size=16,
                               seq_lens=_lens(5000, 330), **W), 3),
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


@pytest.mark.parametrize("name", ["u8-r512-g3-d64", "r512-g4"])
def test_decode_without_a_workspace_sizes_its_own(name):
    """``ops.decode(workspace=None)`` reads the block size off the cache's head page
    (``Int2PageLayout.token_bytes``, per params format) and allocates what ``make_decode_workspace`` gives
    for the block table's capacity: bitwise the same output."""
    case = DecodeCase(seed=zlib.crc32(name.encode()) % 1000, **{c[0]: c[1] for c in CASES}[name])
    out, _, args = _run(case, None)
    got = ops.decode(case.q.cuda(), sink=case.sink, recent=case.recent, scale=case.scale, **args)
    assert torch.equal(out, got)


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
    # store_and_decode while the INT2 CTAs fit in one wave: batch 1 (8 x 30), 8 (64 x 4); not 64 (512 x 1).
    assert [ops.store_overlaps_decode(b, 8, splits.get(b, 1), 132, head_dim=128, num_q_heads=32)
            for b in (1, 8, 32, 64)] == [True, True, True, False]
    # One CTA per SM at head_dim 256 and above 8 query heads per KV head: half the slots.
    assert [ops.decode_ctas_per_sm(d, 8 * g, 8) for d, g in ((64, 4), (128, 4), (128, 16), (256, 2))] == [2, 2, 1, 1]
    d256 = {b: ops.decode_num_splits(b, 16, 8, 256, 131072, sink=64, recent=256, num_sms=132) for b in (1, 8, 64)}
    assert d256 == {1: 16, 8: 2, 64: 1}, d256  # the gemma3-12b split sweep's (docs/kernels.md)
    assert [ops.store_overlaps_decode(b, 8, d256[b], 132, head_dim=256, num_q_heads=16) for b in (1, 8, 64)] == [
        True, True, False]  # 128, 128 and 512 INT2 CTAs against 132 slots


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


# --------------------------------------------------------------------------------------------------
# store_and_decode: the decode overlaps the store of the step's newest rows
# --------------------------------------------------------------------------------------------------

# (id, DecodeCase kwargs, levels, extra store tokens). The extra tokens stand for the prefill tokens of a
# mixed batch: after the newest rows (vLLM's order, decodes first), in blocks no block table names. With
# thousands of them the store, which runs beside the decode, is still writing while decode CTAs read.
# The newest rows' cache slots are poisoned: the decode must take them from the workspace (new_rows),
# never from a cache the store has not written yet.
OVERLAP_CASES = [
    ("b1-ctx33000-g4", dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                            seq_lens=[33000], **W), "mse", 0),
    ("b1-ctx33000-g4-longstore", dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=128,
                                      window_block_size=16, seq_lens=[33000], **W), "mse", 8192),
    ("b7-nowindow-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, window=False,
                            seq_lens=_lens(1, 63, 64, 65, 320, 4097, 2000), sink=0, recent=0), "minmax", 4096),
    ("b7-ctx33000-g8-norotv", dict(batch=7, num_q_heads=16, num_kv_heads=2, head_dim=128, block_size=128,
                                   window_block_size=16, seq_lens=_lens(33000, 32999, 16000, 1, 320, 500, 8191),
                                   rot_v=False, **W), "mse", 4096),
    ("b64-ctx4097-g3-d64", dict(batch=64, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32,
                                seq_lens=_random_lens(64, 1500, 1, must=(4097, 1, 64, 65)), **W), "mse", 1024),
    ("seq0-d64", dict(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                      seq_lens=_lens(0, 5, 0), **W), "minmax", 256),
    # A sink but no recent window: the newest row is an INT2 row, so the op runs the store, then the decode.
    ("sink-only-d64", dict(batch=3, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                           seq_lens=_lens(40, 5, 17), sink=16, recent=0), "mse", 32),
    # Above 512 q rows rotate_q takes its large blocks, and the newest rows 16 per CTA: 111 rows end in a
    # partial block.
    ("b37-large-rotate-g8", dict(batch=37, num_q_heads=24, num_kv_heads=3, head_dim=128, block_size=64,
                                 seq_lens=_random_lens(37, 800, 2, must=(4097, 1, 321, 65)), **W), "mse", 100),
    ("u8-b1-ctx33000-g4", dict(batch=1, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                               seq_lens=[33000], **W, **U8), "mse", 0),
    ("u8-b7-nowindow-g4", dict(batch=7, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, window=False,
                               seq_lens=_lens(1, 63, 64, 65, 320, 4097, 2000), sink=0, recent=0, **U8), "minmax", 4096),
    ("u8-b64-ctx4097-g3-d64", dict(batch=64, num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32,
                                   seq_lens=_random_lens(64, 1500, 1, must=(4097, 1, 64, 65)), **W, **U8), "mse", 1024),
    ("u8-r512-b3-g4", dict(batch=3, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=128,
                           window_block_size=16, seq_lens=_lens(33000, 577, 200), **R512, **U8), "mse", 0),
    # 5 INT2 + 3 window splits per item: one window CTA of 3 tiles at 33000 (the newest row in its last),
    # one per tile at 4097
    ("b4-ctx33000-g4-winpasses", dict(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                                      seq_lens=_lens(33000, 4097, 321, 100), **W), "mse", 0),
]


class _Step:
    """One decode step on a :class:`DecodeCase`: new K/V rows for every sequence's newest position (its
    slots poisoned first), then ``extra`` tokens of blocks outside every block table."""

    def __init__(self, case: DecodeCase, levels: str, extra: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.case, self.levels = case, levels
        lay, bs = case.layout, case.layout.block_size
        nb = case.kv_cache.shape[0]
        extra_blocks = -(-extra // bs)
        self.kv_cache = torch.cat([case.kv_cache, poisoned_int2_cache(lay, extra_blocks)])
        newest = [-1 if n == 0 else int(case.block_table[b, (n - 1) // bs]) * bs + (n - 1) % bs
                  for b, n in enumerate(case.seq_lens)]
        self.slots = torch.tensor(newest + [nb * bs + i for i in range(extra)], dtype=torch.int64)
        kc, vc, kp, vp = ref._head_page_views(self.kv_cache, lay)
        for s in newest:
            if s >= 0:
                kc[s // bs, :, s % bs] = 0xFF
                vc[s // bs, :, s % bs] = 0xFF
                kp[s // bs, :, s % bs] = float("nan") if lay.params == "fp16" else 0xFF
                vp[s // bs, :, s % bs] = float("nan") if lay.params == "fp16" else 0xFF
        self.window_cache, self.window_slots = case.window_cache, None
        if case.window:
            wbs = case.wbs
            wnewest = [-1 if n == 0 else int(case.window_block_table[b, (n - 1) // wbs]) * wbs + (n - 1) % wbs
                       for b, n in enumerate(case.seq_lens)]
            self.window_cache = case.window_cache.clone()
            for s in wnewest:
                if s >= 0:
                    self.window_cache[s // wbs, :, s % wbs] = float("nan")
            self.window_slots = torch.tensor(wnewest + [-1] * extra, dtype=torch.int64)
        t = case.batch + extra
        self.key = kv_rows(t, case.hkv, case.d, gen)
        self.value = kv_rows(t, case.hkv, case.d, gen)
        self.clip = (0.96, 0.92) if levels == "minmax" else (0.0, 0.0)

    def cuda_args(self):
        a = self.case.cuda_args()
        a["kv_cache"] = self.kv_cache.cuda()
        a["window_cache"] = None if self.window_cache is None else self.window_cache.cuda()
        return a

    def workspace(self, args):
        c = self.case
        max_len = args["block_table"].shape[1] * c.layout.block_size
        ws = ops.make_decode_workspace(c.batch, c.hq, c.hkv, c.d, max_len, sink=c.sink, recent=c.recent,
                                       window=c.window, device="cuda")
        ws.buffer.fill_(float("nan"))
        return ws

    def store_then_decode(self, q, args, ws, out, key=None, value=None):
        """The reference sequence: oscar::store_kv, then oscar::decode."""
        c = self.case
        key = self.key.cuda() if key is None else key
        value = self.value.cuda() if value is None else value
        ops.store_kv(key, value, args["kv_cache"], self.slots.cuda(), args["rotation_k"],
                     args["rotation_v"], k_clip_ratio=self.clip[0], v_clip_ratio=self.clip[1],
                     window_cache=args["window_cache"],
                     window_slot_mapping=None if self.window_slots is None else self.window_slots.cuda(),
                     levels=self.levels, params=c.layout.params)
        return ops.decode(q, workspace=ws, out=out, sink=c.sink, recent=c.recent, scale=c.scale, **args)

    def fused(self, q, args, ws, out, key=None, value=None, slots=None, window_slots=None):
        c = self.case
        ws_slots = self.window_slots.cuda() if window_slots is None and self.window_slots is not None else window_slots
        return ops.store_and_decode(
            q, self.key.cuda() if key is None else key, self.value.cuda() if value is None else value,
            args["kv_cache"], self.slots.cuda() if slots is None else slots, args["block_table"], args["seq_lens"],
            ws, window_cache=args["window_cache"], window_slot_mapping=ws_slots,
            window_block_table=args["window_block_table"], rotation_k=args["rotation_k"],
            rotation_v=args["rotation_v"], rotate_output=args["rotation_v"] is not None, k_clip_ratio=self.clip[0], v_clip_ratio=self.clip[1],
            levels=self.levels, params=c.layout.params, sink=c.sink, recent=c.recent, scale=c.scale, out=out)


def _bits(x: torch.Tensor | None) -> torch.Tensor | None:
    """A bitwise view (NaN == NaN) of a 16-bit tensor."""
    return None if x is None else x.view(torch.int16)


@pytest.mark.parametrize("name,kwargs,levels,extra", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_store_and_decode_equals_store_then_decode(name, kwargs, levels, extra):
    """Bitwise the same cache, window and output as oscar::store_kv followed by oscar::decode, on caches
    whose newest rows are poisoned until the store writes them (a decode CTA that read one early would
    produce NaN). Repeated, because a missed wait is a race."""
    case = DecodeCase(seed=zlib.crc32(name.encode()) % 1000, **kwargs)
    step = _Step(case, levels, extra, seed=7)
    q = case.q.cuda()
    ref_args = step.cuda_args()
    want = step.store_then_decode(q, ref_args, step.workspace(ref_args), torch.full_like(q, float("nan")))
    torch.cuda.synchronize()
    assert not torch.isnan(want.float()).any()
    for _ in range(3):
        args = step.cuda_args()
        ws = step.workspace(args)
        got = step.fused(q, args, ws, torch.full_like(q, float("nan")))
        torch.cuda.synchronize()
        assert not torch.isnan(got.float()).any(), "a decode CTA read a row before the store wrote it"
        assert torch.equal(got, want)
        assert torch.equal(args["kv_cache"], ref_args["kv_cache"])
        if case.window:
            assert torch.equal(_bits(args["window_cache"]), _bits(ref_args["window_cache"]))
        assert ws.semaphores.abs().sum().item() == 0


def test_store_and_decode_cuda_graph():
    """Captured once, replayed with new queries and new newest rows (re-poisoned before each replay)."""
    case = DecodeCase(batch=4, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                      seq_lens=[4097, 63, 1000, 2], seed=12, **W)
    step = _Step(case, "mse", 512, seed=3)
    args = step.cuda_args()
    poisoned_cache, poisoned_win = args["kv_cache"].clone(), args["window_cache"].clone()
    q = case.q.cuda()
    key, value = step.key.cuda(), step.value.cuda()
    slots, wslots = step.slots.cuda(), step.window_slots.cuda()
    ws = step.workspace(args)
    out = torch.full_like(q, float("nan"))
    kw = {"key": key, "value": value, "slots": slots, "window_slots": wslots}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step.fused(q, args, ws, out, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.fused(q, args, ws, out, **kw)
    for i in range(3):
        gen = torch.Generator().manual_seed(100 + i)
        q.copy_((torch.randn(q.shape, generator=gen) * 2).to(torch.bfloat16))
        key.copy_(kv_rows(key.shape[0], case.hkv, case.d, gen).cuda())
        value.copy_(kv_rows(key.shape[0], case.hkv, case.d, gen).cuda())
        args["kv_cache"].copy_(poisoned_cache)
        args["window_cache"].copy_(poisoned_win)
        out.fill_(float("nan"))
        graph.replay()
        ref_args = dict(args, kv_cache=poisoned_cache.clone(), window_cache=poisoned_win.clone())
        want = step.store_then_decode(q, ref_args, step.workspace(ref_args), torch.empty_like(q), key, value)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        assert torch.equal(args["kv_cache"], ref_args["kv_cache"])
        assert torch.equal(_bits(args["window_cache"]), _bits(ref_args["window_cache"]))


def test_store_and_decode_opcheck_and_errors():
    case = DecodeCase(batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seq_lens=[70, 5],
                      sink=4, recent=8, seed=5)
    step = _Step(case, "mse", 0, seed=1)
    a = step.cuda_args()
    q = case.q.cuda()
    ws = ops.make_decode_workspace(2, 8, 2, 64, 80, sink=4, recent=8, device="cuda")
    key, value = step.key.cuda(), step.value.cuda()
    torch.library.opcheck(
        torch.ops.oscar.store_and_decode.default,
        (torch.empty_like(q), q, key, value, a["kv_cache"], step.slots.cuda(), a["block_table"], a["seq_lens"],
         a["window_cache"], step.window_slots.cuda(), a["window_block_table"], a["rotation_k"], a["rotation_v"],
         a["rotation_v"], 0.0, 0.0, 1, 4, 8, case.scale, ws.buffer, ws.semaphores, ws.num_splits),
    )
    # Both argument sets are checked, each with the standalone op's message.
    with pytest.raises(RuntimeError, match="value must have key's dtype"):
        step.fused(q, a, ws, torch.empty_like(q), value=value.half())
    with pytest.raises(RuntimeError, match="q must be BFloat16"):
        step.fused(q.float(), a, ws, torch.empty_like(q))
    with pytest.raises(RuntimeError, match=r"newest token of decoded sequence b at key\[b\]"):
        step.fused(q, a, ws, torch.empty_like(q), slots=step.slots.cuda()[:1])
    with pytest.raises(RuntimeError, match="levels mse fits the grid to the whole row"):
        step.clip = (0.96, 0.92)
        step.fused(q, a, ws, torch.empty_like(q))


@pytest.mark.parametrize("head_dim,group", [(64, 4), (64, 16), (128, 4), (128, 8), (128, 16), (256, 2), (256, 8)])
@pytest.mark.parametrize("params", [0, 1])
def test_decode_ctas_per_sm_is_the_devices_occupancy(head_dim, group, params):
    """The split rule's CTAs per SM (DecodeTraits::kMinBlocks) must be what the device runs: a kernel that
    grew past its register or shared-memory budget would leave the rule filling slots that do not exist
    (head_dim 256 had been counted at 2 per SM and ran batch 1 in two waves)."""
    assert torch.ops.oscar.decode_occupancy(head_dim, group, params) == ops.decode_ctas_per_sm(head_dim, 8 * group, 8)
