"""OSCAR ops: the plain-PyTorch spec (:mod:`vllm_oscar.ops.reference`) and the CUDA kernels.

The kernels live in the optional extension ``vllm_oscar._C`` (``csrc/``, built by ``setup.py`` when a
CUDA toolkit is present) and are registered as ``torch.ops.oscar.*`` with fake implementations
(:mod:`vllm_oscar.ops._library`), so torch.compile and CUDA-graph capture see them. Importing this
package never loads the extension; the first kernel call does, and raises
:class:`KernelsUnavailableError` with the reason when it is missing or broken.

Cache layouts (see :mod:`vllm_oscar.layout`):

* INT2 cache, per layer: ``uint8 [num_blocks, num_kv_heads, head_page_bytes]``; a head page holds
  ``block_size`` tokens as ``k_codes | v_codes | k (scale, offset) | v (scale, offset)`` (two fp16 per
  row, or two bytes with ``params="u8"``).
* Window cache, per layer: ``[num_blocks, 2, window_block_size, num_kv_heads, head_dim]`` bf16 (K then
  V), rows in the rotated space. Decode reads position ``j`` of a sequence of length ``n`` from it
  when ``j < sink`` or ``j >= n - recent`` and from INT2 otherwise (:func:`reference.paged_decode`).

Slots and block tables follow vLLM: ``slot = block * block_size + offset`` and position ``j`` of
sequence ``b`` lives in block ``block_table[b, j // block_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_oscar.layout import Int2PageLayout

__all__ = [
    "LEVELS_CODES",
    "PARAMS_CODES",
    "DecodeWorkspace",
    "KernelsUnavailableError",
    "decode",
    "decode_num_splits",
    "gather_prefix",
    "kernels_available",
    "kernels_unavailable_reason",
    "make_decode_workspace",
    "store_and_decode",
    "store_kv",
]

_REBUILD_HINT = (
    "rebuild with `pip install --no-build-isolation -e .` on a machine with a CUDA toolkit "
    "(nvcc on PATH or CUDA_HOME set) and the same torch as at run time"
)

_loaded = False
_load_error: str | None = None


class KernelsUnavailableError(RuntimeError):
    """The CUDA extension ``vllm_oscar._C`` is missing or failed to load."""


def _load() -> None:
    global _loaded, _load_error
    if _loaded:
        return
    _loaded = True
    try:
        import vllm_oscar._C  # noqa: F401  (registers torch.ops.oscar.*)
    except ModuleNotFoundError as exc:
        if exc.name != "vllm_oscar._C":
            _load_error = f"importing vllm_oscar._C failed: {exc}"
        else:
            _load_error = (
                "vllm_oscar._C was not built (no CUDA toolkit at install time, or VLLM_OSCAR_SKIP_CUDA_BUILD=1)"
            )
        return
    except (ImportError, OSError) as exc:  # e.g. built against another torch: undefined symbols
        _load_error = f"vllm_oscar._C failed to load: {exc}"
        return
    from vllm_oscar.ops import _library

    _library.register_fakes()


def kernels_available() -> bool:
    """Whether ``vllm_oscar._C`` loaded (it may still lack a GPU to run on)."""
    _load()
    return _load_error is None


def kernels_unavailable_reason() -> str | None:
    """Why the kernels cannot be used, or ``None`` when they loaded."""
    _load()
    return _load_error


def _ops():
    _load()
    if _load_error is not None:
        raise KernelsUnavailableError(f"vllm_oscar CUDA kernels are unavailable: {_load_error}; {_REBUILD_HINT}.")
    return torch.ops.oscar


# --------------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------------

#: ``levels`` names -> the op's ``int levels`` (``kLevelsMinmax``/``kLevelsMse`` in csrc/kernels/params.h).
LEVELS_CODES = {"minmax": 0, "mse": 1}


#: ``params`` names (:data:`vllm_oscar.layout.PARAM_FORMATS`) -> the ops' ``int params``.
PARAMS_CODES = {"fp16": 0, "u8": 1}


def _op_code(codes: dict[str, int], what: str, name: str) -> int:
    if name not in codes:
        raise ValueError(f"unknown {what} {name!r}; valid: {list(codes)}")
    return codes[name]


def levels_code(levels: str) -> int:
    return _op_code(LEVELS_CODES, "levels", levels)


def params_code(params: str) -> int:
    return _op_code(PARAMS_CODES, "params", params)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rotation_k: torch.Tensor | None = None,
    rotation_v: torch.Tensor | None = None,
    *,
    k_clip_ratio: float,
    v_clip_ratio: float,
    window_cache: torch.Tensor | None = None,
    window_slot_mapping: torch.Tensor | None = None,
    levels: str = "minmax",
    params: str = "fp16",
) -> None:
    """Rotate, clip, INT2-quantize and pack K/V rows into the paged cache, in place.

    Args:
        key, value: ``[num_tokens, num_kv_heads, head_dim]`` bf16 or fp16 (last dim contiguous; row
            strides free, so views of a fused qkv tensor work). Only the first
            ``slot_mapping.shape[0]`` tokens are read.
        kv_cache: ``uint8 [num_blocks, num_kv_heads, head_page_bytes]``; ``block_size`` is
            ``head_page_bytes / (2 * (head_dim / 4 + 4))`` (``+ 2`` with ``params="u8"``).
        slot_mapping: ``int64 [T]``, ``block * block_size + offset``; ``-1`` skips the token.
        rotation_k, rotation_v: ``float32 [head_dim, head_dim]`` (``x_rot = x @ R``), ``None`` = identity.
        k_clip_ratio, v_clip_ratio: row clip quantile (``<= 0`` disables clipping; must be 0 with
            ``levels="mse"``).
        window_cache: optional ``[num_window_blocks, 2, window_block_size, num_kv_heads, head_dim]``
            bf16/fp16: the rotated, unclipped rows of tokens with ``window_slot_mapping[t] >= 0`` are
            also written there (``int64 [>= T]``, ``-1`` skips).
        levels: ``"minmax"`` (clip, then the min-max grid: :func:`reference.quantize_int2`) or
            ``"mse"`` (no clipping, the MSE-fitted grid: :func:`reference.quantize_int2_mse`, the same
            fp32 summation order); the page layout is the same.
        params: how each row's (scale, offset) is stored (:data:`vllm_oscar.layout.PARAM_FORMATS`):
            ``"fp16"``, or ``"u8"`` (2 bytes: :func:`reference.round_params_u8`). Every op reading this
            cache must be given the same value.

    Matches :func:`reference.store_kv` + :func:`reference.store_window`: fp32 rotation, the exact
    ``sort(|x|)[idx]`` clip threshold, fp16 (scale, offset), ``floor((x - offset) / scale + 0.5)``.
    The rotation's fp32 sums run in a different order than a CPU matmul, so with a non-identity R a
    few codes per thousand can land one level apart from the reference; with identity R (or None)
    the bytes are identical.

    >>> store_kv(k, v, cache, slots, r_k, r_v, k_clip_ratio=0.96, v_clip_ratio=0.92)  # doctest: +SKIP
    >>> store_kv(k, v, cache, slots, r_k, r_v, k_clip_ratio=0, v_clip_ratio=0, levels="mse")  # doctest: +SKIP
    """
    code = levels_code(levels)
    _ops().store_kv(
        key, value, kv_cache, slot_mapping, rotation_k, rotation_v, float(k_clip_ratio), float(v_clip_ratio),
        window_cache, window_slot_mapping, code, params_code(params),
    )


# --------------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------------

# Mirrors of DecodeTraits in csrc/kernels/decode.cuh (checked against the extension in tests).
_TILE = {64: 256, 128: 256, 256: 128}  # INT2 tokens per pipeline stage


def _window_tile(head_dim: int) -> int:
    return int(_ops().decode_window_tile(head_dim))


def _window_splits(head_dim: int, sink: int, recent: int, window: bool) -> int:
    return -(-(sink + recent) // _window_tile(head_dim)) if window else 0


def decode_ctas_per_sm(head_dim: int, num_q_heads: int, num_kv_heads: int) -> int:
    """Decode CTAs one SM holds at once (``DecodeTraits::kMinBlocks``): 2 at head_dim <= 128 with up to 8
    query heads per KV head (78 KB of shared memory, <= 128 registers per thread), else 1 (head_dim 256:
    ~170 registers per thread; more than 8 query heads per KV head: ~200). The slots
    :func:`decode_num_splits` fills and :func:`store_overlaps_decode` compares against; the GPU test
    ``test_decode_ctas_per_sm_is_the_devices_occupancy`` checks it against the device's occupancy."""
    return int(_ops().decode_ctas_per_sm(head_dim, max(num_q_heads // max(num_kv_heads, 1), 1)))


# One CTA per SM (decode_ctas_per_sm 1): decode_num_splits keeps the whole grid resident while that costs
# each INT2 CTA at most this many more tiles than filling the wave with INT2 CTAs (whose window CTAs then
# run in a second wave). Measured on the H100, no R_V (benchmarks/results/kernels-h100.json,
# decode_steps.one_cta_per_sm_*): Gemma 3 12B's global layers at batch 1, resident 11 against 16 splits,
# 17.1 / 20.1 / 25.7 / 37.7 / 103.0 us against 24.2 / 26.0 / 30.4 / 38.0 / 82.0 at 4K / 8K / 16K / 32K /
# 128K (3 / 6 / 12 / 24 / 93 tiles per CTA against 2 / 4 / 8 / 16 / 64);
# store_and_decode 39.8 against 44.1 us at 32K; batch 2 (3 against 8) 23.6 against 25.8 us at 4K (6 more
# tiles), 54.9 against 37.1 at 16K (26 more); 16 query heads per KV head (64 / 4, d=128), batch 1 (30 against
# 33) 27.4 against 34.0 us at 32K and 43.8 against 49.3 at 128K (2 more tiles), batch 2 (13 against 16)
# 30.1 against 36.3 at 32K. At exactly 8 more tiles, 128 query / 8 KV heads at batch 1 and 128K took 69.0 us
# resident against 66.0 (13 against 16 splits), the one measured loss.
_RESIDENT_EXTRA_TILES = 8


def decode_num_splits(
    batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    *,
    sink: int = 0,
    recent: int = 0,
    window: bool = True,
    num_sms: int | None = None,
) -> int:
    """INT2 split count for a batch size and maximum context: fixed per (batch, max_seq_len), so a
    CUDA graph captured with it stays valid for every shorter sequence.

    An SM holds :func:`decode_ctas_per_sm` CTAs (2 at d <= 128 with up to 8 query heads per KV head,
    else 1), so there are that many times ``num_sms`` slots. When the whole grid (INT2 and window
    splits) fits in them with at least one INT2 CTA per SM, every split starts at once and nothing
    waits for a second wave (small batch).
    Otherwise (medium batch) the INT2 splits alone fill one wave, ``slots // items`` of them per
    (sequence, KV head), and the short window splits run after them; a second, mostly empty wave of
    long INT2 CTAs costs a whole CTA length. Only when one wave cannot be nearly filled that way (items
    between half and all of the slots) does it take two splits per item. With one CTA per SM (head_dim
    256, more than 8 query heads per KV head) a resident grid always has fewer INT2 CTAs than SMs; there it
    is kept while its INT2 CTAs take at most ``_RESIDENT_EXTRA_TILES`` more tiles each than with the wave
    filled (short contexts, few items): the second wave of window CTAs costs about that much. At least one
    pipeline tile (256 tokens, 128 at d=256) per split. In a resident grid the kernel may hand window splits to the INT2
    tiles at run time (``csrc/kernels/window_ctas.h``; ``torch.ops.oscar.decode_window_ctas`` gives the count), so the
    window splits counted here are slots, not a fixed division of work.

    Measured on one H100 (``python benchmarks/kernels.py --parts sweep``, no R_V, 2026-11-24): Qwen3-8B
    shape, batch 8, 32K: 4 splits 73.7 us against 88.3 us for the 5 (= ceil(264 / 64)) chosen before;
    batch 8, 128K: 240 against 293 us; batch 16, 32K: 2 splits 131 against 139 us (3 before); SmolLM2
    batch 64 (192 items): 2 splits 142 us, 1 split 168 us. Head_dim 256 (Gemma 3 12B's global layers, 16
    query / 8 KV heads, one CTA per SM; ``--shapes gemma3-12b``, same day): counted with two slots per SM,
    batch 1 took 28 splits, two waves (25.7 / 42.5 / 94.1 us at 4K / 32K / 128K); with the one real slot,
    16 (24.0 / 38.0 / 81.4 us); batch 8: 4 -> 2 splits, 166.5 -> 153.5 us. Fewer were faster at batch 1
    and short context (11 splits, the resident grid: 17.1 us at 4K; 13: 35.0 us at 32K), but 16 was the
    best at 128K: since 2026-11-25 the resident count is taken up to ``_RESIDENT_EXTRA_TILES`` more tiles
    per CTA (11 up to a max_seq_len of 32K), with the measurements next to that constant.
    """
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    tiles = max(1, -(-max(max_seq_len - ((sink + recent) if window else 0), 1) // _TILE[head_dim]))
    items = max(1, batch * num_kv_heads)
    per_sm = decode_ctas_per_sm(head_dim, num_q_heads, num_kv_heads)
    slots = per_sm * num_sms
    s_win = _window_splits(head_dim, sink, recent, window)
    resident = slots // items - s_win  # INT2 splits of a grid resident at once, window CTAs included
    s = resident
    if s * items < num_sms:  # too few INT2 CTAs to keep every SM streaming: INT2 fills one wave
        s = slots // items
        if s * items < slots * 9 // 10:  # more than a tenth of the wave idle (or items > slots)
            s = -(-slots // items)
        # the most INT2 tiles one CTA takes with `resident` against `s` splits
        if per_sm == 1 and resident >= 1 and (
                -(-tiles // min(resident, tiles)) - -(-tiles // min(s, tiles)) <= _RESIDENT_EXTRA_TILES):
            s = resident
    group = num_q_heads // num_kv_heads
    cap = int(_ops().decode_max_split_heads(head_dim, group)) // group - s_win
    return max(1, min(s, tiles, cap))


@dataclass(frozen=True)
class DecodeWorkspace:
    """Preallocated scratch of :func:`decode` (reusable across layers on one stream, not concurrently).

    ``buffer`` fp32 holds the rotated queries and the per-split partial outputs and log-sum-exps;
    ``semaphores`` int32 ``[max_batch * num_kv_heads]`` must start at zero, and the kernel leaves it at
    zero, so one allocation serves every replay of a CUDA graph.
    """

    buffer: torch.Tensor
    semaphores: torch.Tensor
    num_splits: int
    max_batch: int


def make_decode_workspace(
    max_batch: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    *,
    sink: int = 0,
    recent: int = 0,
    window: bool = True,
    device: torch.device | str | None = None,
    num_splits: int | None = None,
) -> DecodeWorkspace:
    """Allocate a :class:`DecodeWorkspace` for up to ``max_batch`` sequences of ``max_seq_len`` tokens."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if num_splits is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        num_splits = decode_num_splits(
            max_batch, num_q_heads, num_kv_heads, head_dim, max_seq_len,
            sink=sink, recent=recent, window=window, num_sms=num_sms,
        )
    group = num_q_heads // num_kv_heads
    s_total = num_splits + _window_splits(head_dim, sink, recent, window)
    # q_rot, the splits' partial outputs and log-sum-exps, store_and_decode's newest K and V rows
    numel = (max_batch * num_q_heads * head_dim + max_batch * num_kv_heads * s_total * group * (head_dim + 1)
             + 2 * max_batch * num_kv_heads * head_dim)
    return DecodeWorkspace(
        buffer=torch.empty(max(numel, 1), dtype=torch.float32, device=device),
        semaphores=torch.zeros(max(max_batch * num_kv_heads, 1), dtype=torch.int32, device=device),
        num_splits=num_splits,
        max_batch=max_batch,
    )


def decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    workspace: DecodeWorkspace | None = None,
    *,
    window_cache: torch.Tensor | None = None,
    window_block_table: torch.Tensor | None = None,
    rotation_k: torch.Tensor | None = None,
    rotation_v: torch.Tensor | None = None,
    sink: int = 0,
    recent: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    params: str = "fp16",
) -> torch.Tensor:
    """Decode attention of one query token per sequence over the OSCAR cache.

    Args:
        q: ``[batch, num_q_heads, head_dim]`` bf16, the query at position ``seq_lens[b] - 1``, in the
            model space (rotated by ``rotation_k`` inside). Query head ``h`` reads kv head
            ``h // (num_q_heads // num_kv_heads)``.
        kv_cache: INT2 cache ``uint8 [num_blocks, num_kv_heads, head_page_bytes]``.
        block_table: ``int32 [>= batch, max_blocks]``; seq_lens: ``int32 [>= batch]`` (0 gives zeros).
        workspace: from :func:`make_decode_workspace`; ``None`` allocates one per call (not
            CUDA-graph safe).
        window_cache, window_block_table: BF16 window cache
            ``[num_window_blocks, 2, window_block_size, num_kv_heads, head_dim]`` and its ``int32``
            block table; rows ``j < sink`` and ``j >= seq_len - recent`` are read from it. ``None``:
            every row comes from INT2.
        rotation_k: ``float32 [d, d]`` applied to q (``None`` = identity).
        rotation_v: ``float32 [d, d]``; the output is ``o @ rotation_v.T``. ``None`` leaves the output
            in the rotated space (use it when R_V is folded into o_proj).
        scale: softmax scale, default ``head_dim ** -0.5``.
        out: optional ``[batch, num_q_heads, head_dim]`` bf16 destination.
        params: the cache's (scale, offset) format, as given to :func:`store_kv`.

    Returns ``out``. Matches :func:`reference.paged_decode` to bf16 accuracy.
    """
    batch, num_q_heads, head_dim = q.shape
    if workspace is None:
        # the op checks the page size itself (its error names the page and the token bytes)
        bs = kv_cache.shape[2] // Int2PageLayout.token_bytes(head_dim, params)
        workspace = make_decode_workspace(
            batch, num_q_heads, kv_cache.shape[1], head_dim, block_table.shape[1] * bs,
            sink=sink, recent=recent, window=window_cache is not None, device=q.device,
        )
    if out is None:
        out = torch.empty_like(q)
    scale = head_dim**-0.5 if scale is None else float(scale)
    _ops().decode(
        out, q, kv_cache, block_table, seq_lens, window_cache, window_block_table, rotation_k, rotation_v,
        int(sink), int(recent), scale, workspace.buffer, workspace.semaphores, int(workspace.num_splits),
        params_code(params),
    )
    return out


def store_overlaps_decode(batch: int, num_kv_heads: int, num_splits: int, num_sms: int, *, head_dim: int,
                          num_q_heads: int) -> bool:
    """Whether a decode step should run :func:`store_and_decode` rather than :func:`store_kv` then
    :func:`decode` (with a window cache): while the decode's INT2 CTAs fit in one wave of CTA slots
    (:func:`decode_ctas_per_sm` per SM).

    One H100, ``python benchmarks/kernels.py --parts step`` (one token per sequence stored, no R_V, MSE
    grid; two runs, 2026-11-24, the store behind the decode): the op saved 4.5-5.9 us per call at batch
    1 and 8 on the Qwen3-8B shape (batch 1, 32K: 30.7 -> 25.0 us, decode alone 23.9) and 4.5-10.1 us on
    SmolLM2's, but at batch 64 on the Qwen3-8B shape, where 512 INT2 CTAs run in two waves and the
    store can start only in the last one, it was 7-55 us slower than the two kernels in turn (32K: 489
    -> 495-530 us), while on SmolLM2's it was 2.5-6.8 us faster.
    """
    return num_splits * batch * num_kv_heads <= decode_ctas_per_sm(head_dim, num_q_heads, num_kv_heads) * num_sms


def store_and_decode(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    workspace: DecodeWorkspace,
    *,
    window_cache: torch.Tensor | None = None,
    window_slot_mapping: torch.Tensor | None = None,
    window_block_table: torch.Tensor | None = None,
    rotation_k: torch.Tensor | None = None,
    rotation_v: torch.Tensor | None = None,
    rotate_output: bool = True,
    k_clip_ratio: float,
    v_clip_ratio: float,
    levels: str = "minmax",
    params: str = "fp16",
    sink: int = 0,
    recent: int = 0,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`store_kv` then :func:`decode` in one op, with the store running beside the decode.

    A decode step stores each sequence's newest token, but the decode reads that row only from the BF16
    window, and only in the CTA that covers position ``seq_lens[b] - 1``. With a window cache the op
    launches ``q @ R_K`` (which also rotates the newest K/V rows into the workspace, with the store's
    arithmetic), the decode (that CTA takes the row from the workspace), then the store, chained by
    programmatic dependent launch (sm_90+): the store's CTAs start in the slots the decode's CTAs free,
    so at small batch its few microseconds leave the critical path. Without a window cache or with
    ``recent == 0`` (the newest row is then an INT2 row) the op runs :func:`store_kv`, then
    :func:`decode`. Results are bitwise those of :func:`store_kv` followed by :func:`decode`.

    Arguments are those of :func:`store_kv` (``key``, ``value``, ``slot_mapping``,
    ``window_slot_mapping``, ``rotation_k``/``rotation_v`` for the rows, ``k_clip_ratio``,
    ``v_clip_ratio``, ``levels``, ``params``) and of :func:`decode` (``q``, ``block_table``, ``seq_lens``,
    ``workspace``, ``window_block_table``, ``sink``, ``recent``, ``scale``, ``out``); the output is
    ``o @ rotation_v.T`` when ``rotate_output``, else left in the rotated space.

    Contract (vLLM's batch order, decodes first): ``key[b]``/``value[b]`` is the newest token of
    sequence ``b < q.shape[0]`` (position ``seq_lens[b] - 1``, stored at ``slot_mapping[b]`` and
    ``window_slot_mapping[b]``); the other tokens must belong to sequences this decode does not read
    (for example the prefill tokens of a mixed batch), since the store may write them while the decode
    runs.
    """
    head_dim = q.shape[-1]
    if out is None:
        out = torch.empty_like(q)
    scale = head_dim**-0.5 if scale is None else float(scale)
    _ops().store_and_decode(
        out, q, key, value, kv_cache, slot_mapping, block_table, seq_lens, window_cache, window_slot_mapping,
        window_block_table, rotation_k, rotation_v, rotation_v if rotate_output else None, float(k_clip_ratio),
        float(v_clip_ratio), levels_code(levels), int(sink), int(recent), scale, workspace.buffer,
        workspace.semaphores, int(workspace.num_splits), params_code(params),
    )
    return out


# --------------------------------------------------------------------------------------------------
# prefix gather (chunked prefill / prefix-cache hits)
# --------------------------------------------------------------------------------------------------


def gather_prefix(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    head_dim: int,
    prefix_lens: torch.Tensor | None = None,
    window_cache: torch.Tensor | None = None,
    window_block_table: torch.Tensor | None = None,
    window_starts: torch.Tensor | None = None,
    sink: int = 0,
    total_tokens: int | None = None,
    key_out: torch.Tensor | None = None,
    value_out: torch.Tensor | None = None,
    params: str = "fp16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize the cached prefixes of several sequences into contiguous bf16 K and V (rotated space).

    Sequence ``i`` owns output rows ``cu_seqlens[i] .. cu_seqlens[i+1]-1`` (``int32 [num_seqs + 1]``)
    and its prefix positions ``j = 0 .. prefix_lens[i]-1`` (default: all of its rows) land in rows
    ``cu_seqlens[i] + j``; rows past the prefix are left untouched, so the caller can write the new
    chunk's K/V there and hand the same ``cu_seqlens`` to FlashAttention varlen.

    Window rule: position ``j`` is copied from ``window_cache`` (bf16, through ``window_block_table``)
    when a window cache is given and ``j < sink`` or ``j >= window_starts[i]`` (``int32 [num_seqs]``,
    typically the first position whose BF16 copy is still held); otherwise it is dequantized from
    INT2 as ``bf16(code * scale + offset)`` (product and sum rounded separately in fp32, exactly
    :func:`reference.dequantize_int2` then a bf16 cast). ``params``: the cache's (scale, offset) format,
    as given to :func:`store_kv`.

    Returns ``(key_out, value_out)`` ``[total_tokens, num_kv_heads, head_dim]`` bf16. Without
    ``total_tokens`` (and without outputs) this reads ``cu_seqlens[-1]`` on the host (a sync).
    """
    num_kv_heads = kv_cache.shape[1]
    if key_out is None or value_out is None:
        rows = int(cu_seqlens[-1]) if total_tokens is None else int(total_tokens)
        shape = (rows, num_kv_heads, head_dim)
        key_out = torch.empty(shape, dtype=torch.bfloat16, device=kv_cache.device) if key_out is None else key_out
        value_out = (
            torch.empty(shape, dtype=torch.bfloat16, device=kv_cache.device) if value_out is None else value_out
        )
    _ops().gather_prefix(
        key_out, value_out, kv_cache, block_table, cu_seqlens, prefix_lens, window_cache, window_block_table,
        window_starts, int(sink), params_code(params),
    )
    return key_out, value_out

