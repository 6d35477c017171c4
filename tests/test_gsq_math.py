"""Pure-math tests for vllm_slq.quant.gsq (no llmcompressor, no model)."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_slq.quant.gsq import GSQConfig, GSQWeight, refine, sample_noise, scale_lr_factor, soft_weight_reference
from vllm_slq.quant.lion import Lion, cosine_lr, linear_schedule
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec, QuantSpecError


def sym_rtn(w: torch.Tensor, bits: int, group: int, ternary: bool = False) -> QuantizedWeight:
    """Minimal symmetric RTN for the tests (independent of grid.py)."""
    spec = QuantSpec(bits, group, symmetric=True)
    n, k = w.shape
    wg = w.view(n, k // group, group)
    qmax = 1 if ternary else spec.qmax
    qmin = -1 if ternary else spec.qmin
    scale = (wg.abs().amax(-1) / max(qmax, 1)).clamp_min(1e-8)
    if ternary:
        scale = wg.abs().mean(-1).clamp_min(1e-8) * 1.2
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), qmin, qmax).to(torch.int8).view(n, k)
    return QuantizedWeight(codes, scale, None, spec)


MODES = [(2, False), (3, False), (4, False), (2, True)]


def _weight(mode, n=6, k=16, group=8, seed=0, chunk_elems=1 << 21):
    bits, ternary = mode
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    init = sym_rtn(w, bits, group, ternary)
    gw = GSQWeight(init, ternary=ternary, seed=seed, chunk_elems=chunk_elems, fp_weight=w)
    return w, init, gw


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "ternary" if m[1] else f"{m[0]}bit")
@pytest.mark.parametrize("chunk_elems", [1 << 21, 40])  # one chunk / many row chunks
def test_custom_backward_matches_autograd(mode, chunk_elems):
    _, _, gw = _weight(mode, chunk_elems=chunk_elems)
    # wider logits than the init so the softmax is not saturated everywhere
    with torch.no_grad():
        gw.logits.add_(0.02 * torch.randn(gw.logits.shape, generator=torch.Generator().manual_seed(5)))
    tau, kappa, seed = 0.7, 150.0, 1234
    grad_out = torch.randn(gw.q0.shape, generator=torch.Generator().manual_seed(9))

    soft = gw.soft_weight(tau, kappa, seed)
    (soft * grad_out).sum().backward()
    g_logits, g_scale = gw.logits.grad.clone(), gw.scale.grad.clone()
    gw.logits.grad = None
    gw.scale.grad = None

    ref = soft_weight_reference(gw, tau, kappa, seed)
    torch.testing.assert_close(soft, ref.detach(), rtol=1e-5, atol=1e-6)
    (ref * grad_out).sum().backward()
    # fp32 on both sides; the kappa/tau factor (~200) amplifies rounding, so compare
    # relative to the gradient's magnitude (exactness is checked in float64 below)
    torch.testing.assert_close(g_logits, gw.logits.grad, rtol=1e-4, atol=1e-5 * g_logits.abs().max().item())
    torch.testing.assert_close(g_scale, gw.scale.grad, rtol=1e-4, atol=1e-5 * g_scale.abs().max().item())
    assert g_logits.abs().sum() > 0 and g_scale.abs().sum() > 0


def test_custom_backward_float64_gradcheck():
    """Finite-difference check of the hand-written backward (2-bit and ternary)."""
    for mode in [(2, False), (3, False), (2, True)]:
        _, _, gw = _weight(mode, n=3, k=8, group=4)
        logits = (gw.logits.detach().double() * 3).requires_grad_(True)
        scale = gw.scale.detach().double().requires_grad_(True)
        if mode[1]:
            from vllm_slq.quant.gsq import TernarySoftWeight

            fn = lambda lg, sc: TernarySoftWeight.apply(lg, sc, 0.9, 100.0, 7, 1 << 21, torch.float64)
        else:
            from vllm_slq.quant.gsq import GumbelSoftWeight

            fn = lambda lg, sc: GumbelSoftWeight.apply(lg, sc, gw.base, gw.offsets.double(), 0.9, 100.0, 7,
                                                       gw.spec.qmin, gw.spec.qmax, 1 << 21, torch.float64)
        assert torch.autograd.gradcheck(fn, (logits, scale), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_noise_is_replayed_exactly_and_depends_on_seed():
    a = sample_noise((5, 7, 4), seed=3, chunk_elems=30)
    b = sample_noise((5, 7, 4), seed=3, chunk_elems=30)
    c = sample_noise((5, 7, 4), seed=4, chunk_elems=30)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Gumbel(0,1) has mean ~0.5772
    big = sample_noise((64, 64, 4), seed=0, chunk_elems=1 << 21)
    assert abs(big.mean().item() - 0.5772) < 0.03


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "ternary" if m[1] else f"{m[0]}bit")
def test_low_temperature_soft_weight_converges_to_hard(mode):
    _, _, gw = _weight(mode, n=16, k=32, group=8)
    with torch.no_grad():  # a decisive assignment, like one after training
        gw.logits.mul_(5)
    hard = gw.hard_weight()
    # at a fixed large logit scale, lowering tau sharpens the sample onto the argmax
    errs = []
    for tau in [1e4, 500.0, 100.0, 10.0, 1e-2]:
        soft = gw.soft_weight(tau, 1e5, seed=11).detach()
        errs.append((soft - hard).abs().mean().item())
    assert errs[0] > 1e-3, errs
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-6, errs
    # the paper's end point (tau 0.05, kappa 500) is already close to hard on average
    end = (gw.soft_weight(0.05, 500.0, seed=3).detach() - hard).abs().mean().item()
    start = (gw.soft_weight(2.0, 100.0, seed=3).detach() - hard).abs().mean().item()
    assert end < 0.2 * start, (start, end)


@pytest.mark.parametrize("mode", MODES + [(8, False)], ids=lambda m: "ternary" if m[1] else f"{m[0]}bit")
def test_codes_stay_inside_grid(mode):
    bits, ternary = mode
    _, init, gw = _weight(mode, n=32, k=64, group=16, seed=2)
    spec = init.spec
    for trial in range(4):
        with torch.no_grad():  # arbitrary logits, including ones favouring off-grid candidates
            gw.logits.copy_(torch.randn(gw.logits.shape, generator=torch.Generator().manual_seed(trial)) * 10)
        codes = gw.hard_codes()
        assert codes.dtype == torch.int8
        if ternary:
            assert set(codes.unique().tolist()) <= {-1, 0, 1}
        else:
            assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
            if bits >= 3:  # 5 candidates around the GPTQ code
                assert (codes.int() - gw.q0.int()).abs().max() <= 2
        # soft weights stay inside the grid's range too
        soft = gw.soft_weight(0.5, 200.0, seed=trial).detach()
        lo = (-1 if ternary else spec.qmin) * gw.scale.detach().repeat_interleave(16, 1)
        hi = (1 if ternary else spec.qmax) * gw.scale.detach().repeat_interleave(16, 1)
        assert torch.all(soft >= lo - 1e-6) and torch.all(soft <= hi + 1e-6)
    qw = gw.to_quantized()
    assert qw.zero_point is None and qw.spec == spec and qw.meta["method"] == "gsq"


def test_edge_codes_mask_off_grid_candidates():
    spec = QuantSpec(3, 4, symmetric=True)
    codes = torch.tensor([[-4, -3, 3, 0]], dtype=torch.int8)
    gw = GSQWeight(QuantizedWeight(codes, torch.ones(1, 1), None, spec))
    valid = gw.valid_mask()[0]
    assert valid[0].tolist() == [False, False, True, True, True]  # -4: only -4..-2
    assert valid[2].tolist() == [True, True, True, False, False]  # 3: 1..3
    with torch.no_grad():
        gw.logits.zero_()
        gw.logits[0, 0, 0] = 100.0  # favour an off-grid candidate: must be ignored
    assert gw.hard_codes()[0, 0] != -6


def test_rejects_inconsistent_zero_points_and_bad_ternary_init():
    spec = QuantSpec(2, 4, symmetric=False)
    qw = QuantizedWeight(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), None, spec)
    with pytest.raises(QuantSpecError, match="model.layers.0.mlp.up_proj.*w2ag4 init lacks zero points"):
        GSQWeight(qw, name="model.layers.0.mlp.up_proj")
    qw = QuantizedWeight(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int8), spec)
    with pytest.raises(QuantSpecError, match="ternary GSQ is symmetric"):
        GSQWeight(qw, ternary=True, name="x")
    spec = QuantSpec(2, 4, symmetric=True)
    qw = QuantizedWeight(torch.full((2, 4), -2, dtype=torch.int8), torch.ones(2, 1), None, spec)
    with pytest.raises(QuantSpecError, match="ternary"):
        GSQWeight(qw, ternary=True, name="x")


def test_init_prior_prefers_gptq_code():
    # the paper's draw: a prior gap of 6 * 1/2 = 3 noise std between q0 and its neighbours,
    # so the argmax of the initial logits is q0 for ~97% of weights, a neighbour otherwise
    for bits in (2, 3):
        w = torch.randn(64, 64, generator=torch.Generator().manual_seed(bits))
        init = sym_rtn(w, bits, 16)
        gw = GSQWeight(init, seed=0, fp_weight=w, init_keeps_codes=False)
        same = (gw.hard_codes() == init.codes).float().mean().item()
        assert 0.93 < same < 1.0, same
        assert (gw.hard_codes().int() - init.codes.int()).abs().max() <= 1


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_init_keeps_every_gptq_code_with_the_same_noise_values(bits):
    """init_keeps_codes (the default): the argmax is q0 everywhere, and per weight the noise
    values are those of the paper's draw, two of them swapped where it had flipped the code."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(bits))
    init = sym_rtn(w, bits, 16)
    gw = GSQWeight(init, seed=0, fp_weight=w)
    assert torch.equal(gw.hard_codes(), init.codes)
    paper = GSQWeight(init, seed=0, fp_weight=w, init_keeps_codes=False)
    assert (paper.hard_codes() != init.codes).any()
    v = gw.base.float().unsqueeze(-1) + gw.offsets
    # swapped: where the paper's logits peak off q0, off-grid candidates at the edges included
    flipped = paper.logits.detach().argmax(-1) != (v == init.codes.float().unsqueeze(-1)).int().argmax(-1)
    prior = -0.5 * (init.codes.float().unsqueeze(-1) - v) ** 2
    prior = prior - prior.mean(-1, keepdim=True)
    std, strength = GSQConfig.init_std, GSQConfig.init_strength
    noise_keep = gw.logits.detach() / std - strength * prior
    noise_paper = paper.logits.detach() / std - strength * prior
    torch.testing.assert_close(noise_keep.sort(-1).values, noise_paper.sort(-1).values, atol=1e-4, rtol=0)
    torch.testing.assert_close(noise_keep[~flipped], noise_paper[~flipped], atol=1e-4, rtol=0)


