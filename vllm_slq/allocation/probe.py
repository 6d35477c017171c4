"""The fidelity probe of the target search: exact per-position EAR / KL / top-1 of a hard
allocation against the FP model on fixed held-out blocks (teacher-forced, T = 1).

Memory, at a user's scale (128k-256k vocabularies): the reference is never a dense
[tokens, vocab] tensor. When the objective's model computes its logits as a plain output
head on its decoder's hidden states (``plain_output_head``), the probe keeps the
reference as final hidden states [tokens, hidden] and both distributions are streamed
over the vocabulary from hidden states (``HiddenStateLogits``); otherwise each block's
reference logits are recomputed at every probe, one block at a time.

Data-parallel under torch.distributed: rank r scores blocks r, r + world, ...; the
per-block results are all-gathered (on the CPU, a few floats per position) and put back in
block order, so every rank summarises the same sequences with the same seed and reaches the
same verdict.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from vllm_slq.eval.metrics import HiddenStateLogits, PositionMetrics, position_metrics, summarize

from .objective import ModelKLObjective


class FidelityProbe:
    """probe(choice) -> per-block PositionMetrics of allocation `choice`, every block, in order.

    first_position: when > 0, score positions first_position .. seq_len - 2 only, the ones that
    predict a continuation's tokens (prompt_len - 1 for reference_continuations' output).
    """

    def __init__(self, objective: ModelKLObjective, tokens: torch.Tensor, first_position: int = 0):
        if tokens.dim() != 2:
            raise ValueError(f"probe tokens must be [n_blocks, seq_len], got shape {tuple(tokens.shape)}")
        if first_position and not 0 < first_position < tokens.shape[1] - 1:
            raise ValueError(f"probe first_position {first_position} outside 0..{tokens.shape[1] - 2}")
        self.first_position = first_position
        self.objective = objective
        self.tokens = tokens.to(objective.device)
        self.n_blocks = tokens.shape[0]
        self.mine = list(range(objective.rank, self.n_blocks, objective.world))
        self.head: Optional[torch.nn.Linear] = objective.head
        self._ref_hidden: dict[int, torch.Tensor] = {}
        if self.head is not None:
            with torch.no_grad():
                self._ref_hidden = {s: objective._hidden(self.tokens[s:s + 1])[0] for s in self.mine}

    def _source(self, hidden: torch.Tensor) -> HiddenStateLogits:
        return HiddenStateLogits(hidden, self.head.weight, self.head.bias)

    @torch.no_grad()
    def _local(self, choice: np.ndarray) -> list[tuple[int, PositionMetrics]]:
        obj, out = self.objective, []
        for s in self.mine:
            ids = self.tokens[s:s + 1]
            if self.head is not None:
                ref = self._source(self._ref_hidden[s])
                with obj.applied(choice):
                    cand = self._source(obj._hidden(ids)[0])
            else:
                ref = obj._logits(ids)[0].float()
                with obj.applied(choice):
                    cand = obj._logits(ids)[0].float()
            m = position_metrics(ref, cand)
            # the last position predicts past the block: nothing to score there
            keep = slice(self.first_position, ids.shape[1] - 1) if self.first_position else slice(None)
            out.append((s, PositionMetrics(**{k: (v[keep].cpu() if isinstance(v, torch.Tensor) else v)
                                              for k, v in vars(m).items()})))
        return out

    def __call__(self, choice: np.ndarray) -> list[PositionMetrics]:
        local = self._local(choice)
        if self.objective.world > 1:
            parts: list = [None] * self.objective.world
            dist.all_gather_object(parts, local)
            local = [item for part in parts for item in part]
        got = dict(local)
        if sorted(got) != list(range(self.n_blocks)):
            raise RuntimeError(f"fidelity probe: blocks {sorted(got)} scored, expected 0..{self.n_blocks - 1}")
        return [got[s] for s in range(self.n_blocks)]


@torch.no_grad()
def reference_continuations(objective: ModelKLObjective, prompts: torch.Tensor, new_tokens: int, *,
                            greedy: bool, seed: int = 0) -> torch.Tensor:
    """[n, P + new_tokens]: each prompt continued by the FP model the objective holds, sampled at
    T = 1 (greedy: its argmax): the contexts a speculative draft meets, since every token the
    original emits is distributed as the original's. All prompts decode together, a full forward
    per new token (no KV cache: the objective's block runs allow none), only the last position's
    logits formed; one seeded generator draws, so the result depends on (model, prompts, seed)."""
    if new_tokens <= 0:
        raise ValueError(f"new_tokens must be positive, got {new_tokens}")
    g = torch.Generator().manual_seed(seed)
    ids = prompts.to(objective.device)
    for _ in range(new_tokens):
        if objective.head is not None:
            logits = objective.head(objective._hidden(ids)[:, -1])
        else:
            logits = objective._logits(ids)[:, -1]
        probs = torch.softmax(logits.float(), -1).cpu()
        nxt = probs.argmax(-1, keepdim=True) if greedy else torch.multinomial(probs, 1, generator=g)
        ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
    return ids


def heldout_metrics(objective: ModelKLObjective, choice: np.ndarray, tokens: torch.Tensor) -> dict:
    """KL / EAR / top-1 of allocation `choice` on held-out blocks [n, L] (teacher-forced, T = 1),
    averaged over every position: the probe's exact metrics, with EAR's 5th and 50th percentiles."""
    s = summarize(FidelityProbe(objective, tokens)(choice))
    return {"kl": s["kl"], "ear": s["ear"], "top1": s["top1"], "ear_p5": s["ear_p5"], "ear_p50": s["ear_p50"],
            "positions": s["n_positions"]}
