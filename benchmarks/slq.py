"""SLQ on the reference model (or --model): fidelity vs bpp against uniform GPTQ, the symmetric ablation and GSQ.

Curves (docs/methods.md section 2), all from ONE set of FP Hessians on calibration
blocks and evaluated on held-out blocks of the other split:

    uniform_asym   asymmetric GPTQ g64, the same width everywhere, 2..8 bits
                   (true bpp with scales and zero points: 4-bit = 4.3125)
    slq_asym       SLQ: RCO allocation (true model KL, q/k/v and gate/up tied) over
                   the asymmetric GPTQ database w2..w8 g64, one run per budget
    slq_asym_tuned with --tune-steps N: each slq_asym point of --budgets (--tune-budgets)
                   after SLQModifier's scale tuning (allocation/scale_tuning.py: N Adam
                   steps on the model KL, codes and zero points fixed), as the product
                   runs it; trained on --tune-blocks calibration blocks of --tune-seq-len
                   cut from the split's end, best scales kept by --tune-check-blocks more
                   (disjoint from GPTQ's, the objective's and the held-out blocks)
    uniform_asym_tuned with --tune-uniform B..: the uniform_asym rows of those widths after
                   the same tuning: the line tuned SLQ must beat for mixing widths to
                   be worth anything once both are tuned
    uniform_sym    symmetric GPTQ g64, 2..8 bits
    slq_sym        the same RCO search on the symmetric database: the gamma-squared
                   ablation (symmetric grids inflate the noise by gamma^2 per group)
    gsq            read from benchmarks/results/gsq_all_linears.json (benchmarks/gsq.py
                   --include-attention --n-eval 8: the same held-out tokens) when it holds completed GSQ
                   rows over every decoder linear; otherwise listed as not measured

With --candidate-scales FILE.. (the .pt files --save-tuned-scales writes for tuned uniform
rows), the asymmetric database's entries of those widths carry the tuned scales instead
of GPTQ's before anything is measured: every curve is then an allocation over tuned
candidates (a tuning-aware allocation; its uniform rows reproduce the tuned ones).

Distribution-lossless mode: for EAR targets 0.98 and 0.99, bisect the budget of
slq_asym between the curve's bracketing points (RCO at every probe) and report
the fewest bpp whose held-out EAR lower 95% bound reaches the target, as
SLQModifier(target_ear=...) does.

Held-out protocol: teacher-forced, fp32 softmax over the full vocabulary, T=1,
every next-token position of each block (vllm_slq.eval.hf_backend: exact EAR
= 1 - TV, KL(p_fp || p_q), top-1 agreement, perplexity); 95% percentile
bootstrap CI of mean EAR resampling whole sequences; LCB = its lower end.

The GPTQ databases are cached on disk (vllm_slq.allocation.objective.
cached_candidates, keyed by weights, options, calibration tokens and GPTQ
options) so reruns skip the GPTQ pass.

    python benchmarks/slq.py                       # full measurement
    python benchmarks/slq.py --max-layers 2 --calib-blocks 2 --eval-blocks 2 \\
        --seq-len 64 --budgets 3 4 --rco-steps 2 --threads 1 --out /tmp/slq.json   # smoke
    python benchmarks/slq.py --gsq-only             # after benchmarks/gsq.py --include-attention:
                                                    # GSQ rows onto the existing slq.json, nothing recomputed

Writes benchmarks/results/slq.json (rewritten after every point, status "running"
until the end) and slq_fidelity_vs_bpp.png next to it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from vllm_slq.allocation.baselines import uniform_allocate
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.allocation.engine import SLQ_GPTQ, AllocationEngine, bisect_budget
from vllm_slq.allocation.rco import RCOConfig
from vllm_slq.allocation.scale_tuning import fold_norm_scales, tunable_norms, tune_scales
from vllm_slq.eval.hf_backend import HFRunner, teacher_forced_metrics
from vllm_slq.eval.metrics import summarize
from vllm_slq.fileio import atomic_write_json
from vllm_slq.quant.spec import QuantSpec
from common import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
BITS = list(range(2, 9))
GROUP = 64
TARGETS = (0.98, 0.99)
DEFAULT_BUDGETS = [2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 7.0, 8.0]
# SLQModifier's default range-shrink grid (11 points 1.0 .. 0.5, Hessian-weighted):
# the benchmark measures the database the product builds
CURVES = {
    "uniform_asym": "uniform asymmetric GPTQ g64",
    "slq_asym": "SLQ (asym, RCO)",
    "slq_asym_tuned": "SLQ (asym, RCO) + scale tuning",
    "uniform_asym_tuned": "uniform asymmetric GPTQ g64 + scale tuning",
    "uniform_sym": "uniform symmetric GPTQ g64",
    "slq_sym": "SLQ sym (gamma^2 ablation)",
    "gsq": "GSQ (symmetric)",
    "gsq_gptq": "uniform symmetric GPTQ, GSQ's calibration",
}
# curves read from benchmarks/gsq.py's JSON: its method -> our curve name
GSQ_JSON_CURVES = {"gsq": "gsq", "gptq": "gsq_gptq"}


def decoder_shapes(model, max_layers):
    """The decoder linears (lm_head stays FP); only those of layers < max_layers if given."""
    shapes = linear_shapes(model)
    if max_layers is None:
        return shapes
    keep = []
    for s in shapes:
        m = re.search(r"\.layers\.(\d+)\.", s.name)
        if m is None:
            raise ValueError(f"--max-layers: cannot read a decoder layer index from module {s.name!r}")
        if int(m.group(1)) < max_layers:
            keep.append(s)
    if not keep:
        raise ValueError(f"--max-layers {max_layers} selects no decoder linear")
    return keep


def gamma_squared(model, shapes, group: int = GROUP) -> dict:
    """docs/methods.md's gamma-squared law on this model's weights: per group of `group`,
    gamma = 2 max|w| / (max w - min w); symmetric rounding noise is gamma^2 (1 - 2^-b)^2
    times asymmetric's (steps 2 max|w| / 2^b vs (max - min) / (2^b - 1)). Means over all
    groups of the decoder linears, the noise ratio the law predicts per width."""
    mods = dict(model.named_modules())
    g2 = []
    for s in shapes:
        w = mods[s.name].weight.detach().float().reshape(s.out_features, -1, group)
        span = (w.amax(-1) - w.amin(-1)).clamp_min(1e-12)
        g2.append(((2 * w.abs().amax(-1) / span) ** 2).flatten())
    g2 = torch.cat(g2)
    return {"mean_gamma2": float(g2.mean()), "median_gamma2": float(g2.median()), "groups": int(g2.numel()),
            "predicted_rtn_noise_ratio_sym_over_asym": {str(b): float(g2.mean()) * (1 - 2.0 ** -b) ** 2 for b in BITS}}


def database_error_ratio(errors: dict) -> dict:
    """Median over layers of GPTQ's Hessian-weighted error, symmetric over asymmetric, per width."""
    a, s = np.asarray(errors["asym"]), np.asarray(errors["sym"])
    return {str(b): float(np.median(s[:, k] / np.maximum(a[:, k], 1e-30))) for k, b in enumerate(BITS)}