def test_schedules():
    assert linear_schedule(2.0, 0.05, 0, 10) == 2.0
    assert math.isclose(linear_schedule(2.0, 0.05, 9, 10), 0.05)
    assert math.isclose(linear_schedule(100, 500, 5, 11), 300)
    assert cosine_lr(1.0, 0, 100) == 1.0
    assert math.isclose(cosine_lr(1.0, 99, 100), 0.1)
    assert 0.1 < cosine_lr(1.0, 50, 100) < 1.0


def test_lion_matches_formula():
    p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    m = torch.zeros(3)
    ref = p.detach().clone()
    for g in [torch.tensor([0.3, -0.1, 0.0]), torch.tensor([-1.0, 0.2, 2.0])]:
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), ref)


def _refine_on_one_linear(gw: dict, w: torch.Tensor, logit_lr: float = 2e-3):
    """GSQ for 12 epochs on one linear y = x w^T, loss = output MSE against the FP layer, on
    correlated inputs (so that roundings interact); no fallback to the init."""
    x = torch.randn(256, w.shape[1]) @ torch.randn(w.shape[1], w.shape[1]) * 0.3
    batches = [x[i:i + 32] for i in range(0, 256, 32)]
    target = {id(b): b @ w.T for b in batches}

    def loss_fn(weights, batch):
        return ((batch @ weights["w"].T - target[id(batch)]) ** 2).mean()

    cfg = GSQConfig(epochs=12, batch_size=2, logit_lr=logit_lr, scale_lr=1e-3)
    return refine(gw, batches, loss_fn, cfg, keep_init_if_worse=False)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "ternary" if m[1] else f"{m[0]}bit")
