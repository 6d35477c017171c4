"""cached_candidates: the on-disk GPTQ database equals a fresh build, is reused, resumes, and is keyed."""
import json

import numpy as np
import pytest
import torch

from vllm_slq.allocation.objective import (cached_candidates, candidate_cache_key,
                                           collect_hessians, database_errors, proxy_errors)
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.quant.database import LayerDatabase
from vllm_slq.quant.gptq import gptq_quantize_many
from vllm_slq.quant.spec import QuantSpec
from vllm_slq.testing import tiny_llama

torch.set_num_threads(1)
OPTS = [QuantSpec(b, 32, False) for b in (2, 4, 8)]
GRID = [1.0, 0.9, 0.8]  # a short scale search keeps the test fast; it is part of the key


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=1)
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    return model, pb, tokens


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for s in a[name]:
            x, y = a[name][s], b[name][s]
            assert torch.equal(x.codes, y.codes) and torch.equal(x.scale, y.scale)
            assert (x.zero_point is None) == (y.zero_point is None)
            if x.zero_point is not None:
                assert torch.equal(x.zero_point, y.zero_point)


def test_build_then_reuse_equals_fresh_database(setup, tmp_path):
    model, pb, tokens = setup
    first, info1 = cached_candidates(model, pb, tokens, tmp_path, progress=False, shrink_grid=GRID)
    assert info1["built_layers"] == len(pb.module_names()) and info1["loaded_layers"] == 0
    H = collect_hessians(model, pb.module_names(), tokens)
    # the same GPTQ (same Hessians and scale search), built directly without the cache
    mods = dict(model.named_modules())
    fresh = {n: gptq_quantize_many(mods[n].weight.detach().float(), H[n], OPTS, layer=n, shrink_grid=GRID)
             for n in pb.module_names()}
    _same(first, fresh)
    second, info2 = cached_candidates(model, pb, tokens, tmp_path, progress=False, shrink_grid=GRID)
    assert info2["built_layers"] == 0 and info2["loaded_layers"] == len(pb.module_names())
    assert info2["key"] == info1["key"]
    _same(first, second)
    # errors from the stored meta equal the Hessian proxy computed from scratch
    assert np.allclose(database_errors(pb, second), proxy_errors(model, pb, second, H), rtol=1e-4, atol=1e-9)


def test_key_changes_with_tokens_options_weights(setup, tmp_path):
    model, pb, tokens = setup
    k0, _ = candidate_cache_key(model, pb, tokens, shrink_grid=GRID)
    assert candidate_cache_key(model, pb, tokens, shrink_grid=GRID)[0] == k0
    assert candidate_cache_key(model, pb, tokens + 1, shrink_grid=GRID)[0] != k0
    assert candidate_cache_key(model, pb, tokens, shrink_grid=[1.0])[0] != k0
    sym = AllocationProblem(pb.groups, [QuantSpec(b, 32, True) for b in (2, 4, 8)])
    assert candidate_cache_key(model, sym, tokens, shrink_grid=GRID)[0] != k0
    other = tiny_llama(seed=1, layers=1)
    assert candidate_cache_key(other, pb, tokens, shrink_grid=GRID)[0] != k0


def test_interrupted_build_resumes_only_missing_layers(setup, tmp_path):
    model, pb, tokens = setup
    full, info = cached_candidates(model, pb, tokens, tmp_path, progress=False, shrink_grid=GRID)
    # simulate a build stopped after the first layer: keep one layer in a fresh index
    db_dir = tmp_path / info["key"]
    idx = json.loads((db_dir / "index.json").read_text())
    keep = pb.module_names()[0]
    idx["layers"] = {keep: idx["layers"][keep]}
    (db_dir / "index.json").write_text(json.dumps(idx))
    again, info2 = cached_candidates(model, pb, tokens, tmp_path, progress=False, shrink_grid=GRID)
    assert info2["loaded_layers"] == 1 and info2["built_layers"] == len(pb.module_names()) - 1
    _same(full, again)
    assert len(LayerDatabase(db_dir, create=False)) == len(pb.module_names())


def test_foreign_directory_is_refused(setup, tmp_path):
    model, pb, tokens = setup
    key, comp = candidate_cache_key(model, pb, tokens, shrink_grid=GRID)
    (tmp_path / key).mkdir()
    (tmp_path / key / "key.json").write_text(json.dumps({**comp, "options": ["w3ag32"]}))
    with pytest.raises(ValueError, match="key.json"):
        cached_candidates(model, pb, tokens, tmp_path, progress=False, shrink_grid=GRID)