@torch.no_grad()
def heldout_metrics(ref: HFRunner, cand: HFRunner, blocks: torch.Tensor, n_boot: int, seed: int) -> dict:
    """One candidate's held-out row: teacher-forced fidelity against the reference, with the
    per-sequence sums a paired comparison on the same text needs (benchmarks/peers.py too)."""
    s = summarize(teacher_forced_metrics(ref, cand, blocks, progress=False), n_boot=n_boot, seed=seed)
    return {"ear": s["ear"], "ear_lcb": s["ear_ci95"][0], "ear_ucb": s["ear_ci95"][1],
            "ear_p5": s["ear_p5"], "ear_p50": s["ear_p50"], "ear_pow100": s["ear_pow100"],
            "kl": s["kl"], "pinsker_ear_lower_bound": s["pinsker_ear_lower_bound"], "top1": s["top1"],
            "ppl": s["ppl_cand"], "ppl_fp": s["ppl_ref"], "n_sequences": s["n_sequences"],
            "n_positions": s["n_positions"],
            # per held-out sequence, for paired comparisons of two candidates on the same text
            "kl_seq_sums": s["per_sequence"]["kl_sum"], "ear_seq_sums": s["per_sequence"]["ear_sum"],
            "seq_positions": s["per_sequence"]["n_positions"]}


class HeldoutEvaluator:
    """Exact held-out fidelity of an allocation: the FP model vs a copy carrying the chosen weights."""

    def __init__(self, model, blocks: torch.Tensor, n_boot: int, seed: int):
        self.blocks = blocks
        self.n_boot, self.seed = n_boot, seed
        self.cand_model = copy.deepcopy(model).eval()
        self.mods = dict(self.cand_model.named_modules())
        self.norms = {name: [t.detach().clone() for t in m.parameters(recurse=False)]
                      for name, m in tunable_norms(self.cand_model)[0].items()}
        self.ref = HFRunner(model, name="fp32 reference")
        self.ref.cache = {}  # the reference's hidden states are reused by every point
        self.cand = HFRunner(self.cand_model, name="quantized")

    @torch.no_grad()
    def __call__(self, problem: AllocationProblem, cands, choice, scales: dict | None = None,
                 norm_scales: dict | None = None) -> dict:
        """scales: per-layer scales replacing the candidates' (tuned ones), or None; norm_scales:
        tuned norms' factors, folded into the copy's norms (the others keep the FP model's)."""
        for name, spec in problem.module_specs(choice).items():
            qw = cands[name][spec] if scales is None else dataclasses.replace(cands[name][spec], scale=scales[name])
            self.mods[name].weight.copy_(qw.dequantize(torch.float32))
        for name, originals in self.norms.items():
            for t, t0 in zip(self.mods[name].parameters(recurse=False), originals):
                t.copy_(t0)
        fold_norm_scales(self.cand_model, norm_scales or {})
        return heldout_metrics(self.ref, self.cand, self.blocks, self.n_boot, self.seed)


def allocation_summary(problem: AllocationProblem, choice) -> dict:
    """Per-group widths and the parameter share at each width."""
    bits = [problem.options[int(k)].bits for k in choice]
    share = {}
    for b, n in zip(bits, problem.params):
        share[f"w{b}"] = share.get(f"w{b}", 0.0) + float(n) / problem.total_params
    return {"group_bits": bits, "param_share_by_bits": dict(sorted(share.items()))}


def thresholds(rows, key: str, targets=TARGETS) -> dict:
    """Per target: the fewest measured bpp whose `key` reaches it, and the linear
    interpolation between the first reaching point and the point just below it."""
    pts = sorted((r["achieved_bpp"], r[key]) for r in rows if r.get(key) is not None)
    out = {}
    for t in targets:
        reach = [b for b, v in pts if v >= t]
        if not reach:
            best = max(pts, key=lambda p: p[1]) if pts else None
            out[str(t)] = {"reached": False,
                           "best": None if best is None else {"bpp": best[0], key: best[1]}}
            continue
        i = next(j for j, (b, v) in enumerate(pts) if v >= t)
        rec = {"reached": True, "fewest_measured_bpp": reach[0],
               "stays_reached_above": all(v >= t for b, v in pts[i:])}
        if i == 0:
            rec["interpolated_bpp"] = None
            rec["note"] = "reached at the lowest measured point; the threshold may lie lower"
        else:
            (b0, v0), (b1, v1) = pts[i - 1], pts[i]
            rec["interpolated_bpp"] = b0 + (t - v0) * (b1 - b0) / (v1 - v0) if v1 != v0 else b1
        out[str(t)] = rec
    return out


