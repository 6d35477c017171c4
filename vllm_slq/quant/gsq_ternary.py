"""GSQ's ternary initialisation: GPTQ with codes clamped to {-1, 0, 1} on the 2-bit
symmetric grid, each group's scale from a diag(H)-weighted search (docs/methods.md
sections 1 and 3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .gptq import factor_hessian
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
    """GPTQ (docs/methods.md sec. 1) with ternary codes on the 2-bit symmetric grid.

    vllm_slq.quant.gptq.gptq_quantize rounds to the full [qmin, qmax] range, so the
    ternary init runs the same column loop here with codes clamped to {-1, 0, 1} and
    each group's scale from :func:`ternary_qparams` (diag-H weighted) on the
    error-updated columns when the group starts.
    """
    spec = QuantSpec(2, group_size, symmetric=True)
    n, k = W.shape
    spec.groups(k, layer)
    if not torch.isfinite(W).all():
        raise QuantSpecError(f"layer {layer!r}: weight has NaN/inf")
    dev = W.device
    factor = factor_hessian(H, percdamp, layer=layer, device=dev)
    U, dead, hdiag = factor.hinv_upper.to(dev), factor.dead.to(dev), factor.diag.to(dev)
    Wc = W.to(torch.float32).clone()
    Wc[:, dead] = 0.0
    g = group_size
    codes = torch.empty(n, k, dtype=torch.int8, device=dev)
    scales = torch.empty(n, k // g, device=dev)
    starts = sorted(set(range(0, k, blocksize)) | set(range(0, k, g)))
    sc = torch.ones(n, device=dev)
    for bi, i1 in enumerate(starts):
        i2 = starts[bi + 1] if bi + 1 < len(starts) else k
        if i1 % g == 0:
            s = ternary_qparams(Wc[:, i1:i1 + g], g, hdiag[i1:i1 + g]).to(scale_dtype).to(torch.float32)
            sc = s[:, 0]
            scales[:, i1 // g] = sc
        W1 = Wc[:, i1:i2].clone()
        Err = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.clamp(torch.round(w / sc), -1, 1)
            codes[:, i1 + i] = q.to(torch.int8)
            err = (w - q * sc) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(-1) * U1[i, i:]
            Err[:, i] = err
        if i2 < k:
            Wc[:, i2:] -= Err @ U[i1:i2, i2:]
    return QuantizedWeight(codes, scales.to(scale_dtype), None, spec,
                           meta={"method": "gptq_ternary", "layer": layer, "percdamp": factor.percdamp})
