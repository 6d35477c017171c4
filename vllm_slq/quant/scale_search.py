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
    search_qparams_stacked  the same for B weights that differ in bits only (GPTQ database)
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
# 11 points from 1.0 to 0.5: SLQ's 7-width database uses it, a seventh of the default's cost
COARSE_SHRINK_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))


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
    s, z = search_qparams_stacked(w.unsqueeze(0), [spec], grid=grid, hessian_diag=hessian_diag,
                                  negative_scale=negative_scale, scale_dtype=scale_dtype, layer=layer,
                                  _checked=True)
    return s[0], (None if z is None else z[0])


def search_qparams_stacked(ws: torch.Tensor, specs: Sequence[QuantSpec], *,
                           grid: Sequence[float] = DEFAULT_SHRINK_GRID,
                           hessian_diag: Optional[torch.Tensor] = None, negative_scale: bool = True,
                           scale_dtype: torch.dtype = torch.float16, layer: str = "", _checked: bool = False
                           ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """search_qparams for B weights at once: ws [B, N, K], specs[b] for ws[b].

    The specs may differ in bits only (same group size and symmetry): GPTQ's
    multi-bit database searches all widths of a group in one call. Each slice's
    result equals search_qparams(ws[b], specs[b]) exactly (the same elementwise
    arithmetic, broadcast over b). Returns scale [B, N, G] and zero [B, N, G] | None.
    """
    where = f"layer {layer!r}: " if layer else ""
    if ws.dim() != 3 or ws.shape[0] != len(specs) or not specs:
        raise ValueError(f"{where}search_qparams_stacked: ws must be [B, N, K] with B = len(specs) > 0, "
                         f"got {tuple(ws.shape)} and {len(specs)} specs")
    k = ws.shape[-1]
    g = specs[0].effective_group(k)
    sym = specs[0].symmetric
    if any(sp.effective_group(k) != g or sp.symmetric != sym for sp in specs):
        raise ValueError(f"{where}search_qparams_stacked: specs must share group size and symmetry, "
                         f"got {[sp.short() for sp in specs]}")
    if not _checked:
        for b, sp in enumerate(specs):
            check_weight(ws[b], sp, layer)
    if len(grid) == 0:
        raise ValueError("search_qparams: empty shrink grid")
    grid = [float(p) for p in grid]
    if any(not (0.0 < p <= 1.0) for p in grid):
        raise ValueError(f"search_qparams: shrink factors must lie in (0, 1], got {grid}")
    B, n, _ = ws.shape
    wg = ws.to(torch.float32).reshape(B, n, k // g, g)
    hg = None
    if hessian_diag is not None:
        h = hessian_diag.reshape(-1).to(device=ws.device, dtype=torch.float32)
        if h.numel() != k or not torch.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"{where}hessian_diag must hold {k} finite non-negative values, "
                             f"got shape {tuple(hessian_diag.shape)}")
        hg = h.reshape(k // g, g)

    def col(values) -> torch.Tensor:  # per-spec constants, broadcast as [B, 1, 1]
        return torch.tensor([float(v) for v in values], device=ws.device, dtype=torch.float32).view(B, 1, 1)

    qmin = col(sp.qmin for sp in specs)
    qmax = col(sp.qmax for sp in specs)
    qmin_list = [float(sp.qmin) for sp in specs]
    qmax_list = [float(sp.qmax) for sp in specs]
    levels = col((1 << sp.bits) - 1 for sp in specs)

    def err_of(s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        # w - (q - z) s = (x - q) s with x = w / s + z, so the group error is
        # s^2 * sum_j h_j (x_j - q_j)^2: fewer passes over the group than
        # dequantising (this loop is the hot spot of GPTQ with a search)
        s4 = s.unsqueeze(-1)
        x = wg / s4
        if z is not None:
            x += z.unsqueeze(-1)
        q = torch.round(x)
        for b in range(B):  # scalar bounds per slice: much faster than broadcast tensor bounds
            q[b].clamp_(qmin_list[b], qmax_list[b])
        x -= q
        x.square_()
        e = (x * hg).sum(-1) if hg is not None else x.sum(-1)
        return e * (s * s)

    # Candidates. p = 1 with the min/max formula (bit-identical to grid.compute_qparams)
    # is evaluated first and wins ties, so the search can only improve on RTN's
    # parameters under the measured error.
    lo0 = wg.amin(-1).clamp(max=0.0)
    hi0 = wg.amax(-1).clamp(min=0.0)
    shrinks = [1.0] + [p for p in grid if p != 1.0]
    if sym:
        half_levels = levels / 2.0
        amax, arg = wg.abs().max(-1)
        extreme = torch.gather(wg, -1, arg.unsqueeze(-1)).squeeze(-1)
        if negative_scale:
            # s = -sign(w*) a / |qmin|: w* lands exactly on qmin, the level the
            # standard formula leaves (almost) unused
            signed_div = torch.where(extreme > 0, qmin, -qmin)
        else:
            # positive scales only: w* on qmin when it is negative, else on qmax
            signed_div = torch.where(extreme > 0, qmax, -qmin)

        def candidates(p: float):
            lo, hi = lo0 * p, hi0 * p
            yield _round_scale(torch.maximum(lo.abs(), hi.abs()) / half_levels, scale_dtype), None
            yield _round_scale(amax * p / signed_div, scale_dtype), None
    else:
        def candidates(p: float):
            lo, hi = lo0 * p, hi0 * p
            sc = _round_scale((hi - lo) / levels, scale_dtype)
            yield sc, torch.round(torch.clamp(qmin - lo / sc, qmin, qmax))

    best_s = best_z = best_e = None
    for p in shrinks:
        for s, z in candidates(p):
            e = err_of(s, z)
            if best_e is None:
                best_s, best_z, best_e = s, z, e
                continue
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
    return best_s, (None if best_z is None else best_z.to(torch.int8))


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
