"""GSQ: Gumbel-Softmax scalar quantization (Dadgarnia et al.), the pure math.

GSQ keeps a plain group-wise integer format, symmetric (w ~ q * s) or asymmetric
(w ~ (q - z) * s, the integer zero point z kept as GPTQ chose it), and learns, per
weight, which grid code to use, and per group, the scale, by relaxing the discrete
choice with a Gumbel-Softmax. It starts from GPTQ codes q0 and scales.

Equations (docs/methods.md section 3) and where they live below:

* Candidate set per weight (:func:`candidate_offsets`, :class:`GSQWeight`):
    2-bit   : 4 codes v_k in {-2,-1,0,1}; written as base 0 + offset v_k.
    3/4-bit : 5 codes q0 + d, d in {-2..2}; candidates outside [qmin, qmax]
              are masked (logit -inf), so codes always stay on the grid.
    ternary : independent sign and mask logits (binary Gumbel = logistic noise),
              codes sign * mask in {-1, 0, 1}, stored on the 2-bit symmetric grid.
* Logit init with a prior around the GPTQ code (:func:`init_logits`):
    alpha_k = std * (N(0,1) + strength * l_k),  l_k = -(q0 - v_k)^2 / 2 centred over k
  (std 0.01, strength 6). With keep_init (init_keeps_codes, on by default) a weight whose
  draw would put another code above q0 has the two codes' noise values swapped, so the
  refinement starts from GPTQ's codes exactly; the paper's draw (off) starts about 1.7%
  of codes per neighbour away from them.
* Soft weight (:class:`GumbelSoftWeight`, :class:`TernarySoftWeight`):
    y = softmax((alpha * kappa + g) / tau),   g ~ Gumbel(0, 1)
    W_soft = (base + sum_k y_k d_k - z) * s          (z = 0 when symmetric)
  For weights up to ``save_elems`` logits (default 64M) the forward keeps
  y_k (d_k - e) for the backward (as much memory as the logits); larger weights
  **replay** g from a seed in the backward instead, so no soft one-hot [N, K, C]
  tensor lives between forward and backward. Work is done in row chunks,
  candidate-major ([C, rows, K]: a softmax over a contiguous last dim of 4-5 is
  an order of magnitude slower on CPU), so transient buffers stay small.
  Gradients (y_k = softmax output, e = E_y[d]):
    dL/dalpha_k = (kappa / tau) * (dL/dW * s) * y_k * (d_k - e)
    dL/ds_group = sum_{group} dL/dW * (base + e - z)
* Schedules per step (quant/lion.py: ``linear_schedule``, ``cosine_lr``):
    tau 2.0 -> 0.05 linear, kappa 100 -> 500 linear, lr cosine to 0.1 * lr.
* Optimiser (quant/lion.py: ``Lion``): u = sign(b1 m + (1 - b1) g);
    p <- p * (1 - lr * wd) - lr * u;  m <- b2 m + (1 - b2) g
  logits: lr 2e-4, decoupled wd 1.0 (pulls logits towards uniform: the real
  regulariser); scales: lr 1e-4 at 2 bits, times 3 / (2^b - 1) at width b
  (:func:`scale_lr_factor`: Lion's step is absolute, a b-bit scale ~ 1 / (2^b - 1)),
  fp32, no decay.
* End: hard argmax codes times the learned scale (:meth:`GSQWeight.to_quantized`).
* The optimisation loop over calibration batches for a set of weights refined
  jointly against one loss (the decoder block output MSE): :func:`refine`. One
  Gumbel draw per (step, weight) is shared by the step's items; gradients w.r.t.
  the soft weights accumulate over the items and one custom backward maps them to
  logits and scales.
* Ternary initialisation: GPTQ with codes clamped to {-1, 0, 1} and a diag-H
  weighted ternary scale search (quant/gsq_ternary.py). Applying all this to one
  decoder block of a model: quant/gsq_block.py.

Memory per refined weight (C candidates): logits, their gradient and the Lion
moment, fp32 each (3 x 4 x C bytes per weight) plus int8 base/q0 codes; the soft
weight and its gradient are [N, K] in the block's dtype. Between a step's forward
and backward, y (d - e) adds another 4 x C bytes per weight when it is saved
(save_elems); with replay the noise and the soft one-hot exist only chunk by
chunk inside forward/backward.

Nothing here imports llmcompressor or vLLM; the modifier supplies the loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from .lion import Lion, cosine_lr, linear_schedule
from .spec import QuantizedWeight, QuantSpecError

__all__ = [
    "GSQConfig",
    "GSQWeight",
    "GumbelSoftWeight",
    "RefineResult",
    "TernarySoftWeight",
    "candidate_offsets",
    "hard_loss",
    "init_logits",
    "sample_noise",
    "soft_weight_reference",
    "refine",
    "scale_lr_factor",
    "ternary_init",
]

_EPS = 1e-10
_SEED_MOD = (1 << 62) - 57  # keep combined seeds inside torch's accepted range


@dataclass
class GSQConfig:
    """Hyper-parameters of one GSQ refinement (defaults: the paper's released configs)."""

    tau_start: float = 2.0
    tau_end: float = 0.05
    kappa_start: float = 100.0
    kappa_end: float = 500.0
    logit_lr: float = 2e-4
    logit_weight_decay: float = 1.0
    scale_lr: float = 1e-4  # at 2 bits; width b uses scale_lr * scale_lr_factor(b)
    betas: tuple[float, float] = (0.9, 0.95)
    final_lr_fraction: float = 0.1  # cosine decay ends at this fraction of lr
    init_std: float = 0.01
    init_strength: float = 6.0
    # the init's argmax is GPTQ's code for every weight (init_logits keep_init): at strength 6
    # the paper's draw starts ~2.6% of 2-bit codes on a neighbour, which 80 steps do not undo
    init_keeps_codes: bool = True
    epochs: int = 10
    batch_size: int = 8  # calibration sequences per optimiser step
    seed: int = 0
    chunk_elems: int = 1 << 21  # weights per row chunk in the soft-weight kernels
    # keep the best hard assignment seen at evaluation points (by the loss on
    # hard weights); the paper simply takes the final argmax
    keep_best: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"GSQConfig: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise ValueError("GSQConfig: temperatures must be positive")
        if not (0 < self.final_lr_fraction <= 1):
            raise ValueError("GSQConfig: final_lr_fraction must be in (0, 1]")


# --------------------------------------------------------------------------- #
# candidate sets and initial logits
# --------------------------------------------------------------------------- #

def candidate_offsets(bits: int, ternary: bool = False) -> torch.Tensor:
    """Offsets d_k added to the per-weight base code (float32 [C]).

    2-bit: base 0, offsets are the four absolute codes {-2, -1, 0, 1}.
    3..8-bit: base q0 (the GPTQ code), offsets {-2, -1, 0, 1, 2}.
    ternary: {-1, 0, 1} (only used to describe the code set; the relaxation is sign/mask).
    """
    if ternary:
        return torch.tensor([-1.0, 0.0, 1.0])
    if bits == 2:
        return torch.tensor([-2.0, -1.0, 0.0, 1.0])
    if 3 <= bits <= 8:
        return torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    raise QuantSpecError(f"GSQ supports 2..8 bits or ternary, got bits={bits!r}")


def _valid_mask(base: torch.Tensor, offsets: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    cand = base.to(torch.float32).unsqueeze(-1) + offsets
    return (cand >= qmin) & (cand <= qmax)


def init_logits(
    q0: torch.Tensor,
    base: torch.Tensor,
    offsets: torch.Tensor,
    std: float = 0.01,
    strength: float = 6.0,
    generator: Optional[torch.Generator] = None,
    keep_init: bool = False,
) -> torch.Tensor:
    """alpha_k = std * (N(0,1) + strength * l_k), l_k = -(q0 - v_k)^2/2 centred over k.

    v_k = base + offsets[k] are the candidate codes; q0 the GPTQ code (one of them).
    keep_init: where the draw's argmax k* is not q0's candidate k0, the noise values of k0
    and k* are swapped. Then alpha_k0 = std (n_k* + strength l_k0) is the largest: n_k* was
    the winning draw and l_k0 = max_k l_k. The set of noise values per weight is unchanged.
    """
    v = base.to(torch.float32).unsqueeze(-1) + offsets.to(q0.device)
    q = q0.to(torch.float32).unsqueeze(-1)
    prior = -0.5 * (q - v) ** 2
    prior = prior - prior.mean(dim=-1, keepdim=True)
    noise = torch.randn(prior.shape, generator=generator, device=prior.device, dtype=torch.float32)
    if keep_init:
        k0 = (v == q).to(torch.uint8).argmax(-1, keepdim=True)
        k_star = (noise + strength * prior).argmax(-1, keepdim=True)
        n0, n_star = noise.gather(-1, k0), noise.gather(-1, k_star)
        noise.scatter_(-1, k0, n_star)
        noise.scatter_(-1, k_star, n0)  # k_star == k0: writes n0 back, nothing moves
    return std * (noise + strength * prior)


def ternary_init(
    w: torch.Tensor, q0: torch.Tensor, std: float = 0.01, strength: float = 6.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sign and mask logits [N, K, 2] with a prior at the initial ternary code q0.

    Sign prior +-1/2 towards sign(q0) (sign(w) where q0 = 0, at half strength, so an
    unmasked weight starts on the side its FP value lies); mask prior +-1/2 towards
    "kept" where q0 != 0. Same std/strength convention as :func:`init_logits`.
    """
    s = torch.sign(q0.to(torch.float32))
    s = torch.where(s == 0, 0.5 * torch.sign(w.to(torch.float32)), s)
    m = torch.where(q0 != 0, 1.0, -1.0)
    prior = 0.5 * torch.stack([s, m], dim=-1)
    noise = torch.randn(prior.shape, generator=generator, device=prior.device, dtype=torch.float32)
    return std * (noise + strength * prior)


# --------------------------------------------------------------------------- #
# seeded noise (replayed in backward)
# --------------------------------------------------------------------------- #

def _chunk_rows(n: int, k: int, c: int, chunk_elems: int) -> int:
    return max(1, min(n, chunk_elems // max(1, k * c)))


def _chunk_noise(shape, seed: int, chunk_index: int, device, kind: str) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + chunk_index) % _SEED_MOD)
    u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32).clamp_(_EPS, 1.0 - _EPS)
    if kind == "gumbel":
        return u.log_().neg_().log_().neg_()  # -log(-log u), in place
    if kind == "logistic":
        return torch.log(u) - torch.log1p(-u)
    raise ValueError(f"unknown noise kind {kind!r}")


def sample_noise(shape: Sequence[int], seed: int, chunk_elems: int, device="cpu", kind: str = "gumbel") -> torch.Tensor:
    """The full noise tensor [N, K, C] the soft-weight kernels draw for (shape, seed).

    For reference implementations and tests; the kernels regenerate it chunk by chunk.
    Gumbel noise is drawn candidate-major ([C, rows, K] per row chunk, see
    :class:`GumbelSoftWeight`) and returned here permuted to [N, K, C].
    """
    n, k, c = shape
    rows = _chunk_rows(n, k, c, chunk_elems)
    if kind == "gumbel":
        parts = [_chunk_noise((c, min(rows, n - r0), k), seed, i, device, kind)
                 for i, r0 in enumerate(range(0, n, rows))]
        return torch.cat(parts, dim=1).permute(1, 2, 0)
    parts = [
        _chunk_noise((min(rows, n - r0), k, c), seed, i, device, kind)
        for i, r0 in enumerate(range(0, n, rows))
    ]
    return torch.cat(parts, dim=0)


def _expand_groups(x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, groups] -> [n, K] by repeating each group's value over its G columns."""
    n, groups = x.shape
    return x.unsqueeze(-1).expand(n, groups, k // groups).reshape(n, k)


def _sum_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, k = x.shape
    return x.view(n, groups, k // groups).sum(-1)


# --------------------------------------------------------------------------- #
# custom autograd: categorical candidates
# --------------------------------------------------------------------------- #

class GumbelSoftWeight(torch.autograd.Function):
    """W_soft = (base + sum_k softmax((alpha*kappa + g)/tau)_k d_k - z) * s.

    Inputs: logits [N,K,C] fp32, scale [N,groups] fp32, base int8 [N,K], offsets [C],
    zero: the asymmetric grid's zero points [N,groups] (fp32, integer values) or None;
    candidates outside [qmin, qmax] are masked from (base, offsets) on the fly.
    save_elems: if logits.numel() <= save_elems, forward keeps y*(d - e) ([N,K,C]
    fp32, as much memory as the logits) for the backward; otherwise the backward
    replays g from the seed and recomputes y chunk by chunk (no [N,K,C] state
    between forward and backward). Same math either way.

    Work is candidate-major: per row chunk, noise and z are [C, rows, K], so the
    softmax over candidates and e = sum_k y_k d_k are reductions over contiguous
    planes (a softmax over a last dim of 4-5 is ~15x slower on CPU).
    """

    @staticmethod
    def forward(ctx, logits, scale, base, offsets, tau, kappa, seed, qmin, qmax, chunk_elems, out_dtype,
                save_elems=None, zero=None):
        n, k, c = logits.shape
        rows = _chunk_rows(n, k, c, chunk_elems)
        out = torch.empty((n, k), dtype=out_dtype, device=logits.device)
        offs = offsets.to(device=logits.device, dtype=logits.dtype)
        save = save_elems is not None and logits.numel() <= save_elems
        saved_a, saved_be = [], []
        with torch.no_grad():
            for i, r0 in enumerate(range(0, n, rows)):
                r1 = min(n, r0 + rows)
                y = _soft_assign(logits[r0:r1], base[r0:r1], offs, tau, kappa, seed, i, qmin, qmax)
                e = torch.tensordot(offs, y, dims=([0], [0]))  # [rows, K]
                be = _shifted(base[r0:r1], e, zero, r0, r1)
                out[r0:r1] = (be * _expand_groups(scale[r0:r1], k)).to(out_dtype)
                if save:
                    # y_k (d_k - e), the per-candidate factor of dL/dalpha (zero where masked)
                    saved_a.append(y.mul_((offs.view(c, 1, 1) - e)))
                    saved_be.append(be)
        ctx.save_for_backward(logits, scale, base, offs)
        ctx.zero = zero
        ctx.saved_chunks = (saved_a, saved_be) if save else None
        ctx.cfg = (tau, kappa, seed, qmin, qmax, chunk_elems)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, scale, base, offs = ctx.saved_tensors
        tau, kappa, seed, qmin, qmax, chunk_elems = ctx.cfg
        saved = ctx.saved_chunks
        ctx.saved_chunks = None
        n, k, c = logits.shape
        rows = _chunk_rows(n, k, c, chunk_elems)
        need_logits, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_logits = torch.empty_like(logits) if need_logits else None
        g_scale = torch.empty_like(scale) if need_scale else None
        groups = scale.shape[1]
        for i, r0 in enumerate(range(0, n, rows)):
            r1 = min(n, r0 + rows)
            if saved is not None:
                a, be = saved[0][i], saved[1][i]
            else:
                y = _soft_assign(logits[r0:r1], base[r0:r1], offs, tau, kappa, seed, i, qmin, qmax)
                e = torch.tensordot(offs, y, dims=([0], [0]))
                be = _shifted(base[r0:r1], e, ctx.zero, r0, r1)
                a = y.mul_(offs.view(c, 1, 1) - e)  # y*(d - e) is zero for masked candidates (y = 0)
            g = grad_out[r0:r1].to(logits.dtype)
            if need_scale:
                g_scale[r0:r1] = _sum_groups(g * be, groups)
            if need_logits:
                gs = g * _expand_groups(scale[r0:r1], k) * (kappa / tau)
                g_logits[r0:r1].permute(2, 0, 1).copy_(a.mul_(gs))
        return (g_logits, g_scale) + (None,) * 11  # (autograd drops the Nones past the inputs given)


def _shifted(base: torch.Tensor, e: torch.Tensor, zero: Optional[torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """base + e - z for rows [r0, r1) (z expanded over its groups; none when symmetric)."""
    be = base.to(e.dtype) + e
    return be if zero is None else be.sub_(_expand_groups(zero[r0:r1], be.shape[1]))


def _soft_assign(logits, base, offs, tau, kappa, seed, chunk_index, qmin, qmax):
    """y = softmax over candidates of (alpha*kappa + g)/tau, candidate-major [C, rows, K]."""
    rows, k, c = logits.shape
    z = _chunk_noise((c, rows, k), seed, chunk_index, logits.device, "gumbel").to(logits.dtype)
    z.add_(logits.permute(2, 0, 1), alpha=kappa).mul_(1.0 / tau)
    # mask candidates off the grid: base + d_k < qmin or > qmax (never the case at 2 bits, base 0)
    bmin, bmax = int(base.min()), int(base.max())
    for j, d in enumerate(offs.tolist()):
        if bmin + d < qmin:
            z[j].masked_fill_(base < qmin - d, float("-inf"))
        if bmax + d > qmax:
            z[j].masked_fill_(base > qmax - d, float("-inf"))
    return torch.softmax(z, dim=0)


# --------------------------------------------------------------------------- #
# custom autograd: ternary sign/mask
# --------------------------------------------------------------------------- #

class TernarySoftWeight(torch.autograd.Function):
    """W_soft = s * (2 sigma(z_sign) - 1) * sigma(z_mask), z = (alpha*kappa + logistic)/tau.

    logits [N,K,2] = (sign, mask); logistic noise replayed from seed.
    """

    @staticmethod
    def forward(ctx, logits, scale, tau, kappa, seed, chunk_elems, out_dtype):
        n, k, _ = logits.shape
        rows = _chunk_rows(n, k, 2, chunk_elems)
        out = torch.empty((n, k), dtype=out_dtype, device=logits.device)
        with torch.no_grad():
            for i, r0 in enumerate(range(0, n, rows)):
                r1 = min(n, r0 + rows)
                sig = _ternary_sigmoids(logits[r0:r1], tau, kappa, seed, i)
                val = (2 * sig[..., 0] - 1) * sig[..., 1]
                out[r0:r1] = (val * _expand_groups(scale[r0:r1], k)).to(out_dtype)
        ctx.save_for_backward(logits, scale)
        ctx.cfg = (tau, kappa, seed, chunk_elems)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, scale = ctx.saved_tensors
        tau, kappa, seed, chunk_elems = ctx.cfg
        n, k, _ = logits.shape
        rows = _chunk_rows(n, k, 2, chunk_elems)
        need_logits, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_logits = torch.empty_like(logits) if need_logits else None
        g_scale = torch.empty_like(scale) if need_scale else None
        for i, r0 in enumerate(range(0, n, rows)):
            r1 = min(n, r0 + rows)
            sig = _ternary_sigmoids(logits[r0:r1], tau, kappa, seed, i)
            ss, sm = sig[..., 0], sig[..., 1]
            sign_soft = 2 * ss - 1
            g = grad_out[r0:r1].to(torch.float32)
            if need_scale:
                g_scale[r0:r1] = _sum_groups(g * sign_soft * sm, scale.shape[1])
            if need_logits:
                gs = g * _expand_groups(scale[r0:r1], k) * (kappa / tau)
                g_logits[r0:r1, :, 0] = gs * sm * 2 * ss * (1 - ss)
                g_logits[r0:r1, :, 1] = gs * sign_soft * sm * (1 - sm)
        return g_logits, g_scale, None, None, None, None, None


def _ternary_sigmoids(logits, tau, kappa, seed, chunk_index):
    noise = _chunk_noise(logits.shape, seed, chunk_index, logits.device, "logistic")
    return torch.sigmoid((logits * kappa + noise) / tau)


def soft_weight_reference(w: "GSQWeight", tau: float, kappa: float, seed: int) -> torch.Tensor:
    """The same soft weight through plain autograd (stores y): for tests and checks."""
    n, k, c = w.logits.shape
    if w.ternary:
        noise = sample_noise((n, k, 2), seed, w.chunk_elems, w.logits.device, "logistic")
        sig = torch.sigmoid((w.logits * kappa + noise) / tau)
        val = (2 * sig[..., 0] - 1) * sig[..., 1]
        return val * _expand_groups(w.scale, k)
    noise = sample_noise((n, k, c), seed, w.chunk_elems, w.logits.device, "gumbel")
    z = (w.logits * kappa + noise) / tau
    z = z.masked_fill(~w.valid_mask(), float("-inf"))
    y = torch.softmax(z, dim=-1)
    e = (y * w.offsets).sum(-1)
    z = 0.0 if w.zero is None else _expand_groups(w.zero, k)
    return (w.base.to(torch.float32) + e - z) * _expand_groups(w.scale, k)


# --------------------------------------------------------------------------- #
# one refined weight
# --------------------------------------------------------------------------- #

class GSQWeight:
    """Learnable assignment logits and group scales for one linear weight.

    Built from an initial quantization (GPTQ codes q0, scales and, on an asymmetric
    grid, zero points, which stay fixed). The trainable tensors are ``logits``
    ([N,K,C] fp32) and ``scale`` ([N,groups] fp32).
    """

    def __init__(
        self,
        init: QuantizedWeight,
        ternary: bool = False,
        init_std: float = 0.01,
        init_strength: float = 6.0,
        seed: int = 0,
        chunk_elems: int = 1 << 21,
        init_keeps_codes: bool = True,
        fp_weight: Optional[torch.Tensor] = None,
        name: str = "",
        save_elems: int = 1 << 26,
    ):
        """save_elems: keep the soft assignment between forward and backward when the
        logits have at most this many elements (saves regenerating the noise and the
        softmax in every backward, for as much memory as the logits); larger weights
        replay the noise from its seed instead."""
        spec = init.spec
        where = f"layer {name!r}: " if name else ""
        if spec.symmetric != (init.zero_point is None):
            raise QuantSpecError(f"{where}{spec.short()} init {'has' if spec.symmetric else 'lacks'} zero points")
        if ternary and not spec.symmetric:
            raise QuantSpecError(f"{where}ternary GSQ is symmetric (codes -1, 0, 1), got {spec.short()}")
        q0 = init.codes
        if q0.dim() != 2:
            raise QuantSpecError(f"{where}codes must be [N, K], got shape {tuple(q0.shape)}")
        if int(q0.min()) < spec.qmin or int(q0.max()) > spec.qmax:
            raise QuantSpecError(f"{where}initial codes outside [{spec.qmin}, {spec.qmax}]")
        if ternary and (spec.bits != 2 or int(q0.min()) < -1):
            raise QuantSpecError(f"{where}ternary GSQ needs a 2-bit symmetric init with codes in {{-1,0,1}}")
        self.name = name
        self.spec = spec
        self.ternary = ternary
        self.chunk_elems = chunk_elems
        self.save_elems = int(save_elems)
        device = q0.device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) % _SEED_MOD)
        self.q0 = q0.to(torch.int8)
        if ternary:
            self.offsets = candidate_offsets(2, ternary=True).to(device)
            self.base = torch.zeros_like(self.q0)
            fp = fp_weight if fp_weight is not None else init.dequantize()
            logits = ternary_init(fp, self.q0, init_std, init_strength, gen)
        else:
            self.offsets = candidate_offsets(spec.bits).to(device)
            self.base = torch.zeros_like(self.q0) if spec.bits == 2 else self.q0.clone()
            logits = init_logits(self.q0, self.base, self.offsets, init_std, init_strength, gen,
                                 keep_init=init_keeps_codes)
        self.logits = logits.requires_grad_(True)
        self.scale = init.scale.detach().to(torch.float32).clone().requires_grad_(True)
        self.zero_point = init.zero_point  # int8 [N, groups] or None: fixed, as GPTQ chose it
        self.zero = None if init.zero_point is None else init.zero_point.to(device=device, dtype=torch.float32)
        self.meta = dict(init.meta)

    @property
    def num_candidates(self) -> int:
        return self.logits.shape[-1]

    def parameters(self) -> list[torch.Tensor]:
        return [self.logits, self.scale]

    def valid_mask(self) -> torch.Tensor:
        return _valid_mask(self.base, self.offsets, self.spec.qmin, self.spec.qmax)

    def soft_weight(self, tau: float, kappa: float, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.ternary:
            return TernarySoftWeight.apply(self.logits, self.scale, float(tau), float(kappa), int(seed),
                                           self.chunk_elems, dtype)
        return GumbelSoftWeight.apply(self.logits, self.scale, self.base, self.offsets, float(tau), float(kappa),
                                      int(seed), self.spec.qmin, self.spec.qmax, self.chunk_elems, dtype,
                                      self.save_elems, self.zero)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """Argmax assignment (no noise): int8 [N, K] on the grid."""
        if self.ternary:
            sign = torch.where(self.logits[..., 0] >= 0, 1, -1)
            keep = self.logits[..., 1] > 0
            return (sign * keep).to(torch.int8)
        z = self.logits.masked_fill(~self.valid_mask(), float("-inf"))
        idx = z.argmax(dim=-1)
        return (self.base.to(torch.int64) + self.offsets[idx].to(torch.int64)).to(torch.int8)

    @torch.no_grad()
    def hard_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.to_quantized().dequantize(dtype)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        meta = dict(self.meta)
        meta.update(method="gsq", ternary=self.ternary)
        return QuantizedWeight(
            codes=self.hard_codes(),
            scale=self.scale.detach().clone(),
            zero_point=self.zero_point,
            spec=self.spec,
            meta=meta,
        )

    def state_bytes(self) -> int:
        """Bytes of the persistent per-weight state (logits, base, q0, scale); excludes optimiser state."""
        return sum(t.numel() * t.element_size() for t in (self.logits, self.base, self.q0, self.scale))


# --------------------------------------------------------------------------- #
# the refinement loop
# --------------------------------------------------------------------------- #

@dataclass
class RefineResult:
    losses: list[float] = field(default_factory=list)  # soft-weight training loss per step
    init_hard_loss: float = float("nan")  # loss with the GPTQ weights on all batches
    final_hard_loss: float = float("nan")  # loss with the returned hard weights
    steps: int = 0
    kept: str = "final"  # "final" or "init" (if the refined hard weights were worse)


def scale_lr_factor(bits: int) -> float:
    """3 / (2^b - 1): the scale rate at width b relative to 2 bits (what scale_lr is tuned for).

    Lion moves every scale by +-lr per step, an absolute amount, while a b-bit group's scale
    is s ~ range / (2^b - 1). So one rate is a relative step (2^b - 1) / 3 times larger at
    width b than at 2 bits, and it moves weights (2^b - 1) / 2 steps from the zero point by
    about lr (2^b - 1)^2 / (2 range) grid steps. This factor makes the step the same fraction
    of the scale at every width. Measured per decoder block (benchmarks/gsq_block.py
    --asymmetric, layers 2 and 20, held-out block-output MSE over GPTQ's): with one absolute
    rate, w7 and w8 refinements ended 1.2-2.9x worse than GPTQ (scales alone: 2.2x); with
    this factor 0.94-1.01; with its square 0.98-1.04, and 3-6 bits also lost (0.97-1.06
    against this factor's 0.94-1.05)."""
    return 3.0 / (2 ** int(bits) - 1)


def refine(
    weights: Mapping[str, GSQWeight],
    batches: Sequence,
    loss_fn: Callable[[Mapping[str, torch.Tensor], object], torch.Tensor],
    cfg: GSQConfig,
    weight_dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[int, float], None]] = None,
    keep_init_if_worse: bool = True,
) -> RefineResult:
    """Jointly refine ``weights`` against ``loss_fn(soft_weights_by_name, batch)``.

    ``batches``: a sequence of calibration items; every optimiser step takes
    ``cfg.batch_size`` of them (loss averaged over the items) for ``cfg.epochs``
    passes. ``loss_fn`` runs the block with the given weights and returns the
    MSE to the FP block output for one item. ``keep_init_if_worse``: if the final
    hard assignment has a larger total loss than the initial (GPTQ) one, the
    GSQWeights are reset to their initial codes and scales (a safety net; set
    to False to always keep the argmax, as the paper does).
    """
    if not weights:
        raise ValueError("refine: no weights to refine")
    if len(batches) == 0:
        raise ValueError("refine: no calibration batches")
    n_items = len(batches)
    bs = min(cfg.batch_size, n_items)
    steps_per_epoch = math.ceil(n_items / bs)
    total = steps_per_epoch * cfg.epochs
    names = list(weights)
    logit_params = [weights[n].logits for n in names]
    widths = sorted({weights[n].spec.bits for n in names})
    scale_groups = [dict(params=[weights[n].scale for n in names if weights[n].spec.bits == b],
                         lr=cfg.scale_lr * scale_lr_factor(b), weight_decay=0.0) for b in widths]
    opt = Lion([dict(params=logit_params, lr=cfg.logit_lr, weight_decay=cfg.logit_weight_decay), *scale_groups],
               betas=cfg.betas)
    base_lrs = [g["lr"] for g in opt.param_groups]
    result = RefineResult()
    init_state = {n: (weights[n].scale.detach().clone()) for n in names}
    init_codes = {n: weights[n].q0.clone() for n in names}
    result.init_hard_loss = hard_loss(weights, batches, loss_fn, weight_dtype, codes=init_codes)
    order_gen = torch.Generator()
    order_gen.manual_seed(int(cfg.seed) % _SEED_MOD)
    step = 0
    for _epoch in range(cfg.epochs):
        perm = torch.randperm(n_items, generator=order_gen).tolist()
        for b0 in range(0, n_items, bs):
            idx = perm[b0:b0 + bs]
            tau = linear_schedule(cfg.tau_start, cfg.tau_end, step, total)
            kappa = linear_schedule(cfg.kappa_start, cfg.kappa_end, step, total)
            for g, base_lr in zip(opt.param_groups, base_lrs):
                g["lr"] = cosine_lr(base_lr, step, total, cfg.final_lr_fraction)
            opt.zero_grad(set_to_none=True)
            # one Gumbel draw per (step, weight), shared by the step's items: the soft
            # weights are built once, gradients w.r.t. them accumulate over the items,
            # then one custom backward (noise replayed) maps them to logits and scales
            soft = {
                n: weights[n].soft_weight(tau, kappa, seed=_step_seed(cfg.seed, step, wi), dtype=weight_dtype)
                for wi, n in enumerate(names)
            }
            leaves = {n: t.detach().requires_grad_(True) for n, t in soft.items()}
            step_loss = 0.0
            for j in idx:
                loss = loss_fn(leaves, batches[j]) / len(idx)
                loss.backward()
                step_loss += float(loss.detach())
                del loss
            torch.autograd.backward([soft[n] for n in names],
                                    [leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n])
                                     for n in names])
            del soft, leaves
            opt.step()
            result.losses.append(step_loss)
            if progress is not None:
                progress(step, step_loss)
            step += 1
    result.steps = step
    del opt
    result.final_hard_loss = hard_loss(weights, batches, loss_fn, weight_dtype)
    if keep_init_if_worse and result.final_hard_loss > result.init_hard_loss:
        with torch.no_grad():
            for n in names:
                w = weights[n]
                w.scale.copy_(init_state[n])
                _force_codes(w, init_codes[n])
        result.kept = "init"
        result.final_hard_loss = result.init_hard_loss
    return result


def _step_seed(seed: int, step: int, weight_index: int) -> int:
    return (int(seed) * 7_919 + step * 104_729 + weight_index * 15_485_863 + 1) % _SEED_MOD


@torch.no_grad()
def hard_loss(weights, batches, loss_fn, dtype, codes: Optional[Mapping[str, torch.Tensor]] = None) -> float:
    """Mean loss over all batches with hard weights (argmax codes, or ``codes``) and current scales."""
    hard = {}
    for n, w in weights.items():
        c = w.hard_codes() if codes is None else codes[n]
        hard[n] = QuantizedWeight(c, w.scale.detach(), w.zero_point, w.spec).dequantize(dtype)
    total = 0.0
    for b in batches:
        total += float(loss_fn(hard, b))
    return total / len(batches)


@torch.no_grad()
def _force_codes(w: GSQWeight, codes: torch.Tensor) -> None:
    """Set logits so that the argmax is ``codes`` (used to fall back to the init)."""
    if w.ternary:
        c = codes.to(torch.float32)
        w.logits[..., 0] = torch.where(c >= 0, 1.0, -1.0)
        w.logits[..., 1] = torch.where(c != 0, 1.0, -1.0)
        return
    target = (codes.to(torch.float32) - w.base.to(torch.float32)).unsqueeze(-1)
    w.logits.copy_(torch.where(w.offsets == target, 1.0, -1.0))
