"""Pure-math tests of vllm_slq.eval.metrics (fast, no models)."""
import math

import numpy as np
import pytest
import torch

from vllm_slq.eval.metrics import (
    DenseLogits, HiddenStateLogits, MetricsError, PositionMetrics, bootstrap_mean_ci, paired_bootstrap_ci,
    position_metrics, summarize, topk_ear_bounds,
)


def _rand_logits(T, V, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, V, generator=g) * scale


def test_identical_models_ear_exactly_one():
    x = _rand_logits(17, 1000, 0)
    m = position_metrics(x, x.clone(), targets=torch.arange(17), vocab_chunk=128)
    assert torch.all(m.ear == 1.0)
    assert torch.all(m.kl == 0.0)
    assert bool(m.top1.all())
    s = summarize([m])
    assert s["ear"] == 1.0 and s["ear_pow100"] == 1.0 and s["kl"] == 0.0 and s["top1"] == 1.0
    assert s["ppl_ref"] == s["ppl_cand"]


def test_ear_equals_one_minus_tv_hand_computed():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5], [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]], dtype=torch.float64)
    # sum of min: 0.2+0.3+0.2 = 0.7 ; 0.1+0.1+0.1 = 0.3 ; 1/3
    expected = [0.7, 0.3, 1 / 3]
    q_logits = torch.log(q.clamp_min(1e-30))
    m = position_metrics(torch.log(p).float(), q_logits.float(), vocab_chunk=2)
    assert np.allclose(m.ear.numpy(), expected, atol=1e-6)
    # KL of the first row by hand
    kl0 = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q[0].tolist()))
    assert m.kl[0].item() == pytest.approx(kl0, rel=1e-5)
    # argmax: row 0 p->0, q->2 ; row 1 p->2, q->0 ; row 2 p->0 (first of ties), q->0
    assert m.top1.tolist() == [False, False, True]


def test_pinsker_on_random_pairs():
    for seed in range(5):
        x = _rand_logits(64, 300, seed)
        y = x + _rand_logits(64, 300, 100 + seed, scale=0.3 * (seed + 1))
        m = position_metrics(x, y, vocab_chunk=77)
        # per position: TV <= sqrt(KL/2)
        assert torch.all(1 - m.ear <= torch.sqrt(m.kl / 2) + 1e-6)
        s = summarize([m])
        assert s["ear"] >= s["pinsker_ear_lower_bound"] - 1e-9


def test_chunked_equals_unchunked_and_float64_reference():
    x = _rand_logits(33, 1001, 1)
    y = x + _rand_logits(33, 1001, 2, scale=0.5)
    t = torch.randint(0, 1001, (33,), generator=torch.Generator().manual_seed(3))
    full = position_metrics(x, y, targets=t, vocab_chunk=4096)
    for chunk in (13, 128, 1000):
        c = position_metrics(x, y, targets=t, vocab_chunk=chunk)
        assert torch.allclose(c.ear, full.ear, atol=1e-6)
        assert torch.allclose(c.kl, full.kl, atol=1e-6, rtol=1e-5)
        assert torch.equal(c.top1, full.top1)
        assert torch.allclose(c.nll_ref, full.nll_ref, atol=1e-5)
        assert torch.allclose(c.nll_cand, full.nll_cand, atol=1e-5)
    # against a direct float64 computation
    p, q = torch.softmax(x.double(), -1), torch.softmax(y.double(), -1)
    assert torch.allclose(full.ear, torch.minimum(p, q).sum(-1), atol=1e-6)
    assert torch.allclose(full.kl, (p * (p.log() - q.log())).sum(-1), atol=1e-6, rtol=1e-5)
    assert torch.allclose(full.nll_cand, -q.log()[torch.arange(33), t], atol=1e-5)