def gsq_points(path: Path, shapes, seq_len: int, eval_blocks: int, model: str) -> tuple[list[dict], str]:
    """Completed GSQ rows over all of `shapes` (the decoder linears) from benchmarks/gsq.py's JSON,
    with the GPTQ rows of the same run (GSQ's own baseline: the same calibration, which differs
    from this benchmark's Hessian tokens) as the curve "gsq_gptq"."""
    n_modules = len(shapes)
    if not path.is_file():
        return [], f"not measured: {path} does not exist"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [], f"not measured: {path} is unreadable ({e})"
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        return [], f"not measured: {path} has no 'rows' list"
    gsq = [r for r in rows if isinstance(r, dict) and r.get("method") == "gsq"]
    full = [r for r in rows if isinstance(r, dict) and r.get("method") in GSQ_JSON_CURVES
            and r.get("n_quantized") == n_modules and r.get("kl") is not None and r.get("ear") is not None]
    if not any(r["method"] == "gsq" for r in full):
        status = data.get("status", "")
        return [], (f"not measured: {path} has {len(gsq)} GSQ row(s), none completed over all {n_modules} "
                    f"decoder linears (GSQ's default quantizes the MLP only)"
                    f"{'; its status: ' + status if status else ''}")
    st = data.get("settings", {})
    if st.get("model") != model:
        return [], f"not comparable: {path} measured the model {st.get('model')!r}, this curve {model!r}"
    if (st.get("seq_len"), st.get("n_eval")) != (seq_len, eval_blocks):
        # gsq.py and this benchmark cut held-out blocks the same way: the same shape is the same text
        return [], (f"not comparable: {path} was scored on {st.get('n_eval')} x {st.get('seq_len')} held-out "
                    f"tokens, this curve on {eval_blocks} x {seq_len}")
    calibration = f"{st.get('n_calib')} x {st.get('seq_len')} tokens, sequential pipeline"
    pts = []
    for r in full:
        spec = QuantSpec(int(r["bits"]), int(r.get("group_size", GROUP)), True)
        bpp = sum(spec.bpp(s.in_features) * s.params for s in shapes) / sum(s.params for s in shapes)
        ci = r.get("ear_ci95")
        pts.append({"curve": GSQ_JSON_CURVES[r["method"]], "option": spec.short(), "budget": None, "achieved_bpp": bpp,
                    "ear": r["ear"], "ear_lcb": ci[0] if ci else None, "ear_ucb": ci[1] if ci else None,
                    "kl": r["kl"], "top1": r.get("top1"), "ppl": r.get("ppl"), "ear_p5": r.get("ear_p5"),
                    "source": str(path), "calibration": calibration,
                    "protocol": {"seq_len": st.get("seq_len"), "n_eval": st.get("n_eval")}})
    return pts, f"read from {path}"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = {"uniform_asym": ("s", "--", "C0"), "slq_asym": ("o", "-", "C0"),
              "slq_asym_tuned": ("*", "-", "C3"), "uniform_asym_tuned": ("s", "--", "C4"),
              "uniform_sym": ("s", "--", "C1"),
              "slq_sym": ("o", "-", "C1"), "gsq": ("D", ":", "C2"), "gsq_gptq": ("x", ":", "C2")}
    for curve, (mk, ls, col) in styles.items():
        pts = sorted((r for r in rows if r["curve"] == curve), key=lambda r: r["achieved_bpp"])
        if not pts:
            continue
        x = [r["achieved_bpp"] for r in pts]
        ear = [r["ear"] for r in pts]
        for ax in axes[:2]:
            ax.plot(x, ear, marker=mk, ls=ls, color=col, label=CURVES[curve])
        lcb = [r.get("ear_lcb") for r in pts]
        if all(v is not None for v in lcb):
            ucb = [r["ear_ucb"] for r in pts]
            axes[1].fill_between(x, lcb, ucb, color=col, alpha=0.15)
        axes[2].plot(x, [max(r["kl"], 1e-9) for r in pts], marker=mk, ls=ls, color=col, label=CURVES[curve])
    for ax in axes[:2]:
        for t in TARGETS:
            ax.axhline(t, color="k", lw=0.8, ls=":" if t == 0.98 else "-.")
        ax.set_xlabel("bpp (incl. scales / zero points)")
        ax.set_ylabel("held-out EAR")
        ax.grid(alpha=0.3)
    axes[0].set_title("EAR vs bpp")
    lo = min([r["ear_lcb"] for r in rows if r.get("ear_lcb") is not None and r["ear"] >= 0.9] + [0.95])
    axes[1].set_ylim(max(0.9, lo - 0.005), 1.0005)
    axes[1].set_title("EAR (zoom), 95% bootstrap CI band; 0.98 / 0.99")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("bpp (incl. scales / zero points)")
    axes[2].set_ylabel("held-out KL(p_fp || p_q)")
    axes[2].set_title("KL vs bpp")
    axes[2].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    st = result["settings"]
    fig.suptitle(f"{st['model']}: {st['n_modules']} linears, held-out {st['eval_blocks']}x{st['seq_len']} tokens")
    fig.tight_layout()
    save_figure(fig, path)


def print_table(rows) -> None:
    print(f"{'curve':18s} {'budget':>6s} {'bpp':>7s} {'EAR':>7s} {'LCB':>7s} {'KL':>9s} {'top1':>7s} "
          f"{'PPL':>8s} {'alloc s':>8s} {'eval s':>7s}")
    for r in sorted(rows, key=lambda r: (list(CURVES).index(r["curve"]), r["achieved_bpp"])):
        b = "" if r.get("budget") is None else f"{r['budget']:.2f}"
        lcb = "" if r.get("ear_lcb") is None else f"{r['ear_lcb']:.4f}"
        f = lambda k, fmt: "" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
        print(f"{r['curve']:18s} {b:>6s} {r['achieved_bpp']:7.4f} {r['ear']:7.4f} {lcb:>7s} {r['kl']:9.5f} "
              f"{f('top1', '7.4f'):>7s} {f('ppl', '8.3f'):>8s} {f('alloc_s', '8.1f'):>8s} {f('eval_s', '7.1f'):>7s}"
              f"{'  (bisect probe)' if r.get('probe') else ''}")


