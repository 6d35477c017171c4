"""GPTQ: column-by-column rounding with error feedback through the inverse Hessian.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers" (ICLR 2023). For a linear layer with
weight W [N, K] and calibration inputs x [n, K], the layer-wise objective is

    min_Q ||W X - Q X||^2 = tr((W - Q) H (W - Q)^T),   H = 2/n sum_t x_t x_t^T     (paper eq. 1)

and the map from paper to code below is:

    GPTQ.add_batch          H as a running average of 2/n sum x x^T over all tokens
    factor_hessian          dead columns (H_jj = 0 -> H_jj = 1, W[:, j] = 0);
                            damping H + lambda I, lambda = percdamp * mean(diag H);
                            U = chol(H^-1) upper (paper, "Cholesky reformulation"),
                            retrying with 10x damping when not positive definite
    gptq_quantize_many      the loop of paper Algorithm 1, for S specs at once:
                              for each column j of a block:
                                q_j   = quant(w_j)                        (grid of the group)
                                e_j   = (w_j - q_j) / U_jj
                                W[:, j:blk_end] -= e_j U_j,j:blk_end       (within the block)
                              W[:, blk_end:] -= E U_blk,blk_end:          ("lazy batch" update)
                            inside a block the same again at a finer scale: the per-column
                            update reaches only the rest of its sub-block (`subblock`, 32
                            columns), and each sub-block's errors reach the rest of the
                            block as one matrix product, so most of the O(N K B) update
                            work runs as GEMMs instead of elementwise passes
                            group parameters (scale, zero) are fixed when a group starts,
                            from the *current, error-updated* columns of that group, by
                            scale_search (optionally weighted by diag H). A group that
                            starts inside a block and runs past it (G not dividing the
                            block size, e.g. G=192) sees its later columns with this
                            block's pending lazy updates added, so the parameters always
                            come from exactly-current weights, for any G | K (incl. K=576).
    gptq_quantize           one spec (= gptq_quantize_many with [spec])
    hessian_relative_error  tr((W-Q) H (W-Q)^T) / tr(W H W^T), recorded in meta["rel_err"]
    lowest_error            per spec, the lowest-objective run among several group-parameter
                            rules (searched range vs plain min/max): gptq_quantize_best and
                            SLQ's database (quant.database) both choose this way
    GPTQ_VARIANT            our GPTQ's options: the uniform baseline and SLQ's database both

The S specs of gptq_quantize_many share the factorisation and one pass over the
columns on a batched [S, K, N] copy of W (transposed, so that a column of every
spec is one contiguous [S, N] slice); every batched step is elementwise except
the sub-block and block-end updates, which are done per spec with the same 2-D
matmul a single-spec run uses, so a spec quantized in a batch gets bit-identical
codes, scales and zeros to the same spec quantized alone (block and sub-block
boundaries are multiples of `blocksize` and `subblock` whatever the specs).

Output: QuantizedWeight (codes int8, scale rounded to `scale_dtype` and held in
that dtype, zero int8 | None) whose dequantize() equals, bit for bit, the
fake-quantized weight the error feedback was computed against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .grid import check_weight, compute_qparams
from .scale_search import COARSE_SHRINK_GRID, DEFAULT_SHRINK_GRID, search_qparams_stacked
from .spec import QuantizedWeight, QuantSpec

__all__ = [
    "GPTQ",
    "GPTQError",
    "HessianFactor",
    "factor_hessian",
    "gptq_quantize",
    "gptq_quantize_best",
    "gptq_quantize_many",
    "GPTQ_VARIANT",
    "hessian_relative_error",
    "lowest_error",
]

SCALE_SEARCH_MODES = ("minmax", "mse", "hessian")


class GPTQError(ValueError):
    """Bad input to GPTQ (non-finite weight/Hessian, shape mismatch, non-PD Hessian)."""


def _where(layer: str) -> str:
    return f"layer {layer!r}: " if layer else ""


class GPTQ:
    """Hessian accumulator for one linear layer (in_features K) plus quantize entry points.

    add_batch(x) takes activations [..., K] (any leading dims; each row is a token)
    and keeps H = 2/n sum_t x_t x_t^T as a running average over all n tokens seen.
    """

    def __init__(self, in_features: int, layer: str = "", device: Optional[torch.device | str] = None,
                 dtype: torch.dtype = torch.float32):
        if in_features <= 0:
            raise GPTQError(f"{_where(layer)}in_features must be positive, got {in_features}")
        self.in_features = int(in_features)
        self.layer = layer
        self.H = torch.zeros(self.in_features, self.in_features, device=device, dtype=dtype)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise GPTQError(f"{_where(self.layer)}activations have last dim {x.shape[-1]}, "
                            f"expected in_features={self.in_features}")
        x = x.reshape(-1, self.in_features).to(device=self.H.device, dtype=self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise GPTQError(f"{_where(self.layer)}activations contain NaN/inf")
        # running average: H_new = (n_old H_old + 2 x^T x) / (n_old + n)
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2.0 / self.nsamples) ** 0.5
        self.H.addmm_(x.t(), x)

    def quantize(self, W: torch.Tensor, spec: QuantSpec, **kw) -> QuantizedWeight:
        qw = gptq_quantize(W, self.H, spec, layer=kw.pop("layer", self.layer), **kw)
        qw.meta["nsamples"] = self.nsamples
        return qw

    def quantize_many(self, W: torch.Tensor, specs: Sequence[QuantSpec], **kw) -> dict[QuantSpec, QuantizedWeight]:
        out = gptq_quantize_many(W, self.H, specs, layer=kw.pop("layer", self.layer), **kw)
        for qw in out.values():
            qw.meta["nsamples"] = self.nsamples
        return out


@dataclass
class HessianFactor:
    """What the column loop needs from H, computed once per layer."""

    hinv_upper: torch.Tensor  # U [K, K] fp32, upper triangular, U^T U = (H_fixed + lambda I)^-1
    dead: torch.Tensor        # bool [K]: columns no calibration input ever touched (H_jj = 0)
    diag: torch.Tensor        # fp32 [K]: diag of H with dead entries set to 1 (scale-search weights)
    percdamp: float           # damping actually used (may exceed the request after retries)
    damp: float               # lambda


@torch.no_grad()
def factor_hessian(H: torch.Tensor, percdamp: float = 0.01, *, layer: str = "", max_retries: int = 3,
                   device: Optional[torch.device | str] = None) -> HessianFactor:
    """Dead-column fix, damping and the upper Cholesky factor of H^-1 (in float64).

    When H + lambda I is not positive definite (Cholesky fails), lambda is multiplied
    by 10 up to `max_retries` times before raising GPTQError naming the layer.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise GPTQError(f"{_where(layer)}Hessian must be square [K, K], got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise GPTQError(f"{_where(layer)}Hessian contains NaN/inf (bad calibration activations?)")
    if not (percdamp > 0):
        raise GPTQError(f"{_where(layer)}percdamp must be > 0, got {percdamp}")
    H = H.to(device=device if device is not None else H.device, dtype=torch.float64).clone()
    diag = torch.diagonal(H)
    if bool((diag < 0).any()):
        j = int(torch.nonzero(diag < 0)[0])
        raise GPTQError(f"{_where(layer)}Hessian has a negative diagonal entry H[{j},{j}]={float(diag[j]):.3g}; "
                        "it cannot come from 2/n sum x x^T")
    dead = diag == 0
    diag[dead] = 1.0  # view: writes into H
    mean_diag = float(diag.mean())
    k = H.shape[0]
    eye = torch.eye(k, dtype=H.dtype, device=H.device)
    pd = percdamp
    for attempt in range(max_retries + 1):
        damp = pd * mean_diag
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return HessianFactor(hinv_upper=U.to(torch.float32), dead=dead,
                                     diag=torch.diagonal(H).to(torch.float32).clone(), percdamp=pd, damp=damp)
        if attempt < max_retries:
            pd *= 10.0
    raise GPTQError(f"{_where(layer)}Hessian is not positive definite even with percdamp={pd:g} "
                    f"(damping {damp:.3g}); check the calibration activations")


def _relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, whw: float) -> float:
    """tr((W-Q) H (W-Q)^T) / whw, with W, H fp32 on one device: an fp32 product, summed in
    fp64 (about 1e-6 relative, ample for a sensitivity; fp64 GEMMs cost 2-30x more)."""
    E = W - Q.to(device=W.device, dtype=torch.float32)
    num = float(((E @ H) * E).sum(dtype=torch.float64))
    return num / whw if whw > 0 else (0.0 if num == 0 else float("inf"))


