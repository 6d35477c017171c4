"""Run-time weight layout of the Triton WNA16 kernels, and the repack from the checkpoint.

Checkpoint layout (compressed-tensors pack-quantized, see kernels/registry.py):
    packed int32 [N, ceil(K*b/32)], a dense little-endian bit stream per row
    holding u = q + 2^(b-1) (element k starts at bit k*b, may straddle words).

Kernel layout ("bit-plane, K-major"), built once at load by ``repack``:

  * The b-bit unsigned code u is split into bit planes whose widths are the
    powers of two in b's binary expansion, widest plane in the low bits:
        2 -> [2]   3 -> [2, 1]   4 -> [4]   5 -> [4, 1]
        6 -> [4, 2]   7 -> [4, 2, 1]   8 -> [8]
    u = sum_p plane_p << offset_p, offset_p = sum of the widths before p.
    Every plane packs 32/w codes per int32, so the in-kernel extraction is a
    shift by (k % (32/w)) * w and a mask -- no division by 3/5/6/7 and no code
    straddling a word -- and the storage is still exactly b bits per weight.
  * Each plane is stored K-major: plane_p[kw, n] holds codes
    k = kw*(32/w) + j at bit j*w. A [BLOCK_K, BLOCK_N] tile is then read with
    n (the fastest-moving thread index) contiguous in memory: coalesced,
    vectorisable loads for every width.
  * K is padded with zero codes to a multiple of 32 (the 1-bit plane's word)
    so that K = 576 or any other K works; the kernels mask k >= K, so the
    padding never contributes.
  * All planes live in one int32 tensor [Kpad*b/32, N] (plane p starts at row
    Kpad * offset_p / 32), the same byte count as the checkpoint.
  * scale is stored transposed, [groups, N] in the activation dtype.
  * Zero points are stored as unsigned codes z_u = z + 2^(b-1) in uint8
    [groups, N]. The kernel computes (u - z_u) in int32 and multiplies by s in
    fp32, which equals (q - z) * s exactly (a <=9-bit integer times an
    11/8-bit-mantissa scale fits fp32's 24 bits). A pre-multiplied fp offset
    (-z*s) would round when stored in fp16/bf16, so it is not used; the uint8
    zero costs 8/G bits per weight (0.0625 at G=128).
  * Symmetric layers store no zero tensor; the kernel subtracts 2^(b-1).

Everything here is pure torch (no Triton) so it is tested fast on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch

MIN_BITS, MAX_BITS = 2, 8
K_ALIGN = 32  # pad K to a multiple of the 1-bit plane's codes per word


class LayoutError(ValueError):
    """Input tensors that do not fit the declared layer shape / bit width."""


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit-plane widths (powers of two, widest first) whose sum is ``bits``."""
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS):
        raise LayoutError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return tuple(w for w in (8, 4, 2, 1) if bits & w)


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def _to_int32_wrapping(v: torch.Tensor) -> torch.Tensor:
    """int64 holding a uint32 bit pattern -> int32 with the same bits."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def unpack_dense_bitstream(packed: torch.Tensor, bits: int, k: int, layer: str = "") -> torch.Tensor:
    """Checkpoint dense bit stream int32 [N, ceil(K*b/32)] -> unsigned codes int32 [N, K]."""
    where = f"layer {layer!r}: " if layer else ""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise LayoutError(f"{where}packed weight must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    words = -(-k * bits // 32)
    if packed.shape[1] != words:
        raise LayoutError(
            f"{where}packed weight has {packed.shape[1]} int32 words per row; "
            f"K={k} at {bits} bits needs {words}"
        )
    w64 = packed.to(torch.int64) & 0xFFFFFFFF
    w64 = torch.cat([w64, torch.zeros_like(w64[:, :1])], dim=1)  # the word after the last (straddle)
    start = torch.arange(k, device=packed.device, dtype=torch.int64) * bits
    word, off = start // 32, start % 32
    both = w64[:, word] | (w64[:, word + 1] << 32)
    return ((both >> off) & ((1 << bits) - 1)).to(torch.int32)


def pack_dense_bitstream(codes_u: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_dense_bitstream (used by tests and benchmarks to build inputs)."""
    n, k = codes_u.shape
    words = -(-k * bits // 32)
    total_bits = words * 32
    # Expand each code to its bits, lay them out as one stream per row, regroup into words.
    bit_idx = torch.arange(bits, device=codes_u.device)
    code_bits = (codes_u.to(torch.int64).unsqueeze(-1) >> bit_idx) & 1  # [N, K, b]
    stream = torch.zeros(n, total_bits, dtype=torch.int64, device=codes_u.device)
    stream[:, : k * bits] = code_bits.reshape(n, k * bits)
    weights = 1 << torch.arange(32, device=codes_u.device, dtype=torch.int64)
    return _to_int32_wrapping((stream.view(n, words, 32) * weights).sum(-1))


def pack_planes(codes_u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes int [N, K] -> kernel planes int32 [Kpad*b/32, N]."""
    n, k = codes_u.shape
    kpad = padded_k(k)
    u = torch.zeros(kpad, n, dtype=torch.int64, device=codes_u.device)
    u[:k] = codes_u.t().to(torch.int64)
    planes, offset = [], 0
    for w in plane_widths(bits):
        per_word = 32 // w
        vals = ((u >> offset) & ((1 << w) - 1)).view(kpad // per_word, per_word, n)
        shifts = (torch.arange(per_word, device=u.device, dtype=torch.int64) * w).view(1, per_word, 1)
        planes.append(_to_int32_wrapping((vals << shifts).sum(1)))
        offset += w
    return torch.cat(planes, dim=0).contiguous()


def unpack_planes(planes: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_planes: int32 [Kpad*b/32, N] -> unsigned codes int32 [N, K]."""
    kpad = padded_k(k)
    n = planes.shape[1]
    if planes.shape[0] != kpad * bits // 32:
        raise LayoutError(f"planes have {planes.shape[0]} rows; K={k} at {bits} bits needs {kpad * bits // 32}")
    p64 = planes.to(torch.int64) & 0xFFFFFFFF
    u = torch.zeros(kpad, n, dtype=torch.int64, device=planes.device)
    row, offset = 0, 0
    for w in plane_widths(bits):
        per_word = 32 // w
        rows = kpad // per_word
        shifts = (torch.arange(per_word, device=planes.device, dtype=torch.int64) * w).view(1, per_word, 1)
        vals = (p64[row: row + rows].unsqueeze(1) >> shifts) & ((1 << w) - 1)
        u |= vals.reshape(kpad, n) << offset
        row += rows
        offset += w
    return u[:k].t().to(torch.int32).contiguous()


def repack(packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
           bits: int, group_size: Optional[int], in_features: int, out_features: int,
           act_dtype: torch.dtype = torch.float16, layer: str = "") -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the kernel's run-time tensors (see module docstring).

    Returns {"packed": int32 [Kpad*b/32, N], "scale": act_dtype [groups, N],
             "zero": uint8 [groups, N]} (no "zero" when symmetric).
    """
    where = f"layer {layer!r}: " if layer else ""
    n, k = out_features, in_features
    groups = 1 if group_size is None else k // group_size
    if group_size is not None and (group_size <= 0 or k % group_size):
        raise LayoutError(f"{where}group_size {group_size} does not divide in_features {k}")
    if packed.shape[0] != n:
        raise LayoutError(f"{where}packed weight has {packed.shape[0]} rows, expected out_features={n}")
    if tuple(scale.shape) != (n, groups):
        raise LayoutError(f"{where}weight_scale has shape {tuple(scale.shape)}, expected {(n, groups)}")
    if not scale.is_floating_point():
        raise LayoutError(f"{where}weight_scale must be floating point, got {scale.dtype}")
    codes_u = unpack_dense_bitstream(packed, bits, k, layer)
    out = {
        "packed": pack_planes(codes_u, bits),
        "scale": scale.t().to(act_dtype).contiguous(),
    }
    if zero_point is not None:
        if tuple(zero_point.shape) != (n, groups):
            raise LayoutError(f"{where}weight_zero_point has shape {tuple(zero_point.shape)}, expected {(n, groups)}")
        half = 1 << (bits - 1)
        z = zero_point.to(torch.int32)
        if int(z.min()) < -half or int(z.max()) >= half:
            raise LayoutError(f"{where}weight_zero_point outside [{-half}, {half - 1}] for {bits} bits")
        out["zero"] = (z + half).t().to(torch.uint8).contiguous()
    return out


def dequantize_repacked(weights: dict[str, torch.Tensor], bits: int, group_size: Optional[int],
                        in_features: int) -> torch.Tensor:
    """Reference dequantisation from the kernel layout -> fp32 W [N, K] (tests, CPU fallback)."""
    k = in_features
    u = unpack_planes(weights["packed"], bits, k).to(torch.float32)  # [N, K]
    g = k if group_size is None else group_size
    scale = weights["scale"].t().to(torch.float32)  # [N, groups]
    if "zero" in weights:
        z = weights["zero"].t().to(torch.float32)
    else:
        z = torch.full_like(scale, float(1 << (bits - 1)))
    n = u.shape[0]
    w = (u.view(n, k // g, g) - z.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.view(n, k)
