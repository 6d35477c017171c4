"""GPTQ (vllm_slq.quant.gptq) and the multi-bit layer database (vllm_slq.quant.database)."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_slq.quant.database import DatabaseError, LayerDatabase, build_database
from vllm_slq.quant.gptq import (
    GPTQ,
    GPTQ_VARIANT,
    GPTQError,
    factor_hessian,
    gptq_quantize,
    gptq_quantize_best,
    gptq_quantize_many,
    hessian_relative_error,
)
from vllm_slq.quant.grid import NonFiniteWeightError, compute_qparams, quantize_with, rtn
from vllm_slq.quant.spec import QuantSpec, QuantSpecError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: extra OpenMP threads only add contention on a shared 2-core box
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_inputs(n_tokens, k, seed=0):
    """Activations with a strongly non-diagonal covariance (what makes GPTQ beat RTN)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 1.5 * torch.randn(k, k, generator=g) / k ** 0.5
    scales = torch.exp(torch.randn(k, generator=g))  # uneven channel magnitudes, as in LLMs
    return (torch.randn(n_tokens, k, generator=g) @ mix) * scales


@pytest.fixture(scope="module")
def layer192():
    k, n = 192, 48
    x = correlated_inputs(1024, k)
    gp = GPTQ(k, layer="blk.0.mlp.down")
    gp.add_batch(x[:300].reshape(3, 100, k))  # leading dims are tokens too
    gp.add_batch(x[300:])
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    return w, gp, x


def test_hessian_running_average(layer192):
    _, gp, x = layer192
    assert gp.nsamples == 1024
    torch.testing.assert_close(gp.H, 2.0 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-4)
    with pytest.raises(GPTQError, match="blk.0.mlp.down.*last dim 10"):
        gp.add_batch(torch.randn(4, 10))
    g2 = GPTQ(8, layer="L")
    bad = torch.randn(3, 8)
    bad[1, 1] = float("inf")
    with pytest.raises(GPTQError, match="'L'.*NaN/inf"):
        g2.add_batch(bad)


