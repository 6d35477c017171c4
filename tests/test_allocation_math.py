"""Pure-math tests of vllm_slq.allocation: manifold, DP, RCO, baselines (small random instances)."""
import itertools

import numpy as np
import pytest
import torch

from vllm_slq.allocation.baselines import (EvolutionConfig, PenaltyConfig, evolution_allocate, level_switch,
                                           penalty_allocate, proxy_dp_allocate, uniform_allocate)
from vllm_slq.allocation.dp import solve_budget, solve_mckp
from vllm_slq.allocation.manifold import budget_normal, budget_value, project_tangent, retract, transport_momentum
from vllm_slq.allocation.problem import (AllocationProblem, InfeasibleBudgetError, LinearShape, group_linears)
from vllm_slq.allocation.rco import fill_budget, RCOConfig, rco_allocate, sensitivity_logits
from vllm_slq.quant.spec import QuantSpec

torch.set_num_threads(1)  # tiny tensors: thread start-up dominates on a shared 2-core box

ASYM = [QuantSpec(b, 64, False) for b in range(2, 9)]


def random_problem(seed, n=8, options=ASYM, tie=False):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (128, 64), (64, 128), (192, 128)]
    shapes = []
    for i in range(n):
        N, K = sizes[rng.integers(len(sizes))]
        shapes.append(LinearShape(f"model.layers.{i}.mlp.down_proj", N, K))
    return AllocationProblem(group_linears(shapes, tie_fused=tie), options)


def brute_force(problem, values, budget):
    cap = problem.budget_bits(budget)
    best = (np.inf, None)
    for ch in itertools.product(*[np.nonzero(problem.available[i])[0] for i in range(problem.n_groups)]):
        ch = np.array(ch)
        if problem.bits_of(ch) <= cap:
            v = values[np.arange(problem.n_groups), ch].sum()
            if v < best[0]:
                best = (v, ch)
    return best


# ----------------------------------------------------------------------------- manifold
@pytest.mark.parametrize("seed", range(6))
def test_retraction_lands_on_budget_from_any_start(seed):
    pb = random_problem(seed, n=10)
    c, w, mask = pb.torch_costs()
    lo, hi = pb.feasible_range()
    g = torch.Generator().manual_seed(seed)
    for scale in (0.1, 3.0, 30.0):
        alpha = scale * torch.randn(pb.n_groups, pb.n_options, generator=g, dtype=torch.float64)
        for frac in (0.02, 0.3, 0.7, 0.98):
            B = lo + frac * (hi - lo)
            a2 = retract(alpha, c, w, B, mask)
            assert abs(float(budget_value(a2, c, w, mask)) - B) < 1e-6
            # the retraction moves only along the cost vector
            d = a2 - alpha
            t = (d * c).sum() / (c * c).sum()
            assert torch.allclose(d, t * c, atol=1e-9)


def test_projected_gradient_orthogonal_to_normal_and_normal_is_gradient_of_C():
    pb = random_problem(1, n=9)
    c, w, mask = pb.torch_costs()
    alpha = torch.randn(pb.n_groups, pb.n_options, dtype=torch.float64, requires_grad=True)
    budget_value(alpha, c, w, mask).backward()
    n = budget_normal(alpha.detach(), c, w, mask)
    assert torch.allclose(alpha.grad, n, atol=1e-12)  # closed form == autograd
    for _ in range(5):
        g = torch.randn_like(n)
        pg = project_tangent(g, n)
        assert abs(float((pg * n).sum())) < 1e-12 * float(g.norm() * n.norm()) + 1e-15
        m = transport_momentum(g, alpha.detach() + 0.3, c, w, mask)
        assert abs(float((m * budget_normal(alpha.detach() + 0.3, c, w, mask)).sum())) < 1e-12


