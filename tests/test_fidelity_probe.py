"""The target search's fidelity probe (vllm_slq.allocation.probe): exact metrics with no
[tokens, vocab] reference, and the same per-block results when its blocks are shared over
torch.distributed ranks (real gloo processes)."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_slq.allocation.objective import ModelKLObjective, build_candidates, collect_hessians
from vllm_slq.allocation.probe import FidelityProbe, reference_continuations
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.eval.metrics import position_metrics
from vllm_slq.quant.spec import QuantSpec
from vllm_slq.testing import tiny_llama

OPTS = [QuantSpec(b, 32, False) for b in (2, 3, 4, 8)]
N_PROBE = 3  # odd: unequal shares over 2 ranks


def _setup(fused_head: bool = True):
    torch.manual_seed(0)
    model = tiny_llama()
    pb = AllocationProblem(group_linears(linear_shapes(model)), OPTS)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    H = collect_hessians(model, pb.module_names(), calib)
    cands = build_candidates(model, pb, H, "rtn", progress=False)
    obj = ModelKLObjective(model, pb, cands, calib, batch_blocks=2, fused_head=fused_head, cache_bytes=0)
    probe_tokens = torch.randint(0, 512, (N_PROBE, 24), generator=torch.Generator().manual_seed(1))
    choice = np.arange(pb.n_groups) % pb.n_options  # every width somewhere
    return model, obj, probe_tokens, choice


def _as_lists(metrics):
    return [{k: v.tolist() for k, v in vars(m).items() if isinstance(v, torch.Tensor)} for m in metrics]


@pytest.fixture(scope="module")
def one_process():
    model, obj, tokens, choice = _setup()
    return model, obj, tokens, choice, FidelityProbe(obj, tokens)(choice)


def test_probe_equals_dense_metrics_and_keeps_hidden_states_only(one_process):
    model, obj, tokens, choice, got = one_process
    probe = FidelityProbe(obj, tokens)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    assert probe.head is model.lm_head
    assert all(t.shape == (tokens.shape[1], hidden) for t in probe._ref_hidden.values())
    assert vocab != hidden
    for s, m in enumerate(got):
        with torch.no_grad():
            ref = model(input_ids=tokens[s:s + 1]).logits[0].float()
            with obj.applied(choice):
                cand = model(input_ids=tokens[s:s + 1]).logits[0].float()
        dense = position_metrics(ref, cand)
        assert dense.kl.max() > 1e-4  # the allocation is not the FP model
        assert torch.allclose(m.ear, dense.ear, atol=1e-6)
        assert torch.allclose(m.kl, dense.kl, rtol=1e-4, atol=1e-7)
        assert torch.equal(m.top1, dense.top1)


def test_probe_without_a_plain_head_recomputes_the_reference(one_process):
    _, _, tokens, choice, got = one_process
    _, obj, _, _ = _setup(fused_head=False)
    probe = FidelityProbe(obj, tokens)
    assert probe.head is None and not probe._ref_hidden
    for a, b in zip(probe(choice), got):
        assert torch.allclose(a.ear, b.ear, atol=1e-6) and torch.allclose(a.kl, b.kl, rtol=1e-4, atol=1e-7)


def test_continuations_are_the_reference_models_and_the_probe_scores_only_them(one_process):
    model, obj, tokens, choice, got = one_process
    prompts = tokens[:, :10]
    greedy = reference_continuations(obj, prompts, 6, greedy=True)
    assert torch.equal(greedy[:, :10], prompts)
    with torch.no_grad():  # each new token is the FP model's argmax after what precedes it
        logits = model(input_ids=greedy).logits
    assert torch.equal(logits[:, 9:-1].argmax(-1), greedy[:, 10:])
    sampled = reference_continuations(obj, prompts, 6, greedy=False, seed=3)
    assert torch.equal(sampled, reference_continuations(obj, prompts, 6, greedy=False, seed=3))
    assert not torch.equal(sampled, greedy)
    # first_position: the positions that predict the continuation, the same numbers as scoring it all
    full, tail = FidelityProbe(obj, greedy)(choice), FidelityProbe(obj, greedy, first_position=9)(choice)
    for a, b in zip(full, tail):
        assert len(b) == 6 and torch.allclose(b.ear, a.ear[9:15]) and torch.equal(b.top1, a.top1[9:15])
    with pytest.raises(ValueError, match="first_position 16"):
        FidelityProbe(obj, greedy, first_position=16)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, obj, tokens, choice = _setup()
        probe = FidelityProbe(obj, tokens)
        torch.save({"mine": probe.mine, "metrics": _as_lists(probe(choice))}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_share_the_blocks_and_agree_with_one_process(one_process, tmp_path):
    *_, got = one_process
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "p")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"p.{r}") for r in range(2)]
    assert ranks[0]["mine"] == [0, 2] and ranks[1]["mine"] == [1]
    expect = _as_lists(got)
    for r in ranks:  # every rank holds every block's metrics, in block order
        assert len(r["metrics"]) == N_PROBE
        for a, b in zip(r["metrics"], expect):
            for k in b:
                assert np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
