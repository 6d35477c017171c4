"""Bit packing of integer codes into int32 words: compressed-tensors' pack-quantized layout.

The layout (compressed-tensors >= 0.18, verified against the 0.19 sources):

    stored value     u = q + 2^(b-1)                        (unsigned, b bits)
    codes            element i of a row starts at bit p = i*b of that row's
                     little-endian bit stream; word w = p // 32 holds bits
                     [32w, 32w+32); a value may straddle two words.
                     [N, K] int8 -> int32 [N, ceil(K*b/32)]          -> pack_codes
    zero points      the same stream, but along dim 0 (down each column):
                     [N, G] int8 -> int32 [ceil(N*b/32), G]          -> pack_zero_points

Equivalently, element i contributes  u_i << (p mod 32)  to word p // 32 and, when
it straddles (p mod 32 + b > 32),  u_i >> (32 - p mod 32)  to word p // 32 + 1.
Because the bit ranges are disjoint, summing the contributions equals OR-ing them,
which is what makes a single vectorised ``index_add_`` correct. Unpacking reads
words (word, word+1) for every element and shifts them back.

2-, 4- and 8-bit are identical to the pre-0.18 layout (b divides 32); 3/5/6/7-bit
differ from it. This module is pure torch and does not import compressed-tensors,
so the on-disk format never depends on which compressed-tensors version happens
to be installed; tests compare it byte for byte against compressed-tensors 0.19.
"""
from __future__ import annotations

import torch

from .spec import MAX_BITS, MIN_BITS

__all__ = [
    "PackingError",
    "packed_width",
    "pack_codes",
    "unpack_codes",
    "pack_zero_points",
    "unpack_zero_points",
    "unpack_bitstream",
]

_WORD_BITS = 32
# Rows processed per chunk: bounds the int32 temporaries to ~chunk*K*4 bytes each.
_ROW_CHUNK_ELEMENTS = 1 << 24


class PackingError(ValueError):
    """Codes or packed words that do not fit the requested bit width / shape."""


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise PackingError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def packed_width(length: int, bits: int) -> int:
    """Number of int32 words holding ``length`` values of ``bits`` bits: ceil(length*b/32)."""
    _check_bits(bits)
    return (length * bits + _WORD_BITS - 1) // _WORD_BITS


