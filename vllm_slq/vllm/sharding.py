"""Tensor-parallel sharding of compressed-tensors pack-quantized tensors (pure torch).

Checkpoint layout of one quantized Linear with weight W [N, K] (out, in), b bits,
group size G (per-channel: G = K, one group), as described in vllm_slq/checkpoint/layout.py:

    weight_packed      int32 [N, ceil(K*b/32)]   dense little-endian bit stream of
                                                 q + 2^(b-1) along K, one stream per row
    weight_scale       float [N, K/G]
    weight_zero_point  int32 [ceil(N*b/32), K/G] (asymmetric only) bit stream of
                                                 z + 2^(b-1) along N, one stream per group
    weight_shape       int64 [2] = (N, K)

vLLM splits a linear layer two ways:

  * column parallel (q/k/v, gate/up): rank r keeps output rows
    [r*N_r, (r+1)*N_r).  weight_packed and weight_scale are sliced by rows, which is
    trivial because every row is its own bit stream.  Zero points are packed
    *along N*, so a row slice of the packed words is only valid when the slice
    starts and ends on a 32-bit word boundary; instead we unpack the zero points
    of the loaded tensor (cheap: N*K/G values) and slice the unpacked rows, which
    works for every bit width and every N.
  * row parallel (o_proj, down_proj): rank r keeps input columns
    [r*K_r, (r+1)*K_r).  The packed weight can be sliced in whole int32 words only
    if the shard starts on a word boundary, K_r*b % 32 == 0, and scales / zero
    points only if the shard starts on a group boundary, K_r % G == 0
    (per-channel: the single group spans all of K, so scales are replicated, not
    split).  Violations raise ShardingError naming the layer and field.

Every function takes `layer` and `field` only to name them in errors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from vllm_slq.quant import packing


class ShardingError(ValueError):
    """A packed tensor that cannot be split the way tensor parallelism asks."""


def _where(layer: str, field: str) -> str:
    return f"layer {layer!r} field {field!r}"


def packed_words(n_elements: int, bits: int) -> int:
    """Number of int32 words of a dense bit stream of n_elements b-bit values."""
    return math.ceil(n_elements * bits / 32)


def unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack `count` unsigned b-bit values from each row of int32 words [R, W] -> int16 [R, count].

    The checkpoint's one bit-stream reader (vllm_slq.quant.packing) does the work;
    this wrapper only turns its errors into ShardingError.
    """
    if words.dtype != torch.int32:
        raise TypeError(f"packed tensor must be int32, got {words.dtype}")
    try:
        return packing.unpack_bitstream(words, bits, count).to(torch.int16)
    except packing.PackingError as e:
        raise ShardingError(str(e)) from None


