"""Held-out perplexity of a single model (the reference anchor in the README)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def heldout_perplexity(model_spec: str, dataset: str = "brown", max_chars: int = 100_000,
                       seq_len: int = 1024) -> tuple[float, int]:
    """exp(mean NLL) over the first `max_chars` characters of the evaluation split,
    scored in non-overlapping windows of `seq_len` tokens, fp32."""
    from vllm_slq.data import load_model, load_text

    model, tok = load_model(model_spec, dtype=torch.float32)
    text = " ".join(load_text(dataset).evaluation)[:max_chars]
    ids = tok(text, return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in tqdm(range(0, ids.numel() - 1, seq_len), desc="perplexity"):
            chunk = ids[i: i + seq_len + 1]
            if chunk.numel() < 2:
                break
            logits = model(chunk[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
            n += chunk.numel() - 1
    return math.exp(nll / n), n
