"""Fidelity metrics between a reference model p and a candidate q, from logits.

Pure torch: no transformers, no vLLM. Every next-token position t gives two
distributions over the vocabulary, p_t = softmax(x_t) (reference) and
q_t = softmax(y_t) (candidate), computed in fp32 at temperature 1.

Per position (docs/methods.md section 2):

    EAR_t  = sum_v min(p_v, q_v) = 1 - TV(p, q) = 1 - 1/2 sum_v |p_v - q_v|
                                                        -> `position_metrics` (.ear)
    KL_t   = sum_v p_v (log p_v - log q_v)              -> (.kl)
    top1_t = [argmax p == argmax q]                     -> (.top1)
    NLL_t  = -log p(target), -log q(target)             -> (.nll_ref, .nll_cand)

We evaluate EAR through the 1 - TV form: it is the same number in exact
arithmetic (both distributions sum to one), but identical inputs give exactly
1.0 in floating point, which sum_v min(p, q) (a sum of ~V fp32 terms) does not.

Vocabulary chunking. Nothing here needs the [T, V] fp32 probabilities at once:
a `LogitSource` hands out logits for one vocabulary slice [v0, v1) at a time.
Pass 1 streams the slices to get each row's logsumexp (combining per-chunk
logsumexps) and argmax; pass 2 streams them again, normalises with the pass-1
logsumexp and accumulates |p - q|, p (log p - log q) and the target log-probs.
Peak memory is O(T * chunk). `HiddenStateLogits` (HF backend) computes the
slice from final hidden states and the lm_head rows, so even the model's own
[T, V] logits never exist.

Aggregation over positions -> `summarize`:
    mean EAR, p5 / p50 of per-position EAR, bootstrap 95% CI of the mean EAR,
    EAR^100 (= mean EAR ** 100, the agreement probability of a 100-token
    continuation if positions were independent) and its geometric variant
    exp(100 * mean log EAR_t), mean KL, top-1 agreement, perplexity of both
    models (exp of mean NLL), and the Pinsker bound 1 - sqrt(mean KL / 2),
    which mean EAR must exceed (TV_t <= sqrt(KL_t / 2) per position, then
    Jensen over positions).

Bootstrap: we resample whole *sequences* (with replacement, a seeded
generator), not positions. Tokens of one sequence are strongly correlated (one
hard passage moves all of its positions), so a position bootstrap would report
intervals that are too narrow. Each replicate's statistic is
sum(EAR over the drawn sequences' positions) / (number of those positions).

Top-k lower bound -> `topk_ear_bounds`: when the candidate is only available
as log-probabilities on a token set S_t (vLLM prompt logprobs: its top-k plus
the prompt token) and the reference is full,

    LB_t = sum_{v in S_t} min(p_v, q_v)  <=  EAR_t
         <= LB_t + min(1 - P(S_t), 1 - Q(S_t))  = UB_t

Both are exact bounds, not approximations: the omitted terms min(p_v, q_v),
v not in S_t, are non-negative (lower bound) and sum to at most the leftover
mass of either distribution (upper bound). With S_t = the full vocabulary, LB_t
is EAR_t. If the reference were also top-k only, the same bounds hold with
S_t = S_p ∩ S_q for the terms where both values are known.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

DEFAULT_VOCAB_CHUNK = 8192


class MetricsError(ValueError):
    """Inputs that do not describe matching next-token distributions."""


# ---------------------------------------------------------------- logit sources
class LogitSource(Protocol):
    """Logits of T positions, one vocabulary slice at a time."""

    vocab_size: int
    num_positions: int

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """fp32 logits [T, stop - start] for vocabulary ids start..stop-1."""
        ...


class DenseLogits:
    """A [T, V] logits (or log-probabilities) tensor already in memory."""

    def __init__(self, logits: torch.Tensor):
        if logits.dim() != 2:
            raise MetricsError(f"logits must be [positions, vocab], got shape {tuple(logits.shape)}")
        self.logits = logits
        self.num_positions, self.vocab_size = logits.shape

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        return self.logits[:, start:stop].float()


class HiddenStateLogits:
    """Logits h @ W[v0:v1]^T (+ bias), optionally soft-capped, computed per slice.

    `hidden` [T, H] are the final (post-norm) hidden states and `weight` [V, H]
    the output embedding. The matmul runs in fp32 so the logits match an fp32
    model's; `softcap` (Gemma-style final_logit_softcapping) gives
    cap * tanh(logits / cap), `scale` divides (Granite-style logits_scaling).
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                 scale: Optional[float] = None):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise MetricsError(f"hidden {tuple(hidden.shape)} and lm_head weight {tuple(weight.shape)} "
                               f"do not fit ([T, H] and [V, H])")
        self.hidden = hidden.float()
        self.weight = weight
        self.bias = bias
        self.softcap = softcap
        self.scale = scale
        self.num_positions = hidden.shape[0]
        self.vocab_size = weight.shape[0]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        x = self.hidden @ self.weight[start:stop].float().T
        if self.bias is not None:
            x = x + self.bias[start:stop].float()
        if self.scale:
            x = x / self.scale
        if self.softcap:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x


