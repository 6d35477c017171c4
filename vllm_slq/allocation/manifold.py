"""RCO's budget manifold: operations on logits alpha [G, K] (docs/methods.md section 4).

Relaxation: p_i = softmax(alpha_i) over the options available to group i,
w_i = n_i / sum n, c_ik = true bpp of option k for group i. The budget manifold is

    M_B = { alpha : C(alpha) = sum_i w_i <p_i, c_i> = B }.

Paper equation                                   -> function
  C(alpha) = sum_i w_i <p_i, c_i>                -> budget_value
  normal  dC/dalpha_ik = w_i p_ik (c_ik - E_{p_i}[c_i])
                                                 -> budget_normal
  tangent projection g - (<g,n>/<n,n>) n         -> project_tangent
  retraction alpha + t c, scalar t by bisection  -> retract
      (C is monotone in t: dC/dt = sum_i w_i Var_{p_i}(c_i) >= 0)
  vector transport of Adam's first moment: re-project onto the new tangent
  plane (second moment left as is)               -> transport_momentum

Unavailable options are masked (probability 0) everywhere. All functions work
in float64 for the bisection's sake; inputs are not modified.
"""
from __future__ import annotations

import numpy as np
import torch


def masked_softmax(alpha: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    if mask is None:
        return torch.softmax(alpha, dim=dim)
    return torch.softmax(alpha.masked_fill(~mask, float("-inf")), dim=dim)


def budget_value(alpha: torch.Tensor, costs: torch.Tensor, weights: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """C(alpha) = sum_i w_i <p_i, c_i> (expected bpp under the relaxation)."""
    p = masked_softmax(alpha, mask)
    return (weights * (p * costs).sum(-1)).sum()


def budget_normal(alpha: torch.Tensor, costs: torch.Tensor, weights: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """dC/dalpha_ik = w_i p_ik (c_ik - E_{p_i}[c_i]) (closed form; zero on masked entries)."""
    p = masked_softmax(alpha, mask)
    mean = (p * costs).sum(-1, keepdim=True)
    return weights[:, None] * p * (costs - mean)


def project_tangent(g: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
    """Remove the component of g along the normal: g - (<g,n>/<n,n>) n."""
    nn = (normal * normal).sum()
    if nn <= 0:  # all distributions one-hot: the constraint is locally flat
        return g.clone()
    return g - ((g * normal).sum() / nn) * normal


def retract(alpha: torch.Tensor, costs: torch.Tensor, weights: torch.Tensor, budget: float,
            mask: torch.Tensor | None = None, tol: float = 1e-10, max_iter: int = 200) -> torch.Tensor:
    """Return alpha + t*c with the scalar t for which C(alpha + t c) = budget (bisection).

    Requires min_i-wise < budget < max (strict interior of the relaxed range);
    raises ValueError otherwise, since no finite t reaches the boundary.
    """
    # numpy float64: this runs ~100 evaluations per call on a small [G, K] array,
    # where torch's per-op overhead would dominate
    a = alpha.detach().to(torch.float64).numpy()
    c = costs.detach().to(torch.float64).numpy()
    w = weights.detach().to(torch.float64).numpy()
    keep = np.ones_like(a, dtype=bool) if mask is None else mask.numpy()

    def C(t: float) -> float:
        z = np.where(keep, a + t * c, -np.inf)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return float((w * (e * c).sum(1) / e.sum(1)).sum())

    lo, hi = -1.0, 1.0
    for _ in range(80):
        if C(lo) <= budget:
            break
        lo *= 2.0
    else:
        raise ValueError(f"retraction: budget {budget} is at or below the relaxed minimum")
    for _ in range(80):
        if C(hi) >= budget:
            break
        hi *= 2.0
    else:
        raise ValueError(f"retraction: budget {budget} is at or above the relaxed maximum")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        val = C(mid)
        if abs(val - budget) <= tol or hi - lo < 1e-15 * max(1.0, abs(mid)):
            lo = hi = mid
            break
        if val < budget:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return alpha + t * costs.to(alpha.dtype)


def transport_momentum(m: torch.Tensor, alpha_new: torch.Tensor, costs: torch.Tensor,
                       weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Vector transport by projection: Adam's first moment onto the tangent plane at alpha_new."""
    return project_tangent(m, budget_normal(alpha_new, costs, weights, mask))
