"""HF transformers backend: teacher-forced next-token distributions of both models.

Protocol 1 (teacher forcing, `teacher_forced_metrics`): for every token block
b[0..T-1] of held-out text, the positions t = 0..T-2 predict b[t+1]; both
models see the same block, one sequence at a time under no_grad, and
`metrics.position_metrics` compares them over the full vocabulary.

Protocol 2 (sampled continuations, `sample_continuations` +
`continuation_metrics`): the *reference* model samples L new tokens (T=1, full
vocabulary, no top-k/top-p, a seeded torch.Generator) after a prompt of P
held-out tokens; both models are then teacher-forced on prompt+continuation
and only the L positions that predict sampled tokens are scored. This is the
distribution the reference actually generates from, so it measures agreement
where it matters for speculative-decoding-style acceptance.

Logits never exist as a [T, V] tensor here: `HFRunner.logit_source` runs the
base model to its final hidden states [T, H] and hands out vocabulary slices
h @ W_head[v0:v1]^T in fp32 (`metrics.HiddenStateLogits`). On first use the
runner checks, on a short prefix, that this reproduces the model's own logits
(lm_head bias, Gemma softcapping and Granite logits_scaling are applied); if it
cannot (an unusual head, a still-compressed lm_head), it falls back to the
model's full logits and says so.

Candidates: an in-memory `torch.nn.Module`, a model alias or HF directory
(`vllm_slq.data.resolve_model`), or a compressed-tensors checkpoint directory,
which transformers decompresses on load.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .metrics import (DEFAULT_VOCAB_CHUNK, DenseLogits, HiddenStateLogits, LogitSource,
                      PositionMetrics, SequenceMetrics, position_metrics, topk_ear_bounds)

ModelLike = Union[str, Path, torch.nn.Module]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class EvalError(ValueError):
    """An evaluation that cannot run as asked (mismatched models, bad data, limits)."""


def torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise EvalError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def load_hf_model(spec: ModelLike, dtype="float32", device: Optional[str] = None):
    """(model, tokenizer or None, path or None) for an nn.Module, alias, directory or checkpoint;
    a loaded model is placed straight on `device` (None: transformers' default, the CPU)."""
    if isinstance(spec, torch.nn.Module):
        spec.eval()
        return spec, None, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_slq.data import resolve_model

    path = resolve_model(str(spec))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype),
                                                     **({} if device is None else {"device_map": str(device)}))
    except Exception as e:  # name the model in the error, keep the cause
        raise EvalError(f"cannot load model {spec!r} ({path}) with transformers: {e}") from e
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):  # what transformers raises for a directory without tokenizer files
        tok = None  # checkpoints may ship without a tokenizer; the reference's is used
    return model, tok, path


def _config_value(model, *names):
    cfg = getattr(model, "config", None)
    for n in names:
        for c in (cfg, getattr(cfg, "text_config", None)):
            v = getattr(c, n, None) if c is not None else None
            if v is not None:
                return v
    return None


def max_positions(model) -> Optional[int]:
    return _config_value(model, "max_position_embeddings", "n_positions", "max_sequence_length")


def vocab_size(model) -> int:
    head = model.get_output_embeddings()
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return int(_config_value(model, "vocab_size"))


