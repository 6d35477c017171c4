"""KL-sensitivity estimates (vllm_slq.allocation.sensitivity) on quadratic objectives
where the per-group cost is known in closed form, and their use inside RCO."""
import numpy as np
import pytest
import torch

from vllm_slq.allocation.dp import solve_budget
from vllm_slq.allocation.problem import AllocationProblem, LinearShape, group_linears
from vllm_slq.allocation.rco import RCOConfig, curvature_corrected, rco_allocate
from vllm_slq.allocation.sensitivity import kl_sensitivities, monotone_costs, subset_counts
from vllm_slq.quant.spec import QuantSpec

torch.set_num_threads(1)

ASYM = [QuantSpec(b, 64, False) for b in range(2, 9)]


def problem(n=12, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (128, 64), (64, 128)]
    return AllocationProblem(group_linears([LinearShape(f"model.layers.{i}.mlp.down_proj",
                                                        *sizes[rng.integers(3)]) for i in range(n)],
                                           tie_fused=False), ASYM)


def quadratic_objective(pb, seed=0, coupling=0.0, dim=6):
    """L(P) = 1/2 e^T F e with e = sum_ik P_ik d_ik (d_ik in R^dim per group, shrinking
    4x in energy per bit) and F = blockdiag(A_i) + coupling * (all-pairs term)."""
    rng = np.random.default_rng(seed)
    G, K = pb.n_groups, pb.n_options
    bits = np.array([s.bits for s in pb.options])
    d = rng.normal(size=(G, K, dim)) * (2.0 ** -(bits - 2))[None, :, None] \
        * rng.uniform(0.2, 2.0, size=(G, 1, 1))
    A = []
    for _ in range(G):
        M = rng.normal(size=(dim, dim))
        A.append(M @ M.T / dim + 0.1 * np.eye(dim))
    F = np.zeros((G * dim, G * dim))
    for i in range(G):
        F[i * dim:(i + 1) * dim, i * dim:(i + 1) * dim] = A[i]
    if coupling:
        M = rng.normal(size=(G * dim, G * dim))
        F = F + coupling * (M @ M.T) / (G * dim)
    D = torch.tensor(d, dtype=torch.float64)
    Ft = torch.tensor(F, dtype=torch.float64)

    def objective(P, step):
        e = torch.einsum("gk,gkd->gd", P.to(torch.float64), D).reshape(-1)
        return 0.5 * e @ Ft @ e

    # each group's isolated cost: its own diagonal block of F (coupling included)
    own = np.array([[0.5 * d[i, k] @ F[i * dim:(i + 1) * dim, i * dim:(i + 1) * dim] @ d[i, k]
                     for k in range(K)] for i in range(G)])
    return objective, own


def test_block_diagonal_curvature_gives_each_groups_own_cost_exactly():
    pb = problem()
    objective, own = quadratic_objective(pb, coupling=0.0)
    C, info = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=1e9, progress=False)
    assert info["passes"] == pb.n_options  # one pass per option when nothing needs splitting
    np.testing.assert_allclose(C, monotone_costs(own, pb), rtol=1e-6, atol=1e-12)


def test_smaller_subsets_shrink_the_cross_term_error():
    pb = problem(n=24, seed=3)
    objective, own = quadratic_objective(pb, seed=3, coupling=0.5)
    truth = monotone_costs(own, pb)
    errs = {}
    for mpl in (1e9, 1e-4):
        C, info = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=mpl, progress=False)
        errs[mpl] = np.abs(C - truth).sum() / truth.sum()
    # max_pass_loss tiny: every cheap option is split into one-group subsets (no cross terms)
    assert errs[1e9] > 0.01  # the coupling does bias the one-pass-per-option estimate
    assert errs[1e-4] < 0.01 * errs[1e9]  # singletons (all but the richest option, one pass): ~exact


def test_subsets_grow_as_options_get_cheaper():
    pb = problem(n=16, seed=1)
    objective, _ = quadratic_objective(pb, seed=1)
    _, info = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=0.05, progress=False)
    by_bits = [info["subsets"][k] for k in range(pb.n_options)]  # options are 2..8 bits
    assert by_bits[-1] == 1  # the richest option is measured in one pass
    assert all(a >= b for a, b in zip(by_bits, by_bits[1:]))
    assert by_bits[0] > 1


