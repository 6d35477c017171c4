"""Perplexity: the one next-token NLL sum, over token blocks or over held-out text
(the reference anchor in the README)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def token_nll(model, blocks: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL in fp32, tokens scored) for [B, T] token blocks: positions 1..T-1."""
    logits = model(input_ids=blocks).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                            reduction="sum")
    return float(nll), blocks[:, 1:].numel()


def blocks_perplexity(model, blocks: torch.Tensor, batch: int = 4) -> float:
    """exp(mean NLL) over [B, T] token blocks, `batch` blocks per forward."""
    nll, n = 0.0, 0
    for i in range(0, len(blocks), batch):
        s, c = token_nll(model, blocks[i:i + batch])
        nll, n = nll + s, n + c
    return math.exp(nll / n)


def heldout_perplexity(model_spec: str, dataset: str = "brown", max_chars: int = 100_000,
                       seq_len: int = 1024) -> tuple[float, int]:
    """exp(mean NLL) over the first `max_chars` characters of the evaluation split,
    scored in non-overlapping windows of `seq_len` tokens, fp32."""
    from vllm_slq.data import load_model, load_text

    model, tok = load_model(model_spec, dtype=torch.float32)
    text = " ".join(load_text(dataset).evaluation)[:max_chars]
    ids = tok(text, return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    for i in tqdm(range(0, ids.numel() - 1, seq_len), desc="perplexity"):
        chunk = ids[i: i + seq_len + 1]
        if chunk.numel() < 2:
            break
        s, c = token_nll(model, chunk[None])
        nll, n = nll + s, n + c
    return math.exp(nll / n), n
