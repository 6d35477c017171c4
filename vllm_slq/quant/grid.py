"""Uniform integer grids: group parameters from min/max, rounding, RTN.

Maps docs/methods.md section 1 ("Grids", "Scale search" floor) onto functions. The
semantics follow compressed-tensors' ``calculate_qparams`` and fake-quant exactly,
so our RTN equals the RTN that compressed-tensors/llmcompressor compute:

    range:       lo = min(min_g w, 0) * p,  hi = max(max_g w, 0) * p   (p = shrink)
    symmetric:   s = max(|lo|, |hi|) / ((2^b - 1) / 2),             z = None
    asymmetric:  s = (hi - lo) / (2^b - 1),  z = round(clamp(qmin - lo / s, qmin, qmax))
    s == 0  ->   s = eps(scale dtype)        (all-zero group; avoids 0/0)
    quantize:    q = clamp(round(w / s [+ z]), qmin, qmax)      -> quantize_with
    dequantize:  w ~ (q [- z]) * s                               -> fake_quantize

``compute_qparams`` returns the scale already rounded to its storage dtype
(fp16 by default, what the checkpoint stores) but held in fp32, so codes chosen
here dequantize to exactly what a served checkpoint reproduces.

``rtn`` = compute_qparams + quantize_with, packaged as a QuantizedWeight.
Everything is vectorised over rows and groups; nothing here imports
llmcompressor or vLLM.
"""
from __future__ import annotations

from typing import Optional

import torch

from .spec import QuantizedWeight, QuantSpec, dequantize_codes

__all__ = [
    "NonFiniteWeightError",
    "check_weight",
    "compute_qparams",
    "quantize_with",
    "dequantize_with",
    "fake_quantize",
    "rtn",
]


class NonFiniteWeightError(ValueError):
    """A weight with NaN or inf entries cannot be quantized."""


def _where(layer: str) -> str:
    return f"layer {layer!r}: " if layer else ""


def check_weight(w: torch.Tensor, spec: QuantSpec, layer: str = "") -> int:
    """Validate a [N, K] weight for ``spec``; return the number of groups per row."""
    if w.dim() != 2:
        raise ValueError(f"{_where(layer)}expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.is_floating_point(w):
        raise TypeError(f"{_where(layer)}expected a floating-point weight, got {w.dtype}")
    groups = spec.groups(w.shape[1], layer)  # raises QuantSpecError naming the layer
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(f"{_where(layer)}weight has {bad} NaN/inf entries; cannot quantize")
    return groups


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[N, K] -> fp32 [N, groups, G] view (per-channel: one group of K)."""
    n, k = w.shape
    g = spec.effective_group(k)
    return w.to(torch.float32).reshape(n, k // g, g)


@torch.no_grad()
def compute_qparams(
    w: torch.Tensor,
    spec: QuantSpec,
    shrink: float | torch.Tensor = 1.0,
    *,
    layer: str = "",
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Min/max group parameters of ``w`` [N, K] for ``spec``.

    shrink: range factor p in (0, 1] (scalar, or a tensor broadcastable to
    [N, groups] for per-group scale search). scale_dtype: the storage dtype the
    scale is rounded to (values returned in fp32); pass torch.float32 to keep
    full precision.

    Returns (scale fp32 [N, groups], zero_point int8 [N, groups] or None).
    """
    check_weight(w, spec, layer)
    if isinstance(shrink, torch.Tensor):
        shrink = shrink.to(device=w.device, dtype=torch.float32)
        if bool((shrink <= 0).any()) or bool((shrink > 1).any()):
            raise ValueError(f"{_where(layer)}shrink must lie in (0, 1]")
    elif not (0.0 < float(shrink) <= 1.0):
        raise ValueError(f"{_where(layer)}shrink must lie in (0, 1], got {shrink}")

    wg = _grouped(w, spec)
    # 0 must be representable (compressed-tensors: zero-padding / sparsity stay exact)
    lo = wg.amin(dim=-1).clamp(max=0.0) * shrink
    hi = wg.amax(dim=-1).clamp(min=0.0) * shrink

    if spec.symmetric:
        # compressed-tensors divides by half the level span, (2^b - 1) / 2, so +amax
        # lands half a step beyond qmax and is clamped to it
        scale = torch.maximum(lo.abs(), hi.abs()) / (((1 << spec.bits) - 1) / 2.0)
    else:
        scale = (hi - lo) / float((1 << spec.bits) - 1)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=scale_dtype, device=scale.device), scale)
    scale = scale.to(torch.float32)

    if spec.symmetric:
        return scale, None
    zero = torch.clamp(spec.qmin - lo / scale, spec.qmin, spec.qmax)
    return scale, torch.round(zero).to(torch.int8)


def _check_params(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: QuantSpec, layer: str):
    groups = spec.groups(w.shape[1], layer)
    want = (w.shape[0], groups)
    if tuple(scale.shape) != want:
        raise ValueError(f"{_where(layer)}scale shape {tuple(scale.shape)} != expected {want}")
    if spec.symmetric and zero is not None:
        raise ValueError(f"{_where(layer)}symmetric spec {spec.short()} takes no zero point")
    if not spec.symmetric:
        if zero is None:
            raise ValueError(f"{_where(layer)}asymmetric spec {spec.short()} needs a zero point")
        if tuple(zero.shape) != want:
            raise ValueError(f"{_where(layer)}zero_point shape {tuple(zero.shape)} != expected {want}")


@torch.no_grad()
def quantize_with(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    spec: QuantSpec,
    *,
    layer: str = "",
) -> torch.Tensor:
    """Integer codes int8 [N, K] of ``w`` on the grid (scale, zero)."""
    if w.dim() != 2:
        raise ValueError(f"{_where(layer)}expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    _check_params(w, scale, zero, spec, layer)
    x = _grouped(w, spec) / scale.to(torch.float32).unsqueeze(-1)
    if zero is not None:
        x = x + zero.to(torch.float32).unsqueeze(-1)
    q = torch.clamp(torch.round(x), spec.qmin, spec.qmax)
    return q.reshape(w.shape).to(torch.int8)


def dequantize_with(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(q - z) * s for codes [N, K]: spec.dequantize_codes with this spec's group size."""
    return dequantize_codes(codes, scale, zero, spec.group_size, dtype)


@torch.no_grad()
def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: Optional[torch.Tensor],
    spec: QuantSpec,
    *,
    layer: str = "",
) -> torch.Tensor:
    """Quantize then dequantize ``w`` on the grid (scale, zero); returns w's dtype."""
    codes = quantize_with(w, scale, zero, spec, layer=layer)
    return dequantize_with(codes, scale, zero, spec, dtype=w.dtype)


@torch.no_grad()
def rtn(
    w: torch.Tensor,
    spec: QuantSpec,
    layer: str = "",
    *,
    shrink: float | torch.Tensor = 1.0,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest on the min/max grid (the baseline every method must beat)."""
    scale, zero = compute_qparams(w, spec, shrink, layer=layer, scale_dtype=scale_dtype)
    codes = quantize_with(w, scale, zero, spec, layer=layer)
    return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec, meta={"method": "rtn", "layer": layer})