class HFRunner:
    """Teacher-forced next-token logits of one HF causal LM, as `LogitSource`s."""

    def __init__(self, model: torch.nn.Module, name: str = "model", check_len: int = 8):
        self.model = model
        self.name = name
        self.check_len = check_len
        self._head: Optional[tuple] = None  # (weight, bias, softcap, scale) or () for fallback
        self.vocab_size = vocab_size(model)
        self.max_positions = max_positions(model)
        # ids bytes -> LogitSource; set to {} to reuse one model's hidden states
        # across several comparisons (the reference in `api.evaluate_many`)
        self.cache: Optional[dict] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _base(self):
        base = getattr(self.model, getattr(self.model, "base_model_prefix", "model"), None)
        return base if isinstance(base, torch.nn.Module) and base is not self.model else None

    @torch.no_grad()
    def _setup_head(self, ids: torch.Tensor) -> None:
        head = self.model.get_output_embeddings()
        base = self._base()
        w = getattr(head, "weight", None)
        if base is None or not isinstance(w, torch.Tensor) or w.dim() != 2:
            self._head = ()
        else:
            b = getattr(head, "bias", None)
            self._head = (w, b, _config_value(self.model, "final_logit_softcapping"),
                          _config_value(self.model, "logits_scaling"))
            probe = ids[: self.check_len]
            want = self.model(input_ids=probe[None].to(self.device)).logits[0].float()
            got = self._hidden(probe)
            got = HiddenStateLogits(got, *self._head).chunk(0, self.vocab_size)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-2, rtol=1e-3):
                err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
                warnings.warn(f"{self.name}: hidden-state @ lm_head does not reproduce the model's "
                              f"logits (max |diff| {err:.3g}); using full [T, V] logits instead")
                self._head = ()

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._base()(input_ids=ids[None].to(self.device))
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h[0]

    @torch.no_grad()
    def logit_source(self, ids: torch.Tensor) -> LogitSource:
        """Logits for every position of the 1-D token sequence `ids` (position t predicts ids[t+1])."""
        ids = ids.reshape(-1)
        if self.max_positions is not None and ids.numel() > self.max_positions:
            raise EvalError(f"{self.name}: sequence of {ids.numel()} tokens exceeds the model's "
                            f"max_position_embeddings {self.max_positions}")
        key = ids.cpu().numpy().tobytes() if self.cache is not None else None
        if key is not None and key in self.cache:
            return self.cache[key]
        if self._head is None:
            self._setup_head(ids)
        if self._head:
            src = HiddenStateLogits(self._hidden(ids).cpu(), *[
                x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in self._head])
        else:
            src = DenseLogits(self.model(input_ids=ids[None].to(self.device)).logits[0].float().cpu())
        if key is not None:
            self.cache[key] = src
        return src

    @torch.no_grad()
    def next_token_probs(self, ids: torch.Tensor, past=None):
        """fp32 softmax of the last position's logits (and the updated KV cache)."""
        out = self.model(input_ids=ids[None].to(self.device), past_key_values=past, use_cache=True,
                         logits_to_keep=1)
        return torch.softmax(out.logits[0, -1].float().cpu(), -1), out.past_key_values


    @torch.no_grad()
    def prediction_source(self, ids: torch.Tensor) -> LogitSource:
        """Rows 0..T-2 of `logit_source(ids)`: the positions that predict ids[1:]."""
        ids = ids.reshape(-1)
        return SlicedRows(self.logit_source(ids), 0, ids.numel() - 1)


class SlicedRows:
    """Rows [lo, hi) of another LogitSource."""

    def __init__(self, src: LogitSource, lo: int, hi: int):
        if not 0 <= lo <= hi <= src.num_positions:
            raise EvalError(f"rows [{lo}, {hi}) outside a source of {src.num_positions} positions")
        self.src, self.lo, self.hi = src, lo, hi
        self.vocab_size = src.vocab_size
        self.num_positions = hi - lo

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        s = self.src
        if isinstance(s, SlicedRows):
            return SlicedRows(s.src, s.lo + self.lo, s.lo + self.hi).chunk(start, stop)
        if isinstance(s, HiddenStateLogits):  # slice the hidden states, not the logits
            return HiddenStateLogits(s.hidden[self.lo:self.hi], s.weight, s.bias, s.softcap,
                                     s.scale).chunk(start, stop)
        return s.chunk(start, stop)[self.lo:self.hi]


ROW_BUDGET_BYTES = 256 << 20


