"""CPU checks of the kernel package (run in CI, no GPU): the extension was built and loads, the fake
implementations accept valid fake CUDA tensors and reject bad ones, and a missing extension gives a
clear error instead of failing at import."""

from __future__ import annotations

import fractions
import os
import shutil

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vllm_oscar import ops

_NVCC_PATH = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
_NVCC = os.path.exists(_NVCC_PATH)
_SKIP_BUILD = os.environ.get("VLLM_OSCAR_SKIP_CUDA_BUILD", "0") == "1"
needs_extension = pytest.mark.skipif(
    not ops.kernels_available(), reason=f"vllm_oscar._C not loaded: {ops.kernels_unavailable_reason()}"
)


@pytest.mark.skipif(not _NVCC or _SKIP_BUILD, reason="no CUDA toolkit here, so the package installs without kernels")
def test_extension_built_and_loads():
    """With nvcc available at install time the extension must have compiled and must load (no GPU needed)."""
    assert ops.kernels_available(), ops.kernels_unavailable_reason()
    for name in ("store_kv", "decode", "gather_prefix"):
        assert hasattr(torch.ops.oscar, name), name


def test_missing_extension_error(monkeypatch):
    monkeypatch.setattr(ops, "_loaded", True)
    monkeypatch.setattr(ops, "_load_error", "vllm_oscar._C was not built (no CUDA toolkit at install time)")
    assert not ops.kernels_available()
    with pytest.raises(ops.KernelsUnavailableError, match=r"unavailable: .*pip install --no-build-isolation -e \."):
        ops.decode(torch.zeros(1, 8, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 640, dtype=torch.uint8),
                   torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), workspace=object())


def _cuda(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="cuda")


@needs_extension
def test_fake_store_kv():
    with FakeTensorMode():
        k = _cuda(5, 2, 128, dtype=torch.bfloat16)
        cache = _cuda(4, 2, 16 * 72, dtype=torch.uint8)
        slots = _cuda(5, dtype=torch.int64)
        r = _cuda(128, 128, dtype=torch.float32)
        win = _cuda(3, 2, 16, 2, 128, dtype=torch.bfloat16)
        assert torch.ops.oscar.store_kv(k, k, cache, slots, r, r, 0.96, 0.92, win, slots) is None
        assert cache.shape == (4, 2, 1152) and cache.dtype == torch.uint8
        with pytest.raises(RuntimeError, match="key must be bf16/fp16"):
            torch.ops.oscar.store_kv(k.float(), k.float(), cache, slots, None, None, 0.96, 0.92)
        with pytest.raises(RuntimeError, match="head page of"):
            torch.ops.oscar.store_kv(k, k, _cuda(4, 2, 1000, dtype=torch.uint8), slots, None, None, 0.96, 0.92)
        with pytest.raises(RuntimeError, match="rotation_k must be float32"):
            torch.ops.oscar.store_kv(k, k, cache, slots, r[:64, :64], None, 0.96, 0.92)
        # levels: 0 = minmax (the default), 1 = mse
        assert torch.ops.oscar.store_kv(k, k, cache, slots, r, r, 0.0, 0.0, win, slots, 1) is None
        with pytest.raises(RuntimeError, match="levels must be 0 \\(minmax\\) or 1 \\(mse\\), got 5"):
            torch.ops.oscar.store_kv(k, k, cache, slots, r, r, 0.0, 0.0, win, slots, 5)
        # params: 0 = fp16 pairs (the default), 1 = u8 pairs: 68-byte tokens at d=128, so 16 x 68 pages
        u8_cache = _cuda(4, 2, 16 * 68, dtype=torch.uint8)
        assert torch.ops.oscar.store_kv(k, k, u8_cache, slots, r, r, 0.0, 0.0, win, slots, 1, 1) is None
        with pytest.raises(RuntimeError, match="head page of 1088 bytes is not block_size \\* 72 bytes"):
            torch.ops.oscar.store_kv(k, k, u8_cache, slots, r, r, 0.0, 0.0, win, slots, 1, 0)
        with pytest.raises(RuntimeError, match="params must be 0 \\(fp16 scale and offset\\) or 1 \\(u8\\), got 2"):
            torch.ops.oscar.store_kv(k, k, cache, slots, r, r, 0.0, 0.0, win, slots, 1, 2)