def test_refine_lowers_output_error_on_a_linear_layer(mode):
    """GSQ on a single linear (loss = output MSE) beats its RTN init."""
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    init = sym_rtn(w, mode[0], 16, mode[1])
    gw = {"w": GSQWeight(init, ternary=mode[1], fp_weight=w)}
    res = _refine_on_one_linear(gw, w)
    assert res.steps == 12 * 4 and len(res.losses) == res.steps
    assert res.final_hard_loss < 0.9 * res.init_hard_loss, (res.init_hard_loss, res.final_hard_loss)
    codes = gw["w"].hard_codes()
    assert int(codes.min()) >= init.spec.qmin and int(codes.max()) <= init.spec.qmax


@pytest.mark.parametrize("bits", [2, 3])
def test_saved_and_replayed_backward_agree(bits):
    """Keeping y*(d-e) from the forward and replaying the noise in the backward give the same gradients."""
    _, _, gw = _weight((bits, False), n=12, k=16, group=8, chunk_elems=100)  # several row chunks
    with torch.no_grad():  # spread the logits so the softmax is not saturated and edge codes appear
        gw.logits.add_(0.02 * torch.randn(gw.logits.shape, generator=torch.Generator().manual_seed(1)))
    grad_out = torch.randn(gw.q0.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for save_elems in (0, 1 << 20):
        gw.save_elems = save_elems
        soft = gw.soft_weight(0.8, 120.0, seed=5)
        (soft * grad_out).sum().backward()
        grads.append((soft.detach(), gw.logits.grad.clone(), gw.scale.grad.clone()))
        gw.logits.grad = None
        gw.scale.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * max(1.0, a.abs().max().item()))
    assert grads[0][1].abs().sum() > 0