def score_sequence(ref: HFRunner, cand, ids: torch.Tensor, first: int = 0,
                   vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                   row_budget_bytes: int = ROW_BUDGET_BYTES) -> PositionMetrics:
    """Metrics of the positions first..T-2 of `ids` (each predicting the next token).

    `cand` is anything with `prediction_source(ids)` (rows 0..T-2 as a
    LogitSource): an `HFRunner`, or the vLLM backend's full-vocabulary
    candidate. A candidate with `exact = False` instead offers
    `topk_logprobs(ids) -> (token ids, logprobs)` for rows 0..T-2, and the
    result holds the exact top-k lower/upper bounds on EAR.
    Peak extra memory: about `row_budget_bytes` of fp32 logits (both models),
    whatever the vocabulary size.
    """
    ids = ids.reshape(-1)
    T = ids.numel()
    if T - 1 <= first:
        raise EvalError(f"sequence of {T} tokens has no positions to score after {first}")
    p_src = SlicedRows(ref.prediction_source(ids), first, T - 1)
    targets = ids[first + 1:]
    if getattr(cand, "exact", True):
        q_src = SlicedRows(cand.prediction_source(ids), first, T - 1)
        # Materialise the full-vocabulary logits of R rows at a time (one lm_head
        # matmul per model instead of one per pass), R bounded by row_budget_bytes.
        n = p_src.num_positions
        R = max(1, min(n, row_budget_bytes // (2 * 4 * p_src.vocab_size)))
        parts = []
        for lo in range(0, n, R):
            hi = min(n, lo + R)
            p_rows = SlicedRows(p_src, lo, hi).chunk(0, p_src.vocab_size)
            q_rows = SlicedRows(q_src, lo, hi).chunk(0, q_src.vocab_size)
            parts.append(position_metrics(p_rows, q_rows, targets=targets[lo:hi],
                                          vocab_chunk=vocab_chunk))
        return parts[0] if len(parts) == 1 else PositionMetrics(
            **{k: torch.cat([getattr(m, k) for m in parts])
               for k in ("ear", "kl", "top1", "nll_ref", "nll_cand")})
    top_ids, top_lp = cand.topk_logprobs(ids)
    return topk_ear_bounds(p_src, top_ids[first:], top_lp[first:], vocab_chunk=vocab_chunk,
                           targets=targets)


def teacher_forced_metrics(ref: HFRunner, cand: HFRunner, blocks: torch.Tensor,
                           vocab_chunk: int = DEFAULT_VOCAB_CHUNK, progress: bool = True,
                           desc: str = "teacher-forced") -> SequenceMetrics:
    from tqdm.auto import tqdm

    out = SequenceMetrics()
    for ids in tqdm(blocks, desc=desc, disable=not progress, unit="seq"):
        out.add(score_sequence(ref, cand, ids, vocab_chunk=vocab_chunk))
    return out


@torch.no_grad()
def sample_continuations(ref: HFRunner, prompts: torch.Tensor, new_tokens: int, seed: int = 0,
                         progress: bool = True, greedy: bool = False) -> torch.Tensor:
    """[n, P + new_tokens]: each prompt followed by tokens sampled from the reference at T=1
    (greedy: its argmax at every step instead).

    One seeded generator drives all draws in a fixed order, so the result is a
    function of (model, prompts, new_tokens, seed) only.
    """
    from tqdm.auto import tqdm

    if new_tokens <= 0:
        raise EvalError(f"new_tokens must be positive, got {new_tokens}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in tqdm(prompts, desc="sampling from reference", disable=not progress, unit="seq"):
        ids = prompt.reshape(-1).clone()
        probs, past = ref.next_token_probs(ids)
        new = []
        for i in range(new_tokens):
            tok = probs.argmax().reshape(1) if greedy else torch.multinomial(probs, 1, generator=g)
            new.append(tok)
            if i + 1 < new_tokens:
                probs, past = ref.next_token_probs(tok, past)
        rows.append(torch.cat([ids, torch.cat(new)]))
    return torch.stack(rows)


def continuation_metrics(ref: HFRunner, cand, sequences: torch.Tensor, prompt_len: int,
                         vocab_chunk: int = DEFAULT_VOCAB_CHUNK, progress: bool = True
                         ) -> SequenceMetrics:
    """Score only the positions that predict sampled tokens (prompt_len-1 .. T-2)."""
    from tqdm.auto import tqdm

    out = SequenceMetrics()
    for ids in tqdm(sequences, desc="sampled continuations", disable=not progress, unit="seq"):
        out.add(score_sequence(ref, cand, ids, first=prompt_len - 1, vocab_chunk=vocab_chunk))
    return out