SPECS = [
    QuantSpec(2, 64, False), QuantSpec(3, 64, False), QuantSpec(4, 32, False), QuantSpec(4, 64, True),
    QuantSpec(3, None, False), QuantSpec(4, None, True), QuantSpec(8, 64, False), QuantSpec(6, 96, True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_gptq_beats_rtn_and_is_consistent(layer192, spec):
    w, gp, _ = layer192
    qw = gp.quantize(w, spec)
    assert qw.spec == spec and qw.shape == w.shape
    assert qw.codes.dtype == torch.int8
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    groups = spec.groups(w.shape[1])
    assert qw.scale.shape == (w.shape[0], groups) and qw.scale.dtype == torch.float16
    if spec.symmetric:
        assert qw.zero_point is None
    else:
        assert qw.zero_point.dtype == torch.int8 and qw.zero_point.shape == qw.scale.shape
        assert int(qw.zero_point.min()) >= spec.qmin and int(qw.zero_point.max()) <= spec.qmax
    q = qw.dequantize()
    # on the grid: re-quantizing the dequantized weight reproduces the codes
    zp = qw.zero_point
    assert torch.equal(quantize_with(q, qw.scale.float(), zp, spec), qw.codes)
    err_gptq = hessian_relative_error(w, q, gp.H)
    err_rtn = hessian_relative_error(w, rtn(w, spec).dequantize(), gp.H)
    assert qw.meta["rel_err"] == pytest.approx(err_gptq, rel=1e-9)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # plain min/max group parameters: still better than RTN, and no better than the search
    mm = gptq_quantize(w, gp.H, spec, scale_search="minmax")
    assert mm.meta["rel_err"] < err_rtn
    if spec.bits <= 3:
        assert err_gptq < mm.meta["rel_err"]


def reference_gptq(W, H, spec, percdamp=0.01):
    """Paper Algorithm 1 written out plainly: no lazy batches, no batching over specs,
    min/max group parameters fixed at each group start from the current weights."""
    W = W.clone().float()
    k = W.shape[1]
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    g = spec.effective_group(k)
    Q = torch.zeros_like(W)
    codes = torch.zeros(W.shape, dtype=torch.int8)
    for j in range(k):
        if j % g == 0:
            s, z = compute_qparams(W[:, j:j + g], QuantSpec(spec.bits, g, spec.symmetric))
            s, z = s[:, 0], (torch.zeros_like(s[:, 0]) if z is None else z[:, 0].float())
        q = torch.clamp(torch.round(W[:, j] / s + z), spec.qmin, spec.qmax)
        codes[:, j] = q.to(torch.int8)
        Q[:, j] = (q - z) * s
        err = (W[:, j] - Q[:, j]) / U[j, j]
        # W[:, j:] -= err (x) U[j, j:], with the same fused primitive the implementation
        # uses, so the comparison is bit-exact on any CPU (FMA or not)
        W[:, j:].addcmul_(err.unsqueeze(1), U[j, j:], value=-1.0)
    return codes, Q


@pytest.mark.parametrize("spec", [QuantSpec(3, 64, False), QuantSpec(4, 48, True), QuantSpec(2, None, False)],
                         ids=lambda s: s.short())
def test_matches_reference_algorithm_bit_for_bit(layer192, spec):
    w, gp, _ = layer192
    ref_codes, ref_q = reference_gptq(w, gp.H, spec)
    # one block and one sub-block = no lazy batching: the same float operations as the reference
    qw = gptq_quantize(w, gp.H, spec, scale_search="minmax", blocksize=w.shape[1], subblock=w.shape[1])
    assert torch.equal(qw.codes, ref_codes)
    assert torch.equal(qw.dequantize(), ref_q), "dequantize() must equal the fake-quant weight exactly"
    # lazy batches (blocks of 32, so groups of 48 straddle blocks) change only float rounding
    blocked = gptq_quantize(w, gp.H, spec, scale_search="minmax", blocksize=32)
    ref_err = hessian_relative_error(w, ref_q, gp.H)
    assert blocked.meta["rel_err"] == pytest.approx(ref_err, rel=0.02)
    assert float((blocked.codes != ref_codes).float().mean()) < 0.02
    # group parameters come from exactly-current weights even where a group starts
    # inside a block and runs past it: they differ from the reference by rounding only
    rel = (blocked.scale.float() - qw.scale.float()).abs() / qw.scale.float().abs()
    assert float((rel > 2e-3).float().mean()) < 0.02


@pytest.mark.parametrize("spec", [QuantSpec(3, 48, False), QuantSpec(4, 24, True)], ids=lambda s: s.short())
def test_subblocks_change_rounding_only(layer192, spec):
    """Sub-blocks push each one's errors to the rest of the block as one product. A group
    that starts inside a sub-block (48 and 24 against sub-blocks of 32 and 16) must still
    get its parameters from exactly-current weights: pending errors of its sub-block and
    of its block are added, so only float rounding differs from the unblocked loop."""
    w, gp, _ = layer192
    k = w.shape[1]
    whole = gptq_quantize(w, gp.H, spec, scale_search="minmax", blocksize=k, subblock=k)
    for blocksize, subblock in ((k, 32), (64, 16), (32, 32)):
        part = gptq_quantize(w, gp.H, spec, scale_search="minmax", blocksize=blocksize, subblock=subblock)
        assert part.meta["subblock"] == min(subblock, blocksize)
        assert float((part.codes != whole.codes).float().mean()) < 0.02, (blocksize, subblock)
        rel = (part.scale.float() - whole.scale.float()).abs() / whole.scale.float().abs()
        assert float((rel > 2e-3).float().mean()) < 0.02, (blocksize, subblock)
        assert part.meta["rel_err"] == pytest.approx(whole.meta["rel_err"], rel=0.02)


def test_dequantize_in_fp16_matches_checkpoint_semantics(layer192):
    # scales are rounded to fp16 before rounding the weights, so fp16 storage is lossless
    w, gp, _ = layer192
    qw = gptq_quantize(w, gp.H, QuantSpec(4, 64, False))
    assert qw.scale.dtype == torch.float16
    bf = gptq_quantize(w, gp.H, QuantSpec(4, 64, False), scale_dtype=torch.bfloat16)
    assert bf.scale.dtype == torch.bfloat16
    assert torch.equal(quantize_with(bf.dequantize(), bf.scale.float(), bf.zero_point, bf.spec), bf.codes)


def test_k576_groups(layer192):
    # the reference model's hidden size: 576 = 9 * 64 = 3 * 192, not a multiple of 128
    k = 576
    x = correlated_inputs(1200, k, seed=4)
    H = 2.0 / x.shape[0] * x.T @ x
    w = torch.randn(12, k, generator=torch.Generator().manual_seed(2)) * 0.05
    specs = [QuantSpec(4, 64, False), QuantSpec(4, 192, True), QuantSpec(3, None, False)]
    out = gptq_quantize_many(w, H, specs, layer="blk.3.self_attn.o_proj", shrink_grid=(1.0, 0.9, 0.8, 0.7))
    for spec, qw in out.items():
        assert qw.scale.shape == (12, spec.groups(k))
        assert qw.meta["rel_err"] < hessian_relative_error(w, rtn(w, spec).dequantize(), H)
    with pytest.raises(QuantSpecError, match="blk.3.self_attn.o_proj.*128 does not divide.*576"):
        gptq_quantize(w, H, QuantSpec(4, 128, False), layer="blk.3.self_attn.o_proj")


def test_dead_columns(layer192):
    w, gp, _ = layer192
    H = gp.H.clone()
    dead = [3, 70, 191]
    H[dead, :] = 0
    H[:, dead] = 0
    qw = gptq_quantize(w, H, QuantSpec(4, 64, False))
    assert qw.meta["dead_columns"] == 3
    assert torch.equal(qw.dequantize()[:, dead], torch.zeros(w.shape[0], 3))
    assert torch.isfinite(qw.dequantize()).all()


def test_bad_input_errors(layer192):
    w, gp, _ = layer192
    spec = QuantSpec(4, 64, False)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="'blk.1.q'"):
        gptq_quantize(bad, gp.H, spec, layer="blk.1.q")
    badH = gp.H.clone()
    badH[4, 5] = float("inf")
    with pytest.raises(GPTQError, match="'blk.1.q'.*Hessian contains NaN/inf"):
        gptq_quantize(w, badH, spec, layer="blk.1.q")
    with pytest.raises(GPTQError, match="'blk.1.q'.*does not match in_features 192"):
        gptq_quantize(w, gp.H[:64, :64], spec, layer="blk.1.q")
    with pytest.raises(QuantSpecError, match="'blk.1.q'.*does not divide"):
        gptq_quantize(w, gp.H, QuantSpec(4, 100, False), layer="blk.1.q")
    with pytest.raises(GPTQError, match="negative diagonal"):
        gptq_quantize(w, -gp.H, spec, layer="blk.1.q")
    with pytest.raises(GPTQError, match="scale_search"):
        gptq_quantize(w, gp.H, spec, scale_search="best")


def test_non_pd_hessian_retries_then_errors():
    # eigenvalues -1.5 and 3.5: PD only once the damping exceeds 1.5 (mean diag is 1)
    H = torch.tensor([[1.0, 2.5], [2.5, 1.0]])
    f = factor_hessian(H, 0.01, layer="L")
    assert f.percdamp == pytest.approx(10.0)  # 0.01 -> 0.1 -> 1 (still indefinite) -> 10
    with pytest.raises(GPTQError, match="'L'.*not positive definite"):
        factor_hessian(H, 0.01, layer="L", max_retries=1)
    w = torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    qw = gptq_quantize(w, H, QuantSpec(4, None, False), layer="L")
    assert qw.meta["percdamp"] == pytest.approx(10.0)
    with pytest.raises(GPTQError, match="'big'.*not positive definite even with percdamp=10"):
        gptq_quantize(w, torch.tensor([[1.0, 100.0], [100.0, 1.0]]), QuantSpec(4, None, False), layer="big")


# ---------------------------------------------------------------- database


def test_database_equals_separate_runs_bit_exact(layer192):
    """One pass over the columns for all specs gives bit-identical entries to separate runs:
    the batched steps are elementwise and the block-end update is the same 2-D matmul
    per spec, with block boundaries that do not depend on the other specs."""
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in range(2, 9)] + [QuantSpec(4, 48, True), QuantSpec(3, None, False)]
    db = build_database(w, gp.H, specs, layer="blk.0.mlp.down")
    assert list(db) == specs
    for spec in specs:
        one = gptq_quantize(w, gp.H, spec, layer="blk.0.mlp.down")
        e = db[spec]
        assert torch.equal(e.codes, one.codes), spec
        assert torch.equal(e.scale, one.scale), spec
        assert (e.zero_point is None) == spec.symmetric
        if not spec.symmetric:
            assert torch.equal(e.zero_point, one.zero_point), spec
        assert e.meta["rel_err"] == one.meta["rel_err"]
        assert e.meta["bpp"] == spec.bpp(w.shape[1])
    errs = [db[QuantSpec(b, 64, False)].meta["rel_err"] for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs  # more bits, less error


def test_layer_database_roundtrip(tmp_path, layer192):
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (2, 4, 8)] + [QuantSpec(4, None, True)]
    store = LayerDatabase(tmp_path / "db")
    entries = store.build("model.layers.0.mlp.down_proj", w, gp.H, specs)
    store.put("model/odd name", {specs[1]: entries[specs[1]]})
    store.put("model.layers.0.mlp.down_proj", {QuantSpec(3, 64, False): gptq_quantize(w, gp.H, QuantSpec(3, 64, False))})
    assert not [p for p in os.listdir(tmp_path / "db") if p.endswith(".tmp")]

    again = LayerDatabase(tmp_path / "db", create=False)
    assert set(again.layers()) == {"model.layers.0.mlp.down_proj", "model/odd name"}
    assert set(again.specs("model.layers.0.mlp.down_proj")) == set(specs) | {QuantSpec(3, 64, False)}
    assert again.shape("model/odd name") == tuple(w.shape)
    for spec in specs:
        got = again.get("model.layers.0.mlp.down_proj", spec)
        assert torch.equal(got.codes, entries[spec].codes)
        assert torch.equal(got.dequantize(), entries[spec].dequantize())
        assert got.scale.dtype == torch.float16
    errs = again.errors("model.layers.0.mlp.down_proj")
    assert errs[specs[0]] == pytest.approx(entries[specs[0]].meta["rel_err"])
    # compact: int8 codes + fp16 scales + int8 zeros, no dense float copies
    size = os.path.getsize(tmp_path / "db" / again._layer_entry("model.layers.0.mlp.down_proj")["file"])
    n, k = w.shape
    assert size < 5 * n * k * 1.3

    with pytest.raises(DatabaseError, match="no layer 'nope'"):
        again.get("nope", specs[0])
    with pytest.raises(DatabaseError, match="model/odd name.*no entry for w8ag64"):
        again.get("model/odd name", QuantSpec(8, 64, False))
    with pytest.raises(DatabaseError, match="different shapes"):
        again.put("x", {specs[0]: entries[specs[0]], specs[1]: gptq_quantize(w[:8], gp.H, specs[1])})


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of `path` (/proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux memory maps")
def test_layer_database_entries_own_their_memory(tmp_path, layer192):
    """An entry read from the cache must not be a view of the file's memory map: the modifier
    keeps one width per layer, and a view pins every page read from that file in RSS."""
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (2, 4)]
    store = LayerDatabase(tmp_path / "db")
    store.build("blk.0.down", w, gp.H, specs)
    path = (tmp_path / "db" / store._layer_entry("blk.0.down")["file"]).resolve()
    for spec in specs:
        got = store.get("blk.0.down", spec)
        ranges = _mapped_ranges(path)
        for t in (got.codes, got.scale, got.zero_point):
            ptr = t.untyped_storage().data_ptr()
            assert not any(lo <= ptr < hi for lo, hi in ranges), (spec.short(), ranges)


