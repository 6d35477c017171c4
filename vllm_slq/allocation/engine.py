"""One allocation engine: what every SLQ allocation runs, in one place.

    SLQ_GPTQ                     the GPTQ options of SLQ's 7-width database (gptq.gptq_quantize_many)
    AllocationEngine(problem, objective, rco=RCOConfig(...), sensitivity_batches=2)
      .sensitivities()           KL sensitivities C[g, k] (sensitivity.kl_sensitivities), measured
                                 once, on first use; with sensitivity_batches = 0 RCO starts
                                 instead from `init_errors` (GPTQ's relative layer errors) as logits
      .allocate(budget)          RCO at a bpp budget (rco.rco_allocate); the rounding candidates
                                 are selected by the objective's calibration KL
      .search(accept, lo, hi)    the fewest bpp in [lo, hi] whose allocation `accept`s
      .maximize(score, lo, hi)   the budget in [lo, hi] whose allocation scores highest
                                 (the speculative target: predicted speed-up)
    bisect_budget(lo, hi, probe) the budget bisection itself: probe(b) -> accepted, monotone in
                                 practice; the EAR / task targets and the benchmark's
                                 distribution-lossless points all bisect with it
    golden_section_max(lo, hi, f) the maximiser of a unimodal f(budget), one probe per step

The SLQ modifier, allocate_model and benchmarks/slq.py and allocation.py call this,
so their seeds, starts, selection rule and database options cannot drift apart.
Every tensor stays where the objective computes; the engine itself holds only the
[groups, options] sensitivity matrix.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from vllm_slq.quant.gptq import GPTQ_VARIANT

from .problem import AllocationProblem
from .rco import AllocationResult, RCOConfig, rco_allocate, sensitivity_logits
from .sensitivity import kl_sensitivities

__all__ = ["SLQ_GPTQ", "AllocationEngine", "bisect_budget", "golden_section_max"]

# SLQ's database: every width by our GPTQ (gptq.GPTQ_VARIANT, the uniform baseline's too):
# act-order columns, the Hessian-weighted range search on 11 shrink factors, positive
# scales (what compressed-tensors and vLLM assume)
SLQ_GPTQ = dict(GPTQ_VARIANT)

Accept = Callable[[np.ndarray], "tuple[bool, dict]"]


def bisect_budget(lo: float, hi: float, probe: Callable[[float], bool], *, steps: int,
                  tolerance: float) -> tuple[float, float, list[dict]]:
    """Bisect [lo, hi] (hi accepted, lo not) with probe(budget) -> accepted, at most
    `steps` probes and none once the bracket is narrower than `tolerance` bpp.
    Returns the final bracket (lo, hi) and the probes [{"budget", "accepted"}]."""
    probes = []
    for _ in range(steps):
        if hi - lo <= tolerance:
            break
        mid = 0.5 * (lo + hi)
        ok = bool(probe(mid))
        probes.append({"budget": mid, "accepted": ok})
        if ok:
            hi = mid
        else:
            lo = mid
    return lo, hi, probes


_INV_PHI = (5 ** 0.5 - 1) / 2


def golden_section_max(lo: float, hi: float, f: Callable[[float], float], *, steps: int
                       ) -> tuple[float, list[dict]]:
    """Golden-section search for the maximum of f on [lo, hi], unimodal in practice: `steps`
    probes (at least 2), each shrinking the bracket by 0.618 after the first two. Returns the
    best probed budget (highest f; on a noisy f that beats the final bracket's midpoint) and
    the probes [{"budget", "score"}] in order."""
    if steps < 2:
        raise ValueError(f"golden_section_max needs at least 2 probes, got steps={steps}")
    probes: list[dict] = []

    def probe(b: float) -> float:
        v = float(f(b))
        probes.append({"budget": b, "score": v})
        return v

    a, b = lo, hi
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = probe(c), probe(d)
    for _ in range(steps - 2):
        if fc >= fd:  # the maximum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = probe(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = probe(d)
    best = max(probes, key=lambda p: p["score"])
    return best["budget"], probes


class AllocationEngine:
    """problem + objective + KL sensitivities + RCO, and the search for acceptance targets.

    objective: a ModelKLObjective (or any callable objective(P, step) -> loss with
    .evaluate(choice) -> calibration KL, which selects among RCO's rounding candidates).
    init_errors [G, K]: per-(group, option) errors to start RCO from when
    sensitivity_batches is 0.
    """

    def __init__(self, problem: AllocationProblem, objective, *, rco: RCOConfig = RCOConfig(),
                 sensitivity_batches: int = 2, init_errors: Optional[np.ndarray] = None,
                 sensitivity_kw: Optional[dict] = None):
        if sensitivity_batches <= 0 and init_errors is None:
            raise ValueError("AllocationEngine: sensitivity_batches = 0 needs init_errors to start RCO from")
        self.problem, self.objective, self.rco = problem, objective, rco
        self.sensitivity_batches = sensitivity_batches
        self.sensitivity_kw = dict(sensitivity_kw or {})
        self.init_errors = init_errors
        self.sensitivity_info: Optional[dict] = None
        self._sensitivities: Optional[np.ndarray] = None
        self.log: list[dict] = []  # one entry per allocation, in order

    def sensitivities(self) -> Optional[np.ndarray]:
        if self.sensitivity_batches <= 0:
            return None
        if self._sensitivities is None:
            self._sensitivities, info = kl_sensitivities(self.problem, self.objective,
                                                         n_batches=self.sensitivity_batches, seed=self.rco.seed,
                                                         **self.sensitivity_kw)
            self.sensitivity_info = {k: v for k, v in info.items() if k != "pass_loss_sum"}
        return self._sensitivities

    def allocate(self, budget: float) -> AllocationResult:
        """RCO at `budget` bpp; the log gets the budget, the bpp reached and its calibration KL."""
        sens = self.sensitivities()
        init = None if sens is not None else sensitivity_logits(self.init_errors, self.problem.available)
        res = rco_allocate(self.problem, budget, self.objective, init_logits=init, config=self.rco,
                           select=self.objective.evaluate, sensitivities=sens)
        scores = res.extra.get("rounding_scores") or {}
        kl = scores.get(res.extra.get("rounding"))
        if kl is None:  # a budget at the feasible range's end has one allocation, never scored
            kl = float(self.objective.evaluate(res.choice))
        self.log.append({"budget": float(budget), "bpp": res.bpp, "calib_kl": float(kl)})
        return res

    def search(self, accept: Accept, lo: float, hi: float, *, steps: int,
               tolerance: float) -> tuple[AllocationResult, bool]:
        """The fewest-bpp allocation in [lo, hi] that accept(choice) -> (ok, info) accepts.

        The richest (hi) is tried first; when even it fails, it is returned with False.
        Every probe's (ok, info) joins its log entry."""
        results: dict[float, AllocationResult] = {}

        def probe(budget: float) -> bool:
            res = self.allocate(budget)
            ok, info = accept(np.asarray(res.choice))
            self.log[-1].update({"accepted": bool(ok), **info})
            results[budget] = res
            return ok

        if not probe(hi):
            return results[hi], False
        _, best, _ = bisect_budget(lo, hi, probe, steps=steps, tolerance=tolerance)
        return results[best], True

    def maximize(self, score: Callable[[np.ndarray], "tuple[float, dict]"], lo: float, hi: float, *,
                 steps: int) -> AllocationResult:
        """The allocation, among `steps` golden-section budgets in [lo, hi], whose
        score(choice) -> (value, info) is highest. Every probe's value and info join its log
        entry, the chosen one marked "best"."""
        results: dict[float, tuple[AllocationResult, int]] = {}

        def probe(budget: float) -> float:
            res = self.allocate(budget)
            value, info = score(np.asarray(res.choice))
            self.log[-1].update({"score": float(value), **info})
            results[budget] = (res, len(self.log) - 1)
            return value

        best, _ = golden_section_max(lo, hi, probe, steps=steps)
        res, entry = results[best]
        self.log[entry]["best"] = True
        return res
