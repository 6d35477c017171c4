"""Error-minimising group scale search (range shrink + negative symmetric scales).

Plain min/max (RTN's choice) puts the grid's end points on the group's extreme
values; for a bell-shaped group that wastes resolution on rare outliers. The
search tries a grid of shrink factors p and keeps, per group, the candidate with
the lowest (optionally Hessian-diagonal weighted) squared error:

    asymmetric:  lo = p * min(min w, 0),  hi = p * max(max w, 0)
                 s = (hi - lo) / (qmax - qmin),  z = clamp(round(qmin - lo / s))
    symmetric:   a = p * max |w|
                 s = a / ((qmax - qmin) / 2)           (compressed-tensors' choice)
                 s = -sign(w*) * a / |qmin|            (negative-scale trick, GSQ
                                                        authors: w* = the value of
                                                        largest |w|; the sign puts
                                                        w* on the extra level qmin)
    error(group) = sum_j h_j (w_j - (q_j - z) s)^2,  h = diag(H) or 1

p = 1 with the first formula is exactly plain min/max, so the search is never
worse than min/max on the measured error. The loop runs over the p grid
(~81 values); every step is vectorised over all groups of the matrix.

Scales are rounded to `scale_dtype` (fp16 by default: the dtype they are stored
in) *before* codes are computed, so a checkpoint's dequantisation reproduces our
fake-quantised weight bit for bit.

Functions:
    minmax_qparams    plain min/max (shrink p) parameters, the RTN baseline
                      (= grid.compute_qparams; codes/dequant via grid.quantize_with)
    search_qparams    the per-group search described above
    group_error       per-group (weighted) squared error
    search_gain       relative error reduction of the search vs min/max for a layer
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .grid import check_weight, compute_qparams
from .spec import QuantSpec

# p in {1.00, 0.99, ..., 0.20}
DEFAULT_SHRINK_GRID: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    n, k = w.shape
    g = spec.effective_group(k)
    return w.to(torch.float32).reshape(n, k // g, g)


def _round_scale(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round to the storage dtype; a scale that rounds to 0 becomes eps (grid.py's rule)."""
    r = s.to(scale_dtype)
    eps = torch.finfo(scale_dtype).eps
    r = torch.where(r == 0, torch.where(s < 0, -eps, eps).to(scale_dtype), r)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"a group scale overflows {scale_dtype} (max |s| = {float(s.abs().max()):.3g}); "
                         "pass a wider scale_dtype")
    return r.to(torch.float32)


