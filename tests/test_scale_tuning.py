"""Tuning the chosen group scales on the model's KL, codes fixed (allocation/scale_tuning.py)."""
import copy

import numpy as np
import pytest
import torch

from vllm_slq.allocation.objective import ModelKLObjective, build_candidates
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.allocation.scale_tuning import ScaledLinear, fold_norm_scales, tunable_norms, tune_scales, width_lr
from vllm_slq.allocation.store import StoredCandidate
from vllm_slq.quant.grid import rtn
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec
from vllm_slq.testing import tiny_llama

torch.set_num_threads(1)
OPTS = [QuantSpec(b, 32, False) for b in (2, 3, 4)]


@pytest.mark.parametrize("spec", [QuantSpec(3, 16, False), QuantSpec(4, 16, True), QuantSpec(2, None, False)])
def test_scaled_linear_matches_autograd_through_the_dense_weight(spec):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 48, generator=g)
    qw = rtn(W, spec, scale_dtype=torch.float16)
    c = StoredCandidate.from_quantized(qw, "cpu")
    groups = qw.scale.shape[1]
    d = (0.1 * torch.randn(24, groups, generator=g)).requires_grad_()
    x = torch.randn(5, 7, 48, generator=g, requires_grad=True)
    bias = torch.randn(24, generator=g)
    y = ScaledLinear.apply(x, d, bias, c)
    gy = torch.randn(y.shape, generator=g)
    gx, gd = torch.autograd.grad(y, (x, d), gy)
    # the same function written densely, differentiated by autograd
    d2, x2 = d.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    grp = spec.effective_group(48)
    integers = qw.codes.float().reshape(24, -1, grp) - (0 if qw.zero_point is None else qw.zero_point.float().unsqueeze(-1))
    dense = (integers * (qw.scale.float() * torch.exp(d2)).unsqueeze(-1)).reshape(24, 48)
    y2 = torch.nn.functional.linear(x2, dense, bias)
    gx2, gd2 = torch.autograd.grad(y2, (x2, d2), gy)
    assert torch.allclose(y, y2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx2, rtol=1e-4, atol=1e-5)
    assert torch.allclose(gd, gd2, rtol=1e-4, atol=1e-4)
    # d = 0 is the candidate itself
    zero = ScaledLinear.apply(x.detach(), torch.zeros_like(d), None, c)
    assert torch.equal(zero, torch.nn.functional.linear(x.detach(), qw.dequantize(torch.float32)))


def _setup(seed=0, n_blocks=6):
    model = tiny_llama(seed=seed)
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (n_blocks, 32), generator=torch.Generator().manual_seed(seed))
    db = build_candidates(model, pb, method="rtn", progress=False)
    obj = ModelKLObjective(model, pb, db, tokens, batch_blocks=2)
    return model, pb, db, tokens, obj


def test_tuning_lowers_the_held_back_kl_and_returns_the_scales_it_measured():
    model, pb, db, tokens, obj = _setup()
    choice = np.zeros(pb.n_groups, dtype=int)  # every layer 2-bit: RTN's min/max scales are far off
    res = tune_scales(obj, choice, train_blocks=4, steps=12, lr=2e-2, check_every=3)
    assert res.heldout_kl_best < 0.97 * res.heldout_kl_start, res.summary()  # measured 0.94
    assert res.best_step > 0 and [e["step"] for e in res.log] == [0, 3, 6, 9, 12]
    assert res.heldout_kl_best == min(e["heldout_kl"] for e in res.log)
    tuned = {}
    for name, entries in db.items():
        qw = entries[OPTS[0]]
        scale = res.scales[name]
        assert scale.dtype == qw.scale.dtype and scale.shape == qw.scale.shape
        assert not torch.equal(scale, qw.scale)
        tuned[name] = {OPTS[0]: QuantizedWeight(qw.codes, scale, qw.zero_point, qw.spec)}
    # the returned scales, written as a database of their own, score the best held-back KL
    # (up to their rounding to the stored fp16)
    pb1 = AllocationProblem(group_linears(linear_shapes(model)), OPTS[:1])
    check = ModelKLObjective(model, pb1, tuned, tokens[4:])
    assert check.evaluate(np.zeros(pb1.n_groups, dtype=int)) == pytest.approx(res.heldout_kl_best, rel=2e-3)


def test_no_step_that_helps_keeps_the_stored_scales():
    _, pb, db, _, obj = _setup(seed=1)
    choice = np.full(pb.n_groups, 2)
    res = tune_scales(obj, choice, train_blocks=4, steps=2, lr=0.0, check_every=1)
    assert res.best_step == 0 and res.heldout_kl_best == res.heldout_kl_start
    for name, entries in db.items():
        assert torch.equal(res.scales[name], entries[OPTS[2]].scale)