def test_content_keyed_store_reuses_equal_inputs_only(tmp_path, layer192, monkeypatch):
    import vllm_slq.quant.database as dbmod

    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (3, 4)]
    store = LayerDatabase(tmp_path / "db")
    first, hit = store.build_cached(w, gp.H, specs, layer="a", act_order=True)
    assert not hit
    builds = []
    real = dbmod.build_database
    monkeypatch.setattr(dbmod, "build_database", lambda *a, **k: builds.append(1) or real(*a, **k))
    # another name, another process (a new store object): the same content is read, not rebuilt
    again, hit = LayerDatabase(tmp_path / "db").build_cached(w, gp.H, specs, layer="b", act_order=True,
                                                             device="cpu")
    assert hit and not builds
    for s in specs:
        assert torch.equal(again[s].codes, first[s].codes) and torch.equal(again[s].scale, first[s].scale)
        assert torch.equal(again[s].zero_point, first[s].zero_point)
        assert again[s].meta["rel_err"] == pytest.approx(first[s].meta["rel_err"])
    # anything GPTQ depends on changes the key: the Hessian, the weights, the options, the specs
    H2 = gp.H.clone()
    H2[0, 0] += 1e-3
    for args, kw in (((w, H2, specs), {"act_order": True}), ((w + 1e-4, gp.H, specs), {"act_order": True}),
                     ((w, gp.H, specs), {"act_order": False}), ((w, gp.H, specs[:1]), {"act_order": True})):
        assert dbmod.database_key(*args, **kw) != dbmod.database_key(w, gp.H, specs, act_order=True)
    _, hit = store.build_cached(w, gp.H, specs, act_order=False)
    assert not hit and len(builds) == 1
    with pytest.raises(ValueError, match="factor"):
        dbmod.database_key(w, gp.H, specs, factor=torch.eye(2))


