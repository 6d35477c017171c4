"""A tiny randomly initialised Llama for fast tests (no download, no reference model)."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0, vocab: int = 512, hidden: int = 64, layers: int = 2,
               intermediate: int = 128, heads: int = 4, kv_heads: int = 2,
               max_positions: int = 512):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def save_tiny_llama(path, with_tokenizer: bool = False, **kw) -> Path:
    """Save a tiny Llama (fp16 safetensors) that HF and vLLM can load from `path`.

    with_tokenizer: also save the reference model's tokenizer (and size the
    vocabulary to it), for flows that tokenize text (oneshot, the main job).
    """
    path = Path(path)
    tok = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        from vllm_slq.data import resolve_model

        tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
        kw.setdefault("vocab", len(tok))
    model = tiny_llama(**kw).to(torch.float16)
    if tok is not None:
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(path)
    return path
