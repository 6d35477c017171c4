"""The true model objective: KL(p_fp || p_model) with a differentiable per-group mix.

For each quantized linear m in group i (docs/methods.md s.4):

    W_m(P) = W_m,ref + sum_k P_ik (W_m^(k) - W_m,ref)          (MixedLinear)
    L(P)   = mean over calibration positions of
             sum_v p_fp(v) (log p_fp(v) - log p_P(v))            (full vocabulary, fp32)

P is RCO's straight-through assignment (one-hot in value), so the forward costs
one dense forward of the candidate model; the backward gives dL/dP_ik =
<dL/dW_m, W^(k) - W_ref> summed over the group's members.

Candidates come from a per-layer database: one QuantizedWeight per option
(GPTQ variants sharing one Hessian factorisation, vllm_slq.quant.gptq, or RTN;
build_candidates below; cached_candidates keeps that database on disk, keyed by
everything it depends on, so a rerun or a second benchmark skips the GPTQ pass).

Memory plan (every tensor on the model's device)
  * the database is a CandidateStore (store.py): b-bit codes plus group
    parameters, sum(b) = 35 bits per weight for widths 2..8, no dense copies;
  * MixedLinear replaces each quantized Linear's forward while the objective
    runs: it dequantizes the chosen candidate in the forward, and saves only
    the layer input x (which autograd keeps for any linear) and p; the backward
    recomputes W(P) and dequantizes the candidates one at a time. So no layer's
    mixed weight outlives its own forward or backward;
  * the reference: the FP model's final hidden states ([blocks, L, hidden]) when
    its logits are a plain output head, and the KL from hidden states a chunk of
    positions at a time (kl_from_hidden), so no [tokens, vocab] tensor exists
    beyond one chunk; for other heads, log-probs cached in fp16 when they fit
    `cache_bytes` (default 1 GiB), otherwise recomputed under no_grad each time.
  * So the peak is the model in its compute dtype + the store + one forward's
    activations (benchmarks/slq_memory.py measures it and fits the model).
  * offload_dir (the 70B path, allocation/offload.py): the decoder blocks' weights rest
    in memory-mapped files and each block is copied onto the device only while it runs
    (its forward, and its recompute in the backward: blocks are checkpointed); a store
    built with the same OffloadDir keeps its candidates there too. The device then
    holds the non-block parameters + one block's weights and candidates + the block
    inputs + one block's activations.

Under torch.distributed (torchrun), every rank holds the model and the store and
scores its share of each call's blocks; values are all-reduced and dL/dP is
summed over ranks in P's backward (_SumGradOverRanks), so RCO, the sensitivities
and the bisection see the loss of all blocks and take identical steps on every
rank from identical Gumbel draws.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from vllm_slq.fileio import atomic_write_json
from vllm_slq.quant.database import sha256_tensor
from vllm_slq.quant.spec import QuantizedWeight, QuantSpec

from .offload import OffloadDir, module_tensors, offload_module, onloaded, restore_module
from .problem import AllocationProblem
from .store import CandidateStore, StoredCandidate


def _mixed_weight(p: torch.Tensor, w_ref: torch.Tensor, candidates: Sequence[Optional[StoredCandidate]]
                  ) -> torch.Tensor:
    """W_ref + sum_k p_k (W^(k) - W_ref) in w_ref's dtype; options with p_k == 0 are never dequantized."""
    chosen = torch.nonzero(p).flatten().tolist()
    if len(chosen) == 1 and float(p[chosen[0]]) == 1.0:  # RCO's one-hot rows: the candidate itself
        return candidates[chosen[0]].dequantize(w_ref.dtype)
    w = w_ref
    for k in chosen:
        w = w + float(p[k]) * (candidates[k].dequantize(w_ref.dtype) - w_ref)
    return w


