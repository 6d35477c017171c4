"""RCO: Riemannian constrained optimisation of per-group bit allocation (docs/methods.md s.4).

    minimise_{k_1..k_G} L(W_ref + sum_i sum_k P_ik (W_i^(k) - W_ref))
    s.t. sum_i w_i c_{i,k_i} <= B   (true bpp, exact at the end)

Algorithm (one function each, see manifold.py for the geometry):
  init      alpha_0 = sensitivity logits (sensitivity_logits) of per-(group, option)
            loss estimates: measured on the objective itself (sensitivity.
            kl_sensitivities, a few backward passes) or a weight-space proxy;
            retracted onto M_B
  forward   for s in 1..S: g ~ Gumbel(0,1)^{G x K};
              hard = DP argmax_k sum_i (alpha + g)_{i,k_i} under the budget
                     (budget-feasible Gumbel-max; dp.solve_mckp)
              soft = softmax((alpha + g) / tau)
              P    = hard + soft - stop_grad(soft)        (straight-through)
              loss_s = L(P)
  gradient  grad = d(mean_s loss_s)/dalpha, projected on the tangent plane of M_B
  step      Adam (m, v) with the projected gradient; alpha <- retract(alpha - lr*mhat/(sqrt(vhat)+eps))
  transport m <- project(m) onto the tangent plane at the new alpha
  schedule  tau_t = tau0 * (tau1/tau0)^(t/(T-1)), exponential 1.0 -> 0.01
  end       exact-budget DP rounding, best of the candidates scored by the loss
            of the hard allocation: log p; log p without the retractions' cost
            shift; the first-order model of L at p = softmax(alpha)
            (linearized_rounding: DP on dL/dP, a Frank-Wolfe linear-minimisation
            step, exact when L is linear in P); and, when given, the DP on the
            sensitivities the run started from. The first three then spend any
            budget they left unused on the upgrades the linear model rates best
            (fill_budget)

Objective contract: objective(P, step) -> scalar tensor differentiable in
P [G, K] (float32, rows one-hot in value). Synthetic objectives ignore `step`;
the model objective uses it to pick the calibration mini-batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .dp import solve_budget, solve_mckp
from .manifold import (budget_normal, budget_value, masked_softmax, project_tangent, retract,
                       transport_momentum)
from .problem import AllocationProblem

Objective = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class RCOConfig:
    steps: int = 200
    samples: int = 4
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    tau_start: float = 1.0
    tau_end: float = 0.01
    seed: int = 0
    dp_max_units: int = 20000       # grid for the in-loop hard assignment (conservative, see dp.py)
    final_max_units: int = 1 << 20  # exact-budget rounding at the end
    progress: bool = True


@dataclass
class AllocationResult:
    method: str
    choice: np.ndarray
    bpp: float
    budget: float
    wall_s: float
    history: list = field(default_factory=list)
    logits: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)


def sensitivity_logits(errors: np.ndarray, available: np.ndarray, strength: float = 4.0) -> torch.Tensor:
    """Initial logits from per-(group, option) quantization error (lower error -> higher logit).

    alpha_0 = -strength * e / s with s the median over groups of the error range
    e_i,max - e_i,min, so the Boltzmann distribution exp(alpha + t c) after
    retraction is a softened Lagrangian relaxation of the proxy problem at a
    temperature comparable to the typical per-layer gain.
    """
    e = np.where(available, np.asarray(errors, dtype=np.float64), np.nan)
    rng = np.nanmax(e, axis=1) - np.nanmin(e, axis=1)
    s = float(np.median(rng[rng > 0])) if (rng > 0).any() else 1.0
    alpha = -strength * np.nan_to_num(e, nan=0.0) / s
    return torch.tensor(np.where(available, alpha, 0.0), dtype=torch.float64)


def tau_schedule(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    if steps <= 1:
        return tau_end
    return tau_start * (tau_end / tau_start) ** (step / (steps - 1))


def _gumbel(shape, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


def feasible_hard_sample(problem: AllocationProblem, perturbed: torch.Tensor, capacity_bits: int,
                         max_units: int) -> np.ndarray:
    """Budget-feasible Gumbel-max: the allocation maximising sum of perturbed logits under budget."""
    values = -perturbed.detach().numpy()
    return solve_mckp(np.where(problem.available, values, 0.0), problem.cost_bits, capacity_bits,
                      problem.available, max_units=max_units).choice


def round_logits(problem: AllocationProblem, alpha: torch.Tensor, budget_bpp: float,
                 max_units: int = 1 << 20) -> np.ndarray:
    """Exact-budget DP rounding: maximise sum_i log p_i(k_i) under the budget."""
    _, _, mask = problem.torch_costs()
    logp = torch.log_softmax(alpha.detach().masked_fill(~mask, float("-inf")), -1)
    values = np.where(problem.available, -logp.numpy(), 0.0)
    values = np.nan_to_num(values, posinf=1e30)
    return solve_budget(problem, values, budget_bpp, max_units=max_units).choice


def linear_model(problem: AllocationProblem, objective: Objective, alpha: torch.Tensor, step: int) -> np.ndarray:
    """dL/dP at p = softmax(alpha): the first-order loss of every (group, option).

    L(onehot(k)) ~ L(p) + sum_i dL/dP_{i,k_i} - const.
    """
    _, _, mask = problem.torch_costs()
    P = masked_softmax(alpha.detach(), mask).to(torch.float32).requires_grad_(True)
    objective(P, step).backward()
    values = np.where(problem.available, P.grad.detach().to(torch.float64).numpy(), 0.0)
    return np.nan_to_num(values, posinf=1e30, neginf=-1e30)


def linearized_rounding(problem: AllocationProblem, values: np.ndarray, budget_bpp: float,
                        max_units: int = 1 << 20) -> np.ndarray:
    """Exact-budget DP on the linear model (linear_model): the linear-minimisation
    oracle of Frank-Wolfe over the budget-feasible vertices."""
    return solve_budget(problem, values, budget_bpp, max_units=max_units).choice


def fill_budget(problem: AllocationProblem, choice: np.ndarray, capacity_bits: int,
                values: np.ndarray) -> np.ndarray:
    """Spend what a rounding left unused: repeatedly take the single-group switch with
    the largest predicted loss decrease per extra bit that still fits.

    A rounding of log p can stop well short of the budget (the retractions' cost
    shift lives inside log p); bits left unspent are fidelity given away.
    """
    choice = np.asarray(choice).copy()
    rows = np.arange(problem.n_groups)
    spare = capacity_bits - problem.bits_of(choice)
    while spare > 0:
        extra = problem.cost_bits - problem.cost_bits[rows, choice][:, None]
        gain = values[rows, choice][:, None] - values
        ok = problem.available & (extra > 0) & (extra <= spare) & (gain > 0)
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
        i, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        choice[i] = k
        spare -= int(extra[i, k])
    return choice


def curvature_corrected(objective: Objective, sensitivities: np.ndarray, available: np.ndarray) -> Objective:
    """L(P) + sum_ik C_ik (P_ik - P_ik^2): the same loss on one-hot P, a better slope.

    The options' errors D_ik are nearly uncorrelated, so L is quadratic in P with a
    large diagonal curvature (L(e) ~ 1/2 e^T F e, C_ik ~ 1/2 D_ik^T F_ii D_ik): at a hard
    sample the straight-through slope is ~2 C for the option taken and ~0 for every
    other, i.e. it calls untaken options free. The correction is zero on every
    one-hot P and adds C_ik (1 - 2 P_ik) to the slope, so the slope becomes ~C_ik for
    every option plus the interaction terms the additive model misses (the
    expected-loss relaxation of a quadratic loss).
    """
    C = torch.tensor(np.where(available, sensitivities, 0.0), dtype=torch.float32)

    def corrected(P: torch.Tensor, step: int) -> torch.Tensor:
        return objective(P, step) + (C.to(P.dtype) * (P - P * P)).sum()

    return corrected


def rco_allocate(problem: AllocationProblem, budget_bpp: float, objective: Objective,
                 init_logits: Optional[torch.Tensor] = None, config: RCOConfig = RCOConfig(),
                 callback: Optional[Callable[[int, dict], None]] = None,
                 select: Optional[Callable[[np.ndarray], float]] = None,
                 sensitivities: Optional[np.ndarray] = None) -> AllocationResult:
    """Run RCO and return an allocation whose true bpp does not exceed budget_bpp.

    select(choice) -> loss, optional: scores the final rounding candidates (see the end);
    by default the objective itself on the hard allocation, at step `config.steps`.
    sensitivities [G, K], optional: per-(group, option) loss estimates (sensitivity.
    kl_sensitivities). They initialise alpha when init_logits is None, and their
    exact-budget DP (the additive model's optimum) joins the rounding candidates, so
    the result is never worse on `select` than the allocation RCO started from.
    """
    problem.check_budget(budget_bpp)
    t0 = time.perf_counter()
    costs, weights, mask = problem.torch_costs()
    lo, hi = problem.feasible_range()
    if budget_bpp <= lo + 1e-12 or budget_bpp >= hi - 1e-12:
        # boundary: exactly one allocation (cheapest/richest) fits; no interior to optimise in
        choice = round_logits(problem, torch.zeros(problem.n_groups, problem.n_options,
                                                   dtype=torch.float64) + costs * (1 if budget_bpp >= hi - 1e-12 else -1),
                              budget_bpp, config.final_max_units)
        return AllocationResult("rco", choice, problem.achieved_bpp(choice), budget_bpp,
                                time.perf_counter() - t0)
    gen = torch.Generator().manual_seed(config.seed)
    if sensitivities is not None:
        sensitivities = np.asarray(sensitivities, dtype=np.float64)
        if sensitivities.shape != (problem.n_groups, problem.n_options):
            raise ValueError(f"sensitivities shape {sensitivities.shape} != (groups, options) "
                             f"{(problem.n_groups, problem.n_options)}")
        if init_logits is None:
            init_logits = sensitivity_logits(sensitivities, problem.available)
        step_objective = curvature_corrected(objective, sensitivities, problem.available)
    else:
        step_objective = objective
    alpha = (init_logits.detach().to(torch.float64).clone() if init_logits is not None
             else torch.zeros(problem.n_groups, problem.n_options, dtype=torch.float64))
    if alpha.shape != (problem.n_groups, problem.n_options):
        raise ValueError(f"init_logits shape {tuple(alpha.shape)} != (groups, options) "
                         f"{(problem.n_groups, problem.n_options)}")
    alpha = retract(alpha, costs, weights, budget_bpp, mask)
    capacity = problem.budget_bits(budget_bpp)
    shift_total = 0.0  # sum of retraction scalars t: alpha = (gradient part) + shift_total * c
    m = torch.zeros_like(alpha)
    v = torch.zeros_like(alpha)
    b1, b2 = config.betas
    history = []
    steps = range(config.steps)
    if config.progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"RCO @ {budget_bpp:.2f} bpp", leave=False)
    for step in steps:
        tau = tau_schedule(step, config.steps, config.tau_start, config.tau_end)
        a = alpha.clone().requires_grad_(True)
        losses = []
        for _ in range(config.samples):
            pert = a.detach() + _gumbel(a.shape, gen)
            hard = problem.one_hot(feasible_hard_sample(problem, pert, capacity, config.dp_max_units),
                                   dtype=torch.float64)
            soft = masked_softmax((a + (pert - a.detach())) / tau, mask)
            P = (hard + soft - soft.detach()).to(torch.float32)
            loss = step_objective(P, step) / config.samples
            loss.backward()
            losses.append(float(loss.detach()) * config.samples)
        grad = a.grad.detach().masked_fill(~mask, 0.0)
        normal = budget_normal(alpha, costs, weights, mask)
        g = project_tangent(grad, normal)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** (step + 1))
        vhat = v / (1 - b2 ** (step + 1))
        stepped = alpha - config.lr * mhat / (vhat.sqrt() + config.eps)
        alpha = retract(stepped, costs, weights, budget_bpp, mask)
        shift_total += float(((alpha - stepped) * costs).sum() / (costs * costs).sum())
        m = transport_momentum(m, alpha, costs, weights, mask)
        rec = {"step": step, "tau": tau, "loss": float(np.mean(losses)),
               "relaxed_bpp": float(budget_value(alpha, costs, weights, mask)),
               "time_s": time.perf_counter() - t0}
        history.append(rec)
        if callback is not None:
            callback(step, rec)
    # End: exact-budget DP rounding. The retractions' accumulated shift shift_total*c
    # acts as a cost penalty inside log p that can leave budget unused, so the rounding
    # of the de-shifted logits is a second candidate; rounding log p ignores how much
    # the loss differs between options, which the linearized rounding (third) uses.
    # Each candidate's hard loss decides (ties keep the earlier one).
    if select is None:
        def select(ch: np.ndarray) -> float:
            with torch.no_grad():
                return float(objective(problem.one_hot(ch, dtype=torch.float32), config.steps))
    values = linear_model(problem, step_objective, alpha, config.steps)
    candidates = {
        "logp": round_logits(problem, alpha, budget_bpp, config.final_max_units),
        "deshifted": round_logits(problem, alpha - shift_total * costs, budget_bpp, config.final_max_units),
        "linearized": linearized_rounding(problem, values, budget_bpp, config.final_max_units),
    }
    candidates = {k: fill_budget(problem, c, capacity, values) for k, c in candidates.items()}
    if sensitivities is not None:
        candidates["sensitivity"] = solve_budget(problem, np.where(problem.available, sensitivities, 0.0),
                                                 budget_bpp, max_units=config.final_max_units).choice
    scores = {k: float(select(c)) for k, c in candidates.items()}
    best = min(scores, key=scores.get)
    choice = candidates[best]
    return AllocationResult("rco", choice, problem.achieved_bpp(choice), budget_bpp,
                            time.perf_counter() - t0, history=history, logits=alpha,
                            extra={"rounding": best, "rounding_scores": scores, "shift_total": shift_total})