def test_hidden_state_source_matches_dense_logits():
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(9, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    src = HiddenStateLogits(h, w, bias=b, softcap=5.0)
    dense = torch.tanh((h @ w.T + b) / 5.0) * 5.0
    assert torch.allclose(torch.cat([src.chunk(0, 20), src.chunk(20, 50)], 1), dense, atol=1e-5)
    y = dense + 0.1
    a = position_metrics(src, y, vocab_chunk=13)
    bm = position_metrics(dense, y, vocab_chunk=50)
    assert torch.allclose(a.ear, bm.ear, atol=1e-6)


def test_topk_bounds_bracket_exact_and_full_k_is_exact():
    x = _rand_logits(40, 500, 4)
    y = x + _rand_logits(40, 500, 5, scale=0.7)
    exact = position_metrics(x, y, vocab_chunk=100)
    logq = torch.log_softmax(y, -1)
    prev_lower = None
    for k in (1, 5, 20, 100, 500):
        vals, ids = logq.topk(k, dim=-1)
        b = topk_ear_bounds(x, ids, vals, vocab_chunk=64)
        assert torch.all(b.ear <= exact.ear + 1e-6)
        assert torch.all(b.ear_upper >= exact.ear - 1e-6)
        if prev_lower is not None:  # more listed tokens never loosen the bound
            assert torch.all(b.ear >= prev_lower - 1e-6)
        prev_lower = b.ear
        assert torch.equal(b.top1, exact.top1)
    assert torch.allclose(b.ear, exact.ear, atol=1e-5)
    assert torch.allclose(b.ear_upper, exact.ear, atol=1e-5)


def test_topk_duplicates_and_padding_counted_once():
    x = _rand_logits(3, 10, 6)
    logq = torch.log_softmax(_rand_logits(3, 10, 7), -1)
    vals, ids = logq.topk(3, dim=-1)
    dup_ids = torch.cat([ids, ids[:, :1], torch.full((3, 2), -1)], 1)
    dup_vals = torch.cat([vals, vals[:, :1], torch.zeros(3, 2)], 1)
    a = topk_ear_bounds(x, ids, vals)
    b = topk_ear_bounds(x, dup_ids, dup_vals)
    assert torch.allclose(a.ear, b.ear) and torch.allclose(a.ear_upper, b.ear_upper)


def test_bootstrap_ci_contains_mean_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    seqs = [PositionMetrics(ear=torch.rand(50, generator=g, dtype=torch.float64) * 0.2 + 0.7,
                            kl=None, top1=None) for _ in range(12)]
    s = summarize(seqs, seed=1)
    lo, hi = s["ear_ci95"]
    assert lo < s["ear"] < hi
    assert summarize(seqs, seed=1)["ear_ci95"] == s["ear_ci95"]
    assert bootstrap_mean_ci([m.ear for m in seqs], seed=2) != (lo, hi)


def test_paired_ratio_ci_separates_a_consistent_small_gain_that_an_unpaired_view_cannot():
    # passages vary 10x in difficulty; candidate a is 5% below b on every one of them
    rng = torch.Generator().manual_seed(3)
    b = (torch.rand(16, generator=rng, dtype=torch.float64) * 9 + 1).tolist()
    a = [0.95 * v for v in b]
    ratio, lo, hi = paired_bootstrap_ci(a, b, seed=0)
    assert ratio == pytest.approx(0.95)
    assert lo == pytest.approx(0.95) and hi == pytest.approx(0.95)
    # unpaired, the two means' intervals overlap almost entirely
    a_lo, a_hi = bootstrap_mean_ci([torch.tensor([v]) for v in a])
    b_lo, b_hi = bootstrap_mean_ci([torch.tensor([v]) for v in b])
    assert a_hi > b_lo
    # noise around a ratio of 1: the interval straddles it
    noisy = [v * (1 + 0.2 * (2 * (i % 2) - 1)) for i, v in enumerate(b)]
    _, lo, hi = paired_bootstrap_ci(noisy, b, seed=0)
    assert lo < 1 < hi
    assert paired_bootstrap_ci(noisy, b, seed=0) == paired_bootstrap_ci(noisy, b, seed=0)
    # difference of position-weighted means: a is 0.02 above b at every position
    counts = [10 + i for i in range(16)]
    b_sum = [0.7 * n for n in counts]
    a_sum = [0.72 * n for n in counts]
    d, lo, hi = paired_bootstrap_ci(a_sum, b_sum, counts, kind="difference")
    assert d == pytest.approx(0.02) and lo == pytest.approx(0.02) and hi == pytest.approx(0.02)
    with pytest.raises(MetricsError, match="different shapes"):
        paired_bootstrap_ci(a[:3], b)
    with pytest.raises(MetricsError, match="zero denominator"):
        paired_bootstrap_ci([1.0], [0.0])
    with pytest.raises(MetricsError, match="kind must be"):
        paired_bootstrap_ci(a, b, kind="mean")


def test_summarize_keeps_per_sequence_sums_for_paired_comparisons():
    g = torch.Generator().manual_seed(1)
    seqs = [PositionMetrics(ear=torch.rand(n, generator=g, dtype=torch.float64),
                            kl=torch.rand(n, generator=g, dtype=torch.float64), top1=None) for n in (5, 7, 9)]
    s = summarize(seqs, n_boot=10)
    ps = s["per_sequence"]
    assert ps["n_positions"] == [5, 7, 9]
    assert sum(ps["ear_sum"]) / sum(ps["n_positions"]) == pytest.approx(s["ear"])
    assert sum(ps["kl_sum"]) / sum(ps["n_positions"]) == pytest.approx(s["kl"])


def test_bad_inputs():
    with pytest.raises(MetricsError, match="vocabulary sizes"):
        position_metrics(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(MetricsError, match="position counts"):
        position_metrics(torch.zeros(2, 5), torch.zeros(3, 5))
    with pytest.raises(MetricsError, match="target ids"):
        position_metrics(torch.zeros(2, 5), torch.zeros(2, 5), targets=torch.tensor([0, 9]))
    with pytest.raises(MetricsError, match="no positions"):
        summarize([])
    with pytest.raises(MetricsError):
        DenseLogits(torch.zeros(5))