def test_ternary_init_runs_the_gptq_loop_with_ternary_codes():
    """gptq_ternary is the one GPTQ column loop with codes clamped to {-1, 0, 1} and a diag-H
    ternary scale per group: its codes stay ternary, and its error feedback beats rounding
    each weight alone with the same scale rule (no feedback)."""
    from vllm_slq.quant.gptq import hessian_relative_error
    from vllm_slq.quant.gsq_ternary import gptq_ternary, ternary_qparams

    g = torch.Generator().manual_seed(0)
    n, k, group = 48, 192, 64
    W = torch.randn(n, k, generator=g)
    # correlated inputs, as a layer's are: error feedback has something to exploit
    X = torch.randn(384, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    H = 2 * X.T @ X / X.shape[0]
    qw = gptq_ternary(W, H, group)
    assert set(qw.codes.unique().tolist()) <= {-1, 0, 1} and (qw.scale > 0).all()
    assert qw.spec == QuantSpec(2, group, symmetric=True) and qw.meta["method"] == "gptq_ternary"
    s = ternary_qparams(W, group, torch.diagonal(H)).to(torch.float16).float()
    codes = torch.clamp(torch.round(W.view(n, k // group, group) / s.unsqueeze(-1)), -1, 1).view(n, k)
    rtn = QuantizedWeight(codes.to(torch.int8), s.to(torch.float16), None, qw.spec)
    err_gptq = hessian_relative_error(W, qw.dequantize(torch.float32), H)
    err_rtn = hessian_relative_error(W, rtn.dequantize(torch.float32), H)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)


# ---- asymmetric grids: W = (q - z) * s with GPTQ's integer zero points fixed ----------

def asym_rtn(w: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """Minimal asymmetric min/max RTN for the tests (independent of grid.py), signed convention."""
    spec = QuantSpec(bits, group, symmetric=False)
    n, k = w.shape
    wg = w.view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(1e-8)
    zero = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax)
    codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1) + zero.unsqueeze(-1)), spec.qmin, spec.qmax)
    return QuantizedWeight(codes.to(torch.int8).view(n, k), scale, zero.to(torch.int8), spec)


def _asym_weight(bits, n=6, k=16, group=8, seed=0, chunk_elems=1 << 21):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + 0.7  # off-centre rows
    init = asym_rtn(w, bits, group)
    return w, init, GSQWeight(init, seed=seed, chunk_elems=chunk_elems, fp_weight=w)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("chunk_elems", [1 << 21, 40])
