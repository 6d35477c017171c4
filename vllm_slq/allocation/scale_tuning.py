"""Tuning the chosen candidates' group scales on the model's KL, the codes fixed.

GPTQ chooses every layer's codes q, zero points z and scales s0 to fit that layer's
output on its calibration inputs. Once the allocation has fixed each layer's width,
the scales alone are tuned on the true objective, the whole model's KL:

    s(d)  = s0 * exp(d)                         d in R^{N x K/G}, one per group, d = 0 at start
    W(d)  = (q - z) * s(d)                      (ScaledLinear; q, z the candidate's integers)
    L(d)  = KL(p_fp || p_{W(d)})                mean over training blocks (ModelKLObjective)
    dL/dd = s(d) * sum_{j in group} (dL/dW)_j (q - z)_j,    dL/dW = g^T x

by Adam with a cosine-decayed rate (tune_scales), one rate per width (width_lr):

    lr_b  = lr * min(1, (2^r - 1) / (2^b - 1))     r = reference_bits (3); None: lr at every width

Adam moves each d by about its rate per step whatever the gradient's size, and a relative
change d of the scale moves a weight by d * |q - z| * s, up to d * (2^b - 1) grid steps. One
rate for all widths therefore moves an 8-bit weight 17x as many of its grid steps as a
4-bit one: at 2e-3 half a grid step per step, which is more than the 8-bit rounding error
it means to correct. Scaling by 1 / (2^b - 1) moves every width's largest code by the same
fraction of its grid step. Widths below r keep lr (slow_only): raising their rate by the
same rule (to 2.1x at 3 bits, 5x at 2, with r = 4) measured worse on the reference model
(benchmarks/results/slq_peer_budgets_widthlr.json). r = 3 (4-bit groups at 7/15 of lr)
measured 0.97-0.99x r = 4's held-out KL at 4.2-6.0 bpw, CIs below 1, and tied at 8.0
(results/slq_peer_budgets.json against _ref4.json). Every `check_every` steps the KL on
held-back blocks is measured and the best d kept, the start (GPTQ's scales) included:
the tuning never returns scales that measured worse on text it did not fit.

With norms=True the model's norm layers are tuned with the scales (norm tweaking): each
norm's output y = n(x) is multiplied by a per-channel factor exp(u), u = 0 at start, at
rate norm_lr. For a norm whose output is proportional to its weight (and bias), as RMSNorm's
and LayerNorm's are, exp(u) * n(x; w, b) = n(x; w exp(u), b exp(u)): the factor folds into
the stored weight exactly (fold_norm_scales), and the tuned model is the written one. That
gives every channel of the linears reading a norm (q/k/v, gate/up) a multiplier no group
scale has. tunable_norms checks the proportionality on each candidate layer and names the
ones it excludes (a (1 + w) norm such as Gemma's is one).

Codes and zero points are the format's integers and stay as GPTQ chose them; the tuned
scale is rounded once to the stored scale dtype. The checkpoint format, the kernels and
the bits per parameter are unchanged.

Memory: d and Adam's two moments are 3 fp32 values per group (0.19 B per weight at
G = 64: about 1.3 GB for Llama-3.1-8B's linears). ScaledLinear saves only x, as any
linear does, and re-dequantizes W in the backward, one layer at a time (as MixedLinear);
under block checkpointing the peak is the allocation's plus those 3 values per group.
Under torch.distributed each rank scores its share of a step's blocks and the gradients
of d are summed over ranks before the step, so every rank takes the same steps.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .objective import ModelKLObjective, linear_weight_grad
from .store import StoredCandidate

__all__ = ["ScaledLinear", "ScaleTuning", "fold_norm_scales", "tunable_norms", "tune_scales", "width_lr"]


class ScaledLinear(torch.autograd.Function):
    """y = x W(d)^T + b with W(d) = (q - z) * s0 * exp(d), the candidate dequantized on the fly.

    Saves x and d; the backward re-dequantizes W for dL/dx and forms dL/dW = g^T x in fp32
    for this layer only, then reduces it over each group against (q - z)."""

    @staticmethod
    def forward(ctx, x, d, bias, candidate: StoredCandidate):
        ctx.save_for_backward(x, d)
        ctx.candidate = candidate
        return torch.nn.functional.linear(x, _weight(candidate, d, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, d = ctx.saved_tensors
        c: StoredCandidate = ctx.candidate
        grad_x = grad_d = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _weight(c, d, grad_y.dtype)
        if ctx.needs_input_grad[1]:
            n, k = c.scale.shape[0], c.in_features
            g = c.spec.effective_group(k)
            grad_w = linear_weight_grad(grad_y, x)
            integers = c.dequantize(torch.float32, scale=torch.ones_like(d))  # q - z
            grad_d = (grad_w * integers).reshape(n, k // g, g).sum(-1) * _scale(c, d)
        return grad_x, grad_d, None, None


def _scale(c: StoredCandidate, d: torch.Tensor) -> torch.Tensor:
    return c.resident_scale().to(torch.float32) * torch.exp(d)


def _weight(c: StoredCandidate, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return c.dequantize(dtype, scale=_scale(c, d))


def _scaled_forward(linear: torch.nn.Linear, d: torch.Tensor, candidate: StoredCandidate,
                    x: torch.Tensor) -> torch.Tensor:
    return ScaledLinear.apply(x, d, linear.bias, candidate)


def _norm_like(module: torch.nn.Module) -> bool:
    """A leaf layer whose parameters are a 1-D weight and at most a bias of its shape."""
    params = dict(module.named_parameters(recurse=False))
    w = params.get("weight")
    return (not any(True for _ in module.children()) and not isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
            and w is not None and w.dim() == 1 and set(params) <= {"weight", "bias"}
            and ("bias" not in params or params["bias"].shape == w.shape))


def _folds_exactly(module: torch.nn.Module) -> str | None:
    """None when exp(u) * n(x; w, b) == n(x; w exp(u), b exp(u)) on a random input and factor
    (a copy of the layer, in fp32 on the CPU); else why not."""
    probe = copy.deepcopy(module).to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    n = probe.weight.numel()
    x = torch.randn(3, n, generator=gen)
    r = torch.exp(0.1 * torch.randn(n, generator=gen))
    with torch.no_grad():
        try:
            scaled = probe(x) * r
        except Exception as e:  # not a layer over the last dimension
            return f"does not take a [tokens, {n}] input ({type(e).__name__})"
        for t in probe.parameters(recurse=False):
            t.mul_(r)
        if not torch.allclose(probe(x), scaled, rtol=1e-5, atol=1e-6):
            return "output not proportional to its weight"
    return None


def tunable_norms(model: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The model's norm layers whose tuned factor folds exactly into their weight (and bias), and
    the norm-like layers excluded, each with the reason."""
    tunable, excluded = {}, {}
    for name, module in model.named_modules():
        if _norm_like(module):
            why = _folds_exactly(module)
            if why is None:
                tunable[name] = module
            else:
                excluded[name] = why
    return tunable, excluded