def unpack_codes_signed(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Signed codes int8 [R, count] (stored value minus 2^(b-1)) of row-wise streams."""
    return (unpack_bitstream(words, bits, count) - (1 << (bits - 1))).to(torch.int8)


def unpack_zero_point_rows(packed_zp: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Zero points packed along dim 0 ([ceil(N*b/32), G] int32) -> int8 [rows, G] signed.

    Unpacks the first `rows` output rows of each group's column stream.
    """
    return unpack_codes_signed(packed_zp.t().contiguous(), bits, rows).t().contiguous()


def check_row_parallel_split(k_total: int, tp_size: int, bits: int, group_size: Optional[int],
                             layer: str = "") -> int:
    """Validate that an input (K) dimension can be split over tp_size ranks; return K_r."""
    if k_total % tp_size:
        raise ShardingError(f"{_where(layer, 'weight_packed')}: in_features {k_total} "
                            f"is not divisible by tensor-parallel size {tp_size}")
    k_shard = k_total // tp_size
    if tp_size > 1:
        if group_size is not None and k_shard % group_size:
            raise ShardingError(
                f"{_where(layer, 'weight_scale')}: group_size {group_size} does not divide the "
                f"tensor-parallel shard of in_features ({k_total} / {tp_size} = {k_shard}); "
                f"a quantization group would straddle two ranks")
        if (k_shard * bits) % 32:
            raise ShardingError(
                f"{_where(layer, 'weight_packed')}: a {bits}-bit row-parallel shard of "
                f"{k_shard} inputs ({k_shard * bits} bits) does not end on a 32-bit word boundary, "
                f"so the packed bit stream cannot be split at rank boundaries "
                f"(need in_features/tp_size * bits % 32 == 0)")
    return k_shard


def shard_packed_weight(packed: torch.Tensor, bits: int, k_total: int, row_start: int, rows: int,
                        k_start: int, k_shard: int, layer: str = "",
                        field: str = "weight_packed") -> torch.Tensor:
    """Slice rows [row_start, row_start+rows) and inputs [k_start, k_start+k_shard).

    `packed` is the checkpoint tensor [N_src, ceil(k_total*b/32)].
    """
    want_words = packed_words(k_total, bits)
    if packed.dim() != 2 or packed.shape[1] != want_words:
        raise ShardingError(f"{_where(layer, field)}: packed shape {tuple(packed.shape)} does not "
                            f"match in_features {k_total} at {bits} bits (expected [N, {want_words}])")
    if packed.dtype != torch.int32:
        raise ShardingError(f"{_where(layer, field)}: dtype {packed.dtype}, expected torch.int32")
    if row_start + rows > packed.shape[0]:
        raise ShardingError(f"{_where(layer, field)}: has {packed.shape[0]} rows, "
                            f"needs rows up to {row_start + rows}")
    out = packed.narrow(0, row_start, rows)
    if k_shard != k_total:
        if (k_start * bits) % 32 or (k_shard * bits) % 32:
            raise ShardingError(f"{_where(layer, field)}: input shard [{k_start}, {k_start + k_shard}) "
                                f"at {bits} bits does not lie on 32-bit word boundaries")
        out = out.narrow(1, k_start * bits // 32, k_shard * bits // 32)
    return out


def shard_group_tensor(t: torch.Tensor, row_start: int, rows: int, n_groups_total: int,
                       group_start: int, n_groups: int, layer: str = "",
                       field: str = "weight_scale") -> torch.Tensor:
    """Slice an unpacked per-group tensor [N_src, groups] by rows and groups."""
    if t.dim() != 2 or t.shape[1] != n_groups_total:
        raise ShardingError(f"{_where(layer, field)}: shape {tuple(t.shape)} does not have "
                            f"{n_groups_total} groups per row (expected [N, {n_groups_total}])")
    if row_start + rows > t.shape[0]:
        raise ShardingError(f"{_where(layer, field)}: has {t.shape[0]} rows, needs rows up to "
                            f"{row_start + rows}")
    return t.narrow(0, row_start, rows).narrow(1, group_start, n_groups)


def shard_packed_zero_points(packed_zp: torch.Tensor, bits: int, n_src: Optional[int],
                             row_start: int, rows: int, n_groups_total: int, group_start: int,
                             n_groups: int, layer: str = "",
                             field: str = "weight_zero_point") -> torch.Tensor:
    """Zero points packed along N -> signed int8 [rows, n_groups] for this shard.

    n_src (the row count of the loaded tensor) is checked against the packed row
    count when known; otherwise only that enough words are present.
    """
    if packed_zp.dim() != 2 or packed_zp.dtype != torch.int32 or packed_zp.shape[1] != n_groups_total:
        raise ShardingError(f"{_where(layer, field)}: got {packed_zp.dtype} {tuple(packed_zp.shape)}, "
                            f"expected int32 [ceil(N*{bits}/32), {n_groups_total}]")
    if n_src is not None and packed_zp.shape[0] != packed_words(n_src, bits):
        raise ShardingError(f"{_where(layer, field)}: packed shape {tuple(packed_zp.shape)} does not "
                            f"match {n_src} output rows at {bits} bits (expected "
                            f"[{packed_words(n_src, bits)}, {n_groups_total}])")
    need = row_start + rows
    if packed_zp.shape[0] * 32 < need * bits:
        raise ShardingError(f"{_where(layer, field)}: {packed_zp.shape[0]} packed rows hold fewer "
                            f"than the {need} output rows needed")
    zp = unpack_zero_point_rows(packed_zp, bits, need)
    return zp.narrow(0, row_start, rows).narrow(1, group_start, n_groups)