def test_each_width_steps_at_its_own_rate():
    """Adam's first step moves every log-scale by its group's rate. With reference_bits=2 a 4-bit
    group's rate is lr * 3 / 15, so both widths' extreme codes move by the same share of a grid step."""
    _, pb, db, _, obj = _setup()
    choice = np.where(np.arange(pb.n_groups) % 2 == 0, 0, 2)  # 2-bit and 4-bit layers
    lr = 1e-2
    res = tune_scales(obj, choice, train_blocks=4, steps=1, lr=lr, check_every=1, reference_bits=2)
    assert res.lr_by_bits == {2: pytest.approx(lr), 4: pytest.approx(lr / 5)}
    assert res.best_step == 1, res.summary()  # RTN's min/max scales: the first step helps
    for i, g in enumerate(pb.groups):
        bits = OPTS[choice[i]].bits
        for m in g.modules:
            moved = torch.log(res.scales[m.name].float() / db[m.name][OPTS[choice[i]]].scale.float()).abs()
            # |d| = rate where the gradient is not ~0, up to the stored fp16's rounding (2^-11 relative)
            assert moved.median() == pytest.approx(res.lr_by_bits[bits], abs=1e-3), (m.name, bits)
    one = tune_scales(obj, choice, train_blocks=4, steps=1, lr=lr, check_every=1, reference_bits=None)
    assert one.lr_by_bits == {2: lr, 4: lr}
    # reference 4: 4-bit groups and narrower at lr, wider ones slower
    assert [width_lr(lr, b, 4) for b in (2, 3, 4)] == [lr, lr, lr]
    assert width_lr(lr, 8, 4) == pytest.approx(lr * 15 / 255)
    assert width_lr(lr, 2, 4, slow_only=False) == pytest.approx(5 * lr)
    # the default, 3: 4-bit groups at 7/15 of lr
    default = tune_scales(obj, choice, train_blocks=4, steps=1, lr=lr, check_every=1)
    assert default.lr_by_bits == {2: lr, 4: pytest.approx(lr * 7 / 15)}


def test_bad_arguments_name_what_is_wrong():
    _, pb, _, _, obj = _setup()
    choice = np.zeros(pb.n_groups, dtype=int)
    with pytest.raises(ValueError, match="train_blocks=6"):
        tune_scales(obj, choice, train_blocks=6, steps=1)
    with pytest.raises(ValueError, match="steps=0"):
        tune_scales(obj, choice, train_blocks=4, steps=0)
    with pytest.raises(ValueError, match="reference_bits=0"):
        tune_scales(obj, choice, train_blocks=4, steps=1, reference_bits=0)


class _OnePlusNorm(torch.nn.Module):
    """Gemma's RMSNorm form, x_hat * (1 + w): its output is not proportional to w."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_norms_fold_exactly_only_where_the_output_is_proportional_to_the_weight():
    model = tiny_llama(seed=0)
    norms, excluded = tunable_norms(model)
    expected = {n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"}
    assert set(norms) == expected and len(expected) == 2 * model.config.num_hidden_layers + 1 and not excluded
    ln = torch.nn.LayerNorm(16)  # weight and bias both scale
    assert tunable_norms(torch.nn.Sequential(ln, _OnePlusNorm(16))) == (
        {"0": ln}, {"1": "output not proportional to its weight"})


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_tuned_norms_fold_into_the_model_that_scores_the_best_held_back_kl(checkpoint_blocks):
    model = tiny_llama(seed=0)
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))
    db = build_candidates(model, pb, method="rtn", progress=False)
    obj = ModelKLObjective(model, pb, db, tokens, batch_blocks=2, checkpoint_blocks=checkpoint_blocks)
    choice = np.zeros(pb.n_groups, dtype=int)
    scales_only = tune_scales(obj, choice, train_blocks=4, steps=12, lr=2e-2, check_every=3)
    res = tune_scales(obj, choice, train_blocks=4, steps=12, lr=2e-2, check_every=3, norms=True, norm_lr=2e-2)
    assert res.norm_lr == 2e-2 and set(res.norm_scales) == set(tunable_norms(model)[0])
    assert all(not torch.equal(r, torch.ones_like(r)) for r in res.norm_scales.values())  # every norm got a gradient
    assert res.best_step > 0 and res.heldout_kl_best < scales_only.heldout_kl_best, (res.summary(), scales_only.summary())
    assert res.summary()["norms"] == len(res.norm_scales)
    # the tuned scales as a database of their own, the norms folded into a copy of the model:
    # no hook, the held-back KL the tuning measured (up to the scales' rounding to fp16)
    tuned = {name: {OPTS[0]: QuantizedWeight(e[OPTS[0]].codes, res.scales[name], e[OPTS[0]].zero_point, OPTS[0])}
             for name, e in db.items()}
    folded = copy.deepcopy(model)
    fold_norm_scales(folded, res.norm_scales)
    pb1 = AllocationProblem(group_linears(linear_shapes(model)), OPTS[:1])
    check = ModelKLObjective(folded, pb1, tuned, tokens[4:])
    assert check.head is not None  # the reference is kept as hidden states: the FP model's replace it
    check._ref_hidden = ModelKLObjective(model, pb1, tuned, tokens[4:])._ref_hidden
    assert check.evaluate(np.zeros(pb1.n_groups, dtype=int)) == pytest.approx(res.heldout_kl_best, rel=2e-3)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        fold_norm_scales(folded, {"nope": torch.ones(3)})
