"""Per-(group, option) loss estimates from the true objective: RCO's initialisation.

docs/methods.md s.4 initialises RCO's logits from per-layer sensitivity. A weight-space
proxy (GPTQ's relative output error) ignores how much each layer matters to the
model's output, so on the reference model its DP is far worse than uniform bits.
This module measures sensitivity on the objective itself, a few passes in all.

Second-order model of the loss around the reference weights (L(0) = 0 and
dL(0) = 0 for KL to the FP model), with e_i = D_ik the error of option k in group i:

    L(e) ~ 1/2 e^T F e,   dL/de = F e,
    C_ik = 1/2 <dL/dW_i, D_ik> at W = W_ref + sum_{j in S} D_jk
         = 1/2 D_ik^T F_ii D_ik  +  1/2 sum_{j in S, j != i} D_ik^T F_ij D_jk .

One backward pass with a subset S of groups switched to option k (the others at
W_ref: P rows all zero) gives C_ik for every i in S at once, since
dL/dP_ik = <dL/dW_i, D_ik> is exactly what the mixed-weight objective returns.
The first term is group i's own cost; the second (cross terms) is noise of
random sign that grows with |S| and with how far the pass leaves the quadratic
regime. So cheap options get split over more, smaller subsets: going from the
richest option down, option k's subsets are sized so that the loss a pass is
predicted to reach (the measured loss of the previous option's passes, scaled by
4 per bit removed, the quantisation-noise rule) stays under `max_pass_loss`,
with at most `max_subsets` subsets (passes) per option: on large models whose
cheapest option is far from the quadratic regime (random weights at 2 bits),
the rule alone asks for one pass per group, hours on a CPU. A capped option is
named in the returned info, and its estimates carry more cross-term noise.
Finally each row is made monotone (a cheaper option never costs less) and
non-negative.

On SmolLM2-135M (120 tied groups, w2..w8 g64) the sums of the estimates match
the measured KL of uniform 3/4-bit within ~5%; see benchmarks/allocation.py.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from .problem import AllocationProblem

Objective = Callable[[torch.Tensor, int], torch.Tensor]


def subset_counts(pass_loss_estimates: np.ndarray, max_pass_loss: float, n_groups: int) -> np.ndarray:
    """Subsets per option: enough that each pass's predicted loss stays under max_pass_loss."""
    n = np.ceil(np.asarray(pass_loss_estimates, dtype=np.float64) / max_pass_loss)
    return np.clip(np.nan_to_num(n, nan=1.0), 1, n_groups).astype(int)


def monotone_costs(values: np.ndarray, problem: AllocationProblem) -> np.ndarray:
    """Per group, a cheaper option never has a lower estimated loss than a richer one; >= 0."""
    out = np.maximum(np.asarray(values, dtype=np.float64), 0.0)
    for i in range(problem.n_groups):
        ks = [k for k in np.argsort(-problem.cost_bits[i], kind="stable") if problem.available[i, k]]
        for a, b in zip(ks, ks[1:]):  # a richer than b
            out[i, b] = max(out[i, b], out[i, a])
    return np.where(problem.available, out, 0.0)


def kl_sensitivities(problem: AllocationProblem, objective: Objective, n_batches: int = 4,
                     max_pass_loss: float = 0.25, max_subsets: int = 32, seed: int = 0,
                     progress: bool = True) -> tuple[np.ndarray, dict]:
    """C [G, K]: estimated loss of switching group i alone to option k (see module docstring).

    objective(P, step) -> loss, differentiable in P [G, K]; `step` 0..n_batches-1 selects
    the mini-batch (ModelKLObjective: calibration blocks batch_blocks at a time).
    Returns (C, info) with info: passes, wall_s, subsets per option, measured pass losses.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if not max_pass_loss > 0:
        raise ValueError(f"max_pass_loss must be > 0, got {max_pass_loss}")
    if max_subsets < 1:
        raise ValueError(f"max_subsets must be >= 1, got {max_subsets}")
    t0 = time.perf_counter()
    G, K = problem.n_groups, problem.n_options
    rng = np.random.default_rng(seed)
    # options from richest to cheapest, by parameter-weighted mean cost
    mean_bpp = (problem.cost_bits * problem.available).sum(0) / np.maximum(
        (problem.params[:, None] * problem.available).sum(0), 1)
    order = np.argsort(-mean_bpp, kind="stable")
    C = np.zeros((G, K))
    measured = {}
    subsets, capped = {}, []
    prev_loss, prev_bpp = 0.0, None
    steps = order.tolist()
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="KL sensitivities", leave=False)
    for k in steps:
        groups = np.nonzero(problem.available[:, k])[0]
        if prev_bpp is None:
            n_sub = 1
        else:
            predicted = prev_loss * 4.0 ** max(prev_bpp - mean_bpp[k], 0.0)
            n_sub = int(subset_counts(np.array([predicted]), max_pass_loss, max(len(groups), 1))[0])
            if n_sub > max_subsets:
                capped.append(int(k))
                n_sub = max_subsets
        perm = rng.permutation(groups)
        total = 0.0
        for S in np.array_split(perm, n_sub):
            if len(S) == 0:
                continue
            P = torch.zeros(G, K, dtype=torch.float32)
            P[torch.as_tensor(S), k] = 1.0
            P.requires_grad_(True)
            for s in range(n_batches):
                loss = objective(P, s) / n_batches
                loss.backward()
                total += float(loss.detach())
            C[S, k] = 0.5 * P.grad[torch.as_tensor(S), k].detach().to(torch.float64).numpy()
        measured[int(k)] = total
        subsets[int(k)] = n_sub
        prev_loss, prev_bpp = total, mean_bpp[k]
    C = monotone_costs(C, problem)
    info = {"passes": int(sum(subsets.values())), "batches_per_pass": n_batches, "subsets": subsets,
            "pass_loss_sum": measured, "max_pass_loss": max_pass_loss, "max_subsets": max_subsets,
            "capped_options": capped, "wall_s": time.perf_counter() - t0}
    return C, info
