"""The 70B path: decoder blocks and candidates resting in memory-mapped files (allocation/offload.py)."""
import copy
import weakref
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import vllm_slq.allocation.objective as objective_mod
from vllm_slq.allocation.objective import ModelKLObjective, build_candidates
from vllm_slq.allocation.offload import OffloadDir, offload_module, onloaded
from vllm_slq.allocation.probe import heldout_metrics
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.allocation.store import CandidateStore
from vllm_slq.quant.spec import QuantSpec
from vllm_slq.testing import tiny_llama

torch.set_num_threads(1)
OPTS = [QuantSpec(b, 32, False) for b in (2, 3, 4, 8)]


def _file_backed(t: torch.Tensor) -> bool:
    """Whether t's storage lies in a private file mapping (this process's /proc/self/maps)."""
    addr = t.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        span, _perms, _off, _dev, inode, *_ = line.split() + [""]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= addr < hi:
            return inode not in ("0", "")
    return False


def test_offload_dir_maps_the_bytes_and_leaves_no_file(tmp_path):
    where = OffloadDir(tmp_path)
    for t in (torch.randn(33, 7, dtype=torch.bfloat16), torch.arange(-8, 8, dtype=torch.int8),
              torch.randn(5, dtype=torch.float32), torch.zeros(0)):
        m = where.put(t)
        assert m.dtype == t.dtype and m.shape == t.shape and torch.equal(m, t)
        if t.numel():
            assert _file_backed(m)
    assert list(where.path.iterdir()) == []  # unlinked once mapped
    where.close()
    assert not where.path.exists()


def test_offloaded_objective_equals_the_in_memory_one(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    twin = copy.deepcopy(model)
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    db = build_candidates(model, pb, method="rtn", progress=False)
    where = OffloadDir(tmp_path / "store")
    store = CandidateStore.from_database(db, "cpu", offload=where)
    assert all(_file_backed(p) for layer in store.layers() for s in store.specs(layer)
               for p in store.get(layer, s).planes)
    plain = ModelKLObjective(twin, pb, db, tokens, batch_blocks=2)
    off = ModelKLObjective(model, pb, store, tokens, batch_blocks=2, offload_dir=tmp_path / "blocks")
    assert off.checkpoint_blocks and len(off.blocks) == model.config.num_hidden_layers
    assert all(_file_backed(p) for blk in off.blocks for p in blk.parameters())

    def step(o):
        P = pb.one_hot(np.array([i % pb.n_options for i in range(pb.n_groups)])).requires_grad_(True)
        loss = o(P, 1)
        loss.backward()
        return float(loss.detach()), P.grad

    (l0, g0), (l1, g1) = step(plain), step(off)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert torch.allclose(g1, g0, rtol=1e-5, atol=1e-8)
    choice = np.full(pb.n_groups, 1)
    assert off.evaluate(choice) == pytest.approx(plain.evaluate(choice), rel=1e-6)
    held = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    assert heldout_metrics(off, choice, held)["kl"] == pytest.approx(heldout_metrics(plain, choice, held)["kl"],
                                                                     rel=1e-6)
    off.close()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
        assert not _file_backed(a), n


def test_one_block_of_copies_is_alive_at_a_time(tmp_path, monkeypatch):
    """The design's memory claim, counted: the onloaded copies alive at once stay within about
    one block's worth through the forward and the checkpointed backward (a model-sized count
    would mean autograd kept every block's copies)."""
    model = tiny_llama(layers=4)
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    obj = ModelKLObjective(model, pb, build_candidates(model, pb, method="rtn", progress=False), tokens,
                           batch_blocks=2, offload_dir=tmp_path)
    per_block = sum(t.numel() for t in [*obj.blocks[0].parameters(), *obj.blocks[0].buffers()])
    alive = {"now": 0, "peak": 0, "onloads": 0}

    def release(n):
        alive["now"] -= n

    @contextmanager
    def counted(module, device):
        with onloaded(module, device):
            alive["onloads"] += 1
            for mod in module.modules():
                for t in [*mod._parameters.values(), *mod._buffers.values()]:
                    if t is not None:
                        alive["now"] += t.numel()
                        weakref.finalize(t, release, t.numel())
            alive["peak"] = max(alive["peak"], alive["now"])
            yield

    monkeypatch.setattr(objective_mod, "onloaded", counted)
    P = pb.one_hot(np.full(pb.n_groups, 2)).requires_grad_(True)
    obj(P, 0).backward()
    assert P.grad is not None
    assert alive["onloads"] == 2 * len(obj.blocks)  # forward + recompute, each block
    assert alive["now"] == 0  # every copy is gone after the backward
    assert per_block <= alive["peak"] <= 2 * per_block, (alive["peak"], per_block)


def test_offload_needs_decoder_blocks(tmp_path):
    model = tiny_llama()
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    db = build_candidates(model, pb, method="rtn", progress=False)
    model._no_split_modules = []
    with pytest.raises(ValueError, match="offload_dir.*_no_split_modules"):
        ModelKLObjective(model, pb, db, tokens, offload_dir=tmp_path)


def test_onloaded_restores_the_slots_even_on_error():
    lin = torch.nn.Linear(4, 3)
    w = lin.weight
    with pytest.raises(RuntimeError, match="boom"):
        with onloaded(lin, "cpu"):
            assert lin.weight is not w and torch.equal(lin.weight, w)
            raise RuntimeError("boom")
    assert lin.weight is w


def test_offload_module_keeps_values_and_dtypes(tmp_path):
    block = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    before = {n: t.clone() for n, t in block.state_dict().items()}
    offload_module(block, OffloadDir(tmp_path))
    for n, t in block.state_dict().items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]) and _file_backed(t), n
