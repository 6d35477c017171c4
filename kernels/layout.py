"""Run-time weight layout of the Triton WNA16 kernels ("slab containers"), and the repack.

The checkpoint layout is described once, in vllm_slq.checkpoint.layout; its codes
are unpacked here by the project's one bit-stream reader (vllm_slq.quant.packing)
and its dequantisation w = (q - z) * s is vllm_slq.quant.spec.dequantize_codes.
This module only says how the kernels want the same numbers laid out, and why.

Why a new layout (issue: each packed word must be loaded exactly once, with no
division by 3/5/6/7 and no code straddling a word):

  * Codes sit in *containers*: int16 for 2..4 bits, int32 for 5..8 bits, holding
    C = floor(container_bits / b) whole codes at bits j*b, j = 0..C-1
        b:        2    3    4    5    6    7    8
        C:        8    5    4    6    5    4    4
        bits/w:   2   3.2   4  5.33  6.4   8    8      (storage per weight)
    A code never straddles a container, so extracting code j is one mask.
  * K is cut into tiles of KT = R * C codes (R = SLAB_ROWS = 16 container rows).
    Inside a tile, container row r holds the codes of k = t*KT + j*R + r for
    j = 0..C-1: code slot j of the R rows is a *slab*, R consecutive k. So one
    load of an [R, BLOCK_N] container tile feeds C slabs, each a dense
    [R, BLOCK_N] block of W^T over consecutive k: a GEMV reduces it against R
    consecutive activations, a GEMM feeds it to tl.dot as a K=16 operand. No
    word is loaded twice, and the slab needs no reshape.
  * R = 16 divides every supported group size (G % 16 == 0), so a slab never
    straddles a quantization group: one scale (and zero) per slab and column.
  * Containers are stored [K_pad / C, N_pad] with N contiguous (coalesced,
    128-bit loads along N); K is padded with zero codes to a multiple of KT and
    N to a multiple of N_ALIGN, so the kernels' weight loads carry no masks.
  * The kernels' dequantisation is a magic-number trick, not an int->float
    conversion: OR-ing the exponent of 2^E into a code placed at mantissa bit s
    gives the float 2^E + u * 2^(E - mant + s); with E = mant - s that is
    exactly 2^E + u, and one subtraction gives u. fp16 (mant 10) and bf16
    (mant 7) do it on both halves of a 32-bit register at once (half2 math);
    fp32 (mant 23) does it for the 5..8-bit containers. A code placed too high
    for the mantissa is first brought down by one shift of the container
    (``extraction_plan``: the shifts each slab needs, decided here, as data).
  * scale [G_pad, N_pad] and zero point [G_pad, N_pad] are stored transposed in
    the activation dtype (G_pad = ceil(K_pad / G) groups; padding groups have
    scale 0). The zero point is the signed z, an integer |z| <= 128 and so exact
    in fp16 and bf16; the kernels compute sum_k (q_k - z) x_k s as
    s * (sum_k q_k x_k - z * sum_k x_k), q the signed code.

Everything here is pure torch (no Triton), tested fast on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from vllm_slq.quant.packing import PackingError, packed_width, unpack_codes
from vllm_slq.quant.spec import MAX_BITS, MIN_BITS, dequantize_codes

SLAB_ROWS = 16  # R: container rows per K tile; divides every supported group size
N_ALIGN = 64  # N is padded to this, so every BLOCK_N <= 64 (and its multiples dividing N_pad) tiles it


class LayoutError(ValueError):
    """Input tensors that do not fit the declared layer shape / bit width."""


@dataclass(frozen=True)
class ContainerFormat:
    """How b-bit codes are held by the kernels: container width and codes per container."""

    bits: int
    container_bits: int  # 16 (half2 math) or 32 (fp32 math)

    @property
    def codes_per_container(self) -> int:
        return self.container_bits // self.bits

    @property
    def tile_k(self) -> int:
        return SLAB_ROWS * self.codes_per_container

    @property
    def container_dtype(self) -> torch.dtype:
        return torch.int16 if self.container_bits == 16 else torch.int32

    @property
    def half2(self) -> bool:
        """GEMV math: half2 (fp16/bf16) for int16 containers, fp32 for int32 ones."""
        return self.container_bits == 16

    @property
    def stored_bits_per_weight(self) -> float:
        return self.container_bits / self.codes_per_container

    def padded_k(self, k: int) -> int:
        return -(-k // self.tile_k) * self.tile_k

    def container_rows(self, k: int) -> int:
        return self.padded_k(k) // self.codes_per_container


# The formats as data: 2..4 bits in int16 containers (their half2 GEMV keeps the
# per-slab fp16 partial sums small: |q| <= 8 over 16 rows), 5..8 bits in int32
# (their GEMV multiplies in fp32, where |q| <= 128 cannot overflow).
FORMATS: dict[int, ContainerFormat] = {b: ContainerFormat(b, 16 if b <= 4 else 32)
                                       for b in range(MIN_BITS, MAX_BITS + 1)}


def container_format(bits: int) -> ContainerFormat:
    if not isinstance(bits, int) or bits not in FORMATS:
        raise LayoutError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return FORMATS[bits]


def padded_n(n: int) -> int:
    return -(-n // N_ALIGN) * N_ALIGN


def extraction_plan(bits: int, container_bits: int, mantissa: int) -> tuple[int, ...]:
    """Right shift applied to the container before extracting code slot j, for each j.

    Code j sits at bits [j*b, j*b + b); the magic-number conversion needs it inside
    the mantissa (top bit below `mantissa`). Greedy: keep the current shift while
    the code fits, else shift so that this code lands at bit 0; this uses the
    fewest distinct shifts (each costs one shift instruction per container).
    """
    shifts, sh = [], 0
    for j in range(container_bits // bits):
        s = j * bits
        if s - sh + bits > mantissa:
            sh = s
        shifts.append(sh)
    return tuple(shifts)


# Exponent bias of the float whose mantissa width is the key: fp16, bf16, fp32.
EXPONENT_BIAS = {10: 15, 7: 127, 23: 127}


def magic_exponents(bits: int, mantissa: int, shifts: tuple[int, ...]) -> tuple[int, ...]:
    """Per code slot j, the exponent field OR-ed onto the extracted code (module docstring):
    that of 2^(mantissa - s_j), s_j = j*bits - shifts[j] the code's bit offset after the
    slot's shift (``shifts`` = ``extraction_plan``'s; passed in, so that Triton can call this
    at compile time)."""
    return tuple((mantissa - (j * bits - sh) + EXPONENT_BIAS[mantissa]) << mantissa for j, sh in enumerate(shifts))


def magic_offsets(bits: int, mantissa: int, shifts: tuple[int, ...]) -> tuple[int, ...]:
    """Per code slot j, what the kernels subtract from the magic float to get the signed
    code: 2^(mantissa - s_j) + 2^(bits - 1)."""
    return tuple((1 << (mantissa - (j * bits - sh))) + (1 << (bits - 1)) for j, sh in enumerate(shifts))


def _slab_order(codes: torch.Tensor, fmt: ContainerFormat, k: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> [rows, C, N]: element [t*R + r, j, n] is code k = t*KT + j*R + r."""
    n = codes.shape[0]
    kpad = fmt.padded_k(k)
    u = torch.zeros(n, kpad, dtype=torch.int64, device=codes.device)
    u[:, :k] = codes.to(torch.int64)
    c, r = fmt.codes_per_container, SLAB_ROWS
    return u.view(n, kpad // fmt.tile_k, c, r).permute(1, 3, 2, 0).reshape(kpad // c, c, n)


def pack_containers(codes_u: torch.Tensor, bits: int, n_pad: Optional[int] = None) -> torch.Tensor:
    """Unsigned codes int [N, K] -> containers [K_pad / C, N_pad] (int16 or int32)."""
    fmt = container_format(bits)
    n, k = codes_u.shape
    slabs = _slab_order(codes_u, fmt, k)  # [rows, C, N]
    shifts = torch.arange(fmt.codes_per_container, dtype=torch.int64, device=codes_u.device) * bits
    words = (slabs << shifts.view(1, -1, 1)).sum(1)  # disjoint bits: sum == or
    if fmt.container_bits == 16:
        words = torch.where(words >= 2**15, words - 2**16, words)
    else:
        words = torch.where(words >= 2**31, words - 2**32, words)
    out = torch.zeros(words.shape[0], n_pad or padded_n(n), dtype=fmt.container_dtype, device=codes_u.device)
    out[:, :n] = words.to(fmt.container_dtype)
    return out


def unpack_containers(containers: torch.Tensor, bits: int, k: int, n: int) -> torch.Tensor:
    """Inverse of pack_containers: containers -> unsigned codes int32 [N, K]."""
    fmt = container_format(bits)
    if containers.dtype != fmt.container_dtype or containers.shape[0] != fmt.container_rows(k):
        raise LayoutError(f"containers must be {fmt.container_dtype} [{fmt.container_rows(k)}, N_pad] for "
                          f"K={k} at {bits} bits, got {containers.dtype} {tuple(containers.shape)}")
    mask = (1 << fmt.container_bits) - 1
    w = containers[:, :n].to(torch.int64) & mask  # [rows, N]
    shifts = torch.arange(fmt.codes_per_container, dtype=torch.int64, device=w.device) * bits
    slabs = (w.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)  # [rows, C, N]
    c, r = fmt.codes_per_container, SLAB_ROWS
    tiles = slabs.shape[0] // r
    u = slabs.view(tiles, r, c, n).permute(3, 0, 2, 1).reshape(n, tiles * fmt.tile_k)
    return u[:, :k].to(torch.int32).contiguous()


def _per_group_padded(t: torch.Tensor, groups_pad: int, n_pad: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, groups] -> transposed [groups_pad, n_pad] in dtype, zero-filled padding."""
    out = torch.zeros(groups_pad, n_pad, dtype=dtype, device=t.device)
    out[: t.shape[1], : t.shape[0]] = t.t().to(dtype)
    return out


def repack(packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
           bits: int, group_size: Optional[int], in_features: int, out_features: int,
           act_dtype: torch.dtype = torch.float16, layer: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the kernels' run-time tensors (see module docstring).

    packed int32 [N, ceil(K*b/32)] (the checkpoint's dense bit stream), scale [N, groups],
    zero_point signed int8 [N, groups] or None. Returns {"packed": containers
    [K_pad/C, N_pad], "scale": act_dtype [G_pad, N_pad], "zero": act_dtype [G_pad, N_pad]}
    ("zero" only when asymmetric).
    """
    where = f"layer {layer!r}: " if layer else ""
    fmt = container_format(bits)
    n, k = out_features, in_features
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise LayoutError(f"{where}group_size {group_size} does not divide in_features {k}")
    if group_size is not None and group_size % SLAB_ROWS:
        raise LayoutError(f"{where}group_size {group_size} is not a multiple of {SLAB_ROWS}, "
                          f"which the kernels' K slabs need")
    groups = 1 if group_size is None else k // group_size
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[0] != n:
        raise LayoutError(f"{where}packed weight must be int32 [{n}, {packed_width(k, bits)}], "
                          f"got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(k, bits):
        raise LayoutError(f"{where}packed weight has {packed.shape[1]} int32 words per row; "
                          f"K={k} at {bits} bits needs {packed_width(k, bits)}")
    if tuple(scale.shape) != (n, groups):
        raise LayoutError(f"{where}weight_scale has shape {tuple(scale.shape)}, expected {(n, groups)}")
    if not scale.is_floating_point():
        raise LayoutError(f"{where}weight_scale must be floating point, got {scale.dtype}")
    try:
        q = unpack_codes(packed, bits, k)  # signed codes int8 [N, K]
    except PackingError as e:
        raise LayoutError(f"{where}{e}") from None
    half = 1 << (bits - 1)
    npad = padded_n(n)
    g = k if group_size is None else group_size
    groups_pad = -(-fmt.padded_k(k) // g)
    out = {
        "packed": pack_containers(q.to(torch.int32) + half, bits, npad),
        "scale": _per_group_padded(scale, groups_pad, npad, act_dtype),
    }
    if zero_point is not None:
        if tuple(zero_point.shape) != (n, groups):
            raise LayoutError(f"{where}weight_zero_point has shape {tuple(zero_point.shape)}, "
                              f"expected {(n, groups)}")
        z = zero_point.to(torch.int32)
        if int(z.min()) < -half or int(z.max()) >= half:
            raise LayoutError(f"{where}weight_zero_point outside [{-half}, {half - 1}] for {bits} bits")
        out["zero"] = _per_group_padded(z, groups_pad, npad, act_dtype)
    return out


def dequantize_repacked(weights: dict[str, torch.Tensor], bits: int, group_size: Optional[int],
                        in_features: int, out_features: int) -> torch.Tensor:
    """Reference dequantisation from the kernel layout -> fp32 W [N, K] (tests)."""
    n, k = out_features, in_features
    q = (unpack_containers(weights["packed"], bits, k, n) - (1 << (bits - 1))).to(torch.int8)
    groups = 1 if group_size is None else k // group_size
    scale = weights["scale"][:groups, :n].t()
    zero = weights["zero"][:groups, :n].t().to(torch.int8) if "zero" in weights else None
    return dequantize_codes(q, scale, zero, group_size, torch.float32)