def test_levels_codes_match_the_kernel_constants():
    from pathlib import Path

    params = (Path(__file__).resolve().parents[2] / "csrc" / "kernels" / "params.h").read_text()
    assert "constexpr int kLevelsMinmax = 0;" in params and "constexpr int kLevelsMse = 1;" in params
    assert ops.LEVELS_CODES == {"minmax": 0, "mse": 1}
    from vllm_oscar.ops import reference as ref

    assert tuple(ops.LEVELS_CODES) == ref.LEVELS
    with pytest.raises(ValueError, match="unknown levels 'lm'; valid: \\['minmax', 'mse'\\]"):
        ops.levels_code("lm")
    # the params codes: the layout's formats in order, and the decode's PB per format
    from vllm_oscar.layout import PARAM_FORMATS

    assert list(ops.PARAMS_CODES) == list(PARAM_FORMATS) and ops.PARAMS_CODES == {"fp16": 0, "u8": 1}
    assert "constexpr int kParamBytesFp16 = 4;" in params and "constexpr int kParamBytesU8 = 2;" in params
    with pytest.raises(ValueError, match="unknown params 'fp8'; valid: \\['fp16', 'u8'\\]"):
        ops.params_code("fp8")


@needs_extension
def test_fake_decode():
    with FakeTensorMode():
        q = _cuda(3, 8, 64, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        cache = _cuda(10, 2, 16 * 40, dtype=torch.uint8)
        bt = _cuda(3, 5, dtype=torch.int32)
        lens = _cuda(3, dtype=torch.int32)
        win = _cuda(4, 2, 16, 2, 64, dtype=torch.bfloat16)
        ws = _cuda(100000, dtype=torch.float32)
        sem = _cuda(6, dtype=torch.int32)
        args = [out, q, cache, bt, lens, win, bt, None, None, 64, 256, 0.125, ws, sem, 4]
        assert torch.ops.oscar.decode(*args) is None
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        bad = list(args)
        bad[1] = q.float()
        with pytest.raises(RuntimeError, match="q must be bfloat16"):
            torch.ops.oscar.decode(*bad)
        bad = list(args)
        bad[1], bad[0] = _cuda(3, 7, 64, dtype=torch.bfloat16), _cuda(3, 7, 64, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="not a multiple of 2 kv heads"):
            torch.ops.oscar.decode(*bad)
        bad = list(args)
        bad[5] = _cuda(4, 2, 16, 3, 64, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="window_cache must be"):
            torch.ops.oscar.decode(*bad)


@needs_extension
def test_fake_store_and_decode():
    with FakeTensorMode():
        q = _cuda(3, 8, 64, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        key = _cuda(5, 2, 64, dtype=torch.bfloat16)
        cache = _cuda(10, 2, 16 * 40, dtype=torch.uint8)
        slots = _cuda(5, dtype=torch.int64)
        bt = _cuda(3, 5, dtype=torch.int32)
        lens = _cuda(3, dtype=torch.int32)
        win = _cuda(4, 2, 16, 2, 64, dtype=torch.bfloat16)
        ws = _cuda(100000, dtype=torch.float32)
        sem = _cuda(6, dtype=torch.int32)
        args = [out, q, key, torch.empty_like(key), cache, slots, bt, lens, win, slots, bt, None, None, None,
                0.0, 0.0, 1, 64, 256, 0.125, ws, sem, 4]
        assert torch.ops.oscar.store_and_decode(*args) is None
        bad = list(args)
        bad[5] = bad[9] = _cuda(2, dtype=torch.int64)  # fewer tokens than decoded sequences
        with pytest.raises(RuntimeError, match=r"newest token of decoded sequence b at key\[b\]"):
            torch.ops.oscar.store_and_decode(*bad)
        bad[8] = bad[9] = bad[10] = None  # without a window cache the op stores, then decodes: no such rule
        assert torch.ops.oscar.store_and_decode(*bad) is None


@needs_extension
def test_fake_gather_prefix():
    with FakeTensorMode():
        k = _cuda(30, 2, 128, dtype=torch.bfloat16)
        cache = _cuda(10, 2, 16 * 72, dtype=torch.uint8)
        bt = _cuda(2, 5, dtype=torch.int32)
        cu = _cuda(3, dtype=torch.int32)
        assert torch.ops.oscar.gather_prefix(k, torch.empty_like(k), cache, bt, cu, None, None, None, None, 0) is None
        with pytest.raises(RuntimeError, match="unsupported head_dim 96"):
            k96 = _cuda(30, 2, 96, dtype=torch.bfloat16)
            torch.ops.oscar.gather_prefix(k96, torch.empty_like(k96), cache, bt, cu, None, None, None, None, 0)


@needs_extension
def test_compile_traces_through_decode():
    """Fake-mode tracing (what torch.compile and vLLM's graph capture do) goes through the op's fake."""

    def f(out, q, cache, bt, lens, ws, sem):
        torch.ops.oscar.decode(out, q, cache, bt, lens, None, None, None, None, 0, 0, 0.125, ws, sem, 2)
        return out * 2

    gm = torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(
        *[
            torch.empty(2, 4, 64, dtype=torch.bfloat16),
            torch.empty(2, 4, 64, dtype=torch.bfloat16),
            torch.empty(4, 1, 640, dtype=torch.uint8),
            torch.empty(2, 2, dtype=torch.int32),
            torch.empty(2, dtype=torch.int32),
            torch.empty(10000, dtype=torch.float32),
            torch.empty(2, dtype=torch.int32),
        ]
    )
    assert "oscar.decode" in str(gm.graph)


@pytest.mark.skipif(not _NVCC, reason="needs nvcc to compile the header's host-side constexpr table")
def test_int2_code_extraction_table_is_exact(tmp_path):
    """decode's code extraction (common.cuh: int2_shift, int2_weight_log4, int2_weight) takes every 2-bit
    code of a quartered-packed word exactly once, as the exact bf16 value 128 + w*c (no GPU needed: the
    table is compiled for the host and the LOP3 ``(x >> shift) & mask | 0x43004300`` is emulated here)."""
    import struct
    import subprocess
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    src = tmp_path / "table.cu"
    src.write_text('#include <cstdio>\n#include "kernels/common.cuh"\nint main() {\n'
                   "  for (int p = 0; p < 2; ++p) for (int q = 0; q < 4; ++q)\n"
                   '    std::printf("%d %d %d %d %g\\n", p, q, oscar::int2_shift(p, q), oscar::int2_weight_log4(p, q),\n'
                   "                oscar::int2_weight(p, q));\n  return 0;\n}\n")
    exe = tmp_path / "table"
    subprocess.run([_NVCC_PATH, "-std=c++17", f"-I{csrc}", "-o", str(exe), str(src)], check=True, capture_output=True)
    rows = [line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
            if line]
    table = {(int(p), int(q)): (int(sh), int(k), float(w)) for p, q, sh, k, w in rows}
    assert sorted(table) == [(p, q) for p in range(2) for q in range(4)]
    assert len({(sh, k) for sh, k, _ in table.values()}) == 8, "two codes share a field"
    bf16 = lambda h: struct.unpack(">f", struct.pack(">H", h) + b"\0\0")[0]
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4000,), generator=gen, dtype=torch.int64).tolist() + [0, 0xFFFFFFFF]
    for (p, q), (sh, k, w) in table.items():
        assert w == 4.0**k and k in (0, 1, 2)
        for x in words:
            r = ((x >> sh) & (0x00030003 << (2 * k))) | 0x43004300
            for half, byte in ((r & 0xFFFF, (x >> (8 * p)) & 0xFF), (r >> 16, (x >> (8 * (p + 2))) & 0xFF)):
                assert bf16(half) == 128 + w * ((byte >> (2 * q)) & 3), (p, q, hex(x))


