"""Multiple-choice knapsack DP: pick one option per group, total bits <= budget.

    minimise   sum_i v[i, k_i]
    subject to sum_i cost_bits[i, k_i] <= B_bits        (B_bits = floor(B * sum n))

Used for (a) RCO's budget-feasible hard assignment of Gumbel-perturbed logits
(v = -(alpha + g)), (b) RCO's final exact-budget rounding of log p, (c) the
proxy-DP baseline (v = per-layer error).

Discretisation (why "exact budget" holds):
  1. Offset: every group must pay at least its cheapest option, so DP runs over
     the *extra* bits  e[i,k] = cost[i,k] - min_k cost[i,k]  with capacity
     B_bits - sum_i min_k cost[i,k].  This shrinks the table by ~an order of magnitude.
  2. Exact units: costs are integers, so dividing by u = gcd of all e[i,k] is
     lossless; for homogeneous option sets (e.g. bits 2..8, asym g64) on a Llama
     the gcd is large (SmolLM2-135M: a few thousand units across the whole
     model), and the DP is *exact*: it returns the optimum among all allocations
     whose true bits do not exceed the budget.
  3. Grid fallback: if the exact unit count exceeds `max_units`, costs are
     rounded UP to a grid u' = ceil(extra_capacity / max_units) and capacity DOWN.
     Any grid-feasible solution is truly feasible (sum e <= u' sum ceil(e/u') <=
     capacity), so the budget is never exceeded; optimality is guaranteed among
     allocations with at least n_groups*u' bits of slack. The returned
     DPResult says which mode ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from math import gcd
from typing import Optional

import numpy as np

from .problem import AllocationProblem, InfeasibleBudgetError


@dataclass
class DPResult:
    choice: np.ndarray  # [G] option index per group
    value: float        # sum_i v[i, choice_i]
    bits: int           # true stored bits
    exact: bool         # True: gcd units (optimal); False: conservative grid
    unit_bits: int      # bits per DP unit


def solve_mckp(values: np.ndarray, cost_bits: np.ndarray, capacity_bits: int,
               available: Optional[np.ndarray] = None, max_units: int = 1 << 20) -> DPResult:
    """Minimise sum_i values[i, k_i] s.t. sum_i cost_bits[i, k_i] <= capacity_bits.

    values: float [G, K]; cost_bits: int [G, K] (non-negative); available: bool [G, K].
    Raises InfeasibleBudgetError if even the cheapest allocation exceeds capacity.
    """
    values = np.asarray(values, dtype=np.float64)
    cost_bits = np.asarray(cost_bits, dtype=np.int64)
    G, K = values.shape
    if cost_bits.shape != (G, K):
        raise ValueError(f"values {values.shape} and cost_bits {cost_bits.shape} differ in shape")
    avail = np.ones((G, K), bool) if available is None else np.asarray(available, bool)
    if not np.isfinite(values[avail]).all():
        raise ValueError("DP values must be finite on available options")
    big = np.iinfo(np.int64).max
    min_cost = np.where(avail, cost_bits, big).min(axis=1)
    extra = np.where(avail, cost_bits - min_cost[:, None], 0)
    capacity = int(capacity_bits) - int(min_cost.sum())
    if capacity < 0:
        raise InfeasibleBudgetError(
            f"capacity {capacity_bits} bits is below the cheapest allocation ({int(min_cost.sum())} bits)")
    capacity = min(capacity, int(extra.max(axis=1).sum()))  # more never helps

    nonzero = [int(x) for x in np.unique(extra[avail]) if x > 0]
    unit = reduce(gcd, nonzero, 0) or 1
    exact = capacity // unit <= max_units
    if exact:
        e_units = extra // unit
        cap_units = capacity // unit
    else:
        unit = -(-capacity // max_units)  # ceil
        e_units = -(-extra // unit)       # round costs up: conservative
        cap_units = capacity // unit      # round capacity down
    e_units = np.where(avail, e_units, cap_units + 1)  # unavailable never fits

    # f[c] = best value using groups so far with extra units <= c
    inf = np.inf
    f = np.zeros(cap_units + 1)
    choice_tab = np.zeros((G, cap_units + 1), dtype=np.int16)
    for i in range(G):
        new = np.full(cap_units + 1, inf)
        arg = np.zeros(cap_units + 1, dtype=np.int16)
        for k in range(K):
            e = int(e_units[i, k])
            if not avail[i, k] or e > cap_units:
                continue
            cand = np.full(cap_units + 1, inf)
            cand[e:] = f[: cap_units + 1 - e] + values[i, k]
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        f = new
        choice_tab[i] = arg
    if not np.isfinite(f[cap_units]):  # cannot happen when capacity >= 0 (all-cheapest fits)
        raise InfeasibleBudgetError("no allocation fits the budget on the DP grid")
    choice = np.zeros(G, dtype=np.int64)
    c = cap_units
    for i in range(G - 1, -1, -1):
        k = int(choice_tab[i, c])
        choice[i] = k
        c -= int(e_units[i, k])
    bits = int(cost_bits[np.arange(G), choice].sum())
    assert bits <= capacity_bits, "DP returned an allocation over budget"
    return DPResult(choice=choice, value=float(values[np.arange(G), choice].sum()), bits=bits,
                    exact=bool(exact), unit_bits=int(unit))


def solve_budget(problem: AllocationProblem, values: np.ndarray, budget_bpp: float,
                 max_units: int = 1 << 20) -> DPResult:
    """solve_mckp on a problem at a bpp budget (checked up front)."""
    problem.check_budget(budget_bpp)
    return solve_mckp(values, problem.cost_bits, problem.budget_bits(budget_bpp), problem.available,
                      max_units=max_units)