def test_read_only_rank_sees_the_writers_entries_and_writes_nothing(tmp_path, layer192):
    """Under torchrun rank 0 writes the content-keyed cache; the other ranks open it
    too, pick up entries the writer stored after they opened it, and never write."""
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (3, 4)]
    reader = LayerDatabase(tmp_path / "db")  # opened before anything is stored
    entries, hit = reader.build_cached(w, gp.H, specs, layer="a", write=False, act_order=True)
    assert not hit and len(reader) == 0 and not (tmp_path / "db" / "index.json").exists()
    writer = LayerDatabase(tmp_path / "db")
    _, hit = writer.build_cached(w, gp.H, specs, layer="a", act_order=True)
    assert not hit and len(writer) == 1
    again, hit = reader.build_cached(w, gp.H, specs, layer="a", write=False, act_order=True)
    assert hit and all(torch.equal(again[s].codes, entries[s].codes) for s in specs)


def test_layer_database_bad_index(tmp_path):
    d = tmp_path / "db"
    d.mkdir()
    (d / "index.json").write_text("{not json")
    with pytest.raises(DatabaseError, match="index.json.*unreadable"):
        LayerDatabase(d)
    (d / "index.json").write_text(json.dumps({"format": "something-else", "version": 1, "layers": {}}))
    with pytest.raises(DatabaseError, match="'format'"):
        LayerDatabase(d)
    with pytest.raises(DatabaseError, match="not a layer database"):
        LayerDatabase(tmp_path / "missing", create=False)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 5),
    group=st.sampled_from([8, 16, 24]),
    ngroups=st.integers(1, 4),
    bits=st.lists(st.integers(2, 8), min_size=1, max_size=3, unique=True),
    sym=st.booleans(),
    per_channel=st.booleans(),
    blocksize=st.sampled_from([8, 16, 128]),
    seed=st.integers(0, 2**16),
)
def test_property_gptq_invariants(n, group, ngroups, bits, sym, per_channel, blocksize, seed):
    k = group * ngroups
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / k)
    H = 2.0 / x.shape[0] * x.T @ x
    w = torch.randn(n, k, generator=g) * 0.1
    specs = [QuantSpec(b, None if per_channel else group, sym) for b in bits]
    many = gptq_quantize_many(w, H, specs, blocksize=blocksize, shrink_grid=(1.0, 0.9, 0.75, 0.5))
    for spec in specs:
        qw = many[spec]
        assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
        q = qw.dequantize()
        assert torch.isfinite(q).all()
        assert torch.equal(quantize_with(q, qw.scale.float(), qw.zero_point, spec), qw.codes)
        one = gptq_quantize(w, H, spec, blocksize=blocksize, shrink_grid=(1.0, 0.9, 0.75, 0.5))
        assert torch.equal(one.codes, qw.codes) and torch.equal(one.scale, qw.scale)


