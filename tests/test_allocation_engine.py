"""The one allocation engine (vllm_slq.allocation.engine) on quadratic objectives whose
per-group costs are known, and the budget bisection it shares with the benchmarks."""
import inspect

import numpy as np
import pytest
import torch

from vllm_slq.allocation.dp import solve_budget
from vllm_slq.allocation.engine import SLQ_GPTQ, AllocationEngine, bisect_budget, golden_section_max
from vllm_slq.allocation.rco import RCOConfig
from vllm_slq.modifiers.slq import SLQModifier
from vllm_slq.quant.gptq import gptq_quantize_many

from test_allocation_sensitivity import problem, quadratic_objective

torch.set_num_threads(1)


class Objective:
    """objective(P, step) plus evaluate(choice), counting forward passes."""

    def __init__(self, pb, seed=0):
        self.pb = pb
        self.fn, self.own = quadratic_objective(pb, seed=seed)
        self.calls = 0

    def __call__(self, P, step=0):
        self.calls += 1
        return self.fn(P, step)

    def evaluate(self, choice, *_):
        P = torch.zeros(self.pb.n_groups, self.pb.n_options, dtype=torch.float64)
        P[torch.arange(self.pb.n_groups), torch.as_tensor(np.asarray(choice))] = 1.0
        return float(self.fn(P, 0))


def test_bisect_budget_brackets_the_threshold():
    seen = []

    def probe(b):
        seen.append(b)
        return b >= 4.3

    lo, hi, probes = bisect_budget(2.0, 8.0, probe, steps=20, tolerance=0.01)
    assert lo < 4.3 <= hi and hi - lo <= 0.01
    assert [p["budget"] for p in probes] == seen and all(p["accepted"] == (p["budget"] >= 4.3) for p in probes)
    # the step limit and the tolerance both stop it
    assert len(bisect_budget(2.0, 8.0, probe, steps=3, tolerance=0.01)[2]) == 3
    assert bisect_budget(4.0, 4.04, probe, steps=10, tolerance=0.05)[2] == []


def test_allocate_meets_the_budget_and_beats_uniform_and_measures_sensitivities_once():
    pb = problem(n=12, seed=1)
    obj = Objective(pb, seed=1)
    engine = AllocationEngine(pb, obj, rco=RCOConfig(steps=20, samples=2, seed=0), sensitivity_batches=1,
                              sensitivity_kw={"progress": False})
    r1 = engine.allocate(4.0)
    calls = obj.calls
    assert engine.sensitivity_info is not None and engine.sensitivity_info["passes"] >= 1
    r2 = engine.allocate(5.0)
    assert r1.bpp <= 4.0 + 1e-9 and r2.bpp <= 5.0 + 1e-9
    # the second allocation reuses the sensitivities: only RCO's own passes were added
    assert obj.calls - calls <= 20 * 2 + 1
    assert [e["budget"] for e in engine.log] == [4.0, 5.0]
    assert engine.log[0]["calib_kl"] == pytest.approx(obj.evaluate(r1.choice))
    # never worse than the additive model's exact-budget optimum on the true per-group costs,
    # up to the coupling the quadratic has not got (block-diagonal: additive is exact)
    best = solve_budget(pb, obj.own, 4.0).choice
    assert engine.log[0]["calib_kl"] <= obj.evaluate(best) * (1 + 1e-9)


def test_search_returns_the_fewest_accepted_bits():
    pb = problem(n=10, seed=2)
    engine = AllocationEngine(pb, Objective(pb, seed=2), rco=RCOConfig(steps=8, samples=1),
                              sensitivity_batches=1, sensitivity_kw={"progress": False})
    lo, hi = pb.feasible_range()

    def accept(choice):  # accepts 5 bits and up: monotone in the budget
        bpp = pb.achieved_bpp(choice)
        return bpp >= 5.0, {"probe_bpp": bpp}

    res, ok = engine.search(accept, lo, hi, steps=8, tolerance=0.02)
    assert ok and 5.0 <= res.bpp <= 5.1
    assert engine.log[0]["budget"] == hi and all("accepted" in e and "probe_bpp" in e for e in engine.log)
    # a target even the richest allocation misses: that allocation, flagged
    res, ok = engine.search(lambda ch: (False, {}), lo, hi, steps=8, tolerance=0.02)
    assert not ok and res.bpp == pytest.approx(hi, abs=1e-6)


def test_golden_section_finds_the_peak_of_a_unimodal_score():
    f = lambda b: -(b - 4.6) ** 2  # noqa: E731
    best, probes = golden_section_max(2.5, 8.5, f, steps=12)
    assert len(probes) == 12 and abs(best - 4.6) < 6 * 0.618 ** 10
    assert best == max(probes, key=lambda p: p["score"])["budget"]
    # a peak at the range's end: the probes walk towards it
    best, _ = golden_section_max(2.5, 8.5, lambda b: b, steps=8)
    assert best > 8.0
    with pytest.raises(ValueError, match="at least 2"):
        golden_section_max(2.5, 8.5, f, steps=1)


def test_maximize_returns_the_best_scored_allocation_and_marks_it():
    pb = problem(n=10, seed=3)
    engine = AllocationEngine(pb, Objective(pb, seed=3), rco=RCOConfig(steps=4, samples=1),
                              sensitivity_batches=1, sensitivity_kw={"progress": False})
    lo, hi = pb.feasible_range()

    def score(choice):  # peaks at 5 bpp
        bpp = pb.achieved_bpp(choice)
        return -abs(bpp - 5.0), {"probe_bpp": bpp}

    res = engine.maximize(score, lo, hi, steps=6)
    assert len(engine.log) == 6 and all("score" in e and "probe_bpp" in e for e in engine.log)
    best = [e for e in engine.log if e.get("best")]
    assert len(best) == 1 and best[0]["score"] == max(e["score"] for e in engine.log)
    assert res.bpp == pytest.approx(best[0]["bpp"]) and abs(res.bpp - 5.0) < 0.6


def test_start_from_errors_needs_them():
    pb = problem(n=6)
    with pytest.raises(ValueError, match="init_errors"):
        AllocationEngine(pb, Objective(pb), sensitivity_batches=0)
    obj = Objective(pb)
    engine = AllocationEngine(pb, obj, rco=RCOConfig(steps=4, samples=1), sensitivity_batches=0,
                              init_errors=obj.own)
    assert engine.allocate(4.0).bpp <= 4.0 + 1e-9 and engine.sensitivities() is None


def test_modifier_and_benchmarks_share_one_database_configuration():
    m = SLQModifier(target_bpp=4.0)
    assert m.dampening_frac == SLQ_GPTQ["percdamp"] and m.act_order == SLQ_GPTQ["act_order"]
    assert tuple(m.shrink_grid) == tuple(SLQ_GPTQ["shrink_grid"])
    # every key is an option of the GPTQ that builds the database
    assert set(SLQ_GPTQ) <= set(inspect.signature(gptq_quantize_many).parameters)