def linear_weight_grad(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL/dW = g^T x of a linear y = x W^T over all leading dimensions, fp32 [N, K]."""
    n, k = grad_y.shape[-1], x.shape[-1]
    return grad_y.reshape(-1, n).to(torch.float32).T @ x.reshape(-1, k).to(torch.float32)


class MixedLinear(torch.autograd.Function):
    """y = x W(p)^T + b, W(p) = W_ref + sum_k p_k (W^(k) - W_ref), candidates dequantized on the fly.

    Nothing of weight size is saved for backward: it keeps x (which any linear
    keeps) and p, and recomputes W(p) for dL/dx. The allocation's gradient
        dL/dp_k = <dL/dW, W^(k) - W_ref>,   dL/dW = g^T x
    dequantizes each candidate in turn, so the transient peak is a few dense
    copies of this one layer in fp32.
    """

    @staticmethod
    def forward(ctx, x, p, w_ref, bias, candidates):
        # w_ref as a saved tensor: block checkpointing drops it with the activations, so an
        # onloaded block's weight copy (offload_dir) does not outlive the block's forward
        ctx.save_for_backward(x, p, w_ref)
        ctx.candidates = candidates
        return torch.nn.functional.linear(x, _mixed_weight(p, w_ref, candidates), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, p, w_ref = ctx.saved_tensors
        candidates = ctx.candidates
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _mixed_weight(p, w_ref, candidates).to(grad_y.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = linear_weight_grad(grad_y, x)
            w32 = w_ref.to(torch.float32)
            grad_p = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for j, c in enumerate(candidates):
                if c is not None:
                    grad_p[j] = ((c.dequantize(torch.float32) - w32) * grad_w).sum()
        return grad_x, grad_p, None, None, None


# The KL works a chunk of positions at a time. Given logits, _KL_CHUNK_ELEMENTS bounds each fp32
# [chunk, vocab] temporary. From hidden states through the output head, a chunk of hidden / 8
# positions holds, at its peak, about the head's own bytes in temporaries (two fp32 copies and the
# head's outputs, ~16 B per logit; a bf16 head is 2 * hidden B per vocabulary entry), so the KL adds
# one head's worth to the peak at every model size (Llama-3.1-8B: 512 positions, ~1 GB; the
# reference model: 72 positions, 54 MB), and each chunk's head product stays a GEMM of hundreds of
# rows at the sizes where that matters.
_KL_CHUNK_ELEMENTS = 1 << 22
_HEAD_CHUNK_HIDDEN_PER_ROW = 8


def _position_chunks(n: int, vocab: int, hidden: Optional[int] = None) -> list[tuple[int, int]]:
    """[a, b) ranges over n positions: hidden // 8 positions each with an output head of width
    `hidden`, else _KL_CHUNK_ELEMENTS // vocab."""
    step = max(1, hidden // _HEAD_CHUNK_HIDDEN_PER_ROW if hidden is not None else _KL_CHUNK_ELEMENTS // vocab)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


# The chunk functions below work in place on fp32 [chunk, vocab] temporaries that their callers
# made for them (``_owned_fp32``), so a chunk costs two such tensors at a time, not five.

def _owned_fp32(t: torch.Tensor) -> torch.Tensor:
    """A new fp32 copy of t, free to be overwritten."""
    return t.to(torch.float32, copy=True)


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    return z.sub_(torch.logsumexp(z, -1, keepdim=True))


def _chunk_kl_sum(ref_logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum over a chunk of positions of KL(p_ref || softmax(z)); both fp32 and overwritten."""
    diff = _log_softmax_(z).neg_().add_(ref_logp)  # log p_ref - log q
    return torch.dot(ref_logp.exp_().reshape(-1), diff.reshape(-1))


def _chunk_kl_grad(ref_p: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d/dz of the chunk's KL sum times scale: softmax(z) sum_v p_ref - p_ref; fp32, z overwritten."""
    q = _log_softmax_(z).exp_()
    return q.mul_(ref_p.sum(-1, keepdim=True)).sub_(ref_p).mul_(scale)


def _chunk_tv_sum(ref_logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum over a chunk of positions of TV(p_ref, softmax(z)) = 1 - sum_v min(p_ref, q) = 1 - EAR;
    both fp32 and overwritten."""
    q, p = _log_softmax_(z).exp_(), ref_logp.exp_()
    return z.shape[0] - torch.minimum(p, q, out=p).sum()


def _chunk_tv_grad(ref_p: torch.Tensor, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """d/dz of the chunk's TV sum times scale. With m_v = [q_v < p_v] (where min(p, q) is q),
    d EAR / dz_j = sum_v m_v q_v (delta_vj - q_j) = m_j q_j - q_j s, s = sum_v m_v q_v, so
    d TV / dz = q s - m q; fp32, z overwritten."""
    q = _log_softmax_(z).exp_()
    mq = torch.where(q < ref_p, q, 0.0)
    return q.mul_(mq.sum(-1, keepdim=True)).sub_(mq).mul_(scale)


# the per-position divergences the objective can minimise: (chunk sum, chunk gradient)
#   kl: KL(p_ref || q), the default;  tv: 1 - EAR, i.e. maximise the acceptance rate itself
DIVERGENCES = {"kl": (_chunk_kl_sum, _chunk_kl_grad), "tv": (_chunk_tv_sum, _chunk_tv_grad)}


def _divergence(name: str):
    if name not in DIVERGENCES:
        raise ValueError(f"divergence {name!r}: expected one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name]


class _FullVocabKL(torch.autograd.Function):
    """Mean over positions of KL(p_ref || softmax(z)) in fp32, a chunk of positions at a time.

    dKL/dz = (softmax(z) sum_v p_ref - p_ref) / n, recomputed per chunk in the backward: the only
    tensors kept are the logits and the reference themselves, never an fp32
    [positions, vocab] copy (0.5 GB per copy at 128k vocab and 1k positions).
    """

    @staticmethod
    def forward(ctx, ref_logp, logits, divergence):
        chunk_sum, _ = _divergence(divergence)
        v = logits.shape[-1]
        z, r = logits.reshape(-1, v), ref_logp.reshape(-1, v)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for a, b in _position_chunks(z.shape[0], v):
            total += chunk_sum(_owned_fp32(r[a:b]), _owned_fp32(z[a:b]))
        ctx.save_for_backward(ref_logp, logits)
        ctx.divergence = divergence
        return total / z.shape[0]

    @staticmethod
    def backward(ctx, grad):
        _, chunk_grad = _divergence(ctx.divergence)
        ref_logp, logits = ctx.saved_tensors
        v = logits.shape[-1]
        z, r = logits.reshape(-1, v), ref_logp.reshape(-1, v)
        out = torch.empty_like(z)
        scale = grad.to(torch.float32) / z.shape[0]
        for a, b in _position_chunks(z.shape[0], v):
            p = _owned_fp32(r[a:b]).exp_()  # a cached fp16 reference sums to 1 only within rounding
            out[a:b] = chunk_grad(p, _owned_fp32(z[a:b]), scale).to(out.dtype)
        return None, out.reshape(logits.shape), None


def kl_full_vocab(ref_logp: torch.Tensor, logits: torch.Tensor, divergence: str = "kl") -> torch.Tensor:
    """Mean over positions of KL(p_ref || softmax(logits)) (or another of DIVERGENCES), full
    vocabulary, fp32 (differentiable in logits)."""
    if ref_logp.shape != logits.shape:
        raise ValueError(f"kl_full_vocab: reference {tuple(ref_logp.shape)} and logits {tuple(logits.shape)} differ")
    return _FullVocabKL.apply(ref_logp, logits, divergence)


class _HeadKL(torch.autograd.Function):
    """Mean over positions of KL(softmax(r W^T + b) || softmax(h W^T + b)) from final hidden states.

    The output head is applied a chunk of positions at a time, to the reference's
    hidden states r and the mixed model's h alike, so no [positions, vocab] tensor
    exists beyond one chunk, and the reference costs [positions, hidden] instead of
    its log-probs (Llama-3.1-8B, 16k tokens: 0.13 GB instead of 4 GB). The backward
    recomputes both chunks' logits: dKL/dh = ((q sum_v p - p) / n) W.
    """

    @staticmethod
    def _logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """fp32 logits of a chunk, a new tensor (the chunk functions overwrite it)."""
        return _owned_fp32(torch.nn.functional.linear(x.to(weight.dtype), weight, bias))

    @staticmethod
    def forward(ctx, ref_h, h, weight, bias, divergence):
        chunk_sum, _ = _divergence(divergence)
        hidden = h.shape[-1]
        x, r = h.reshape(-1, hidden), ref_h.reshape(-1, hidden)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for a, b in _position_chunks(x.shape[0], weight.shape[0], hidden):
            total += chunk_sum(_log_softmax_(_HeadKL._logits(r[a:b], weight, bias)),
                               _HeadKL._logits(x[a:b], weight, bias))
        ctx.save_for_backward(ref_h, h, weight, bias)
        ctx.divergence = divergence
        return total / x.shape[0]

    @staticmethod
    def backward(ctx, grad):
        _, chunk_grad = _divergence(ctx.divergence)
        ref_h, h, weight, bias = ctx.saved_tensors
        hidden = h.shape[-1]
        x, r = h.reshape(-1, hidden), ref_h.reshape(-1, hidden)
        out = torch.empty_like(x)
        scale = grad.to(torch.float32) / x.shape[0]
        for a, b in _position_chunks(x.shape[0], weight.shape[0], hidden):
            p = _log_softmax_(_HeadKL._logits(r[a:b], weight, bias)).exp_()
            dz = chunk_grad(p, _HeadKL._logits(x[a:b], weight, bias), scale).to(weight.dtype)
            out[a:b] = (dz @ weight).to(out.dtype)
        return None, out.reshape(h.shape), None, None, None


def kl_from_hidden(ref_hidden: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear,
                   divergence: str = "kl") -> torch.Tensor:
    """Mean over positions of KL(p_ref || p) (or another of DIVERGENCES) with both distributions
    from the output head applied to final hidden states, chunked (differentiable in `hidden`;
    the head is frozen)."""
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"kl_from_hidden: reference {tuple(ref_hidden.shape)} and hidden "
                         f"{tuple(hidden.shape)} differ")
    return _HeadKL.apply(ref_hidden, hidden, head.weight, head.bias, divergence)


def plain_output_head(model: torch.nn.Module, ids: torch.Tensor) -> Optional[torch.nn.Linear]:
    """The model's output Linear when its logits are exactly head(decoder(ids)), else None.

    Checked on `ids` (their first 16 positions: the check is of what the model computes
    after its decoder, and full-length logits would be the objective's largest transient)
    against the model's own forward, so a model that scales or caps its logits (Gemma-2's
    softcapping, Cohere's logit_scale, ...) or has no separate decoder is recognised by
    what it computes, not by its name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        return None
    ids = ids[..., :16]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
        ours = head(hidden)
    if ours.shape != full.shape:
        return None
    tol = 1e-4 if full.dtype == torch.float32 else 2e-2
    scale = float(full.float().abs().max()) or 1.0
    return head if float((ours.float() - full.float()).abs().max()) <= tol * scale else None


def fidelity_metrics(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """KL(p||q), EAR = sum_v min(p, q), top-1 agreement, per position then averaged (fp32, T=1)."""
    logp = torch.log_softmax(ref_logits.to(torch.float32), -1)
    logq = torch.log_softmax(logits.to(torch.float32), -1)
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum(-1)
    ear = torch.minimum(p, q).sum(-1)
    top1 = (logp.argmax(-1) == logq.argmax(-1)).float()
    return {"kl": float(kl.mean()), "ear": float(ear.mean()), "top1": float(top1.mean()),
            "ear_p5": float(torch.quantile(ear.flatten(), 0.05)), "positions": int(kl.numel())}


@torch.no_grad()
def collect_hessians(model: torch.nn.Module, module_names: Sequence[str], tokens: torch.Tensor,
                     batch: int = 4) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T of each named linear's input over the calibration tokens (FP model)."""
    mods = dict(model.named_modules())
    H = {}
    counts = {}
    hooks = []

    def make_hook(name):
        def hook(_m, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float32)
            H[name] = H.get(name, 0) + 2.0 * x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for n in module_names:
        hooks.append(mods[n].register_forward_hook(make_hook(n)))
    try:
        for s in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    return {n: H[n] / counts[n] for n in module_names}


def build_candidates(model: torch.nn.Module, problem: AllocationProblem,
                     hessians: Optional[dict[str, torch.Tensor]] = None, method: str = "gptq",
                     progress: bool = True) -> dict[str, dict[QuantSpec, QuantizedWeight]]:
    """Per-module database {spec: QuantizedWeight} for every available option.

    method "gptq" (needs hessians; one factorisation per layer for all specs) or "rtn".
    """
    mods = dict(model.named_modules())
    it = [(i, m) for i, g in enumerate(problem.groups) for m in g.modules]
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"{method} database", leave=False)
    out = {}
    for i, m in it:
        W = mods[m.name].weight.detach().to(torch.float32)
        specs = [s for k, s in enumerate(problem.options) if problem.available[i, k]]
        if method == "gptq":
            if hessians is None or m.name not in hessians:
                raise ValueError(f"gptq database needs a Hessian for {m.name!r}")
            from vllm_slq.quant.gptq import gptq_quantize_many
            out[m.name] = gptq_quantize_many(W, hessians[m.name], specs, layer=m.name)
        elif method == "rtn":
            from vllm_slq.quant.grid import rtn
            out[m.name] = {s: rtn(W, s, layer=m.name) for s in specs}
        else:
            raise ValueError(f"unknown database method {method!r} (use 'gptq' or 'rtn')")
    return out


def proxy_errors(model: torch.nn.Module, problem: AllocationProblem,
                 candidates: dict[str, dict[QuantSpec, QuantizedWeight]],
                 hessians: Optional[dict[str, torch.Tensor]] = None) -> np.ndarray:
    """e[i,k] = sum over the group's modules of the relative output error
    tr(E H E^T) / tr(W H W^T) (relative weight MSE without Hessians)."""
    mods = dict(model.named_modules())
    e = np.zeros((problem.n_groups, problem.n_options))
    for i, g in enumerate(problem.groups):
        for m in g.modules:
            W = mods[m.name].weight.detach().to(torch.float64)
            H = None if hessians is None else hessians[m.name].to(torch.float64)
            den = float(((W @ H) * W).sum()) if H is not None else float((W * W).sum())
            for k, spec in enumerate(problem.options):
                if not problem.available[i, k]:
                    continue
                E = W - candidates[m.name][spec].dequantize(torch.float64)
                num = float(((E @ H) * E).sum()) if H is not None else float((E * E).sum())
                e[i, k] += num / max(den, 1e-30)
    return e


class ModelKLObjective:
    """KL of the FP model's next-token distributions to the mixed model's, on calibration blocks.

    model: HF causal LM (kept; its own weights are the references W_ref). Every
    tensor the objective makes lives on the model's device.
    candidates: a CandidateStore, or a {module: {spec: QuantizedWeight}} database
    (packed into a CandidateStore on the model's device).
    tokens: LongTensor [n_blocks, L] of calibration text.
    batch_blocks: blocks per RCO sample (one forward+backward each).
    compute_dtype: the dtype the model is cast to for the objective (None keeps the
    model's own); fp32 by default, since KL differences between allocations are
    small and CPUs have no fast half-precision GEMM.
    checkpoint_blocks: recompute each decoder block (the classes the model lists in
    its `_no_split_modules`, as HF models do) in the backward instead of keeping
    its activations: the saved activations shrink to one tensor per block, for one
    more forward per step.
    offload_dir: rest the decoder blocks' weights in memory-mapped files there and copy
    each block onto `device` only while it runs (implies checkpoint_blocks; see the
    module docstring). The other parameters move to `device`. close() brings the
    blocks back to where they were.
    device: where the objective computes; default the model's (first parameter's) device.
    fused_head: when the model's logits are exactly its output head applied to its
    decoder's hidden states (plain_output_head checks this on a block), keep the
    reference as hidden states and compute the KL from hidden states chunk by chunk
    (kl_from_hidden): no [tokens, vocab] tensor at all, for three head products per
    chunk instead of one. Otherwise (or False) the full logits and cached log-probs.
    divergence: what is minimised per position, one of DIVERGENCES: "kl" (default) or "tv",
    1 - EAR, so the allocation maximises the teacher-forced acceptance rate directly
    (``evaluate`` and the sensitivities then measure it too).
    """

    def __init__(self, model: torch.nn.Module, problem: AllocationProblem,
                 candidates: CandidateStore | dict[str, dict[QuantSpec, QuantizedWeight]], tokens: torch.Tensor,
                 batch_blocks: int = 2, cache_bytes: int = 1 << 30,
                 compute_dtype: Optional[torch.dtype] = torch.float32, checkpoint_blocks: bool = False,
                 fused_head: bool = True, offload_dir=None, device: Optional[torch.device | str] = None,
                 divergence: str = "kl"):
        _divergence(divergence)
        self.divergence = divergence
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [n_blocks, seq_len], got shape {tuple(tokens.shape)}")
        self.model = (model if compute_dtype is None else model.to(compute_dtype)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.problem = problem
        self.tokens = tokens.to(self.device)
        self.batch_blocks = max(1, min(batch_blocks, tokens.shape[0]))
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.checkpoint_blocks = checkpoint_blocks or offload_dir is not None
        self.blocks: list[torch.nn.Module] = decoder_blocks(self.model) if self.checkpoint_blocks else []
        self._block_linears = {blk: set(m for m in blk.modules() if isinstance(m, torch.nn.Linear))
                               for blk in self.blocks}
        if self.checkpoint_blocks and not self.blocks:
            flag = "offload_dir" if offload_dir is not None else "checkpoint_blocks"
            raise ValueError(f"{flag}: {type(self.model).__name__} names no decoder block class in "
                             f"_no_split_modules ({getattr(self.model, '_no_split_modules', None)}); "
                             f"pass checkpoint_blocks=False and no offload_dir (the CLI's --no-checkpoint-blocks, "
                             f"without --offload-dir)")
        self._linear_patches: list = []  # the Linears' mixing while _mixing is active
        self._blocks_active = False  # inside _blocks_run
        self.offload: Optional[OffloadDir] = None
        self._block_homes: list[torch.device] = []
        if offload_dir is not None:
            self.offload = OffloadDir(offload_dir)
            in_blocks = {id(t) for blk in self.blocks for t in module_tensors(blk)}
            for blk in self.blocks:
                self._block_homes.append(next(blk.parameters()).device)
                offload_module(blk, self.offload)
            for mod in self.model.modules():  # everything outside the blocks computes on the device
                for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
                    if id(t) not in in_blocks:
                        t.data = t.data.to(self.device)
        self.store = candidates if isinstance(candidates, CandidateStore) \
            else CandidateStore.from_database(candidates, self.device, self.offload)
        mods = dict(self.model.named_modules())
        self.linears: dict[str, torch.nn.Linear] = {}
        self.candidates: dict[str, list[Optional[StoredCandidate]]] = {}
        for i, g in enumerate(problem.groups):
            for m in g.modules:
                if not isinstance(mods.get(m.name), torch.nn.Linear):
                    raise ValueError(f"module {m.name!r} of group {g.name!r} is not a Linear of the model")
                W = mods[m.name].weight
                if tuple(W.shape) != (m.out_features, m.in_features):
                    raise ValueError(f"module {m.name!r}: weight shape {tuple(W.shape)} != problem's "
                                     f"{(m.out_features, m.in_features)}")
                row: list[Optional[StoredCandidate]] = [None] * problem.n_options
                for k, spec in enumerate(problem.options):
                    if problem.available[i, k]:
                        if m.name not in self.store or spec not in self.store.specs(m.name):
                            raise ValueError(f"database lacks {spec.short()} for module {m.name!r}")
                        row[k] = self.store.get(m.name, spec)
                self.linears[m.name] = mods[m.name]
                self.candidates[m.name] = row
        # the reference: the FP model's final hidden states when its logits are a plain output
        # head (kept, [tokens, hidden]), else its log-probs (kept up to cache_bytes, else
        # recomputed per step): never a dense [tokens, vocab] past that bound
        if fused_head:
            with self._blocks_run():
                self.head = plain_output_head(self.model, self.tokens[:1])
        else:
            self.head = None
        if self.head is not None and any(lin is self.head for lin in self.linears.values()):
            self.head = None  # a quantized head mixes like any Linear: through the full logits
        self._ref_hidden = self._ref_logp = None
        with torch.no_grad():
            if self.head is not None:
                self._ref_hidden = torch.cat([self._hidden(self.tokens[s:s + 1]) for s in range(tokens.shape[0])])
            elif tokens.numel() * self.model.config.vocab_size * 2 <= cache_bytes:
                self._ref_logp = torch.cat([
                    _log_softmax_(_owned_fp32(self._logits(self.tokens[s:s + 1]))).to(torch.float16)
                    for s in range(tokens.shape[0])])

    # ------------------------------------------------------------------ internals
    def _ref(self, idx: torch.Tensor) -> torch.Tensor:
        if self._ref_logp is not None:
            return self._ref_logp[idx]
        with torch.no_grad():
            return _log_softmax_(_owned_fp32(self._logits(self.tokens[idx])))

    @contextmanager
    def computing_with(self, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        """Inside, each named quantized Linear computes y = forwards[name](x) instead of its own
        forward, in every model call of the objective (checkpointed recomputes and offloaded
        blocks included). The allocation's mixing is one such set of forwards; the scale
        tuning (scale_tuning.py) is another."""
        unknown = sorted(set(forwards) - set(self.linears))
        if unknown:
            raise ValueError(f"computing_with: {unknown[:3]} are not quantized Linears of the objective")
        linears = [(self.linears[name], forward) for name, forward in forwards.items()]
        previous, self._linear_patches = self._linear_patches, linears
        try:
            with _patched_forwards(linears):
                yield
        finally:
            self._linear_patches = previous

    def _mixing(self, P: torch.Tensor):
        """Inside, every quantized Linear of the model computes with W(P[group]) (MixedLinear)."""
        P = P.to(self.device)
        return self.computing_with({m.name: functools.partial(_mixed_forward, self.linears[m.name], P[i],
                                                              self.candidates[m.name])
                                    for i, g in enumerate(self.problem.groups) for m in g.modules})

    @contextmanager
    def _blocks_run(self):
        """Every model call of the objective runs inside: with checkpoint_blocks (and grad
        enabled) each decoder block runs checkpointed, and its recomputation in the backward
        installs its Linears' mixing again; with offload_dir each block is onloaded for its
        run (and for its recompute)."""
        checkpoint = self.checkpoint_blocks and torch.is_grad_enabled()
        if self._blocks_active or not (checkpoint or self.offload is not None):
            yield  # nested (applied() around _logits): the outer patches already run the blocks
            return
        patches = []
        for blk in self.blocks:
            inner = [(lin, fwd) for lin, fwd in self._linear_patches if lin in self._block_linears[blk]]
            patches.append((blk, functools.partial(_run_block, blk, blk.forward, inner,
                                                   self.device if self.offload is not None else None, checkpoint)))
        self._blocks_active = True
        try:
            with _patched_forwards(patches):
                yield
        finally:
            self._blocks_active = False

    def close(self) -> None:
        """With offload_dir: the blocks' weights back in memory where they were, the scratch space removed."""
        if self.offload is None:
            return
        for blk, home in zip(self.blocks, self._block_homes):
            restore_module(blk, home)
        self.offload.close()
        self._block_homes = []

    def _local_kl(self, computing, idx: torch.Tensor) -> torch.Tensor:
        """Mean divergence (KL unless told otherwise) over the blocks idx, in this process, with
        the model computing inside the context `computing` (a fresh one per call)."""
        idx = idx.to(self.device)
        if self.head is not None:
            with computing:
                hidden = self._hidden(self.tokens[idx])
            return kl_from_hidden(self._ref_hidden[idx], hidden, self.head, self.divergence)
        with computing:
            logits = self._logits(self.tokens[idx])
        return kl_full_vocab(self._ref(idx), logits, self.divergence)

    def _kl(self, P: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Mean KL over the blocks idx of the mix P; data-parallel under torch.distributed: this
        rank scores its share idx[rank::world], and the value and dL/dP are those of all of idx."""
        if self.world > 1 and P.requires_grad:
            P = _SumGradOverRanks.apply(P)
        return self._ranks_mean(lambda: self._mixing(P), idx)

    def divergence_with(self, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                        idx: torch.Tensor) -> torch.Tensor:
        """Mean KL over the blocks idx with the Linears computing through `forwards`
        (computing_with). Under torch.distributed the value is all ranks' and its gradient
        flows to this rank's share only: the caller sums its parameters' gradients over ranks."""
        return self._ranks_mean(lambda: self.computing_with(forwards), idx)

    def _ranks_mean(self, computing, idx: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return self._local_kl(computing(), idx)
        if len(idx) % self.world:
            raise ValueError(f"{len(idx)} blocks per objective call do not split over {self.world} ranks; "
                             f"make batch_blocks a multiple of the world size")
        local = self._local_kl(computing(), idx[self.rank::self.world]) / self.world
        total = local.detach().clone()
        dist.all_reduce(total)
        return local + (total - local.detach())  # the mean over all ranks; its gradient flows locally

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        # no KV cache: nothing here decodes, and a cache would be appended twice when a
        # checkpointed block recomputes
        with self._blocks_run():
            return self.model(input_ids=ids, use_cache=False).logits

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with self._blocks_run():
            return self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state

    def batch_indices(self, step: int) -> torch.Tensor:
        n, b = self.tokens.shape[0], self.batch_blocks
        start = (step * b) % n
        return torch.arange(start, start + b) % n

    # ---------------------------------------------------------------- public API
    def __call__(self, P: torch.Tensor, step: int) -> torch.Tensor:
        """RCO objective: KL on the step's mini-batch of calibration blocks (differentiable in P)."""
        if P.shape != (self.problem.n_groups, self.problem.n_options):
            raise ValueError(f"P shape {tuple(P.shape)} != (groups, options)")
        return self._kl(P, self.batch_indices(step))

    @torch.no_grad()
    def evaluate(self, choice: np.ndarray, n_blocks: Optional[int] = None) -> float:
        """Mean KL of a hard allocation on the first n_blocks calibration blocks (no grad)."""
        P = self.problem.one_hot(choice)
        return self._mean_over_blocks(lambda: self._mixing(P), range(self._first_blocks(n_blocks)))

    @torch.no_grad()
    def mean_divergence_with(self, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                             blocks: Sequence[int]) -> float:
        """Mean KL over the given calibration blocks with the Linears computing through
        `forwards` (no grad)."""
        return self._mean_over_blocks(lambda: self.computing_with(forwards), blocks)

    def _first_blocks(self, n_blocks: Optional[int]) -> int:
        return self.tokens.shape[0] if n_blocks is None else min(n_blocks, self.tokens.shape[0])

    def _mean_over_blocks(self, computing, blocks: Sequence[int]) -> float:
        blocks = list(blocks)
        if self.world == 1:
            return sum(float(self._local_kl(computing(), torch.tensor([s]))) for s in blocks) / len(blocks)
        # data-parallel: blocks round-robin over ranks, one all-reduce of the sum
        tot = torch.zeros((), dtype=torch.float64, device=self.device)
        for s in blocks[self.rank::self.world]:
            tot += self._local_kl(computing(), torch.tensor([s])).double()
        dist.all_reduce(tot)
        return float(tot) / len(blocks)

    @contextmanager
    def applied(self, choice: np.ndarray):
        """Context: the model computes with the allocation `choice` (weights dequantized per call;
        with offload_dir each block onloaded for its run), whoever calls it."""
        with self._mixing(self.problem.one_hot(choice)), self._blocks_run():
            yield


class _SumGradOverRanks(torch.autograd.Function):
    """Identity on P; its backward all-reduces dL/dP, so each rank's local backward yields
    the gradient of the loss summed over every rank's token shard."""

    @staticmethod
    def forward(ctx, P):
        return P.view_as(P)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: instances of the classes HF lists in _no_split_modules."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def _patched_forwards(patches):
    """Set each module's instance `forward` for the duration; restores whatever was there."""
    previous = []
    try:
        for mod, forward in patches:
            previous.append((mod, vars(mod).get("forward")))
            mod.forward = forward
        yield
    finally:
        for mod, old in reversed(previous):
            if old is None:
                del mod.forward
            else:
                mod.forward = old


def _run_block(block, forward, linears, onload_device, checkpoint, *args, **kwargs):
    """A decoder block's forward with its Linears mixing; onloaded onto onload_device (offload_dir)
    and under activation checkpointing when asked, the recompute mixing and onloading again."""
    def run(*a, **kw):
        with onloaded(block, onload_device) if onload_device is not None else nullcontext(), \
                _patched_forwards(linears):
            return forward(*a, **kw)

    if checkpoint:
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
    return run(*args, **kwargs)


def _mixed_forward(linear: torch.nn.Linear, p: torch.Tensor, candidates, x: torch.Tensor) -> torch.Tensor:
    return MixedLinear.apply(x, p, linear.weight, linear.bias, candidates)


# ----------------------------------------------------------------- cached databases
CANDIDATE_CACHE_FORMAT = "vllm-slq-candidate-cache"
CANDIDATE_CACHE_VERSION = 1


def _json_option(v):
    """GPTQ keyword values as JSON for the cache key (dtypes and devices by name)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_option(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    raise TypeError(f"GPTQ option value {v!r} ({type(v).__name__}) cannot be part of a cache key")


def candidate_cache_key(model: torch.nn.Module, problem: AllocationProblem, calib_tokens: torch.Tensor,
                        hessian_batch: int = 4, key_extra: Optional[dict] = None, **gptq_kw) -> tuple[str, dict]:
    """(key, components): everything the GPTQ database of `problem` depends on.

    The FP weights of the quantized modules (hashed, so a different checkpoint or a
    modified model never reuses a database), the options, the calibration token ids
    the Hessians come from (collect_hessians on the FP model), the GPTQ keyword
    options and `key_extra` (free-form, e.g. the model's name for humans).
    """
    if "device" in gptq_kw:  # where GPTQ runs does not change what it stores
        gptq_kw = {k: v for k, v in gptq_kw.items() if k != "device"}
    if "factor" in gptq_kw:
        raise ValueError("cached_candidates: a precomputed Hessian 'factor' cannot be cached per layer")
    import hashlib

    mods = dict(model.named_modules())
    wh = hashlib.sha256()
    shapes = []
    for name in problem.module_names():
        if name not in mods or not isinstance(getattr(mods[name], "weight", None), torch.Tensor):
            raise ValueError(f"module {name!r} of the allocation problem is not a weighted module of the model")
        w = mods[name].weight.detach().to(torch.float32)
        shapes.append([name, list(w.shape)])
        wh.update(name.encode())
        sha256_tensor(wh, w)
    th = hashlib.sha256()
    sha256_tensor(th, calib_tokens.to(torch.int64))
    components = {
        "format": CANDIDATE_CACHE_FORMAT, "version": CANDIDATE_CACHE_VERSION,
        "modules": shapes, "weights_sha256": wh.hexdigest(),
        "options": [s.short() for s in problem.options],
        "hessians": {"method": "collect_hessians (FP model, H = 2/n sum x x^T)",
                     "calib_shape": list(calib_tokens.shape), "calib_sha256": th.hexdigest(),
                     "batch": int(hessian_batch)},
        "gptq": {k: _json_option(v) for k, v in sorted(gptq_kw.items())},
        "extra": key_extra or {},
    }
    import json

    key = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:24]
    return key, components


def cached_candidates(model: torch.nn.Module, problem: AllocationProblem, calib_tokens: torch.Tensor,
                      cache_dir, *, hessian_batch: int = 4, key_extra: Optional[dict] = None,
                      progress: bool = True, **gptq_kw
                      ) -> tuple[dict[str, dict[QuantSpec, QuantizedWeight]], dict]:
    """build_candidates(method="gptq") with the database kept on disk, per layer.

    The database lives in cache_dir/<key> (candidate_cache_key: FP weights, options,
    calibration tokens, GPTQ options) as a vllm_slq.quant.database.LayerDatabase:
    every layer is written atomically as soon as it is built, so an interrupted
    build resumes where it stopped and a second run (or another benchmark on the
    same model, options and calibration) reads it instead of re-running GPTQ.
    Hessians are collected (on the FP model, collect_hessians) only for the layers
    still missing. A lock file serialises builders of the same key.

    Returns (candidates {module: {spec: QuantizedWeight}}, info) with info keys
    key, path, loaded_layers, built_layers, hessian_s, build_s, load_s.
    Each entry's meta["rel_err"] is the Hessian-weighted relative error
    (database_errors sums it per group: proxy_errors without the Hessians).
    """
    import fcntl
    import json
    import time
    from pathlib import Path

    from vllm_slq.quant.database import LayerDatabase, build_database

    if calib_tokens.dim() != 2:
        raise ValueError(f"calib_tokens must be [n_blocks, seq_len], got shape {tuple(calib_tokens.shape)}")
    key, components = candidate_cache_key(model, problem, calib_tokens, hessian_batch, key_extra, **gptq_kw)
    path = Path(cache_dir) / key
    path.mkdir(parents=True, exist_ok=True)
    key_file = path / "key.json"
    if key_file.exists():
        try:
            stored = json.loads(key_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{key_file}: unreadable cache key file: {e}") from e
        if stored != json.loads(json.dumps(components)):
            raise ValueError(f"{key_file}: stored key components differ from this request's; "
                             f"the directory {path} does not hold this database (remove it)")
    else:
        atomic_write_json(key_file, components, sort_keys=True)

    mods = dict(model.named_modules())
    wanted = {m.name: [s for k, s in enumerate(problem.options) if problem.available[i, k]]
              for i, g in enumerate(problem.groups) for m in g.modules}
    info = {"key": key, "path": str(path), "loaded_layers": 0, "built_layers": 0,
            "hessian_s": 0.0, "build_s": 0.0, "load_s": 0.0}
    out: dict[str, dict[QuantSpec, QuantizedWeight]] = {}
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another builder of this key finishes first
        db = LayerDatabase(path)
        missing = [n for n, specs in wanted.items()
                   if n not in db or not set(specs) <= set(db.specs(n))]
        if missing:
            t = time.perf_counter()
            H = collect_hessians(model, missing, calib_tokens, batch=hessian_batch)
            info["hessian_s"] = time.perf_counter() - t
            it = missing
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(missing, desc=f"GPTQ database {key[:8]}", leave=False)
            t = time.perf_counter()
            for name in it:
                W = mods[name].weight.detach().to(torch.float32)
                entries = build_database(W, H.pop(name), wanted[name], layer=name, **gptq_kw)
                db.put(name, entries)
                out[name] = entries
            info["build_s"] = time.perf_counter() - t
            info["built_layers"] = len(missing)
        t = time.perf_counter()
        for name, specs in wanted.items():
            if name not in out:
                out[name] = {s: db.get(name, s) for s in specs}
                info["loaded_layers"] += 1
        info["load_s"] = time.perf_counter() - t
    return out, info


def database_errors(problem: AllocationProblem,
                    candidates: dict[str, dict[QuantSpec, QuantizedWeight]]) -> np.ndarray:
    """e[i, k] = sum over group i's modules of the entry's meta["rel_err"]
    (tr(E H E^T) / tr(W H W^T), recorded by GPTQ when the database was built)."""
    e = np.zeros((problem.n_groups, problem.n_options))
    for i, g in enumerate(problem.groups):
        for m in g.modules:
            for k, spec in enumerate(problem.options):
                if not problem.available[i, k]:
                    continue
                try:
                    e[i, k] += float(candidates[m.name][spec].meta["rel_err"])
                except KeyError as err:
                    raise ValueError(f"database entry {spec.short()} of module {m.name!r} lacks "
                                     f"meta['rel_err'] ({err})") from None
    return e
