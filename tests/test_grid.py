"""Uniform grid math (vllm_slq.quant.grid): properties over shapes/bits/groups and
bit-exact agreement with compressed-tensors' own qparams + fake-quant."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_slq.quant.grid import (
    NonFiniteWeightError,
    compute_qparams,
    fake_quantize,
    quantize_with,
    rtn,
)
from vllm_slq.quant.spec import QuantSpec, QuantSpecError


@st.composite
def weight_and_spec(draw):
    bits = draw(st.integers(2, 8))
    symmetric = draw(st.booleans())
    group = draw(st.sampled_from([None, 8, 16, 32]))
    n = draw(st.integers(1, 6))
    k = (group or 8) * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):  # one-signed groups exercise the "0 in range" rule
        w = w.abs() * draw(st.sampled_from([1.0, -1.0]))
    return w, QuantSpec(bits=bits, group_size=group, symmetric=symmetric)


@settings(max_examples=40, deadline=None)
@given(weight_and_spec())
def test_rtn_properties(ws):
    w, spec = ws
    q = rtn(w, spec, layer="x")
    n, k = w.shape
    groups = spec.groups(k)
    assert q.codes.shape == (n, k) and q.codes.dtype == torch.int8
    assert q.scale.shape == (n, groups) and q.scale.dtype == torch.float32
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    assert bool((q.scale > 0).all())
    # scales are fp16-representable (what the checkpoint stores)
    assert torch.equal(q.scale, q.scale.half().float())
    if spec.symmetric:
        assert q.zero_point is None
    else:
        assert q.zero_point.shape == (n, groups) and q.zero_point.dtype == torch.int8
        assert int(q.zero_point.min()) >= spec.qmin and int(q.zero_point.max()) <= spec.qmax
    deq = q.dequantize()
    assert torch.equal(deq, fake_quantize(w, q.scale, q.zero_point, spec))
    # Inside the clamp range, the rounding error is at most half a step (plus fp slack);
    # the symmetric grid clips only its single top level (+2^(b-1) s), error <= s.
    g = spec.effective_group(k)
    err = (deq - w).abs().view(n, k // g, g)
    step = q.scale.unsqueeze(-1)
    bound = (step if spec.symmetric else 0.5 * step) * (1 + 1e-3) + 1e-6 * w.abs().max()
    # fp16 rounding of the scale can push the extreme value past the last level by
    # a relative 2^-11 of the range; allow it
    # (absolute 2^-25 once the scale is an fp16 subnormal)
    bound = bound + (1 << spec.bits) * torch.clamp(2.0 ** -11 * step, min=2.0 ** -25)
    assert bool((err <= bound).all())


@settings(max_examples=20, deadline=None)
@given(weight_and_spec())
def test_requantizing_dequantized_weight_is_identity(ws):
    w, spec = ws
    q = rtn(w, spec)
    again = quantize_with(q.dequantize(), q.scale, q.zero_point, spec)
    assert torch.equal(again, q.codes)


def test_more_bits_less_error():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    errs = [float((rtn(w, QuantSpec(b, 32)).dequantize() - w).pow(2).sum()) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_zero_group_and_shrink():
    w = torch.zeros(2, 16)
    w[1] = torch.linspace(-1, 1, 16)
    q = rtn(w, QuantSpec(4, 8))
    assert torch.equal(q.dequantize()[0], torch.zeros(16))
    s_full, _ = compute_qparams(w, QuantSpec(4, 8))
    s_half, _ = compute_qparams(w, QuantSpec(4, 8), shrink=0.5)
    assert torch.allclose(s_half[1], s_full[1] * 0.5, rtol=1e-3)
    per_group = torch.tensor([[1.0, 1.0], [0.5, 1.0]])
    s_mix, _ = compute_qparams(w, QuantSpec(4, 8), shrink=per_group)
    assert torch.allclose(s_mix[1, 0], s_full[1, 0] * 0.5, rtol=1e-3)
    assert torch.equal(s_mix[1, 1], s_full[1, 1])
    with pytest.raises(ValueError, match="shrink"):
        compute_qparams(w, QuantSpec(4, 8), shrink=0.0)


def test_errors_name_the_layer():
    w = torch.randn(4, 24)
    with pytest.raises(QuantSpecError, match="model.layers.3.mlp.down_proj"):
        rtn(w, QuantSpec(4, 16), layer="model.layers.3.mlp.down_proj")
    w[1, 2] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="q_proj"):
        rtn(w, QuantSpec(4, 8), layer="q_proj")
    w[1, 2] = float("inf")
    with pytest.raises(NonFiniteWeightError, match="q_proj"):
        rtn(w, QuantSpec(4, None), layer="q_proj")
    with pytest.raises(ValueError, match="2-D"):
        rtn(torch.randn(2, 3, 8), QuantSpec(4, 8), layer="v")
    good = torch.randn(4, 16)
    s, z = compute_qparams(good, QuantSpec(4, 8))
    with pytest.raises(ValueError, match="zero point"):
        quantize_with(good, s, None, QuantSpec(4, 8), layer="k")
    with pytest.raises(ValueError, match="scale shape"):
        quantize_with(good, s[:, :1], z[:, :1], QuantSpec(4, 8), layer="k")


# --- agreement with compressed-tensors (the reference implementation) -------------

ct = pytest.importorskip("compressed_tensors")


def _ct_fake_quant(w: torch.Tensor, spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import calculate_qparams

    if spec.group_size is None:
        args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="channel")
        mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        args = QuantizationArgs(
            num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy="group", group_size=spec.group_size
        )
        wg = w.view(w.shape[0], -1, spec.group_size)
        mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    scale, zp = calculate_qparams(mn, mx, args)
    return ct_fq(w, scale, zp, args), scale, zp


@pytest.mark.parametrize(
    "bits,group,sym",
    [(4, 64, False), (3, 64, False), (2, 32, False), (8, 128, False), (4, 128, True), (3, None, False), (5, None, True)],
)
def test_rtn_equals_compressed_tensors_fp32(bits, group, sym):
    torch.manual_seed(bits * 10 + (group or 0))
    w = torch.randn(48, 256) * 0.02
    w[0, :64] = w[0, :64].abs()  # a one-signed group
    spec = QuantSpec(bits, group, sym)
    ref, ct_scale, ct_zp = _ct_fake_quant(w, spec)
    q = rtn(w, spec, scale_dtype=torch.float32)
    assert torch.equal(q.scale, ct_scale.view_as(q.scale).float())
    if not sym:
        assert torch.equal(q.zero_point.to(torch.int32), ct_zp.view_as(q.zero_point).to(torch.int32))
    torch.testing.assert_close(q.dequantize(), ref, rtol=0, atol=1e-7)


def test_rtn_matches_compressed_tensors_fp16_model():
    """On an fp16 model compressed-tensors computes scales in fp16; ours (fp16 by
    default) agrees up to rare fp16-arithmetic ties."""
    torch.manual_seed(0)
    w = (torch.randn(64, 256) * 0.02).half()
    spec = QuantSpec(4, 64, False)
    ref, _, _ = _ct_fake_quant(w, spec)
    q = rtn(w, spec)
    ours = q.dequantize(torch.float16)
    # fp16 arithmetic (range, quotient) differs from ours by an ulp of the scale in
    # some groups; count only disagreements larger than 1% of a grid step
    step = q.scale.repeat_interleave(64, dim=1)
    off = ((ours.float() - ref.float()).abs() / step > 0.01).float().mean().item()
    assert off < 0.01, off
    assert math.isclose(float((ours.float() - w.float()).pow(2).sum()), float((ref.float() - w.float()).pow(2).sum()), rel_tol=0.02)