def test_asymmetric_soft_weight_and_backward_match_autograd(bits, chunk_elems):
    _, init, gw = _asym_weight(bits, chunk_elems=chunk_elems)
    assert gw.zero is not None and torch.equal(gw.zero_point, init.zero_point)
    with torch.no_grad():
        gw.logits.add_(0.02 * torch.randn(gw.logits.shape, generator=torch.Generator().manual_seed(5)))
    grad_out = torch.randn(gw.q0.shape, generator=torch.Generator().manual_seed(9))
    soft = gw.soft_weight(0.7, 150.0, 1234)
    (soft * grad_out).sum().backward()
    g_logits, g_scale = gw.logits.grad.clone(), gw.scale.grad.clone()
    gw.logits.grad = gw.scale.grad = None
    ref = soft_weight_reference(gw, 0.7, 150.0, 1234)
    torch.testing.assert_close(soft, ref.detach(), rtol=1e-5, atol=1e-6)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(g_logits, gw.logits.grad, rtol=1e-4, atol=1e-5 * g_logits.abs().max().item())
    torch.testing.assert_close(g_scale, gw.scale.grad, rtol=1e-4, atol=1e-5 * g_scale.abs().max().item())
    # the hard weight keeps the zero points; before any step it is the init (the prior's argmax)
    hard = gw.to_quantized()
    assert torch.equal(hard.zero_point, init.zero_point) and hard.spec == init.spec


def test_asymmetric_backward_float64_gradcheck():
    from vllm_slq.quant.gsq import GumbelSoftWeight

    _, _, gw = _asym_weight(3, n=3, k=8, group=4)
    logits = (gw.logits.detach().double() * 3).requires_grad_(True)
    scale = gw.scale.detach().double().requires_grad_(True)
    fn = lambda lg, sc: GumbelSoftWeight.apply(lg, sc, gw.base, gw.offsets.double(), 0.9, 100.0, 7, gw.spec.qmin,
                                               gw.spec.qmax, 1 << 21, torch.float64, None, gw.zero.double())
    assert torch.autograd.gradcheck(fn, (logits, scale), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_asymmetric_refine_lowers_output_error_and_keeps_codes_on_the_grid(bits):
    """As the symmetric test above: GSQ on one linear (loss = output MSE) beats its RTN init,
    here on an asymmetric grid whose zero points stay as they were."""
    torch.manual_seed(0)
    w = torch.randn(32, 64) + 0.5  # off-centre rows: the asymmetric grid's case
    init = asym_rtn(w, bits, 16)
    gw = {"w": GSQWeight(init, fp_weight=w)}
    res = _refine_on_one_linear(gw, w)
    assert res.final_hard_loss < 0.9 * res.init_hard_loss, (res.init_hard_loss, res.final_hard_loss)
    q = gw["w"].to_quantized()
    assert int(q.codes.min()) >= q.spec.qmin and int(q.codes.max()) <= q.spec.qmax
    assert torch.equal(q.zero_point, init.zero_point)


def test_the_scale_rate_shrinks_with_the_width_so_a_fine_grid_is_not_overshot():
    """Lion moves a scale by +-lr per step. At 8 bits one such step moved a group's weights by
    many grid steps, so refining the scales alone raised the error (a w8 block: 2.2x GPTQ's;
    this layer: 2.8x). With the rate scaled by 3 / (2^b - 1), the codes held (logit rate 0, a
    prior strong enough that the init noise flips none), the 8-bit output error does not rise."""
    assert scale_lr_factor(2) == 1.0 and scale_lr_factor(8) == pytest.approx(3 / 255)
    torch.manual_seed(0)
    w = torch.randn(32, 64) + 0.5
    init = asym_rtn(w, 8, 16)
    gw = {"w": GSQWeight(init, fp_weight=w, init_strength=40.0)}
    res = _refine_on_one_linear(gw, w, logit_lr=0.0)
    assert torch.equal(gw["w"].hard_codes(), init.codes.to(gw["w"].hard_codes().dtype))
    assert res.final_hard_loss <= 1.01 * res.init_hard_loss, (res.init_hard_loss, res.final_hard_loss)
