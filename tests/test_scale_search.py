"""Scale search: never worse than min/max, consistent with grid.py, negative symmetric scales."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_slq.quant.grid import NonFiniteWeightError, compute_qparams, dequantize_with, quantize_with
from vllm_slq.quant.scale_search import DEFAULT_SHRINK_GRID, group_error, search_gain, search_qparams
from vllm_slq.quant.spec import QuantSpec, QuantSpecError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these tensors are tiny: OpenMP threads only add contention on a shared 2-core box
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def heavy_tailed(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    mask = torch.rand(n, k, generator=g) < 0.01
    return torch.where(mask, w * 10, w)


SPECS = [QuantSpec(b, gs, sym) for b in (2, 3, 4, 8) for gs in (32, None) for sym in (False, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
@pytest.mark.parametrize("weighted", [False, True])
def test_never_worse_than_minmax_per_group(spec, weighted):
    w = heavy_tailed(24, 128)
    h = torch.rand(128, generator=torch.Generator().manual_seed(1)) * 10 if weighted else None
    s0, z0 = compute_qparams(w, spec)
    s1, z1 = search_qparams(w, spec, hessian_diag=h)
    e0 = group_error(w, s0, z0, spec, h)
    e1 = group_error(w, s1, z1, spec, h)
    # the search measures s^2 sum h (x - q)^2, group_error sum h (w - (q - z) s)^2:
    # equal up to float rounding, hence the 1e-5 relative slack
    assert bool((e1 <= e0 * (1 + 1e-5) + 1e-12).all())
    if spec.bits <= 4:  # outliers: shrinking must help somewhere
        assert float(e1.sum()) < 0.97 * float(e0.sum())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_params_on_grid_and_storable(spec):
    w = heavy_tailed(8, 128, seed=3)
    s, z = search_qparams(w, spec)
    groups = spec.groups(128)
    assert s.shape == (8, groups) and s.dtype == torch.float32
    assert torch.equal(s.half().float(), s), "scales must be exactly representable in fp16"
    assert bool((s != 0).all())
    if spec.symmetric:
        assert z is None
    else:
        assert (s > 0).all()
        assert z.dtype == torch.int8 and z.shape == s.shape
        assert int(z.min()) >= spec.qmin and int(z.max()) <= spec.qmax
    # grid.py's rounding and dequantisation reproduce the measured error
    codes = quantize_with(w, s, z, spec)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    d = (w - dequantize_with(codes, s, z, spec)).pow(2)
    torch.testing.assert_close(d.sum(), group_error(w, s, z, spec).sum(), rtol=1e-6, atol=0)


def test_grid_of_one_is_exactly_minmax():
    w = heavy_tailed(16, 64, seed=5)
    for spec in (QuantSpec(3, 32, False), QuantSpec(5, None, False)):
        s, z = search_qparams(w, spec, grid=(1.0,))
        s0, z0 = compute_qparams(w, spec)
        assert torch.equal(s, s0) and torch.equal(z, z0)


def test_negative_scale_uses_the_extra_level():
    # 2-bit symmetric levels {-2,-1,0,1}; the largest |w| is positive, so only a
    # negative scale (-0.5) puts it on -2 and represents every value exactly
    w = torch.tensor([[1.0, -0.5, 0.5, 0.0]])
    spec = QuantSpec(2, None, True)
    s, _ = search_qparams(w, spec)
    assert float(s[0, 0]) == -0.5
    assert float(group_error(w, s, None, spec).sum()) == 0.0
    s_pos, _ = search_qparams(w, spec, negative_scale=False)
    assert float(s_pos[0, 0]) > 0
    assert float(group_error(w, s_pos, None, spec).sum()) > 0.01
    # grid.py's quantize/dequantize accept the negative scale unchanged
    codes = quantize_with(w, s, None, spec)
    assert codes.tolist() == [[-2, 1, -1, 0]]
    assert torch.equal(dequantize_with(codes, s, None, spec), w)


def test_hessian_weighting_lowers_the_weighted_error():
    w = heavy_tailed(32, 128, seed=7)
    h = torch.ones(128)
    h[::7] = 100.0  # a few columns matter much more
    for spec in (QuantSpec(3, 64, False), QuantSpec(3, 64, True)):
        plain = group_error(w, *search_qparams(w, spec), spec, h).sum()
        weighted = group_error(w, *search_qparams(w, spec, hessian_diag=h), spec, h).sum()
        assert float(weighted) <= float(plain) * (1 + 1e-5)


def test_search_gain_report():
    w = heavy_tailed(32, 128, seed=2)
    r = search_gain(w, QuantSpec(3, 32, False), layer="blk.0.q")
    assert r["layer"] == "blk.0.q" and r["spec"] == "w3ag32"
    assert r["search_error"] <= r["minmax_error"]
    assert 0.05 < r["relative_reduction"] < 1.0
    r = search_gain(w, QuantSpec(4, 32, True))
    assert r["negative_scale_groups"] > 0


def test_all_zero_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1, 32:] = 0.3  # a constant positive group
    for spec in (QuantSpec(4, 32, False), QuantSpec(4, 32, True)):
        s, z = search_qparams(w, spec)
        assert torch.isfinite(s).all() and bool((s != 0).all())
        assert float(group_error(w, s, z, spec).max()) < 1e-6


def test_bad_input_errors():
    spec = QuantSpec(4, 64, False)
    w = torch.randn(4, 128)
    bad = w.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="layer 'mlp.up'"):
        search_qparams(bad, spec, layer="mlp.up")
    with pytest.raises(QuantSpecError, match="layer 'mlp.up'.*does not divide"):
        search_qparams(torch.randn(4, 96), spec, layer="mlp.up")
    with pytest.raises(ValueError, match="hessian_diag"):
        search_qparams(w, spec, hessian_diag=torch.ones(64), layer="mlp.up")
    with pytest.raises(ValueError, match="hessian_diag"):
        search_qparams(w, spec, hessian_diag=-torch.ones(128))
    with pytest.raises(ValueError, match="empty"):
        search_qparams(w, spec, grid=())
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        search_qparams(w, spec, grid=(1.0, 1.2))


def test_default_grid():
    assert DEFAULT_SHRINK_GRID[0] == 1.0 and DEFAULT_SHRINK_GRID[1] == 0.99
    assert abs(DEFAULT_SHRINK_GRID[-1] - 0.2) < 1e-9 and len(DEFAULT_SHRINK_GRID) == 81


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    group=st.sampled_from([4, 8, 16, 32]),
    ngroups=st.integers(1, 4),
    bits=st.integers(2, 8),
    sym=st.booleans(),
    per_channel=st.booleans(),
    scale_pow=st.integers(-6, 2),
    seed=st.integers(0, 2**16),
    weighted=st.booleans(),
)
def test_property_search_beats_minmax(n, group, ngroups, bits, sym, per_channel, scale_pow, seed, weighted):
    k = group * ngroups
    spec = QuantSpec(bits, None if per_channel else group, sym)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * (10.0 ** scale_pow)
    h = torch.rand(k, generator=g) if weighted else None
    s0, z0 = compute_qparams(w, spec)
    s1, z1 = search_qparams(w, spec, hessian_diag=h, grid=DEFAULT_SHRINK_GRID[::4])
    e0 = group_error(w, s0, z0, spec, h)
    e1 = group_error(w, s1, z1, spec, h)
    assert bool((e1 <= e0 * (1 + 1e-5) + 1e-30).all())
    codes = quantize_with(w, s1, z1, spec)
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    if z1 is not None:
        assert int(z1.min()) >= spec.qmin and int(z1.max()) <= spec.qmax