@contextmanager
def _scaling_outputs(norms: dict[str, torch.nn.Module], u: dict[str, torch.Tensor]):
    """Inside, each norm's output is multiplied by exp(u[name]) (a forward hook; checkpointed
    recomputes included)."""
    def hook(name, _module, _inputs, output):
        return output * torch.exp(u[name]).to(output.dtype)

    handles = [m.register_forward_hook(functools.partial(hook, name)) for name, m in norms.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold_norm_scales(model: torch.nn.Module, norm_scales: dict[str, torch.Tensor]) -> None:
    """Multiply each named norm's weight (and bias) by its tuned factor, in place: the model then
    computes what the tuning measured."""
    mods = dict(model.named_modules())
    for name, r in norm_scales.items():
        if name not in mods:
            raise ValueError(f"fold_norm_scales: the model has no layer {name!r}")
        for t in mods[name].parameters(recurse=False):
            t.copy_((t.float() * r.to(t.device)).to(t.dtype))


@dataclass
class ScaleTuning:
    """tune_scales' result: the tuned scales per layer (the stored dtype, on the CPU), the tuned
    norms' factors (fp32, on the CPU; empty unless norms were tuned) and its log."""

    scales: dict[str, torch.Tensor]
    heldout_kl_start: float
    heldout_kl_best: float
    best_step: int
    seconds: float
    lr_by_bits: dict[int, float] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    norms_excluded: dict[str, str] = field(default_factory=dict)
    norm_lr: float | None = None

    def summary(self) -> dict:
        return {"heldout_kl_start": self.heldout_kl_start, "heldout_kl_best": self.heldout_kl_best,
                "heldout_kl_ratio": self.heldout_kl_best / self.heldout_kl_start if self.heldout_kl_start else None,
                "best_step": self.best_step, "seconds": self.seconds, "lr_by_bits": self.lr_by_bits,
                "norms": len(self.norm_scales), "norm_lr": self.norm_lr, "norms_excluded": self.norms_excluded,
                "norm_factor_range": None if not self.norm_scales else
                [min(float(r.min()) for r in self.norm_scales.values()),
                 max(float(r.max()) for r in self.norm_scales.values())],
                "log": self.log}


def width_lr(lr: float, bits: int, reference_bits: int | None, slow_only: bool = True) -> float:
    """The rate of a `bits`-wide candidate's log-scales: lr at reference_bits, scaled by 1 / (2^b - 1)
    (the module docstring); lr at every width when reference_bits is None. slow_only: widths
    below reference_bits keep lr; False raises their rate by the same rule."""
    if reference_bits is None:
        return lr
    factor = ((1 << reference_bits) - 1) / ((1 << bits) - 1)
    return lr * (min(factor, 1.0) if slow_only else factor)


def tune_scales(objective: ModelKLObjective, choice: np.ndarray, train_blocks: int, steps: int,
                lr: float = 2e-3, check_every: int = 8, reference_bits: int | None = 3,
                slow_only: bool = True, norms: bool = False, norm_lr: float | None = None) -> ScaleTuning:
    """Tune the group scales of the allocation `choice` (one option per group of the objective's
    problem) on the objective's first `train_blocks` token blocks, `objective.batch_blocks`
    per step; the remaining blocks are the held-back check. `lr` is the rate at `reference_bits`
    (width_lr). norms: tune the model's norm layers too (tunable_norms), at norm_lr (default
    lr); the caller folds the result's norm_scales into the model (fold_norm_scales).
    Returns the best-checked scales (and norm factors)."""
    n_blocks = objective.tokens.shape[0]
    if not 0 < train_blocks < n_blocks:
        raise ValueError(f"tune_scales: train_blocks={train_blocks} must leave held-back blocks among the "
                         f"objective's {n_blocks}")
    if steps < 1 or check_every < 1:
        raise ValueError(f"tune_scales: steps={steps} and check_every={check_every} must be >= 1")
    if reference_bits is not None and reference_bits < 1:
        raise ValueError(f"tune_scales: reference_bits={reference_bits} must be >= 1, or None for one rate")
    t0 = time.time()
    problem = objective.problem
    chosen: dict[str, StoredCandidate] = {}
    for i, g in enumerate(problem.groups):
        for m in g.modules:
            c = objective.candidates[m.name][int(choice[i])]
            if c is None:
                raise ValueError(f"tune_scales: option {int(choice[i])} is not available for layer {m.name!r}")
            chosen[m.name] = c
    d = {name: torch.zeros(c.scale.shape, dtype=torch.float32, device=objective.device, requires_grad=True)
         for name, c in chosen.items()}
    forwards = {name: functools.partial(_scaled_forward, objective.linears[name], d[name], c)
                for name, c in chosen.items()}
    norm_layers, excluded = tunable_norms(objective.model) if norms else ({}, {})
    u = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=objective.device, requires_grad=True)
         for name, m in norm_layers.items()}
    heldout = range(train_blocks, n_blocks)
    lr_by_bits = {b: width_lr(lr, b, reference_bits, slow_only) for b in sorted({c.spec.bits for c in chosen.values()})}
    norm_lr = (lr if norm_lr is None else norm_lr) if norm_layers else None
    optimizer = torch.optim.Adam([{"params": [d[n] for n, c in chosen.items() if c.spec.bits == b], "lr": rate}
                                  for b, rate in lr_by_bits.items()]
                                 + ([{"params": list(u.values()), "lr": norm_lr}] if u else []))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    params = {**{("scale", n): t for n, t in d.items()}, **{("norm", n): t for n, t in u.items()}}

    def snapshot():
        return {k: t.detach().clone() for k, t in params.items()}

    with _scaling_outputs(norm_layers, u):
        best_kl = start_kl = objective.mean_divergence_with(forwards, heldout)
        best = snapshot()
        best_step, log = 0, [{"step": 0, "heldout_kl": start_kl}]
        b = objective.batch_blocks
        for step in tqdm(range(1, steps + 1), desc="scale tuning", leave=False):
            idx = (torch.arange(b) + (step - 1) * b) % train_blocks
            loss = objective.divergence_with(forwards, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if objective.world > 1:
                for t in params.values():
                    if t.grad is not None:  # a norm no token passes (the same on every rank)
                        dist.all_reduce(t.grad)
            optimizer.step()
            schedule.step()
            if step % check_every == 0 or step == steps:
                kl = objective.mean_divergence_with(forwards, heldout)
                log.append({"step": step, "train_kl": float(loss.detach()), "heldout_kl": kl})
                if kl < best_kl:
                    best_kl, best_step = kl, step
                    best = snapshot()
    with torch.no_grad():
        scales = {name: _scale(c, best[("scale", name)]).to(c.scale.dtype).cpu() for name, c in chosen.items()}
        norm_scales = {name: torch.exp(best[("norm", name)]).cpu() for name in u}
    return ScaleTuning(scales, start_kl, best_kl, best_step, time.time() - t0, lr_by_bits, log,
                       norm_scales, excluded, norm_lr)