@needs_extension
def test_decode_split_rule_counts_the_ctas_an_sm_holds():
    """decode_num_splits fills ``decode_ctas_per_sm x SMs`` slots: 2 per SM at head_dim <= 128 with up to 8
    query heads per KV head, 1 at head_dim 256 or above 8 (the GPU test
    ``test_decode_ctas_per_sm_is_the_devices_occupancy`` checks these against the device). Counting 2 slots
    at head_dim 256 had put batch 1 in two waves of CTAs (docs/kernels.md, *Head_dim 256*)."""
    assert [ops.decode_ctas_per_sm(d, 8 * g, 8) for d, g in ((64, 4), (64, 16), (128, 8), (128, 16), (256, 1), (256, 4))] \
        == [2, 1, 2, 1, 1, 1]
    split = lambda b, hq, d, ctx=131072, hkv=8: ops.decode_num_splits(b, hq, hkv, d, ctx, sink=64, recent=256,
                                                                       num_sms=132)
    assert [split(b, 16, 256) for b in (1, 8, 64)] == [16, 2, 1]  # 16 x 8 = 128 and 2 x 64 = 128 INT2 CTAs <= 132
    assert [split(b, 32, 128) for b in (1, 8, 64)] == [30, 4, 1]  # unchanged: 2 slots per SM
    # One slot per SM: the resident grid (its window CTAs included) while its INT2 CTAs take at most
    # _RESIDENT_EXTRA_TILES = 8 more tiles each than with the wave filled by INT2 CTAs. Gemma 3 12B at batch 1:
    # 11 splits (11 x 8 INT2 + 5 x 8 window CTAs = 128) up to 32K (24 against 16 tiles per CTA), 16 from 64K
    # (47 against 32); batch 2: 3 splits at 4K (10 against 4 tiles), 8 from 8K (21 against 8).
    assert [split(1, 16, 256, ctx) for ctx in (4096, 32768, 65536, 131072)] == [11, 11, 16, 16]
    assert [split(2, 16, 256, ctx) for ctx in (4096, 8192, 32768)] == [3, 8, 8]
    # 16 query heads per KV head (d=128, 256-token tiles): 64 / 4 heads at batch 1 30 splits (33 filling the
    # wave) at every length from 8K; 128 / 8 at batch 1 13 (16) up to 128K, where it is exactly 8 tiles more.
    assert [split(1, 64, 128, ctx, hkv=4) for ctx in (4096, 32768, 131072)] == [15, 30, 30]
    assert [split(2, 64, 128, ctx, hkv=4) for ctx in (4096, 131072)] == [13, 13]
    assert split(1, 128, 128) == 13
    assert split(4, 128, 128) == 4  # resident: 132 // 32 - 3 = 1 INT2 split per item, 511 tiles against 128
    assert ops.store_overlaps_decode(8, 8, 2, 132, head_dim=256, num_q_heads=16)
    assert not ops.store_overlaps_decode(8, 8, 4, 132, head_dim=256, num_q_heads=16)
    with pytest.raises(RuntimeError, match="unsupported head_dim 96"):
        torch.ops.oscar.decode_ctas_per_sm(96, 4)
    for query in (torch.ops.oscar.decode_ctas_per_sm, torch.ops.oscar.decode_max_split_heads):
        with pytest.raises(RuntimeError, match=r"group \(query heads per KV head\) must be >= 1, got 0"):
            query(128, 0)


