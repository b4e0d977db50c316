"""The paged INT2 KV-cache layout: one dataclass, every size derived from it.

One vLLM KV block of one OSCAR layer is a ``uint8`` tensor of shape
``[num_kv_heads, head_page_bytes]``; the whole layer cache is
``[num_blocks, num_kv_heads, head_page_bytes]`` (see :meth:`Int2PageLayout.cache_shape`).
Inside one (block, kv head) *head page* the bytes are, in order::

    k_codes   [block_size, head_dim/4]  uint8  INT2 codes of rotated, clipped K, quartered packing
    v_codes   [block_size, head_dim/4]  uint8  the same for V
    k_params  [block_size, 2]           fp16   (scale, offset) per token: k = code*scale + offset
    v_params  [block_size, 2]           fp16   the same for V

(``params="u8"``: the two parameter regions hold one byte each instead, see *Scale and offset*.)

Head-major pages keep the tokens of one KV head contiguous, so a decode CTA that owns one KV head
streams ``block_size * head_dim/4`` code bytes with 16-byte vector loads and serves every query head
of its GQA group from them.

**Quartered packing.** With ``Q = head_dim/4``, byte ``j`` of a row holds elements
``j, Q+j, 2Q+j, 3Q+j`` in bits ``[1:0], [3:2], [5:4], [7:6]``. One 32-bit word of 4 bytes therefore
yields 4 *consecutive* elements of each quarter with one shift and mask per quarter (the OSCAR
authors' layout; their kernels and ours unpack it the same way).

**Scale and offset.** The per-row affine pair is stored as fp16 ``scale`` and fp16 ``offset`` (the
row minimum after clipping), so dequantization is one fused multiply-add. This is the paper's
``(code - zero) * scale`` with ``zero = -offset/scale``; storing the offset instead of the float zero
point avoids one fp16 rounding of a possibly large ``zero``.

With ``params="u8"`` the pair takes 2 bytes instead of 4 (``[scale code m, offset code u]`` per
row): ``scale = 2**(m // 16 - 10) * (1 + (m % 16) / 16)`` (an 8-bit float with a 4-bit exponent and a
4-bit mantissa, 2**-10 .. 62; its fp32 bits are ``(m << 19) + (117 << 23)``) and ``offset = scale *
(u - 152) / 16`` (sixteenths of the scale, -9.5 .. +6.44 scales: a zero-mean row's lowest level
-1.5 scales is ``u = 128``). Both values are exact in fp32, so dequantization is still one FMA; the
store rounds to them (:func:`vllm_oscar.ops.reference.round_params_u8`). At head_dim 128 a token
then costs 68 bytes per KV head instead of 72 (64 instead of 72 would be codes alone), at head_dim 64
36 instead of 40.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_HEAD_DIMS = (64, 128, 256)
CODES_PER_BYTE = 4  # INT2
PARAMS_PER_ROW = 2  # (scale, offset)
#: How a row's (scale, offset) is stored -> bytes per parameter: "fp16" (the paper's storage) or "u8"
#: (8-bit float scale + 8-bit offset in sixteenths of the scale; see the module docstring).
PARAM_FORMATS = {"fp16": 2, "u8": 1}
#: The artifact's and the runtime configuration's ``scale_dtype`` names of the same formats.
SCALE_DTYPES = {"float16": "fp16", "u8": "u8"}


def params_for_scale_dtype(scale_dtype: str) -> str:
    """The :data:`PARAM_FORMATS` key of a ``scale_dtype`` setting (``"float16"`` -> ``"fp16"``)."""
    try:
        return SCALE_DTYPES[scale_dtype]
    except KeyError:
        raise ValueError(f"unknown scale_dtype {scale_dtype!r}; valid: {list(SCALE_DTYPES)}") from None
#: INT2 tokens per page = this x vLLM's BF16 block size (vllm_oscar/attention/specs.py says why 8): with
#: vLLM's default block size of 16 the INT2 pages the decode kernel reads hold 128 tokens.
INT2_BLOCK_MULTIPLIER = 8


@dataclass(frozen=True)
class Int2PageLayout:
    """Byte layout of one KV block of an OSCAR INT2 layer (see the module docstring)."""

    head_dim: int
    block_size: int
    num_kv_heads: int = 1
    params: str = "fp16"  #: a PARAM_FORMATS key: how each row's (scale, offset) is stored

    def __post_init__(self) -> None:
        if self.params not in PARAM_FORMATS:
            raise ValueError(f"params={self.params!r} is not a parameter format; valid: {list(PARAM_FORMATS)}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"head_dim={self.head_dim} is not supported by the OSCAR INT2 cache; supported head dims: "
                f"{list(SUPPORTED_HEAD_DIMS)} (powers of two, for the Hadamard rotation and 4-way packing)"
            )
        if self.block_size <= 0 or self.block_size % 16 != 0:
            raise ValueError(
                f"block_size={self.block_size} must be a positive multiple of 16 (keeps every region of a "
                "head page 16-byte aligned for vector loads)"
            )
        if self.num_kv_heads <= 0:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must be positive")

    @property
    def packed_row_bytes(self) -> int:
        """Bytes of INT2 codes for one (token, kv head) row of K or of V: ``head_dim / 4``."""
        return self.head_dim // CODES_PER_BYTE

    @property
    def params_row_bytes(self) -> int:
        """Bytes of (scale, offset) for one row: two fp16 values (4), or two bytes with ``params="u8"``."""
        return PARAMS_PER_ROW * PARAM_FORMATS[self.params]

    @property
    def token_bytes_per_head(self) -> int:
        """Bytes one token costs per KV head, K and V together: codes plus scale/offset."""
        return 2 * (self.packed_row_bytes + self.params_row_bytes)

    @property
    def k_codes_offset(self) -> int:
        """Offset of the K code region inside a head page."""
        return 0

    @property
    def v_codes_offset(self) -> int:
        """Offset of the V code region inside a head page."""
        return self.block_size * self.packed_row_bytes

    @property
    def k_params_offset(self) -> int:
        """Offset of the K (scale, offset) pairs inside a head page."""
        return 2 * self.block_size * self.packed_row_bytes

    @property
    def v_params_offset(self) -> int:
        """Offset of the V (scale, offset) pairs inside a head page."""
        return self.k_params_offset + self.block_size * self.params_row_bytes

    @property
    def head_page_bytes(self) -> int:
        """Bytes of one (block, kv head) head page."""
        return self.block_size * self.token_bytes_per_head

    @property
    def page_bytes(self) -> int:
        """Bytes of one KV block of one layer (all KV heads): what vLLM's page-size math must see."""
        return self.num_kv_heads * self.head_page_bytes

    @classmethod
    def token_bytes(cls, head_dim: int, params: str = "fp16") -> int:
        """:attr:`token_bytes_per_head` of every layout with this ``head_dim`` and ``params`` (it depends on
        neither the block size nor the head count)."""
        return cls(head_dim=head_dim, block_size=16, params=params).token_bytes_per_head

    @classmethod
    def for_head_page(cls, head_dim: int, head_page_bytes: int, num_kv_heads: int = 1,
                      params: str = "fp16") -> Int2PageLayout:
        """The layout whose head pages are ``head_page_bytes`` long (a cache tensor's last dimension):
        ``block_size = head_page_bytes // token_bytes_per_head`` (validated like any layout)."""
        return cls(head_dim=head_dim, block_size=head_page_bytes // cls.token_bytes(head_dim, params),
                   num_kv_heads=num_kv_heads, params=params)

    def cache_shape(self, num_blocks: int) -> tuple[int, int, int]:
        """Shape of a layer's ``uint8`` cache tensor: ``[num_blocks, num_kv_heads, head_page_bytes]``."""
        return (num_blocks, self.num_kv_heads, self.head_page_bytes)

    def bf16_page_bytes(self) -> int:
        """Bytes the same block would take in vLLM's BF16 cache (K and V), for capacity ratios."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * 2

    def compression_ratio(self) -> float:
        """How many INT2 tokens fit in the bytes of one BF16 token (fp16 params: 7.11 at d=128, 6.4 at d=64;
        u8 params: 7.53 and 7.11)."""
        return self.bf16_page_bytes() / self.page_bytes

    def bits_per_element(self) -> float:
        """Stored bits per K or V element in the INT2 region (2 + 32/head_dim; u8 params: 2 + 16/head_dim)."""
        return 8.0 * self.token_bytes_per_head / (2 * self.head_dim)