@pytest.mark.llmcompressor
def _llmcompressor_gptq(w, H, spec, actorder):
    """llmcompressor's own GPTQ kernel on min/max group parameters -> (Q, scale, zero)."""
    pytest.importorskip("llmcompressor")
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                            strategy="channel" if spec.group_size is None else "group",
                            group_size=spec.group_size, actorder=actorder if spec.group_size else None)
    if actorder and spec.group_size is None:  # its validator refuses this; the kernel permutes anyway
        args = args.model_copy(update={"actorder": actorder})
    s, z = compute_qparams(w, spec)
    z_arg = torch.zeros_like(s, dtype=torch.int8) if z is None else z
    theirs, _, _ = quantize_weight(w.unsqueeze(0).clone(), H.unsqueeze(0).clone(),
                                   s.half().unsqueeze(0), z_arg.unsqueeze(0), None, args)
    return theirs[0], s, z


@pytest.mark.slow  # importing llmcompressor takes several seconds
def test_static_minmax_reproduces_llmcompressor_gptq_kernel(layer192):
    """With llmcompressor's choice of group parameters (min/max of the original weight),
    our column loop reproduces its GPTQ kernel's error; our defaults beat it."""
    w, gp, _ = layer192
    for spec in (QuantSpec(2, 64, False), QuantSpec(4, 64, True), QuantSpec(4, None, False)):
        theirs, s, _ = _llmcompressor_gptq(w, gp.H, spec, actorder=None)
        err_theirs = hessian_relative_error(w, theirs, gp.H)
        static = gptq_quantize(w, gp.H, spec, static_groups=True, scale_search="minmax")
        assert static.meta["rel_err"] == pytest.approx(err_theirs, rel=0.01), spec
        # same codes almost everywhere (their dequant arithmetic differs from ours by ~1 ulp,
        # a different code differs by a whole step)
        step = static.scale.float().abs().repeat_interleave(spec.effective_group(w.shape[1]), dim=1)
        flips = (static.dequantize() - theirs).abs() > 0.25 * step
        assert float(flips.float().mean()) < 0.01, spec
        assert gptq_quantize(w, gp.H, spec).meta["rel_err"] < err_theirs, spec


