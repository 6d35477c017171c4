"""GSQ's ternary initialisation: GPTQ with codes clamped to {-1, 0, 1} on the 2-bit
symmetric grid, each group's scale from a diag(H)-weighted search (docs/methods.md
sections 1 and 3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .gptq import gptq_quantize_many
from .spec import QuantizedWeight, QuantSpec, QuantSpecError

__all__ = ["TERNARY_SHRINK", "gptq_ternary", "ternary_qparams"]


TERNARY_SHRINK = tuple(round(0.05 + 0.025 * i, 3) for i in range(39))  # s / max|w| in 0.05..1.0


def ternary_qparams(w: torch.Tensor, group_size: int, weights: Optional[torch.Tensor] = None,
                    grid: Sequence[float] = TERNARY_SHRINK) -> torch.Tensor:
    """Per-group scale s minimising sum_j h_j (w_j - s * clamp(round(w_j / s), -1, 1))^2.

    w [N, G*groups] fp32; weights h [K] (e.g. diag H) or None. Returns s [N, groups] > 0.
    """
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)
    amax = wg.abs().amax(-1).clamp_min(1e-12)
    h = None if weights is None else weights.view(1, k // group_size, group_size)
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for p in grid:
        sc = amax * p
        q = torch.clamp(torch.round(wg / sc.unsqueeze(-1)), -1, 1)
        err = (wg - q * sc.unsqueeze(-1)) ** 2
        err = (err if h is None else err * h).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, sc, best)
    return best


@torch.no_grad()
def gptq_ternary(W: torch.Tensor, H: torch.Tensor, group_size: int, *, layer: str = "",
                 percdamp: float = 0.01, blocksize: int = 128,
                 scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """GPTQ (docs/methods.md sec. 1) with ternary codes on the 2-bit symmetric grid: the one
    GPTQ column loop (gptq.gptq_quantize_many) with codes clamped to {-1, 0, 1} and each
    group's scale from :func:`ternary_qparams` (diag-H weighted) on the error-updated
    columns when the group starts."""
    spec = QuantSpec(2, group_size, symmetric=True)
    spec.groups(W.shape[1], layer)
    if not torch.isfinite(W).all():
        raise QuantSpecError(f"layer {layer!r}: weight has NaN/inf")

    def qparams(w: torch.Tensor, hdiag: Optional[torch.Tensor], _spec: QuantSpec):
        s = ternary_qparams(w, w.shape[1], hdiag)[:, 0]
        return s.to(scale_dtype).to(torch.float32), None

    qw = gptq_quantize_many(W, H, [spec], layer=layer, percdamp=percdamp, blocksize=blocksize,
                            scale_search="hessian", scale_dtype=scale_dtype, negative_scale=False,
                            group_qparams=qparams, code_range=(-1, 1))[spec]
    qw.meta["method"] = "gptq_ternary"
    return qw