def minmax_qparams(w: torch.Tensor, spec: QuantSpec, shrink: float = 1.0, *,
                   scale_dtype: torch.dtype = torch.float16, layer: str = ""
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain min/max parameters (RTN's, from grid.compute_qparams): scale fp32 [N, G], zero int8 or None."""
    return compute_qparams(w, spec, shrink, layer=layer, scale_dtype=scale_dtype)


def _codes_grouped(wg: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    # same arithmetic as grid.quantize_with, on the [N, G, g] view
    x = wg / s.unsqueeze(-1)
    if z is not None:
        x = x + z.to(torch.float32).unsqueeze(-1)
    return torch.clamp(torch.round(x), spec.qmin, spec.qmax)


def _dequant_grouped(q: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    # same arithmetic as grid.dequantize_with / QuantizedWeight.dequantize
    if z is not None:
        q = q - z.to(torch.float32).unsqueeze(-1)
    return q * s.unsqueeze(-1)


def group_error(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: QuantSpec,
                hessian_diag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-group squared error sum_j h_j (w_j - Q(w_j))^2, shape [N, G]."""
    n, k = w.shape
    wg = _grouped(w, spec)
    s = scale.to(torch.float32)
    d = wg - _dequant_grouped(_codes_grouped(wg, s, zero, spec), s, zero)
    d2 = d * d
    if hessian_diag is not None:
        d2 = d2 * _grouped(hessian_diag.reshape(1, k).to(d2.device), spec)
    return d2.sum(-1)


def search_qparams(w: torch.Tensor, spec: QuantSpec, *, grid: Sequence[float] = DEFAULT_SHRINK_GRID,
                   hessian_diag: Optional[torch.Tensor] = None, negative_scale: bool = True,
                   scale_dtype: torch.dtype = torch.float16, layer: str = ""
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-group best (scale, zero) over shrink factors `grid` (and negative symmetric scales).

    w: [N, K]; hessian_diag: optional [K] non-negative weights (diag of H).
    Returns scale float32 [N, G] (values representable in `scale_dtype`, negative
    only for symmetric specs with negative_scale=True) and zero int8 [N, G] or None.
    """
    check_weight(w, spec, layer)
    n, k = w.shape
    if len(grid) == 0:
        raise ValueError("search_qparams: empty shrink grid")
    grid = [float(p) for p in grid]
    if any(not (0.0 < p <= 1.0) for p in grid):
        raise ValueError(f"search_qparams: shrink factors must lie in (0, 1], got {grid}")
    wg = _grouped(w, spec)
    hg = None
    if hessian_diag is not None:
        h = hessian_diag.reshape(-1).to(device=w.device, dtype=torch.float32)
        if h.numel() != k or not torch.isfinite(h).all() or (h < 0).any():
            where = f"layer {layer!r}: " if layer else ""
            raise ValueError(f"{where}hessian_diag must hold {k} finite non-negative values, "
                             f"got shape {tuple(hessian_diag.shape)}")
        hg = _grouped(h.reshape(1, k), spec)

    def err_of(s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        # w - (q - z) s = (x - q) s with x = w / s + z, so the group error is
        # s^2 * sum_j h_j (x_j - q_j)^2: fewer passes over the group than
        # dequantising (this loop is the hot spot of GPTQ with a search)
        s3 = s.unsqueeze(-1)
        x = wg / s3
        if z is not None:
            x += z.to(torch.float32).unsqueeze(-1)
        q = torch.round(x).clamp_(spec.qmin, spec.qmax)
        x -= q
        x.square_()
        e = (x * hg).sum(-1) if hg is not None else x.sum(-1)
        return e * (s * s)

    # Candidates for every p at once, stacked [C, N, G]. The min/max one (p = 1,
    # exactly grid.compute_qparams) comes first and wins ties, so the search can
    # only improve on RTN's parameters under the measured error. The other p use
    # grid.compute_qparams' formulas on the precomputed group range.
    p = torch.tensor([x for x in grid if x != 1.0], device=w.device, dtype=torch.float32).view(-1, 1, 1)
    s1, z1 = compute_qparams(w, spec, 1.0, layer=layer, scale_dtype=scale_dtype)
    lo = wg.amin(-1).clamp(max=0.0) * p
    hi = wg.amax(-1).clamp(min=0.0) * p
    if spec.symmetric:
        half_levels = ((1 << spec.bits) - 1) / 2.0
        amax, arg = wg.abs().max(-1)
        extreme = torch.gather(wg, -1, arg.unsqueeze(-1)).squeeze(-1)
        if negative_scale:
            # s = -sign(w*) a / |qmin|: w* lands exactly on qmin, the level the
            # standard formula leaves (almost) unused
            signed_div = torch.where(extreme > 0, float(spec.qmin), float(-spec.qmin))
        else:
            # positive scales only: w* on qmin when it is negative, else on qmax
            signed_div = torch.where(extreme > 0, float(spec.qmax), float(-spec.qmin))
        all_p = torch.cat([torch.ones_like(p[:1]), p])
        scales = torch.cat([s1.unsqueeze(0),
                            _round_scale(torch.maximum(-lo, hi) / half_levels, scale_dtype),
                            _round_scale(amax * all_p / signed_div, scale_dtype)])
        zeros = None
    else:
        sc = _round_scale((hi - lo) / float((1 << spec.bits) - 1), scale_dtype)
        scales = torch.cat([s1.unsqueeze(0), sc])
        zeros = torch.cat([z1.to(torch.float32).unsqueeze(0),
                           torch.round(torch.clamp(spec.qmin - lo / sc, spec.qmin, spec.qmax))])

    best_s, best_z = s1, z1
    best_e = err_of(s1, z1)
    for c in range(1, scales.shape[0]):
        z = None if zeros is None else zeros[c]
        e = err_of(scales[c], z)
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_s = torch.where(better, scales[c], best_s)
        if z is not None:
            best_z = torch.where(better, z.to(torch.int8), best_z)
    return best_s, best_z


def search_gain(w: torch.Tensor, spec: QuantSpec, *, hessian_diag: Optional[torch.Tensor] = None,
                layer: str = "", **search_kw) -> dict:
    """Layer report: (weighted) squared error of min/max vs the search, and the relative reduction."""
    s0, z0 = minmax_qparams(w, spec, scale_dtype=search_kw.get("scale_dtype", torch.float16), layer=layer)
    s1, z1 = search_qparams(w, spec, hessian_diag=hessian_diag, layer=layer, **search_kw)
    e0 = float(group_error(w, s0, z0, spec, hessian_diag).sum())
    e1 = float(group_error(w, s1, z1, spec, hessian_diag).sum())
    return {
        "layer": layer,
        "spec": spec.short(),
        "minmax_error": e0,
        "search_error": e1,
        "relative_reduction": (e0 - e1) / e0 if e0 > 0 else 0.0,
        "negative_scale_groups": int((s1 < 0).sum()),
    }