def refresh_gsq(args, png: Path) -> None:
    """--gsq-only: put the GSQ rows of --gsq-json onto an existing curve without recomputing it."""
    from vllm_slq.data import load_model

    if not args.out.is_file():
        raise SystemExit(f"--gsq-only: {args.out} does not exist; run the curves first")
    result = json.loads(args.out.read_text())
    if result.get("status") != "complete":
        raise SystemExit(f"--gsq-only: {args.out} has status {result.get('status')!r}, not 'complete'")
    model, _ = load_model(result["settings"]["model"], dtype=torch.float32)
    shapes = decoder_shapes(model, result["settings"]["max_layers"])
    finish(result, shapes, args, png, None, lambda: atomic_write_json(args.out, result))
    print(f"wrote {args.out} and {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m",
                    help="alias or local directory (vllm_slq.data.resolve_model); computed in float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--budgets", type=float, nargs="+", default=DEFAULT_BUDGETS)
    ap.add_argument("--rco-steps", type=int, default=30)
    ap.add_argument("--rco-samples", type=int, default=2)
    ap.add_argument("--sensitivity-batches", type=int, default=4, help="objective blocks per KL-sensitivity pass")
    ap.add_argument("--bisect-steps", type=int, default=3,
                    help="distribution-lossless budget bisection steps per EAR target on slq_asym (0: off)")
    ap.add_argument("--bisect-tolerance", type=float, default=0.05, help="stop bisecting below this bpp bracket")
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=SLQ_GPTQ["act_order"],
                    help="GPTQ databases with act-order (static groups), as SLQModifier's")
    ap.add_argument("--skip-sym", action="store_true", help="no symmetric database / curves")
    ap.add_argument("--max-layers", type=int, default=None, help="quantize only decoder layers < N (smoke runs)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="GPTQ database cache (default: <vllm_slq cache>/databases)")
    ap.add_argument("--gsq-json", type=Path, default=RESULTS / "gsq_all_linears.json",
                    help="GSQ rows over every decoder linear (benchmarks/gsq.py --include-attention)")
    ap.add_argument("--tune-steps", type=int, default=0,
                    help="also score each slq_asym point after this many scale-tuning steps (SLQModifier's "
                         "tune_steps, 128 in the product since session 22, 64 before); 0: allocation only")
    ap.add_argument("--tune-budgets", type=float, nargs="+", default=None,
                    help="tune only the points at these budgets (default: every --budgets point)")
    ap.add_argument("--tune-uniform", type=int, nargs="+", default=[], metavar="BITS",
                    help="also tune the asymmetric uniform rows of these widths (curve uniform_asym_tuned)")
    ap.add_argument("--tune-lr", type=float, default=2e-3, help="the rate at --tune-reference-bits")
    ap.add_argument("--tune-reference-bits", type=int, default=3,
                    help="each width's rate is lr * min(1, (2^r - 1) / (2^b - 1)) (scale_tuning.width_lr); "
                         "0: one rate")
    ap.add_argument("--tune-slow-only", action=argparse.BooleanOptionalAction, default=True,
                    help="widths below --tune-reference-bits keep --tune-lr (default); --no-tune-slow-only "
                         "raises their rate by the same rule")
    ap.add_argument("--tune-norms", action="store_true",
                    help="tune the norm layers with the scales (scale_tuning's norms=True), folded into the "
                         "evaluated model's norm weights")
    ap.add_argument("--norm-lr", type=float, default=None, help="the norms' rate (default --tune-lr)")
    ap.add_argument("--tune-blocks", type=int, default=256,
                    help="training blocks (SLQModifier's tune_blocks: 256 since session 22, 128 before)")
    ap.add_argument("--tune-check-blocks", type=int, default=8,
                    help="held-back blocks choosing the best step (SLQModifier's objective_blocks)")
    ap.add_argument("--tune-seq-len", type=int, default=256, help="SLQModifier's objective_seq_len")
    ap.add_argument("--save-tuned-scales", type=Path, default=None, metavar="DIR",
                    help="write each tuned row's scales to DIR/<curve>_<option or budget>.pt")
    ap.add_argument("--candidate-scales", type=Path, nargs="+", default=[], metavar="FILE",
                    help="tuned uniform rows' scales (--save-tuned-scales' files) replacing GPTQ's in the "
                         "asymmetric database's entries of those widths")
    ap.add_argument("--out", type=Path, default=RESULTS / "slq.json")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the points already in --out when its settings match (budgets and "
                         "--skip-sym may differ), e.g. add the symmetric curves to an asymmetric run")
    ap.add_argument("--gsq-only", action="store_true",
                    help="refresh only the GSQ points (from --gsq-json), thresholds, comparisons and plot of an "
                         "existing --out; measures nothing else")
    args = ap.parse_args()
    png = args.out.with_name(args.out.stem + "_fidelity_vs_bpp.png")
    if args.gsq_only:
        return refresh_gsq(args, png)
    if args.rco_steps < 1 or args.rco_samples < 1:
        ap.error("--rco-steps and --rco-samples must be >= 1")
    if args.tune_reference_bits < 0:  # tune_scales would say so only after the first allocation
        ap.error(f"--tune-reference-bits must be >= 1, or 0 for one rate, not {args.tune_reference_bits}")
    args.tune_reference_bits = args.tune_reference_bits or None  # 0: one rate (tune_scales' None)
    if args.tune_uniform and args.tune_steps <= 0:
        ap.error("--tune-uniform needs --tune-steps N > 0")
    candidate_scales = [torch.load(f, weights_only=True) for f in args.candidate_scales]
    for f, c in zip(args.candidate_scales, candidate_scales):
        if c["curve"] != "uniform_asym_tuned":
            ap.error(f"--candidate-scales: {f} holds a {c['curve']} row's scales, not a tuned uniform row's")
    if set(args.tune_uniform) - set(BITS):
        ap.error(f"--tune-uniform: widths {sorted(set(args.tune_uniform) - set(BITS))} are not in {BITS}")
    torch.set_num_threads(args.threads)

    from vllm_slq.allocation.objective import ModelKLObjective, cached_candidates
    from vllm_slq.data import cache_dir, load_model, load_text, token_blocks

    t_all = time.perf_counter()
    stages: dict = {}
    t = time.perf_counter()
    model, tok = load_model(args.model, dtype=torch.float32)
    model.eval()
    text = load_text("brown")
    both = token_blocks(tok, text.calibration, args.seq_len, 2 * args.calib_blocks)
    # GPTQ's Hessians and RCO's KL read disjoint calibration blocks: scored on the
    # tokens GPTQ fitted, low widths look far better than they are on new text
    calib, objective_tokens = both[:args.calib_blocks], both[args.calib_blocks:]
    held = token_blocks(tok, text.evaluation, args.seq_len, args.eval_blocks)
    # the tuning's blocks, as SLQModifier cuts them: from the calibration split's end
    tune_tokens = (token_blocks(tok, text.calibration, args.tune_seq_len, args.tune_blocks + args.tune_check_blocks,
                                from_end=True) if args.tune_steps > 0 else None)
    shapes = decoder_shapes(model, args.max_layers)
    groups = group_linears(shapes)
    problems = {"asym": AllocationProblem(groups, [QuantSpec(b, GROUP, False) for b in BITS])}
    if not args.skip_sym:
        problems["sym"] = AllocationProblem(groups, [QuantSpec(b, GROUP, True) for b in BITS])
    evaluator = HeldoutEvaluator(model, held, args.n_boot, args.seed)
    stages["load_s"] = time.perf_counter() - t
    db_root = args.cache_dir or (cache_dir() / "databases")
    gptq_kw = {**SLQ_GPTQ, "act_order": args.act_order}  # SLQModifier's database options

    settings = {
        "model": args.model, "dtype": "float32", "text": "brown (calibration / evaluation splits)",
        "n_modules": len(shapes), "n_groups": len(groups), "tied": "q/k/v and gate/up per block",
        "max_layers": args.max_layers, "seq_len": args.seq_len, "calib_blocks": args.calib_blocks,
        "eval_blocks": args.eval_blocks, "budgets": args.budgets,
        "options": {k: [o.short() for o in p.options] for k, p in problems.items()},
        "feasible_bpp": {k: list(p.feasible_range()) for k, p in problems.items()},
        "gptq": {"hessians": "collect_hessians on the FP model, calibration blocks (same tokens for both databases)",
                 "scale_search": "hessian", **json.loads(json.dumps(gptq_kw)),
                 "blocksize": 128, "cache_dir": str(db_root)},
        "rco": {"steps": args.rco_steps, "samples": args.rco_samples, "blocks_per_sample": 1, "lr": 0.1,
                "tau": "1.0->0.01 exponential",
                "init": f"kl_sensitivities on the objective ({args.sensitivity_batches} blocks per pass)",
                "objective_tokens": "the next calib_blocks calibration blocks (disjoint from GPTQ's)",
                "rounding": "best of logp / deshifted / linearized DP (budget-filled) / sensitivity DP, by objective KL",
                "select": "calibration KL of the rounding candidates (all objective blocks)",
                "seed": args.seed},
        "tuning": None if args.tune_steps <= 0 else {
            "curves": ["slq_asym_tuned", "uniform_asym_tuned"], "steps": args.tune_steps, "lr": args.tune_lr,
            "reference_bits": args.tune_reference_bits, "slow_only": args.tune_slow_only,
            "blocks": args.tune_blocks,
            "check_blocks": args.tune_check_blocks, "seq_len": args.tune_seq_len,
            "tokens": "the calibration split's last blocks (SLQModifier's); disjoint from GPTQ's and the objective's",
            "batch_blocks": 2, "check_every": 8,
            # only when asked: rows tuned before the option existed stay resumable
            **({"norms": {"lr": args.norm_lr or args.tune_lr}} if args.tune_norms else {})},
        **({"candidate_scales": [{"file": str(f), "option": c["option"]}
                                 for f, c in zip(args.candidate_scales, candidate_scales)]}
           if candidate_scales else {}),
        "distribution_lossless": {"curve": "slq_asym", "targets": list(TARGETS), "bisect_steps": args.bisect_steps,
                                  "tolerance_bpp": args.bisect_tolerance,
                                  "criterion": "held-out EAR lower 95% bootstrap bound >= target"},
        "eval_protocol": "teacher-forced held-out blocks, fp32 softmax over the full vocabulary, T=1, every "
                         "next-token position; EAR = 1 - TV exact; 95% percentile bootstrap CI of mean EAR "
                         f"over whole sequences ({args.n_boot} resamples, seed {args.seed}); LCB = lower end",
    }
    result = {"status": "running", "settings": settings, "stages": stages, "rows": [],
              "machine": {"cpu_count": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                          "torch": torch.__version__, "loadavg_at_start": list(os.getloadavg())}}
    rows = result["rows"]
    print("settings:", json.dumps(settings), flush=True)
    previous = {}
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        # budgets and the set of databases (--skip-sym) may change: points are keyed per curve
        free = ("budgets", "options", "feasible_bpp", "tuning")
        same = {k: v for k, v in old.get("settings", {}).items() if k not in free} == \
            {k: v for k, v in json.loads(json.dumps(settings)).items() if k not in free}
        if not same:
            raise SystemExit(f"--resume: {args.out} was written with other settings; use another --out")
        previous = {(r["curve"], r.get("option"), r.get("budget")): r for r in old.get("rows", [])
                    if r["curve"] not in GSQ_JSON_CURVES.values()}
        old_tuning, new_tuning = ({k: v for k, v in (t or {}).items() if k not in ("curve", "curves")}
                                  for t in (old["settings"].get("tuning"), settings["tuning"]))
        if old_tuning != new_tuning:  # tuned points of other settings are not these
            previous = {k: r for k, r in previous.items() if not k[0].endswith("_tuned")}
        # stages not rerun this time (a resumed database's sensitivities) keep their old figures
        stages.update({k: v for k, v in old.get("stages", {}).items() if k not in stages})
        print(f"resuming: {len(previous)} points from {args.out}")

    def save():
        result["stages"]["total_s"] = time.perf_counter() - t_all
        atomic_write_json(args.out, result)

    def add_row(row):
        rows.append(row)
        if row.get("resumed"):
            return
        lcb = "" if row.get("ear_lcb") is None else f" LCB={row['ear_lcb']:.4f}"
        print(f"  {row['curve']:13s} bpp={row['achieved_bpp']:.4f} EAR={row['ear']:.4f}{lcb} KL={row['kl']:.5f} "
              f"top1={row['top1']:.4f} alloc={row.get('alloc_s', 0):.1f}s eval={row.get('eval_s', 0):.1f}s",
              flush=True)
        save()

    lossless = {}
    db_errors = {}
    for kind, pb in problems.items():
        t = time.perf_counter()
        cands, info = cached_candidates(model, pb, calib, db_root, key_extra={"model": args.model}, **gptq_kw)
        stages[f"database_{kind}"] = {**info, "wall_s": time.perf_counter() - t}
        db_errors[kind] = [[cands[sh.name][spec].meta["rel_err"] for spec in pb.options] for sh in shapes]
        if kind == "asym":
            by_short = {o.short(): o for o in pb.options}
            for f, c in zip(args.candidate_scales, candidate_scales):
                for name, option in c["options"].items():
                    if name not in cands:
                        raise SystemExit(f"--candidate-scales: {f} tunes layer {name}, which this run does not "
                                         "quantize (another --max-layers?)")
                    entry = cands[name][by_short[option]]
                    if c["scales"][name].shape != entry.scale.shape:
                        raise SystemExit(f"--candidate-scales: {f}: layer {name}'s scales have shape "
                                         f"{tuple(c['scales'][name].shape)}, the database's {tuple(entry.scale.shape)}")
                    entry.scale = c["scales"][name].to(entry.scale.dtype)
                print(f"database asym: {c['option']} entries carry the tuned scales of {f}")
        print(f"database {kind}: {info['built_layers']} layers built ({info['build_s']:.0f} s, Hessians "
              f"{info['hessian_s']:.0f} s), {info['loaded_layers']} loaded ({info['load_s']:.1f} s) "
              f"from {info['path']}", flush=True)

        def tune_row(curve, option, budget, choice, row):
            """SLQModifier's scale tuning of the allocation `choice` (option indices per group),
            which `row` scored untuned: a row of `curve`."""
            if (curve, option, budget) in previous:
                add_row({**previous[(curve, option, budget)], "resumed": True})
                return
            t = time.perf_counter()
            tune_obj = ModelKLObjective(model, pb, cands, tune_tokens, batch_blocks=2)
            try:
                tuning = tune_scales(tune_obj, choice, args.tune_blocks, args.tune_steps, lr=args.tune_lr,
                                     reference_bits=args.tune_reference_bits,
                                     slow_only=args.tune_slow_only, norms=args.tune_norms, norm_lr=args.norm_lr)
            finally:
                tune_obj.close()
            t_tune = time.perf_counter() - t
            t = time.perf_counter()
            m = evaluator(pb, cands, choice, scales=tuning.scales, norm_scales=tuning.norm_scales)
            summary = tuning.summary()
            if args.save_tuned_scales:
                args.save_tuned_scales.mkdir(parents=True, exist_ok=True)
                torch.save({"curve": curve, "option": option, "budget": budget, "scales": tuning.scales,
                            "norm_scales": tuning.norm_scales, "options": {
                                name: spec.short() for name, spec in pb.module_specs(choice).items()}},
                           args.save_tuned_scales / f"{curve}_{option or budget}.pt")
            add_row({"curve": curve, **({"option": option} if option else {}), "budget": budget,
                     "achieved_bpp": row["achieved_bpp"], **m,
                     **{k: row[k] for k in ("group_bits", "param_share_by_bits") if k in row},
                     "tuning": {k: summary[k] for k in ("heldout_kl_start", "heldout_kl_best", "best_step",
                                                        "seconds", "lr_by_bits", "norms", "norm_lr",
                                                        "norm_factor_range", "norms_excluded", "log")},
                     "alloc_s": row.get("alloc_s", 0) + t_tune, "tune_s": t_tune,
                     "eval_s": time.perf_counter() - t})

        for k, spec in enumerate(pb.options):  # uniform curve
            tune = kind == "asym" and spec.bits in args.tune_uniform
            if (f"uniform_{kind}", spec.short(), None) in previous:
                row = {**previous[(f"uniform_{kind}", spec.short(), None)], "resumed": True}
                add_row(row)
            else:
                t = time.perf_counter()
                r = uniform_allocate(pb, pb.cost_bits[:, k].sum() / pb.total_params)
                t_alloc = time.perf_counter() - t
                t = time.perf_counter()
                m = evaluator(pb, cands, r.choice)
                row = {"curve": f"uniform_{kind}", "option": spec.short(), "budget": None,
                       "achieved_bpp": r.bpp, **m, "alloc_s": t_alloc, "eval_s": time.perf_counter() - t}
                add_row(row)
            if tune:
                tune_row(f"uniform_{kind}_tuned", spec.short(), None, np.full(len(groups), k), row)

        t = time.perf_counter()
        obj = ModelKLObjective(model, pb, cands, objective_tokens, batch_blocks=1)
        # sensitivities are measured on the first allocation only (a --resume that only
        # adds the other database's curves skips them)
        engine = AllocationEngine(pb, obj, rco=RCOConfig(steps=args.rco_steps, samples=args.rco_samples,
                                                         seed=args.seed),
                                  sensitivity_batches=args.sensitivity_batches)
        stages[f"objective_{kind}_s"] = time.perf_counter() - t
        lo, hi = pb.feasible_range()

        def tune_point(budget, row):
            """The point's allocation (its row's group widths) after SLQModifier's scale tuning."""
            by_bits = {o.bits: k for k, o in enumerate(pb.options)}
            tune_row(f"slq_{kind}_tuned", None, budget, np.array([by_bits[b] for b in row["group_bits"]]), row)

        def tuned(budget):
            return kind == "asym" and args.tune_steps > 0 and (args.tune_budgets is None or any(
                abs(budget - b) < 1e-9 for b in args.tune_budgets))

        def run_point(budget, probe=False):
            if (f"slq_{kind}", None, budget) in previous:
                row = {**previous[(f"slq_{kind}", None, budget)], "resumed": True}
                add_row(row)
                if not probe and tuned(budget):
                    tune_point(budget, row)
                return row
            t = time.perf_counter()
            measured = engine.sensitivity_info is not None
            r = engine.allocate(budget)
            t_alloc = time.perf_counter() - t
            if not measured and engine.sensitivity_info is not None:
                stages[f"sensitivities_{kind}"] = engine.sensitivity_info
                print(f"KL sensitivities {kind}: {engine.sensitivity_info['passes']} passes, "
                      f"{engine.sensitivity_info['wall_s']:.0f} s", flush=True)
            t = time.perf_counter()
            m = evaluator(pb, cands, r.choice)
            scores = r.extra.get("rounding_scores", {})
            steps = [h["time_s"] for h in r.history]
            row = {"curve": f"slq_{kind}", "budget": budget, "achieved_bpp": r.bpp, **m,
                   "calib_kl": scores.get(r.extra.get("rounding")), "rounding": r.extra.get("rounding"),
                   "rco_step_s": (steps[-1] / len(steps)) if steps else None,
                   **allocation_summary(pb, r.choice), "alloc_s": t_alloc, "eval_s": time.perf_counter() - t}
            if probe:
                row["probe"] = "distribution-lossless bisection"
            add_row(row)
            if not probe and tuned(budget):
                tune_point(budget, row)
            return row

        budgets = sorted({min(max(b, lo), hi) for b in args.budgets})
        clipped = [b for b in args.budgets if not lo <= b <= hi]
        if clipped:
            print(f"  {kind}: budgets {clipped} clipped to the feasible range [{lo:.4f}, {hi:.4f}]")
        for B in budgets:
            run_point(B)

        if kind == "asym" and args.bisect_steps > 0:
            for target in TARGETS:
                curve = [r for r in rows if r["curve"] == "slq_asym"]
                ok = [r["budget"] for r in curve if r["ear_lcb"] >= target]
                probes = []
                if ok:
                    b_hi = min(ok)
                    below = [r["budget"] for r in curve if r["budget"] < b_hi and r["ear_lcb"] < target]
                    b_lo = max(below) if below else lo

                    def probe(budget, target=target):
                        row = run_point(budget, probe=True)
                        probes.append({"budget": budget, "bpp": row["achieved_bpp"], "ear_lcb": row["ear_lcb"],
                                       "accepted": row["ear_lcb"] >= target})
                        return row["ear_lcb"] >= target

                    b_lo, b_hi, _ = bisect_budget(b_lo, b_hi, probe, steps=args.bisect_steps,
                                                  tolerance=args.bisect_tolerance)
                curve = [r for r in rows if r["curve"] == "slq_asym"]
                acc = sorted((r for r in curve if r["ear_lcb"] >= target), key=lambda r: r["achieved_bpp"])
                lossless[str(target)] = (
                    {"reached": True, "bpp": acc[0]["achieved_bpp"], "budget": acc[0]["budget"],
                     "ear": acc[0]["ear"], "ear_lcb": acc[0]["ear_lcb"], "kl": acc[0]["kl"],
                     "bracket_bpp": [b_lo, b_hi], "probes": probes} if acc else
                    {"reached": False, "max_ear_lcb": max(r["ear_lcb"] for r in curve),
                     "at_bpp": max(curve, key=lambda r: r["ear_lcb"])["achieved_bpp"]})
                result["distribution_lossless"] = lossless
                save()
        engine = obj = cands = None  # free this database before the next one is built
        result["stages"][f"curves_{kind}_s"] = sum(r.get("alloc_s", 0) + r.get("eval_s", 0)
                                                   for r in rows if r["curve"] in (f"uniform_{kind}", f"slq_{kind}"))

    gamma = None
    if "sym" in db_errors:
        # the law's mechanism, before and after GPTQ: RTN's predicted noise ratio from the
        # weights' gamma, and the ratio of GPTQ's own Hessian-weighted errors in the databases
        gamma = {**gamma_squared(model, shapes), "gptq_error_ratio_sym_over_asym_median": database_error_ratio(db_errors)}
    finish(result, shapes, args, png, gamma, save)
    print(f"wrote {args.out} and {png} in {time.perf_counter() - t_all:.0f} s")


def gsq_vs_curves(rows) -> list[dict]:
    """Each GSQ point against symmetric GPTQ at the same width -- on GSQ's own calibration
    (gsq_gptq: the fair comparison) and on this benchmark's Hessians (uniform_sym) -- and
    against SLQ at the same bpp (log-KL interpolated between SLQ's neighbouring points)."""
    from vllm_slq.eval.report import log_interpolate

    out = []
    slq = [(r["achieved_bpp"], r["kl"]) for r in rows if r["curve"] == "slq_asym" and not r.get("probe")]
    for g in sorted((r for r in rows if r["curve"] == "gsq"), key=lambda r: r["achieved_bpp"]):
        rec = {"bpp": g["achieved_bpp"], "gsq": {k: g.get(k) for k in ("ear", "ear_lcb", "kl")}}
        for curve in ("gsq_gptq", "uniform_sym"):
            u = next((r for r in rows if r["curve"] == curve and r.get("option") == g["option"]), None)
            if u:
                rec[curve] = {k: u[k] for k in ("achieved_bpp", "ear", "ear_lcb", "kl")}
                rec[f"kl_ratio_gsq_over_{curve}"] = g["kl"] / u["kl"] if u["kl"] > 0 else None
        at = log_interpolate(slq, g["achieved_bpp"])
        if at:
            kl, between = at
            rec["slq_asym_kl_at_same_bpp"] = kl
            rec["slq_asym_between"] = list(between)
            rec["kl_ratio_gsq_over_slq_asym"] = g["kl"] / kl if kl > 0 else None
        out.append(rec)
    return out


def slq_vs_uniform_line(rows, kind: str, curve: str | None = None, line: str | None = None) -> list[dict]:
    """Each SLQ point (of `curve`, default slq_<kind>) against the line through the uniform
    points (of `line`, default the untuned uniform_<kind>) of the same database (log KL vs
    bpp): below 1 is what mixing widths (and, for slq_asym_tuned against the untuned line,
    the scale tuning) buys over interpolating uniform widths."""
    from vllm_slq.eval.report import log_interpolate

    uniform = [(r["achieved_bpp"], r["kl"]) for r in rows if r["curve"] == (line or f"uniform_{kind}")]
    out = []
    for r in sorted((r for r in rows if r["curve"] == (curve or f"slq_{kind}")), key=lambda r: r["achieved_bpp"]):
        at = log_interpolate(uniform, r["achieved_bpp"])
        if at:
            out.append({"budget": r["budget"], "bpp": r["achieved_bpp"], "kl": r["kl"], "uniform_line_kl": at[0],
                        "ratio_to_line": r["kl"] / at[0], "uniform_between": list(at[1])})
    return out


def tuning_gain(rows, n_boot: int, seed: int) -> list[dict]:
    """Each tuned row's held-out KL over its untuned row's (the same allocation), paired on
    the held-out sequences."""
    from vllm_slq.eval.metrics import paired_bootstrap_ci

    out = []
    for t in (r for r in rows if r["curve"].endswith("_tuned")):
        base = next((r for r in rows if r["curve"] == t["curve"][:-len("_tuned")] and not r.get("probe")
                     and r.get("option") == t.get("option") and r.get("budget") == t.get("budget")), None)
        if base is None or not (t.get("kl_seq_sums") and base.get("kl_seq_sums")):
            continue
        ratio, lo, hi = paired_bootstrap_ci(t["kl_seq_sums"], base["kl_seq_sums"], n_boot=n_boot, seed=seed)
        out.append({"curve": t["curve"], "option": t.get("option"), "budget": t.get("budget"),
                    "bpp": t["achieved_bpp"], "kl": t["kl"], "untuned_kl": base["kl"],
                    "kl_ratio": ratio, "kl_ratio_ci95": [lo, hi]})
    return out


def finish(result: dict, shapes, args, png: Path, gamma: dict | None, save) -> None:
    """GSQ points, thresholds, the explicit comparisons, table, JSON and plot, from the rows
    measured so far. gamma: the gamma-squared check, or None to keep the one already in result."""
    rows = result["rows"]
    rows[:] = [r for r in rows if r["curve"] not in GSQ_JSON_CURVES.values()]
    lossless = result.get("distribution_lossless", {})
    st = result["settings"]
    gsq, gsq_note = gsq_points(args.gsq_json, shapes, st["seq_len"], st["eval_blocks"], st["model"])
    rows.extend(gsq)
    result["gsq"] = {"status": gsq_note, "points": len(gsq)}
    print(f"GSQ: {gsq_note}")

    curves = sorted({r["curve"] for r in rows}, key=list(CURVES).index)
    result["thresholds"] = {c: {"ear_lcb": thresholds([r for r in rows if r["curve"] == c], "ear_lcb"),
                                "ear": thresholds([r for r in rows if r["curve"] == c], "ear")} for c in curves}
    if "gsq" not in curves:
        result["thresholds"]["gsq"] = gsq_note

    # explicit comparisons the issue asks for
    comp = {}
    w4 = next((r for r in rows if r["curve"] == "uniform_asym" and r.get("option") == f"w4ag{GROUP}"), None)
    s4 = next((r for r in rows if r["curve"] == "slq_asym" and r.get("budget") == 4.0 and not r.get("probe")), None)
    if w4 and s4:
        comp["slq_asym_4.0_vs_uniform_asym_w4"] = {
            "slq": {"bpp": s4["achieved_bpp"], "kl": s4["kl"], "ear": s4["ear"], "ear_lcb": s4["ear_lcb"]},
            "uniform": {"bpp": w4["achieved_bpp"], "kl": w4["kl"], "ear": w4["ear"], "ear_lcb": w4["ear_lcb"]},
            "kl_ratio_slq_over_uniform": s4["kl"] / w4["kl"] if w4["kl"] > 0 else None,
            "slq_lower_kl": s4["kl"] < w4["kl"]}
        if s4.get("kl_seq_sums") and w4.get("kl_seq_sums"):
            from vllm_slq.eval.metrics import paired_bootstrap_ci

            _, lo, hi = paired_bootstrap_ci(s4["kl_seq_sums"], w4["kl_seq_sums"], n_boot=args.n_boot, seed=args.seed)
            comp["slq_asym_4.0_vs_uniform_asym_w4"]["kl_ratio_paired_ci95"] = [lo, hi]
            comp["slq_asym_4.0_vs_uniform_asym_w4"]["slq_lower_kl_beyond_noise"] = hi < 1.0
    else:
        comp["slq_asym_4.0_vs_uniform_asym_w4"] = "not measured (4.0 not among the budgets, or no w4 uniform row)"
    eq = []
    for sa in (r for r in rows if r["curve"] == "slq_asym" and not r.get("probe")):
        ss = next((r for r in rows if r["curve"] == "slq_sym" and r["budget"] == sa["budget"]), None)
        if ss:
            eq.append({"budget": sa["budget"], "asym": {k: sa[k] for k in ("achieved_bpp", "ear", "ear_lcb", "kl")},
                       "sym": {k: ss[k] for k in ("achieved_bpp", "ear", "ear_lcb", "kl")},
                       "kl_ratio_sym_over_asym": ss["kl"] / sa["kl"] if sa["kl"] > 0 else None,
                       "ear_gap_asym_minus_sym": sa["ear"] - ss["ear"]})
    comp["slq_sym_vs_asym_equal_budget"] = eq or "not measured (--skip-sym)"
    ub = []
    for ua in (r for r in rows if r["curve"] == "uniform_asym"):
        us = next((r for r in rows if r["curve"] == "uniform_sym" and r["option"][:2] == ua["option"][:2]), None)
        if us:
            ub.append({"bits": int(ua["option"][1]), "asym": {k: ua[k] for k in ("achieved_bpp", "ear", "kl")},
                       "sym": {k: us[k] for k in ("achieved_bpp", "ear", "kl")},
                       "kl_ratio_sym_over_asym": us["kl"] / ua["kl"] if ua["kl"] > 0 else None})
    comp["uniform_sym_vs_asym_equal_bits"] = ub or "not measured (--skip-sym)"
    gamma = gamma or result.get("comparisons", {}).get("gamma_squared")
    if gamma:
        comp["gamma_squared"] = gamma
    comp["gsq_vs_uniform_sym_and_slq"] = gsq_vs_curves(rows) or gsq_note
    comp["slq_vs_uniform_line"] = {k: slq_vs_uniform_line(rows, k) for k in ("asym", "sym")
                                   if any(r["curve"] == f"slq_{k}" for r in rows)}
    if any(r["curve"] == "slq_asym_tuned" for r in rows):
        comp["slq_vs_uniform_line"]["asym_tuned"] = slq_vs_uniform_line(rows, "asym", "slq_asym_tuned")
    if any(r["curve"] == "uniform_asym_tuned" for r in rows):
        # the fair line for tuned SLQ: what mixing widths buys once both are tuned
        comp["slq_vs_uniform_line"]["asym_tuned_vs_tuned_line"] = slq_vs_uniform_line(
            rows, "asym", "slq_asym_tuned", line="uniform_asym_tuned")
    comp["tuning_gain"] = tuning_gain(rows, args.n_boot, args.seed)
    result["comparisons"] = comp
    result["status"] = "complete"
    save()

    print_table(rows)
    for c, th in result["thresholds"].items():
        if isinstance(th, str):
            print(f"{c:13s} {th}")
            continue
        parts = []
        for t in TARGETS:
            x = th["ear_lcb"][str(t)]
            if x["reached"]:
                ip = x["interpolated_bpp"]
                parts.append(f"LCB>={t}: {x['fewest_measured_bpp']:.3f} bpp"
                             f"{'' if ip is None else f' (interp {ip:.3f})'}")
            else:
                parts.append(f"LCB>={t}: not reached")
        print(f"{c:13s} " + "; ".join(parts))
    for t, v in lossless.items():
        print(f"distribution-lossless EAR LCB >= {t}: " +
              (f"{v['bpp']:.4f} bpp (EAR {v['ear']:.4f}, LCB {v['ear_lcb']:.4f})" if v["reached"]
               else f"not reached (best LCB {v['max_ear_lcb']:.4f} at {v['at_bpp']:.3f} bpp)"))
    c = comp["slq_asym_4.0_vs_uniform_asym_w4"]
    if isinstance(c, dict):
        ci = c.get("kl_ratio_paired_ci95")
        print(f"SLQ asym {c['slq']['bpp']:.3f} bpp KL {c['slq']['kl']:.5f} vs uniform w4a {c['uniform']['bpp']:.4f} "
              f"bpp KL {c['uniform']['kl']:.5f} (ratio {c['kl_ratio_slq_over_uniform']:.3f}"
              f"{'' if ci is None else f', paired 95% CI {ci[0]:.3f}-{ci[1]:.3f}'})")
    gs = comp.get("gamma_squared")
    if gs:
        print(f"gamma^2: mean {gs['mean_gamma2']:.3f} over {gs['groups']} groups; sym/asym noise ratio, "
              "predicted for RTN / GPTQ database median: " + ", ".join(
                  f"w{b} {gs['predicted_rtn_noise_ratio_sym_over_asym'][str(b)]:.2f}/"
                  f"{gs['gptq_error_ratio_sym_over_asym_median'][str(b)]:.2f}" for b in BITS))
    for g in comp["tuning_gain"]:
        print(f"tuning {g['curve']} {g['option'] or g['budget']}: KL {g['untuned_kl']:.5f} -> {g['kl']:.5f}, "
              f"{g['kl_ratio']:.3f} [{g['kl_ratio_ci95'][0]:.3f}, {g['kl_ratio_ci95'][1]:.3f}]")
    for k, pts in comp["slq_vs_uniform_line"].items():
        print(f"SLQ {k} / uniform line: " + ", ".join(f"{p['bpp']:.2f} bpp {p['ratio_to_line']:.3f}" for p in pts))
    for g in comp["gsq_vs_uniform_sym_and_slq"] if isinstance(comp["gsq_vs_uniform_sym_and_slq"], list) else []:
        parts = [f"GSQ {g['bpp']:.3f} bpp KL {g['gsq']['kl']:.5f}"]
        for curve in ("gsq_gptq", "uniform_sym"):
            if f"kl_ratio_gsq_over_{curve}" in g:
                parts.append(f"/ {CURVES[curve]} {g[f'kl_ratio_gsq_over_{curve}']:.3f}")
        if "kl_ratio_gsq_over_slq_asym" in g:
            parts.append(f"/ SLQ asym at the same bpp {g['kl_ratio_gsq_over_slq_asym']:.3f}")
        print(" ".join(parts))
    plot(result, png)


if __name__ == "__main__":
    main()