def test_max_subsets_caps_the_passes_of_each_option_and_names_the_capped_ones():
    pb = problem(n=16, seed=1)
    objective, _ = quadratic_objective(pb, seed=1)
    _, free = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=0.05, progress=False)
    assert free["capped_options"] == []
    over = [k for k, n in free["subsets"].items() if n > 3]
    assert over  # the rule alone asks for more than 3 passes somewhere
    C, capped = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=0.05, max_subsets=3, progress=False)
    assert max(capped["subsets"].values()) == 3
    assert sorted(capped["capped_options"]) == sorted(over)
    assert capped["passes"] == sum(min(n, 3) for n in free["subsets"].values())
    assert np.isfinite(C).all() and (C >= 0).all()
    with pytest.raises(ValueError, match="max_subsets"):
        kl_sensitivities(pb, objective, max_subsets=0, progress=False)


def test_monotone_costs_and_subset_counts():
    pb = problem(n=3)
    raw = np.array([[0.5, 0.9, 0.2, 0.1, 0.0, -0.1, 0.0]] * 3)
    out = monotone_costs(raw, pb)
    assert (out >= 0).all()
    assert all((np.diff(row) <= 0).all() for row in out)  # options ordered 2..8 bits
    assert out[0, 0] == 0.9 and out[0, 1] == 0.9 and out[0, 2] == 0.2
    np.testing.assert_array_equal(subset_counts(np.array([0.0, 0.3, 2.0, 1e9]), 0.25, 10), [1, 2, 8, 10])


def test_bad_arguments_are_rejected():
    pb = problem(n=2)
    with pytest.raises(ValueError, match="n_batches"):
        kl_sensitivities(pb, lambda P, s: P.sum(), n_batches=0, progress=False)
    with pytest.raises(ValueError, match="max_pass_loss"):
        kl_sensitivities(pb, lambda P, s: P.sum(), max_pass_loss=0.0, progress=False)
    with pytest.raises(ValueError, match="sensitivities shape"):
        lo, hi = pb.feasible_range()
        rco_allocate(pb, (lo + hi) / 2, lambda P, s: P.sum(), sensitivities=np.zeros((1, 1)),
                     config=RCOConfig(steps=1, progress=False))


@pytest.mark.parametrize("seed", range(3))
def test_rco_with_sensitivities_never_loses_to_their_dp(seed):
    pb = problem(n=16, seed=seed)
    objective, own = quadratic_objective(pb, seed=seed, coupling=0.3)
    C, _ = kl_sensitivities(pb, objective, n_batches=1, progress=False)
    lo, hi = pb.feasible_range()
    B = lo + 0.4 * (hi - lo)

    def loss(ch):
        return float(objective(pb.one_hot(ch, dtype=torch.float64), 0))

    r = rco_allocate(pb, B, objective, sensitivities=C, config=RCOConfig(steps=20, progress=False, seed=seed),
                     select=loss)
    assert "sensitivity" in r.extra["rounding_scores"]
    assert pb.bits_of(r.choice) <= pb.budget_bits(B)
    dp = solve_budget(pb, C, B).choice
    assert loss(r.choice) <= loss(dp) + 1e-12


def test_curvature_correction_keeps_hard_losses_and_gives_untaken_options_their_cost():
    pb = problem(n=10, seed=4)
    objective, own = quadratic_objective(pb, seed=4)  # block-diagonal: C is exact
    C, _ = kl_sensitivities(pb, objective, n_batches=1, max_pass_loss=1e9, progress=False)
    corrected = curvature_corrected(objective, C, pb.available)
    choice = np.full(pb.n_groups, 3)
    P = pb.one_hot(choice, dtype=torch.float64)
    assert float(corrected(P, 0)) == pytest.approx(float(objective(P, 0)), rel=1e-12)
    P.requires_grad_(True)
    objective(P, 0).backward()
    raw = P.grad.clone()
    P.grad = None
    corrected(P, 0).backward()
    fixed = P.grad
    untaken = np.ones_like(C, dtype=bool)
    untaken[np.arange(pb.n_groups), choice] = False
    # straight-through slope of an untaken option is ~0 (uncorrelated errors), corrected ~C
    assert raw[torch.as_tensor(untaken)].abs().sum() < 0.5 * C[untaken].sum()
    np.testing.assert_allclose(fixed.numpy()[untaken], raw.numpy()[untaken] + C[untaken], rtol=1e-9)
    # taken option: its own term 2 * own, minus C
    taken = ~untaken
    np.testing.assert_allclose(raw.numpy()[taken], 2 * own[taken], rtol=1e-6)
    np.testing.assert_allclose(fixed.numpy()[taken], 2 * own[taken] - C[taken], rtol=1e-6)