@needs_extension
def test_decode_window_ctas_follow_the_rule_at_every_length():
    """decode_kernel's window CTA count (csrc/kernels/window_ctas.h): thresholds on an item's INT2 tiles,
    computed at launch by bisection, must give the rule's own choice at every tile count, which holds
    only if the choice never rises with the count: the count w in [1, s_win] that minimizes
    max(ceil(s_win / w) * cost / 4, n / (num_splits + s_win - w)) INT2 tiles (ties to more window CTAs),
    with at most kWinFromSlots = 8 window CTAs given away. cost is DecodeTraits::kWinTileCost."""
    def rule(n, splits, s_win, cost):
        if n == 0 or cost == 0 or s_win <= 1 or 20 * (splits + s_win - 1) < 23 * splits:  # < 15% more: keep
            return s_win
        total, best, best_cost = splits + s_win, s_win, None
        for w in range(s_win, 0, -1):
            c = max(fractions.Fraction(-(-s_win // w) * cost), fractions.Fraction(4 * n, total - w))
            if best_cost is None or c < best_cost:
                best, best_cost = w, c
        return max(best, s_win - 8)

    tiles = list(range(160)) + [255, 256, 387, 388, 511, 1023, 4095, 1 << 20]
    for head_dim, cost in ((64, 6), (128, 6), (256, 8)):
        for splits in (1, 2, 5, 13, 30, 85):
            for s_win in (0, 1, 2, 3, 5, 12):
                got = [torch.ops.oscar.decode_window_ctas(n, splits, s_win, head_dim) for n in tiles]
                assert got == [rule(n, splits, s_win, cost) for n in tiles], (head_dim, splits, s_win)
    # Qwen3-8B (3 window tiles): at batch 1 (30 INT2 splits) one CTA per window tile at any length; at
    # batch 2 (13) 2 window CTAs from 40 INT2 tiles, one from 64; at batch 4 (5) 2 from 16, one from 28.
    assert {torch.ops.oscar.decode_window_ctas(n, 30, 3, 128) for n in (63, 127, 511, 1 << 20)} == {3}
    assert [torch.ops.oscar.decode_window_ctas(n, 13, 3, 128) for n in (39, 40, 63, 64)] == [3, 2, 2, 1]
    assert [torch.ops.oscar.decode_window_ctas(n, 5, 3, 128) for n in (15, 16, 27, 28)] == [3, 2, 2, 1]
    with pytest.raises(RuntimeError, match=r"num_splits must be in \[1, 65536\], got 0"):
        torch.ops.oscar.decode_window_ctas(10, 0, 3, 128)
