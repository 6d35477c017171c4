"""Perplexity: the one next-token NLL sum, over token blocks or over held-out text
(the reference anchor in the README)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from vllm_slq.data import added_bos, load_model, load_text


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


def text_windows(ids: torch.Tensor, seq_len: int, bos: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows over a 1-D token sequence, each scoring up to seq_len tokens.

    With a BOS (a model trained on texts that start with it): [bos] + ids[i:i+seq_len], so every
    text token is scored and each window starts the way the model saw its training texts --
    without it a Gemma-style model's perplexity more than doubles. Without one: ids[i:i+seq_len+1],
    the previous window's last token the context of the first, the text's first token unscored."""
    if seq_len < 1:
        raise ValueError(f"perplexity windows of {seq_len} tokens score nothing")
    if bos is not None:
        head = torch.tensor([bos], dtype=ids.dtype)
        return [torch.cat([head, ids[i:i + seq_len]]) for i in range(0, ids.numel(), seq_len)]
    return [ids[i:i + seq_len + 1] for i in range(0, ids.numel() - 1, seq_len)]


def heldout_perplexity(model_spec: str, dataset: str = "brown", max_chars: int = 100_000,
                       seq_len: int = 1024) -> tuple[float, int]:
    """exp(mean NLL) over the first `max_chars` characters of the evaluation split, scored in
    text_windows of `seq_len` tokens (each from the tokenizer's BOS where it adds one), fp32."""
    model, tok = load_model(model_spec, dtype=torch.float32)
    text = " ".join(load_text(dataset).evaluation)[:max_chars]
    bos = added_bos(tok)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nll, n = 0.0, 0
    for window in tqdm(text_windows(ids, seq_len, bos), desc="perplexity"):
        s, c = token_nll(model, window[None])
        nll, n = nll + s, n + c
    return math.exp(nll / n), n