def as_source(x) -> LogitSource:
    return DenseLogits(x) if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------- per position
@dataclass
class PositionMetrics:
    """Per-position metrics, all float64 [T] except top1 (bool [T]).

    `ear_upper` is set only for top-k (bounded) results; `exact` says whether
    `ear` is the exact EAR or the top-k lower bound.
    """

    ear: torch.Tensor
    kl: Optional[torch.Tensor]
    top1: Optional[torch.Tensor]
    nll_ref: Optional[torch.Tensor] = None
    nll_cand: Optional[torch.Tensor] = None
    ear_upper: Optional[torch.Tensor] = None
    exact: bool = True

    def __len__(self) -> int:
        return int(self.ear.numel())


def _vocab_ranges(vocab: int, chunk: int):
    if chunk <= 0:
        raise MetricsError(f"vocab_chunk must be positive, got {chunk}")
    return [(s, min(s + chunk, vocab)) for s in range(0, vocab, chunk)]


def logsumexp_and_argmax(src: LogitSource, vocab_chunk: int = DEFAULT_VOCAB_CHUNK
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: per-row logsumexp and argmax over the full vocabulary, streamed.

    The running log-sum-exp keeps its max and its scaled sum in float64, so the
    result does not depend on the chunking beyond float64 rounding.
    """
    run_max = run_sum = None
    best_val = best_idx = None
    for s, e in _vocab_ranges(src.vocab_size, vocab_chunk):
        x = src.chunk(s, e)
        v, i = x.max(dim=-1)
        i = i + s
        c_max = v.double()
        # exp in fp32 relative to the chunk's own max (terms in (0, 1]), summed in fp64
        c_sum = torch.exp(x - v[:, None]).sum(-1, dtype=torch.float64)
        if run_max is None:
            run_max, run_sum = c_max, c_sum
            best_val, best_idx = v, i
        else:
            new_max = torch.maximum(run_max, c_max)
            run_sum = run_sum * torch.exp(run_max - new_max) + c_sum * torch.exp(c_max - new_max)
            run_max = new_max
            # strict '>' keeps the first maximum, the same tie rule as torch.argmax
            take = v > best_val
            best_val = torch.where(take, v, best_val)
            best_idx = torch.where(take, i, best_idx)
    lse = run_max + torch.log(run_sum)
    return lse, best_idx


def position_metrics(reference, candidate, targets: Optional[torch.Tensor] = None,
                     vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                     reference_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                     ) -> PositionMetrics:
    """Exact per-position EAR, KL, top-1 agreement and NLLs, streamed over the vocabulary.

    `reference` / `candidate`: [T, V] tensors or `LogitSource`s (logits or
    log-probs; both are re-normalised). `targets` [T]: the observed next tokens,
    for the NLLs. `reference_stats`: a cached (logsumexp, argmax) of the
    reference from `logsumexp_and_argmax`, to skip its first pass.
    """
    p_src, q_src = as_source(reference), as_source(candidate)
    if p_src.vocab_size != q_src.vocab_size:
        raise MetricsError(f"vocabulary sizes differ: reference {p_src.vocab_size}, "
                           f"candidate {q_src.vocab_size}")
    if p_src.num_positions != q_src.num_positions:
        raise MetricsError(f"position counts differ: reference {p_src.num_positions}, "
                           f"candidate {q_src.num_positions}")
    T = p_src.num_positions
    if targets is not None:
        targets = targets.reshape(-1).long()
        if targets.numel() != T:
            raise MetricsError(f"{targets.numel()} targets for {T} positions")
        if T and (int(targets.min()) < 0 or int(targets.max()) >= p_src.vocab_size):
            raise MetricsError(f"target ids outside the vocabulary [0, {p_src.vocab_size})")

    lse_p, arg_p = reference_stats if reference_stats is not None else logsumexp_and_argmax(p_src, vocab_chunk)
    lse_q, arg_q = logsumexp_and_argmax(q_src, vocab_chunk)

    lse_diff = (lse_p.double() - lse_q.double()).float()
    # a row-constant fp32 rounding of lse (~1e-6 relative) rescales p by 1 +- 1e-6
    lse_p32, lse_q32 = lse_p.float(), lse_q.float()
    abs_diff = torch.zeros(T, dtype=torch.float64)
    kl = torch.zeros(T, dtype=torch.float64)
    lp_t = torch.zeros(T, dtype=torch.float32)
    lq_t = torch.zeros(T, dtype=torch.float32)
    rows = torch.arange(T)
    for s, e in _vocab_ranges(p_src.vocab_size, vocab_chunk):
        x, y = p_src.chunk(s, e), q_src.chunk(s, e)
        logp = x - lse_p32[:, None]
        logq = y - lse_q32[:, None]
        p, q = logp.exp(), logq.exp()
        abs_diff += (p - q).abs().sum(-1, dtype=torch.float64)
        # log p - log q as (x - y) - (lse_p - lse_q): the logit difference is
        # small where the models agree, so form it before adding large offsets.
        log_ratio = (x - y) - lse_diff[:, None]
        # p * (log p - log q) with 0 * (...) = 0 where p underflows to 0
        term = torch.where(p > 0, p * log_ratio, torch.zeros_like(p))
        kl += term.sum(-1, dtype=torch.float64)
        if targets is not None:
            inside = (targets >= s) & (targets < e)
            if inside.any():
                idx = (targets[inside] - s)
                lp_t[inside] = logp[rows[inside], idx]
                lq_t[inside] = logq[rows[inside], idx]

    ear = (1.0 - 0.5 * abs_diff).clamp(0.0, 1.0)
    return PositionMetrics(
        ear=ear,
        kl=kl.clamp_min(0.0),  # rounding can give -1e-9 for identical rows
        top1=arg_p == arg_q,
        nll_ref=None if targets is None else (-lp_t).double(),
        nll_cand=None if targets is None else (-lq_t).double(),
    )


def topk_ear_bounds(reference, cand_ids: torch.Tensor, cand_logprobs: torch.Tensor,
                    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                    reference_stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                    targets: Optional[torch.Tensor] = None) -> PositionMetrics:
    """Exact lower/upper bounds on EAR from the candidate's log-probs on a token subset.

    `reference`: full [T, V] logits or a `LogitSource`. `cand_ids` [T, k] int64
    token ids (entries < 0 are padding), `cand_logprobs` [T, k] the candidate's
    *normalised* log-probabilities of those tokens (as vLLM returns them:
    log-softmax over the full vocabulary). Duplicate ids in a row (vLLM repeats
    the prompt token when it is also in the top-k) are counted once.
    Returns `ear` = lower bound, `ear_upper` = upper bound, exact=False,
    top1 = whether the reference argmax equals the candidate's best listed token
    (exact whenever the listed set is the candidate's top-k, k >= 1), KL None,
    nll_cand where the target is listed (NaN otherwise).
    """
    p_src = as_source(reference)
    T, V = p_src.num_positions, p_src.vocab_size
    if cand_ids.shape != cand_logprobs.shape or cand_ids.dim() != 2 or cand_ids.shape[0] != T:
        raise MetricsError(f"cand_ids {tuple(cand_ids.shape)} / cand_logprobs {tuple(cand_logprobs.shape)} "
                           f"must both be [T={T}, k]")
    ids = cand_ids.long()
    valid = ids >= 0
    if bool((ids >= V).any()):
        raise MetricsError(f"candidate token ids outside the vocabulary [0, {V})")
    # de-duplicate per row: keep the first occurrence of each id
    sorted_ids, order = torch.sort(torch.where(valid, ids, torch.full_like(ids, V)), dim=1, stable=True)
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    dup = torch.zeros_like(valid).scatter(1, order, dup_sorted)
    keep = valid & ~dup
    safe_ids = torch.where(keep, ids, torch.zeros_like(ids))
    q = torch.where(keep, cand_logprobs.float().exp(), torch.zeros_like(cand_logprobs, dtype=torch.float32))

    lse_p, arg_p = reference_stats if reference_stats is not None else logsumexp_and_argmax(p_src, vocab_chunk)
    p = torch.zeros_like(q)
    for s, e in _vocab_ranges(V, vocab_chunk):
        inside = keep & (safe_ids >= s) & (safe_ids < e)
        if not inside.any():
            continue
        logp = p_src.chunk(s, e) - lse_p.float()[:, None]
        local = torch.where(inside, safe_ids - s, torch.zeros_like(safe_ids))
        p = torch.where(inside, logp.gather(1, local).exp(), p)
    lower = torch.minimum(p, q).sum(-1, dtype=torch.float64)
    left_p = (1.0 - p.sum(-1, dtype=torch.float64)).clamp_min(0.0)
    left_q = (1.0 - q.sum(-1, dtype=torch.float64)).clamp_min(0.0)
    upper = (lower + torch.minimum(left_p, left_q)).clamp(max=1.0)
    best = torch.where(keep, cand_logprobs.float(), torch.full_like(q, -math.inf)).argmax(-1)
    top_q = ids.gather(1, best[:, None])[:, 0]
    nll_cand = None
    if targets is not None:
        targets = targets.reshape(-1).long()
        hit = keep & (ids == targets[:, None])
        lq = torch.where(hit, cand_logprobs.float(), torch.full_like(q, -math.inf)).max(-1).values
        nll_cand = torch.where(torch.isfinite(lq), -lq, torch.full_like(lq, math.nan)).double()
    return PositionMetrics(ear=lower.clamp(0.0, 1.0), kl=None, top1=arg_p == top_q,
                           nll_cand=nll_cand, ear_upper=upper, exact=False)


# ---------------------------------------------------------------- aggregation
@dataclass
class SequenceMetrics:
    """Per-position metrics of several sequences, kept per sequence for the bootstrap."""

    sequences: list[PositionMetrics] = field(default_factory=list)

    def add(self, m: PositionMetrics) -> None:
        self.sequences.append(m)

    def cat(self, name: str) -> Optional[torch.Tensor]:
        parts = [getattr(m, name) for m in self.sequences]
        if not parts or any(x is None for x in parts):
            return None
        return torch.cat([x.double() if x.dtype != torch.bool else x for x in parts])


def bootstrap_mean_ci(values_per_seq: Sequence[torch.Tensor], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the position-weighted mean, resampling whole sequences."""
    sums = np.array([float(v.double().sum()) for v in values_per_seq])
    counts = np.array([v.numel() for v in values_per_seq], dtype=np.float64)
    n = len(sums)
    if n == 0 or counts.sum() == 0:
        raise MetricsError("bootstrap over zero sequences")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def paired_bootstrap_ci(a_sums: Sequence[float], b_sums: Sequence[float], counts: Optional[Sequence[float]] = None,
                        kind: str = "ratio", n_boot: int = 1000, seed: int = 0, level: float = 0.95
                        ) -> tuple[float, float, float]:
    """Two candidates scored on the SAME sequences: per sequence, the sum of a metric over its
    positions for a and for b (and its position count). Each bootstrap replicate draws the
    sequences once and uses the draw for both, so the passage-to-passage variation they share
    cancels and the interval reflects only how consistently one differs from the other.

        kind="ratio":       sum a / sum b                   (e.g. KL: < 1 means a is closer)
        kind="difference":  (sum a - sum b) / sum counts    (e.g. mean EAR of a minus b)

    Returns (value, lo, hi), a percentile interval at `level`."""
    a = np.asarray(a_sums, dtype=np.float64)
    b = np.asarray(b_sums, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise MetricsError(f"paired bootstrap: per-sequence sums of different shapes {a.shape} vs {b.shape}")
    if a.size == 0:
        raise MetricsError("paired bootstrap: no sequences")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, a.size, size=(n_boot, a.size))
    if kind == "ratio":
        if b.sum() <= 0:
            raise MetricsError("paired bootstrap: ratio with a zero denominator")
        value = a.sum() / b.sum()
        stats = a[draws].sum(1) / np.maximum(b[draws].sum(1), 1e-300)
    elif kind == "difference":
        n = np.ones_like(a) if counts is None else np.asarray(counts, dtype=np.float64)
        if n.shape != a.shape or n.sum() <= 0:
            raise MetricsError(f"paired bootstrap: counts of shape {n.shape} for {a.size} sequences")
        value = (a.sum() - b.sum()) / n.sum()
        stats = (a[draws].sum(1) - b[draws].sum(1)) / n[draws].sum(1)
    else:
        raise MetricsError(f"paired bootstrap: kind must be 'ratio' or 'difference', got {kind!r}")
    q = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [q, 1 - q])
    return float(value), float(lo), float(hi)


def summarize(seqs: SequenceMetrics | Sequence[PositionMetrics], n_boot: int = 1000, seed: int = 0
              ) -> dict:
    """Aggregate per-position metrics into the report numbers (see module docstring)."""
    if not isinstance(seqs, SequenceMetrics):
        seqs = SequenceMetrics(list(seqs))
    if not seqs.sequences or sum(len(m) for m in seqs.sequences) == 0:
        raise MetricsError("no positions to summarize")
    ear = seqs.cat("ear").numpy()
    # per-sequence sums: enough to compare two candidates scored on the same blocks later
    # (paired_bootstrap_ci) without keeping every position
    per_seq = {"n_positions": [int(m.ear.numel()) for m in seqs.sequences],
               "ear_sum": [float(m.ear.double().sum()) for m in seqs.sequences]}
    if all(m.kl is not None for m in seqs.sequences):
        per_seq["kl_sum"] = [float(m.kl.double().sum()) for m in seqs.sequences]
    out: dict = {
        "n_sequences": len(seqs.sequences),
        "n_positions": int(ear.size),
        "ear_exact": all(m.exact for m in seqs.sequences),
        "ear": float(ear.mean()),
        "ear_p5": float(np.quantile(ear, 0.05)),
        "ear_p50": float(np.quantile(ear, 0.50)),
    }
    lo, hi = bootstrap_mean_ci([m.ear for m in seqs.sequences], n_boot=n_boot, seed=seed)
    out["ear_ci95"] = [lo, hi]
    out["per_sequence"] = per_seq
    out["ear_pow100"] = float(out["ear"] ** 100)
    with np.errstate(divide="ignore"):
        out["ear_geo100"] = float(np.exp(100 * np.log(np.clip(ear, 1e-300, 1.0)).mean()))
    upper = seqs.cat("ear_upper")
    if upper is not None:
        out["ear_upper"] = float(upper.mean())
    kl = seqs.cat("kl")
    if kl is not None:
        out["kl"] = float(kl.mean())
        out["pinsker_ear_lower_bound"] = float(1.0 - math.sqrt(max(out["kl"], 0.0) / 2))
    top1 = seqs.cat("top1")
    if top1 is not None:
        out["top1"] = float(top1.double().mean())
    for who in ("ref", "cand"):
        nll = seqs.cat(f"nll_{who}")
        if nll is not None:
            nll = nll.numpy()
            finite = np.isfinite(nll)
            if finite.all():
                out[f"ppl_{who}"] = float(np.exp(nll.mean()))
            elif finite.any():  # top-k backends: the target may fall outside the listed set
                out[f"ppl_{who}_listed_only"] = float(np.exp(nll[finite].mean()))
                out[f"nll_{who}_listed_fraction"] = float(finite.mean())
    return out