# ----------------------------------------------------------------------------- DP
@pytest.mark.parametrize("seed", range(8))
def test_dp_exact_vs_brute_force(seed):
    opts = [QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, None, True), QuantSpec(8, 32)]
    pb = random_problem(seed, n=6, options=opts)
    rng = np.random.default_rng(seed)
    values = rng.uniform(0, 1, size=(pb.n_groups, pb.n_options))
    lo, hi = pb.feasible_range()
    for frac in (0.0, 0.15, 0.5, 0.9, 1.0):
        B = lo + frac * (hi - lo)
        res = solve_budget(pb, values, B)
        bv, _ = brute_force(pb, values, B)
        assert res.exact and res.bits <= pb.budget_bits(B)
        assert res.value == pytest.approx(bv, abs=1e-12)


def test_dp_grid_fallback_never_exceeds_budget():
    pb = random_problem(3, n=7, options=[QuantSpec(2, 64), QuantSpec(3, 32, True), QuantSpec(5, None), QuantSpec(7, 64)])
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, size=(pb.n_groups, pb.n_options))
    lo, hi = pb.feasible_range()
    B = (lo + hi) / 2
    coarse = solve_budget(pb, values, B, max_units=8)
    assert not coarse.exact and coarse.bits <= pb.budget_bits(B)
    assert coarse.value >= brute_force(pb, values, B)[0] - 1e-12


def test_infeasible_budgets_rejected_with_range():
    pb = random_problem(0)
    lo, hi = pb.feasible_range()
    for B in (lo - 0.01, hi + 0.01, float("nan")):
        with pytest.raises(InfeasibleBudgetError, match=r"\[\d+\.\d+, \d+\.\d+\]|finite"):
            rco_allocate(pb, B, lambda P, s: P.sum())
    with pytest.raises(InfeasibleBudgetError, match=f"{lo:.4f}"):
        solve_budget(pb, np.zeros((pb.n_groups, pb.n_options)), lo - 1)
    with pytest.raises(InfeasibleBudgetError, match=f"{hi:.4f}"):
        proxy_dp_allocate(pb, hi + 1, np.zeros((pb.n_groups, pb.n_options)))
    with pytest.raises(InfeasibleBudgetError):
        evolution_allocate(pb, lo - 1, lambda ch, s: 0.0, np.zeros(pb.n_groups, int))


# ----------------------------------------------------------------------------- ties
def llama_shapes(layers=2, h=64, kv=32, f=128):
    out = []
    for l in range(layers):
        p = f"model.layers.{l}"
        out += [LinearShape(f"{p}.self_attn.q_proj", h, h), LinearShape(f"{p}.self_attn.k_proj", kv, h),
                LinearShape(f"{p}.self_attn.v_proj", kv, h), LinearShape(f"{p}.self_attn.o_proj", h, h),
                LinearShape(f"{p}.mlp.gate_proj", f, h), LinearShape(f"{p}.mlp.up_proj", f, h),
                LinearShape(f"{p}.mlp.down_proj", h, f)]
    return out


def test_tied_groups_always_share_bits():
    pb = AllocationProblem(group_linears(llama_shapes()), ASYM)
    assert pb.n_groups == 8  # qkv, o, gate+up, down per layer
    rng = np.random.default_rng(0)
    lo, hi = pb.feasible_range()
    V = torch.tensor(rng.uniform(0, 1, (pb.n_groups, pb.n_options)), dtype=torch.float32)
    choices = [rco_allocate(pb, (lo + hi) / 2, lambda P, s: (P * V).sum(),
                            config=RCOConfig(steps=10, progress=False)).choice,
               proxy_dp_allocate(pb, 4.0, V.numpy()).choice]
    for ch in choices:
        specs = pb.module_specs(ch)
        for l in range(2):
            p = f"model.layers.{l}"
            assert len({specs[f"{p}.self_attn.{x}_proj"] for x in "qkv"}) == 1
            assert specs[f"{p}.mlp.gate_proj"] == specs[f"{p}.mlp.up_proj"]


# ----------------------------------------------------------------------------- RCO + baselines
def linear_instance(seed, n=10):
    pb = random_problem(seed, n=n)
    rng = np.random.default_rng(100 + seed)
    base = rng.uniform(0.5, 2, size=(pb.n_groups, 1)) * np.exp(-0.7 * np.arange(pb.n_options))[None] \
        * pb.params[:, None] / 1e4
    return pb, base