def _row_chunks(rows: int, cols: int):
    step = max(1, _ROW_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _bit_positions(length: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bit_pos = torch.arange(length, device=device, dtype=torch.int64) * bits
    return bit_pos // _WORD_BITS, (bit_pos % _WORD_BITS).to(torch.int32)


def _pack_rows(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int32 [R, L] values in [0, 2^b) along dim 1 into int32 [R, ceil(L*b/32)].

    int32 arithmetic is exact here: torch's << on int32 keeps the low 32 bits (the
    bit pattern we want), and the contributions to one word occupy disjoint bits, so
    their sum never carries and never overflows the signed range.
    """
    rows, length = unsigned.shape
    width = packed_width(length, bits)
    device = unsigned.device
    word, offset = _bit_positions(length, bits, device)
    out = torch.empty(rows, width, dtype=torch.int32, device=device)
    for r0, r1 in _row_chunks(rows, length):
        u = unsigned[r0:r1]
        # one spare word so straddling values can always spill into word+1
        acc = torch.zeros(r1 - r0, width + 1, dtype=torch.int32, device=device)
        acc.index_add_(1, word, u << offset)
        # u < 2^b, so u >> (32 - offset) is 0 unless the value straddles the boundary
        # (a shift by 32 yields 0 for non-negative int32 in torch)
        acc.index_add_(1, word + 1, u >> (_WORD_BITS - offset))
        out[r0:r1] = acc[:, :width]
    return out


def _unpack_rows(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of _pack_rows: int32 [R, W] -> int32 [R, length] values in [0, 2^b)."""
    rows, width = packed.shape
    device = packed.device
    word, offset = _bit_positions(length, bits, device)
    # >> on int32 is arithmetic: keep only the 32 - offset bits that belong to this word
    low_mask = (1 << torch.clamp(_WORD_BITS - offset, max=bits)) - 1
    mask = (1 << bits) - 1
    out = torch.empty(rows, length, dtype=torch.int32, device=device)
    for r0, r1 in _row_chunks(rows, length):
        words = torch.cat([packed[r0:r1], torch.zeros_like(packed[r0:r1, :1])], dim=1)
        low = (words[:, word] >> offset) & low_mask
        high = (words[:, word + 1] << (_WORD_BITS - offset)) & mask  # << 32 gives 0
        out[r0:r1] = low | high
    return out


def _check_codes(codes: torch.Tensor, bits: int, what: str) -> None:
    if codes.dim() != 2:
        raise PackingError(f"{what}: expected a 2-D tensor, got shape {tuple(codes.shape)}")
    if codes.dtype != torch.int8:
        raise PackingError(f"{what}: expected int8 signed codes, got {codes.dtype}")
    if codes.numel():
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi:
            raise PackingError(
                f"{what}: values span [{cmin}, {cmax}], outside the {bits}-bit range [{lo}, {hi}]"
            )


def _check_packed(packed: torch.Tensor, bits: int, length: int, dim: int, what: str) -> None:
    if packed.dim() != 2:
        raise PackingError(f"{what}: expected a 2-D int32 tensor, got shape {tuple(packed.shape)}")
    if packed.dtype != torch.int32:
        raise PackingError(f"{what}: expected int32 words, got {packed.dtype}")
    if length < 0:
        raise PackingError(f"{what}: negative length {length}")
    want = packed_width(length, bits)
    if packed.shape[dim] != want:
        raise PackingError(
            f"{what}: {length} values of {bits} bits need {want} words along dim {dim}, "
            f"got shape {tuple(packed.shape)}"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed int8 codes [N, K] in [-2^(b-1), 2^(b-1)) -> int32 [N, ceil(K*b/32)]."""
    _check_bits(bits)
    _check_codes(codes, bits, "pack_codes")
    unsigned = codes.to(torch.int32) + (1 << (bits - 1))
    return _pack_rows(unsigned, bits)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 [N, ceil(K*b/32)] -> signed int8 codes [N, K]."""
    _check_bits(bits)
    _check_packed(packed, bits, in_features, 1, "unpack_codes")
    return (_unpack_rows(packed, bits, in_features) - (1 << (bits - 1))).to(torch.int8)


def pack_zero_points(zero_points: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed int8 zero points [N, G] -> int32 [ceil(N*b/32), G] (packed down dim 0)."""
    _check_bits(bits)
    _check_codes(zero_points, bits, "pack_zero_points")
    unsigned = zero_points.to(torch.int32).t() + (1 << (bits - 1))
    return _pack_rows(unsigned, bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """int32 [ceil(N*b/32), G] -> signed int8 zero points [N, G]."""
    _check_bits(bits)
    _check_packed(packed, bits, out_features, 0, "unpack_zero_points")
    unsigned = _unpack_rows(packed.t(), bits, out_features)
    return (unsigned - (1 << (bits - 1))).to(torch.int8).t().contiguous()


def unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` unsigned b-bit values of each row's stream: int32 [R, W] -> int32 [R, count].

    Unlike unpack_codes, the rows may hold more words than `count` values need (a
    tensor-parallel shard reads a prefix of a longer stream).
    """
    _check_bits(bits)
    if words.dim() != 2 or words.dtype != torch.int32:
        raise PackingError(f"unpack_bitstream: expected a 2-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    if count * bits > words.shape[1] * _WORD_BITS:
        raise PackingError(f"unpack_bitstream: {count} values of {bits} bits need {packed_width(count, bits)} "
                           f"words, have {words.shape[1]}")
    return _unpack_rows(words, bits, count)
