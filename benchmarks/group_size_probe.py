"""Does a different cost ladder help SLQ on the reference model? Group size against bits.

SLQ can only beat the straight line through the uniform points (log KL vs bpp) if some
option is cheaper per unit of KL than the widths it already has. Options that change
the ladder are group sizes: a larger group saves scale/zero-point bits (asymmetric
b + (16 + b)/G per weight) and costs a wider range per group. This probe quantizes
every decoder linear of SmolLM2-135M with asymmetric RTN at one width and one
group-size rule and measures held-out KL and EAR against the FP model:

    g64     every linear at group 64 (SLQ's ladder)
    g128d   group 128 where it divides K (down_proj, K = 1536), else 64 (K = 576)
    g192    group 192 everywhere (the largest size dividing both 576 and 1536)
    ch      per-channel (one group per row)

RTN, not GPTQ, so the probe takes minutes; the question is the relative cost of the
options, which GPTQ shifts but does not reorder. For each point the table gives the
KL the g64 ladder would give at the same bpp (log-linear between the neighbouring
g64 widths) and the ratio to it: below 1 would mean a cheaper option.

    python benchmarks/group_size_probe.py            # table, JSON, PNG in benchmarks/results/
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
RULES = {
    "g64": lambda k: 64,
    "g128d": lambda k: 128 if k % 128 == 0 else 64,
    "g192": lambda k: 192,
    "ch": lambda k: None,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6])
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "group_size_probe.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from vllm_slq.allocation.problem import linear_shapes
    from vllm_slq.data import load_model, load_text, token_blocks
    from vllm_slq.eval.hf_backend import HFRunner, teacher_forced_metrics
    from vllm_slq.eval.metrics import summarize
    from vllm_slq.eval.report import log_interpolate
    from vllm_slq.fileio import atomic_write_json
    from vllm_slq.quant.grid import rtn
    from vllm_slq.quant.spec import QuantSpec

    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    model.eval()
    held = token_blocks(tok, load_text("brown").evaluation, args.seq_len, args.eval_blocks)
    ref = HFRunner(model, name="fp32 reference")
    ref.cache = {}
    shapes = linear_shapes(model)
    fp = dict(model.named_modules())
    cand = copy.deepcopy(model).eval()
    mods = dict(cand.named_modules())
    runner = HFRunner(cand, name="rtn")

    rows = []
    for bits in args.bits:
        for rule, group_of in RULES.items():
            t = time.perf_counter()
            bit_sum = 0.0
            for s in shapes:
                spec = QuantSpec(bits, group_of(s.in_features), False)
                with torch.no_grad():
                    mods[s.name].weight.copy_(rtn(fp[s.name].weight.detach(), spec, s.name).dequantize(torch.float32))
                bit_sum += spec.bpp(s.in_features) * s.params
            with torch.no_grad():
                m = summarize(teacher_forced_metrics(ref, runner, held, progress=False), n_boot=200)
            rows.append({"bits": bits, "rule": rule, "bpp": bit_sum / sum(s.params for s in shapes),
                         "kl": m["kl"], "ear": m["ear"], "ear_ci95": m["ear_ci95"], "seconds": time.perf_counter() - t})
            print(f"w{bits} {rule:6s} bpp {rows[-1]['bpp']:.3f} KL {m['kl']:.4f} EAR {m['ear']:.4f}", flush=True)

    ladder = [(r["bpp"], r["kl"]) for r in rows if r["rule"] == "g64"]
    for r in rows:
        at = log_interpolate(ladder, r["bpp"])
        ref_kl = None if at is None else at[0]
        r["g64_line_kl"] = ref_kl
        r["ratio_to_g64_line"] = None if ref_kl is None else r["kl"] / ref_kl
    print(f"\n{'bits':>4} {'rule':6s} {'bpp':>6} {'KL':>8} {'g64 line':>9} {'ratio':>6}")
    for r in rows:
        line = "-" if r["g64_line_kl"] is None else f"{r['g64_line_kl']:.4f}"
        ratio = "-" if r["ratio_to_g64_line"] is None else f"{r['ratio_to_g64_line']:.3f}"
        print(f"{r['bits']:>4} {r['rule']:6s} {r['bpp']:6.3f} {r['kl']:8.4f} {line:>9} {ratio:>6}")
    atomic_write_json(args.out, {
        "settings": {"model": "smollm2-135m", "quantizer": "asymmetric RTN (min/max)", "linears": len(shapes),
                     "held_out": f"{args.eval_blocks} x {args.seq_len} tokens, brown evaluation split",
                     "rules": {"g64": "64", "g128d": "128 where it divides K, else 64", "g192": "192",
                               "ch": "per-channel"}},
        "rows": rows})
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rule, mk in zip(RULES, "osD^"):
        pts = sorted((r["bpp"], r["kl"]) for r in rows if r["rule"] == rule)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=mk, ls="-" if rule == "g64" else ":", label=rule)
    ax.set_yscale("log")
    ax.set_xlabel("bpp (incl. scales / zero points)")
    ax.set_ylabel("held-out KL(p_fp || p_q)")
    ax.set_title("SmolLM2-135M, asymmetric RTN: group size vs bits")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
