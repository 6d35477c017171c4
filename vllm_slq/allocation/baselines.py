"""Baselines RCO is judged against (docs/methods.md section 5), on the same problem.

  uniform_allocate     one option for every group: the richest uniform option
                       whose bpp fits the budget (what "uniform b-bit" means).
  proxy_dp_allocate    HIGGS/SPDY-style: knapsack DP over a per-layer error
                       proxy e[i,k] (separable), exact budget (dp.solve_budget).
  evolution_allocate   EvoPress-style (1+lambda) search over levels: a mutation
                       moves one group one level down and another group one level
                       up with *exactly* the same bit delta (budget preserved to
                       the bit); multi-stage selection on growing token counts
                       (e.g. lambda=16 offspring + parent -> 4 -> 1 survivor).
  penalty_allocate     budget as a soft penalty: Adam on logits of
                       L(P) + mu * L0 * ((C(alpha) - B) / B)^2 with unconstrained
                       Gumbel straight-through samples; final exact-budget DP
                       rounding (the same rounding RCO uses, so the difference
                       measured is the optimisation path, not the rounding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .dp import solve_budget
from .manifold import budget_value, masked_softmax
from .problem import AllocationProblem, InfeasibleBudgetError
from .rco import AllocationResult, Objective, _gumbel, round_logits, tau_schedule


def uniform_allocate(problem: AllocationProblem, budget_bpp: float) -> AllocationResult:
    """Richest option applied to every group whose bpp fits the budget."""
    problem.check_budget(budget_bpp)
    t0 = time.perf_counter()
    cap = problem.budget_bits(budget_bpp)
    best = None
    for k in range(problem.n_options):
        if not problem.available[:, k].all():
            continue
        bits = int(problem.cost_bits[:, k].sum())
        if bits <= cap and (best is None or bits > best[1]):
            best = (k, bits)
    if best is None:
        raise InfeasibleBudgetError(f"no uniform option fits {budget_bpp:.4f} bpp")
    choice = np.full(problem.n_groups, best[0])
    return AllocationResult("uniform", choice, problem.achieved_bpp(choice), budget_bpp,
                            time.perf_counter() - t0, extra={"option": problem.options[best[0]].short()})


def proxy_dp_allocate(problem: AllocationProblem, budget_bpp: float, errors: np.ndarray) -> AllocationResult:
    """Exact knapsack DP minimising sum_i errors[i, k_i] under the budget."""
    t0 = time.perf_counter()
    res = solve_budget(problem, np.where(problem.available, errors, 0.0), budget_bpp)
    return AllocationResult("proxy_dp", res.choice, problem.achieved_bpp(res.choice), budget_bpp,
                            time.perf_counter() - t0, extra={"dp_exact": res.exact})


# --------------------------------------------------------------------------- evolution
@dataclass
class EvolutionConfig:
    generations: int = 50
    offspring: int = 16
    survivors: Sequence[int] = (4, 1)  # survivors after each selection stage; stage s uses fitness(choice, s)
    max_mutations: int = 3             # each offspring applies 1..max_mutations level switches
    seed: int = 0
    time_limit_s: Optional[float] = None
    progress: bool = True


def _levels(problem: AllocationProblem) -> list[np.ndarray]:
    """Per group, the available option indices sorted by cost (level 0 = cheapest)."""
    out = []
    for i in range(problem.n_groups):
        ks = np.nonzero(problem.available[i])[0]
        out.append(ks[np.argsort(problem.cost_bits[i, ks], kind="stable")])
    return out


def level_switch(problem: AllocationProblem, choice: np.ndarray, rng: np.random.Generator,
                 levels: Optional[list[np.ndarray]] = None, tries: int = 64) -> Optional[np.ndarray]:
    """One budget-preserving mutation: group i one level down, group j one level up, same bit delta.

    Returns None when no exact-delta pair is found in `tries` attempts.
    """
    levels = levels if levels is not None else _levels(problem)
    pos = np.array([int(np.nonzero(levels[i] == choice[i])[0][0]) for i in range(problem.n_groups)])
    cost = problem.cost_bits
    for _ in range(tries):
        i = int(rng.integers(problem.n_groups))
        if pos[i] == 0:
            continue
        k_down = levels[i][pos[i] - 1]
        delta = cost[i, choice[i]] - cost[i, k_down]
        ups = []
        for j in range(problem.n_groups):
            if j == i or pos[j] + 1 >= len(levels[j]):
                continue
            k_up = levels[j][pos[j] + 1]
            if cost[j, k_up] - cost[j, choice[j]] == delta:
                ups.append((j, k_up))
        if ups:
            j, k_up = ups[int(rng.integers(len(ups)))]
            new = choice.copy()
            new[i] = k_down
            new[j] = k_up
            return new
    return None


def evolution_allocate(problem: AllocationProblem, budget_bpp: float,
                       fitness: Callable[[np.ndarray, int], float], init_choice: np.ndarray,
                       config: EvolutionConfig = EvolutionConfig(),
                       callback: Optional[Callable[[int, dict], None]] = None) -> AllocationResult:
    """EvoPress-style search from init_choice (which must fit the budget); bits are preserved exactly.

    fitness(choice, stage) -> loss (lower is better); stage s = 0..len(survivors)-1
    evaluates on a growing number of calibration tokens. Evaluations are cached
    per (choice, stage), so the parent is not re-evaluated.
    """
    problem.check_budget(budget_bpp)
    init_choice = np.asarray(init_choice, dtype=np.int64)
    if problem.bits_of(init_choice) > problem.budget_bits(budget_bpp):
        raise ValueError(f"evolution start allocation uses {problem.achieved_bpp(init_choice):.4f} bpp "
                         f"> budget {budget_bpp:.4f}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    levels = _levels(problem)
    cache: dict[tuple, float] = {}
    n_evals = [0] * len(config.survivors)

    def fit(ch: np.ndarray, stage: int) -> float:
        key = (tuple(int(x) for x in ch), stage)
        if key not in cache:
            cache[key] = float(fitness(ch, stage))
            n_evals[stage] += 1
        return cache[key]

    parent = init_choice.copy()
    history = []
    gens = range(config.generations)
    if config.progress:
        from tqdm.auto import tqdm
        gens = tqdm(gens, desc=f"evolution @ {budget_bpp:.2f} bpp", leave=False)
    for gen in gens:
        pool = [parent]
        for _ in range(config.offspring):
            child = parent
            for _ in range(int(rng.integers(1, config.max_mutations + 1))):
                nxt = level_switch(problem, child, rng, levels)
                if nxt is not None:
                    child = nxt
            pool.append(child)
        for stage, keep in enumerate(config.survivors):
            scores = [fit(ch, stage) for ch in pool]
            order = np.argsort(scores, kind="stable")  # stable: parent wins ties
            pool = [pool[o] for o in order[:keep]]
        parent = pool[0]
        rec = {"generation": gen, "fitness": fit(parent, len(config.survivors) - 1),
               "time_s": time.perf_counter() - t0}
        history.append(rec)
        if callback is not None:
            callback(gen, rec)
        if config.time_limit_s is not None and time.perf_counter() - t0 > config.time_limit_s:
            break
    assert problem.bits_of(parent) == problem.bits_of(init_choice)  # exact budget preservation
    return AllocationResult("evolution", parent, problem.achieved_bpp(parent), budget_bpp,
                            time.perf_counter() - t0, history=history,
                            extra={"evaluations_per_stage": n_evals, "generations": len(history)})


# --------------------------------------------------------------------------- penalty
@dataclass
class PenaltyConfig:
    steps: int = 200
    samples: int = 4
    lr: float = 0.1
    mu: float = 10.0
    tau_start: float = 1.0
    tau_end: float = 0.01
    seed: int = 0
    progress: bool = False


def penalty_allocate(problem: AllocationProblem, budget_bpp: float, objective: Objective,
                     init_logits: Optional[torch.Tensor] = None,
                     config: PenaltyConfig = PenaltyConfig()) -> AllocationResult:
    """Soft-penalty baseline; returns the exact-budget DP rounding of its final logits."""
    problem.check_budget(budget_bpp)
    t0 = time.perf_counter()
    costs, weights, mask = problem.torch_costs()
    gen = torch.Generator().manual_seed(config.seed)
    alpha = (init_logits.detach().to(torch.float64).clone() if init_logits is not None
             else torch.zeros(problem.n_groups, problem.n_options, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([alpha], lr=config.lr)
    scale = None
    history = []
    for step in range(config.steps):
        tau = tau_schedule(step, config.steps, config.tau_start, config.tau_end)
        opt.zero_grad()
        losses = []
        for _ in range(config.samples):
            pert = alpha + _gumbel(alpha.shape, gen)
            soft = masked_softmax(pert / tau, mask)
            hard = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
            P = (hard + soft - soft.detach()).to(torch.float32)
            loss = objective(P, step) / config.samples
            loss.backward()
            losses.append(float(loss.detach()) * config.samples)
        if scale is None:
            scale = max(abs(float(np.mean(losses))), 1e-12)
        C = budget_value(alpha, costs, weights, mask)
        pen = config.mu * scale * ((C - budget_bpp) / budget_bpp) ** 2
        pen.backward()
        opt.step()
        history.append({"step": step, "loss": float(np.mean(losses)), "relaxed_bpp": float(C)})
    choice = round_logits(problem, alpha.detach(), budget_bpp)
    return AllocationResult("penalty", choice, problem.achieved_bpp(choice), budget_bpp,
                            time.perf_counter() - t0, history=history, logits=alpha.detach())