def test_static_groups_take_params_from_original_weight(layer192):
    w, gp, _ = layer192
    spec = QuantSpec(3, 64, False)
    static = gptq_quantize(w, gp.H, spec, static_groups=True, scale_search="minmax")
    s, z = compute_qparams(w, spec)
    assert torch.equal(static.scale.float(), s) and torch.equal(static.zero_point, z)
    assert static.meta["static_groups"] is True
    dynamic = gptq_quantize(w, gp.H, spec, scale_search="minmax")
    assert not torch.equal(dynamic.scale.float(), s)  # groups after the first see updated weights
    assert torch.equal(dynamic.scale[:, 0].float(), s[:, 0])  # the first group sees the original


@pytest.mark.slow  # importing llmcompressor takes several seconds
def test_act_order_minmax_reproduces_llmcompressor_static_actorder(layer192):
    """act_order=True with min/max groups is llmcompressor's default ("static") GPTQ:
    columns in descending diag(H) order, group parameters from the original weight."""
    w, gp, _ = layer192
    for spec in (QuantSpec(3, 64, False), QuantSpec(4, 64, True), QuantSpec(4, None, False)):
        theirs, s, _ = _llmcompressor_gptq(w, gp.H, spec, actorder="static")
        err_theirs = hessian_relative_error(w, theirs, gp.H)
        ours = gptq_quantize(w, gp.H, spec, act_order=True, scale_search="minmax")
        assert ours.meta["act_order"] is True and ours.meta["static_groups"] is True
        assert torch.equal(ours.scale.float(), s)
        assert ours.meta["rel_err"] == pytest.approx(err_theirs, rel=0.01), spec
        assert ours.meta["rel_err"] < gptq_quantize(w, gp.H, spec, scale_search="minmax",
                                                    static_groups=True).meta["rel_err"], spec


