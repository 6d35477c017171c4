"""The two types every stage exchanges: a quantization spec and a quantized weight.

A linear layer has weight W [N, K] (out, in). Group size G splits each row into
K/G groups, each with a scale s and, when asymmetric, an integer zero point z:

    symmetric:  q = clamp(round(w / s), qmin, qmax),      w ~ q * s
    asymmetric: q = clamp(round(w / s + z), qmin, qmax),  w ~ (q - z) * s

with qmin = -2^(b-1), qmax = 2^(b-1) - 1 (compressed-tensors' signed convention;
the checkpoint stores q + 2^(b-1) and z + 2^(b-1)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

MIN_BITS, MAX_BITS = 2, 8
SCALE_BITS = 16  # scales are stored in fp16/bf16


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                     group_size: Optional[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one dequantisation: w = (q - z) * s in fp32, rounded once to `dtype`.

    codes [N, K] (signed q), scale [N, K/G], zero_point [N, K/G] (signed z) or None;
    group_size None means per-channel. (q - z) is an exact small integer and the
    product with an fp16/bf16 scale is exact in fp32, so the single rounding is the
    cast to `dtype`. Every reader of the format (QuantizedWeight, the HF reference,
    the CPU kernel, the kernel layout's tests) calls this.
    """
    n, k = codes.shape
    g = k if group_size is None else group_size
    q = codes.to(torch.float32).reshape(n, k // g, g)
    if zero_point is not None:
        q = q - zero_point.to(torch.float32).unsqueeze(-1)
    return (q * scale.to(torch.float32).reshape(n, k // g).unsqueeze(-1)).reshape(n, k).to(dtype)


class QuantSpecError(ValueError):
    """A quantization spec that cannot apply to a given layer."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: Optional[int] = 128  # None -> per-channel (one group per row)
    symmetric: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not (MIN_BITS <= self.bits <= MAX_BITS):
            raise QuantSpecError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise QuantSpecError(f"group_size must be a positive integer or None (per-channel), got {self.group_size!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int, layer: str = "") -> int:
        """Number of groups per row; raises if G does not divide K."""
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            where = f"layer {layer!r}: " if layer else ""
            raise QuantSpecError(
                f"{where}group_size {self.group_size} does not divide in_features {in_features}"
            )
        return in_features // self.group_size

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size is None else self.group_size

    def bpp(self, in_features: int) -> float:
        """Bits per parameter including fp16 scales and packed zero points."""
        g = self.effective_group(in_features)
        overhead = SCALE_BITS / g + (0.0 if self.symmetric else self.bits / g)
        return self.bits + overhead

    def short(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{'s' if self.symmetric else 'a'}{g}"


@dataclass
class QuantizedWeight:
    """Integer codes plus group parameters for one [N, K] weight.

    codes: int8 [N, K] in [qmin, qmax]; scale: float [N, groups];
    zero_point: int8 [N, groups] in [qmin, qmax] or None when symmetric.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    spec: QuantSpec
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.spec.group_size, dtype)

    def bits_total(self) -> float:
        n, k = self.codes.shape
        return self.spec.bpp(k) * n * k