def _weighted_norm(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T) for fp32 W, H (the denominator of every relative error of W)."""
    return float(((W @ H) * W).sum(dtype=torch.float64))


@torch.no_grad()
def hessian_relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W-Q) H (W-Q)^T) / tr(W H W^T): the layer-output error the GPTQ objective measures."""
    W = W.to(torch.float32)
    H = H.to(device=W.device, dtype=torch.float32)
    return _relative_error(W, Q, H, _weighted_norm(W, H))


@torch.no_grad()
def gptq_quantize_many(
    W: torch.Tensor,
    H: torch.Tensor,
    specs: Sequence[QuantSpec],
    *,
    layer: str = "",
    percdamp: float = 0.01,
    blocksize: int = 128,
    subblock: int = 32,
    scale_search: str = "hessian",
    shrink_grid: Sequence[float] = DEFAULT_SHRINK_GRID,
    negative_scale: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    factor: Optional[HessianFactor] = None,
    device: Optional[torch.device | str] = None,
    static_groups: bool = False,
    act_order: bool = False,
    group_qparams: Optional[Callable[[torch.Tensor, Optional[torch.Tensor], QuantSpec],
                                     tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
    code_range: Optional[tuple[int, int]] = None,
) -> dict[QuantSpec, QuantizedWeight]:
    """GPTQ for every spec in `specs` in one pass over the columns (shared factorisation).

    W: [N, K] weight (any float dtype; computed in fp32). H: [K, K] Hessian.
    scale_search: "minmax" (plain min/max, RTN's grid), "mse" (range-shrink search,
    unweighted) or "hessian" (the search weighted by diag H). negative_scale lets the
    symmetric search use negative scales (set False for consumers that assume s > 0).
    factor: reuse a factor_hessian() result (it must come from this H and percdamp).
    static_groups: take every group's parameters from the original W before the loop
    (llmcompressor's GPTQModifier does this with its observer) instead of from the
    error-updated columns when the group starts (the paper's default, ours).
    act_order: visit columns in descending diag(H) order (the paper's "act-order"
    heuristic; llmcompressor's default "static" ordering). Groups stay contiguous in
    the original column order, so no g_idx is needed in the checkpoint; their
    parameters therefore cannot wait for a group's first column and are fixed up
    front from the original W, i.e. act_order implies static_groups.
    group_qparams / code_range: a different per-column quantizer on the same loop, e.g.
    ternary codes (quant/gsq_ternary.py): group_qparams(w [N, g], diag H of the group or
    None, spec) -> (scale [N] in scale_dtype, zero point [N] or None) replaces the scale
    search, and codes are clamped to code_range instead of the spec's [qmin, qmax].
    Returns {spec: QuantizedWeight} with meta rel_err / gptq_loss / percdamp / ...
    """
    specs = list(dict.fromkeys(specs))  # de-duplicate, keep order
    if not specs:
        raise GPTQError(f"{_where(layer)}no specs given")
    if scale_search not in SCALE_SEARCH_MODES:
        raise GPTQError(f"{_where(layer)}scale_search must be one of {SCALE_SEARCH_MODES}, got {scale_search!r}")
    if blocksize <= 0 or subblock <= 0:
        raise GPTQError(f"{_where(layer)}blocksize and subblock must be positive, got {blocksize}, {subblock}")
    for spec in specs:
        check_weight(W, spec, layer)  # 2-D, float, G | K, finite (errors name the layer)
    n, k = W.shape
    if tuple(H.shape) != (k, k):
        raise GPTQError(f"{_where(layer)}Hessian shape {tuple(H.shape)} does not match in_features {k}")
    dev = torch.device(device) if device is not None else W.device
    perm = None
    if act_order:
        static_groups = True
        if factor is not None:
            raise GPTQError(f"{_where(layer)}act_order permutes H; pass H, not a precomputed factor")
        Hd = torch.diagonal(H).to(dev)
        perm = torch.argsort(Hd, descending=True, stable=True)
        Hp = H.to(dev)[perm][:, perm]
        factor_p = factor_hessian(Hp, percdamp, layer=layer, device=dev)
        inv = torch.argsort(perm)
        # the column loop runs in permuted order; scale search and outputs use the original one
        factor = HessianFactor(hinv_upper=factor_p.hinv_upper, dead=factor_p.dead[inv], diag=factor_p.diag[inv],
                               percdamp=factor_p.percdamp, damp=factor_p.damp)
    elif factor is None:
        factor = factor_hessian(H, percdamp, layer=layer, device=dev)
    U = factor.hinv_upper.to(dev)  # in visit order (permuted under act_order)
    dead = factor.dead.to(dev)
    hdiag = factor.diag.to(dev) if scale_search == "hessian" else None

    S = len(specs)
    W0 = W.to(device=dev, dtype=torch.float32)
    # working copies [S, K, N]: one column of every spec's weight is a contiguous [S, N]
    # slice, so the per-column steps read and write contiguous memory
    Wt = W0.t().unsqueeze(0).repeat(S, 1, 1)
    Wt[:, dead, :] = 0.0
    W0z = Wt[0].t().clone() if static_groups else None  # original weight [N, K], dead columns zeroed
    group = [spec.effective_group(k) for spec in specs]
    qmin = torch.tensor([float(s.qmin if code_range is None else code_range[0]) for s in specs],
                        device=dev).view(S, 1)
    qmax = torch.tensor([float(s.qmax if code_range is None else code_range[1]) for s in specs],
                        device=dev).view(S, 1)
    scale_cur = torch.ones(S, n, device=dev)
    zero_cur = torch.zeros(S, n, device=dev)  # 0 for symmetric specs: w/s + 0 == w/s exactly
    codes_t = torch.empty(S, k, n, dtype=torch.int8, device=dev)
    scales = [torch.empty(n, k // g, device=dev) for g in group]
    zeros = [None if sp.symmetric else torch.empty(n, k // g, dtype=torch.int8, device=dev)
             for sp, g in zip(specs, group)]
    losses = torch.zeros(S, device=dev, dtype=torch.float64)
    sub = max(1, min(subblock, blocksize))

    group_starts: dict[int, list[int]] = {}  # column -> specs whose group starts there
    for si, g in enumerate(group):
        for c in range(0, k, g):
            group_starts.setdefault(c, []).append(si)

    def current_group(si: int, col: int, i1: int, i2: int, j1: int, j2: int, W1: torch.Tensor,
                      Err1: torch.Tensor) -> torch.Tensor:
        """Spec si's group starting at `col` as it stands now (every earlier column's error
        applied), [N, g]. Columns of the sub-block [i1+j1, i1+j2) are current; later ones
        of the block still lack the sub-block's errors so far, and columns past the block
        lack all of this block's."""
        g, i = group[si], col - i1
        end = col + g
        parts = [W1[si, i:min(j2, i + g)]]
        if end > i1 + j2:  # rest of the block
            b_end = min(end, i2) - i1
            part = W1[si, j2:b_end]
            if i > j1:
                part = part - U1[j1:i, j2:b_end].t() @ Err1[si, j1:i]
            parts.append(part)
        if end > i2:  # past the block
            part = Wt[si, i2:end]
            if i > 0:
                part = part - U[i1:col, i2:end].t() @ Err1[si, :i]
            parts.append(part)
        return torch.cat(parts).t()

    def fix_group_params(sis: list[int], col: int, i1: int, i2: int, j1: int, j2: int, W1: torch.Tensor,
                         Err1: torch.Tensor) -> None:
        """Scale/zero of the groups starting at `col` for specs `sis`, from their current columns."""
        # specs that differ in bits only are searched in one stacked call
        batches: dict[tuple[int, bool], list[int]] = {}
        for si in sis:
            batches.setdefault((group[si], specs[si].symmetric), []).append(si)
        for (g, sym), members in batches.items():
            gspecs = [QuantSpec(specs[si].bits, g, sym) for si in members]
            if static_groups:  # from the original weight, as llmcompressor's observer does
                wgrp = W0z[:, col:col + g].unsqueeze(0).expand(len(members), -1, -1)
            else:
                wgrp = torch.stack([current_group(si, col, i1, i2, j1, j2, W1, Err1) for si in members])
            if group_qparams is not None:
                pairs = [group_qparams(wgrp[b], None if hdiag is None else hdiag[col:col + g], gs)
                         for b, gs in enumerate(gspecs)]
                sc = torch.stack([p[0] for p in pairs]).unsqueeze(-1)
                zp = None if sym else torch.stack([p[1] for p in pairs]).unsqueeze(-1)
            elif scale_search == "minmax":
                pairs = [compute_qparams(wgrp[b], gs, layer=layer, scale_dtype=scale_dtype)
                         for b, gs in enumerate(gspecs)]
                sc = torch.stack([p[0] for p in pairs])
                zp = None if sym else torch.stack([p[1] for p in pairs])
            else:
                sc, zp = search_qparams_stacked(
                    wgrp, gspecs, grid=shrink_grid, hessian_diag=None if hdiag is None else hdiag[col:col + g],
                    negative_scale=negative_scale, scale_dtype=scale_dtype, layer=layer, _checked=True)
            for b, si in enumerate(members):
                scale_cur[si] = sc[b, :, 0]
                scales[si][:, col // g] = sc[b, :, 0]
                if zp is not None:
                    zero_cur[si] = zp[b, :, 0].to(torch.float32)
                    zeros[si][:, col // g] = zp[b, :, 0]

    col_scale = col_zero = None
    if perm is not None:
        # every group's parameters from the original W (static groups read W0z only, so
        # the block arguments are unused), then per-column lookups in visit order, [S, K, N]
        for col, sis in sorted(group_starts.items()):
            fix_group_params(sis, col, 0, k, 0, 0, Wt[:, :0], Wt[:, :0])
        col_scale = torch.stack([scales[si].t().repeat_interleave(g, dim=0) for si, g in enumerate(group)])
        col_zero = torch.stack([torch.zeros(k, n, device=dev) if zeros[si] is None
                                else zeros[si].t().to(torch.float32).repeat_interleave(g, dim=0)
                                for si, g in enumerate(group)])
        col_scale, col_zero = col_scale[:, perm].contiguous(), col_zero[:, perm].contiguous()
        Wt = Wt[:, perm].contiguous()
        group_starts = {}

    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        cnt = i2 - i1
        W1 = Wt[:, i1:i2].clone()
        Err1 = torch.empty(S, cnt, n, device=dev)
        Q1 = torch.empty(S, cnt, n, device=dev)
        U1 = U[i1:i2, i1:i2]
        for j1 in range(0, cnt, sub):
            j2 = min(j1 + sub, cnt)
            for i in range(j1, j2):
                if i1 + i in group_starts:
                    fix_group_params(group_starts[i1 + i], i1 + i, i1, i2, j1, j2, W1, Err1)
                if col_scale is not None:
                    scale_cur, zero_cur = col_scale[:, i1 + i], col_zero[:, i1 + i]
                w = W1[:, i]
                q = torch.clamp(torch.round(w / scale_cur + zero_cur), qmin, qmax)
                Q1[:, i] = q
                # (w - dq) / U_ii with dq = (q - z) s = QuantizedWeight.dequantize() of this column
                err = (w - (q - zero_cur) * scale_cur) / U1[i, i]
                Err1[:, i] = err
                # W[:, i+1:j2] -= err (x) U[i, i+1:j2] within the sub-block, fused in place
                if i + 1 < j2:
                    W1[:, i + 1:j2].addcmul_(U1[i, i + 1:j2].view(1, -1, 1), err.unsqueeze(1), value=-1.0)
            if j2 < cnt:  # the sub-block's errors reach the rest of the block as one product per spec
                for si in range(S):
                    W1[si, j2:].addmm_(U1[j1:j2, j2:].t(), Err1[si, j1:j2], alpha=-1.0)
        codes_t[:, i1:i2] = Q1.to(torch.int8)
        losses += (Err1 * Err1).sum(dim=(1, 2), dtype=torch.float64) / 2.0  # paper: (w - q)^2 / [H^-1]_jj / 2
        if i2 < k:  # "lazy batch": the block's errors reach the later columns
            for si in range(S):  # one 2-D product per spec, as a single-spec run (bit-identical results)
                Wt[si, i2:].addmm_(U[i1:i2, i2:].t(), Err1[si], alpha=-1.0)

    codes = codes_t.transpose(1, 2)
    if perm is not None:
        codes = codes[:, :, torch.argsort(perm)]
    codes = codes.contiguous()
    out: dict[QuantSpec, QuantizedWeight] = {}
    H32 = H.to(device=dev, dtype=torch.float32)
    whw = _weighted_norm(W0, H32)  # tr(W H W^T), shared by every spec
    for s, spec in enumerate(specs):
        qw = QuantizedWeight(codes=codes[s].clone(), scale=scales[s].to(scale_dtype), zero_point=zeros[s],
                             spec=spec, meta={})
        qw.meta.update({
            "method": "gptq",
            "layer": layer,
            "rel_err": _relative_error(W0, qw.dequantize(torch.float32), H32, whw),
            "whw": whw,  # rel_err's denominator, tr(W H W^T): row shards add theirs up
            "gptq_loss": float(losses[s]),
            "percdamp": factor.percdamp,
            "dead_columns": int(dead.sum()),
            "scale_search": scale_search,
            "blocksize": blocksize,
            "subblock": sub,
            "static_groups": static_groups,
            "act_order": act_order,
        })
        out[spec] = qw
    return out


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, layer: str = "", **kw) -> QuantizedWeight:
    """GPTQ for one spec; keyword options as in gptq_quantize_many."""
    return gptq_quantize_many(W, H, [spec], layer=layer, **kw)[spec]


def lowest_error(runs: dict[str, dict[QuantSpec, QuantizedWeight]]) -> dict[QuantSpec, QuantizedWeight]:
    """Per spec, the run (one per group-parameter rule, e.g. {"hessian": ..., "minmax": ...})
    with the lowest tr((W-Q) H (W-Q)^T); meta["scale_search_tried"] records every run's
    rel_err. A tie keeps the earlier rule."""
    first = next(iter(runs.values()))
    out = {}
    for spec in first:
        tried = {mode: entries[spec].meta["rel_err"] for mode, entries in runs.items()}
        best = min(tried, key=tried.get)
        out[spec] = runs[best][spec]
        out[spec].meta["scale_search_tried"] = tried
    return out


def gptq_quantize_best(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, layer: str = "",
                       scale_searches: Sequence[str] = ("hessian", "minmax"), **kw) -> QuantizedWeight:
    """GPTQ once per group-parameter rule; keep the lowest tr((W-Q) H (W-Q)^T).

    A shrunk (searched) range lowers the rounding error of the weights it was fitted
    on, but error feedback later pushes weights past it, where they clip; at 4 bits
    on some layers that costs more than it gains, so plain min/max wins there. The
    GPTQ objective itself decides, per layer (meta["scale_search_tried"] has both).
    """
    return lowest_error({mode: {spec: gptq_quantize(W, H, spec, layer=layer, scale_search=mode, **kw)}
                         for mode in dict.fromkeys(scale_searches)})[spec]


# Our GPTQ, one variant for the uniform baseline (SLQGPTQModifier's defaults) and SLQ's
# database (allocation.engine.SLQ_GPTQ), so that comparing them compares allocations.
# Chosen by held-out KL on the reference model (uniform w4, same tokens, 2026-12-06):
# the 11-point range search alone gives KL 0.144; with a second, min/max GPTQ run kept
# where its layer objective is lower (the baseline until then) 0.190, 1.32x, although
# min/max won that objective on about half the 4-bit layers; 81 factors instead of 11:
# 0.987x [0.965, 1.008], a tie at 2.2x the search's cost.
GPTQ_VARIANT = dict(percdamp=0.01, negative_scale=False, shrink_grid=COARSE_SHRINK_GRID, act_order=True)