def test_act_order_database_equals_separate_runs_and_helps(layer192):
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (2, 3, 4, 8)] + [QuantSpec(4, 48, True), QuantSpec(3, None, False)]
    db = build_database(w, gp.H, specs, layer="blk.0.mlp.down", act_order=True)
    for spec in specs:
        one = gptq_quantize(w, gp.H, spec, layer="blk.0.mlp.down", act_order=True)
        assert torch.equal(db[spec].codes, one.codes), spec
        assert torch.equal(db[spec].scale, one.scale), spec
        assert db[spec].meta["rel_err"] == one.meta["rel_err"]
        # what the error feedback saw is what dequantize() gives (codes unpermuted correctly)
        assert one.meta["rel_err"] == pytest.approx(hessian_relative_error(w, one.dequantize(), gp.H), rel=1e-9)
    with pytest.raises(GPTQError, match="act_order"):
        gptq_quantize(w, gp.H, specs[0], act_order=True, factor=factor_hessian(gp.H))


def test_database_and_uniform_baseline_are_one_gptq_variant(layer192):
    """SLQ's database and the uniform GPTQ baseline share GPTQ_VARIANT's options; built with
    several group-parameter rules, a database entry is gptq_quantize_best's, bit for bit."""
    from vllm_slq.allocation.engine import SLQ_GPTQ
    from vllm_slq.modifiers import SLQGPTQModifier, SLQModifier
    uni, slq = SLQGPTQModifier(), SLQModifier(target_bpp=4.0)
    assert SLQ_GPTQ == GPTQ_VARIANT
    assert (uni.dampening_frac, uni.act_order, tuple(uni.shrink_grid), uni.try_minmax) == (
        slq.dampening_frac, slq.act_order, tuple(slq.shrink_grid), bool(slq.scale_searches)) == (
        GPTQ_VARIANT["percdamp"], GPTQ_VARIANT["act_order"], tuple(GPTQ_VARIANT["shrink_grid"]), False)
    w, gp, _ = layer192
    specs = [QuantSpec(b, 64, False) for b in (2, 4)] + [QuantSpec(3, 64, True)]
    rules = ("hessian", "minmax")
    db = build_database(w, gp.H, specs, layer="blk.0.mlp.down", scale_searches=rules, **GPTQ_VARIANT)
    for spec in specs:
        one = gptq_quantize_best(w, gp.H, spec, scale_searches=rules, **GPTQ_VARIANT)
        assert torch.equal(db[spec].codes, one.codes) and torch.equal(db[spec].scale, one.scale), spec
        assert db[spec].meta["scale_search_tried"] == one.meta["scale_search_tried"]
    with pytest.raises(ValueError, match="scale_search or scale_searches"):
        build_database(w, gp.H, specs, scale_search="hessian", scale_searches=("minmax",))


def test_best_of_scale_searches_keeps_the_lower_layer_error(layer192):
    w, gp, _ = layer192
    for spec in (QuantSpec(4, 64, False), QuantSpec(3, 64, True)):
        runs = {m: gptq_quantize(w, gp.H, spec, scale_search=m, act_order=True) for m in ("hessian", "minmax")}
        best = gptq_quantize_best(w, gp.H, spec, scale_searches=("hessian", "minmax"), act_order=True)
        want = min(runs.values(), key=lambda q: q.meta["rel_err"])
        assert torch.equal(best.codes, want.codes) and torch.equal(best.scale, want.scale)
        assert best.meta["scale_search_tried"] == {m: q.meta["rel_err"] for m, q in runs.items()}