@pytest.mark.parametrize("seed", range(4))
def test_rco_reaches_the_optimum_on_linear_instances(seed):
    # For a loss linear in P the linearized rounding is the DP on the true per-option
    # losses, so RCO's answer is the DP optimum exactly, whatever the noisy init.
    pb, base = linear_instance(seed)
    V = torch.tensor(base, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    noisy = base * np.exp(0.3 * rng.standard_normal(base.shape))  # imperfect sensitivity init
    B = 4.5
    opt = solve_budget(pb, base, B).value
    uni = base[np.arange(pb.n_groups), uniform_allocate(pb, B).choice].sum()
    r = rco_allocate(pb, B, lambda P, s: (P * V).sum(), init_logits=sensitivity_logits(noisy, pb.available),
                     config=RCOConfig(progress=False, seed=seed))
    got = base[np.arange(pb.n_groups), r.choice].sum()
    assert pb.bits_of(r.choice) <= pb.budget_bits(B)
    assert got < uni
    assert got == pytest.approx(opt, rel=1e-6), (opt, got, r.extra)
    assert set(r.extra["rounding_scores"]) == {"logp", "deshifted", "linearized"}
    assert len(r.history) == 200 and r.history[-1]["tau"] == pytest.approx(0.01)
    assert all(abs(h["relaxed_bpp"] - B) < 1e-6 for h in r.history)  # iterates stay on the manifold


def test_evolution_preserves_budget_and_improves():
    pb, base = linear_instance(0, n=12)
    B = 4.5
    rng = np.random.default_rng(0)
    start = proxy_dp_allocate(pb, B, rng.uniform(0, 1, base.shape)).choice
    for _ in range(50):
        nxt = level_switch(pb, start, rng)
        assert nxt is None or pb.bits_of(nxt) == pb.bits_of(start)
    r = evolution_allocate(pb, B, lambda ch, s: float(base[np.arange(pb.n_groups), ch].sum()), start,
                           EvolutionConfig(generations=40, offspring=8, survivors=(2, 1), progress=False))
    assert pb.bits_of(r.choice) == pb.bits_of(start)
    f0 = base[np.arange(pb.n_groups), start].sum()
    fits = [h["fitness"] for h in r.history]
    assert fits[-1] < f0 and all(a >= b for a, b in zip(fits, fits[1:]))  # (1+lambda): monotone


def test_uniform_and_penalty_feasible():
    pb, base = linear_instance(1)
    V = torch.tensor(base, dtype=torch.float32)
    u = uniform_allocate(pb, 4.5)
    assert u.extra["option"] == "w4ag64" and len(set(u.choice)) == 1
    p = penalty_allocate(pb, 4.5, lambda P, s: (P * V).sum(), config=PenaltyConfig(steps=30))
    assert pb.bits_of(p.choice) <= pb.budget_bits(4.5)


def test_fill_budget_spends_leftover_bits_on_gains_only():
    pb, base = linear_instance(2)
    B = 4.5
    cap = pb.budget_bits(B)
    cheapest = np.where(pb.available, pb.cost_bits, np.iinfo(np.int64).max).argmin(axis=1)
    filled = fill_budget(pb, cheapest, cap, base)
    assert pb.bits_of(filled) <= cap
    rows = np.arange(pb.n_groups)
    assert base[rows, filled].sum() < base[rows, cheapest].sum()
    # nothing left that fits and helps
    spare = cap - pb.bits_of(filled)
    extra = pb.cost_bits - pb.cost_bits[rows, filled][:, None]
    assert not (pb.available & (extra > 0) & (extra <= spare) & (base < base[rows, filled][:, None])).any()
    # an allocation already at the optimum is left alone; values that never improve change nothing
    opt = solve_budget(pb, base, B).choice
    assert np.array_equal(fill_budget(pb, opt, cap, base), opt) or \
        base[rows, fill_budget(pb, opt, cap, base)].sum() <= base[rows, opt].sum()
    assert np.array_equal(fill_budget(pb, cheapest, cap, -base), cheapest)
