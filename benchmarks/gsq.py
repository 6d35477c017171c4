"""GSQ vs RTN vs GPTQ on the reference model (SmolLM2-135M-Instruct), symmetric G=64.

For each bit width (default 2 and 3) and method, quantize the MLP linears
(gate/up/down of every decoder layer; attention stays FP, as in the GSQ paper's
released configs) on the same calibration data and the same symmetric grid, then
measure against the FP model on held-out Brown documents, teacher-forced:
KL(p||q), EAR = sum_v min(p, q), top-1 agreement, perplexity (vllm_slq.eval,
fp32 softmax over the full vocabulary, T=1, every next-token position), plus
quantization wall-clock and peak RSS of the process during that run.

    RTN   vllm_slq.modifiers.RTNModifier (min/max symmetric grid, no data)
    GPTQ  vllm_slq.modifiers.SLQGPTQModifier (ours, symmetric, hessian scale search)
    GSQ   vllm_slq.modifiers.gsq.GSQModifier (GPTQ init as above + refinement)

Scaled down for CPU (the paper: 10 epochs x batch 64 sequences on GPU, hundreds
of steps per block): defaults 64 x 256-token calibration sequences, 1 epoch, 2
sequences per step = 32 optimiser steps per block (15-20 s per block with its
GPTQ init on one shared core), logit lr 1e-3, scale lr 3e-4, init strength 10 (paper: 2e-4, 1e-4, 6);
tau 2 -> 0.05 and kappa 100 -> 500 per step as in the paper. Why these values:
benchmarks/gsq_block.py sweeps on single blocks (layers 0/2/10/20, results in
benchmarks/results/gsq_block_{2,3}bit.json). With the paper's init strength 6
the prior gap between the GPTQ code and a neighbour is 0.03 in logit units
against init noise of std 0.01 per logit, so ~3% of argmax codes start off the
GPTQ code at random; 32 steps are too few to undo that and the refined hard
weights came out no better than GPTQ. Strength 10 (gap 0.05) starts on the
GPTQ codes. Lion moves every logit by exactly lr per step, so lr 1e-3 over 32
cosine-decayed steps moves two logits apart by at most ~0.035: only codes with
a consistent gradient flip (~1%); lr 2e-3 and up flips ~5% and overfits the
calibration set (held-out block MSE worse). Settings are stored in the JSON.

    python benchmarks/gsq.py                 # table, benchmarks/results/gsq.json, gsq.png
    python benchmarks/gsq.py --bits 2 --methods gptq gsq --epochs 2

--include-attention quantizes and refines q/k/v/o too, i.e. every decoder linear:
the rows benchmarks/slq.py puts on its fidelity-vs-bpp curve. Those runs write
benchmarks/results/gsq_all_linears.json by default; run them with --n-eval 8 (the
first eight held-out blocks, exactly slq.py's held-out tokens), or slq.py leaves
them off its curve as scored on other text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from common import PeakSampler, RESULTS, save_figure

MLP = ["re:.*mlp\\.(gate_proj|up_proj|down_proj)$"]


def make_modifier(method: str, bits: int, args):
    from vllm_slq.modifiers import RTNModifier, SLQGPTQModifier
    from vllm_slq.modifiers.gsq import ATTENTION_TARGETS, GSQModifier

    targets = MLP + ATTENTION_TARGETS if args.include_attention else MLP
    common = dict(bits=bits, group_size=args.group_size, symmetric=True, targets=targets, ignore=["lm_head"])
    if method == "rtn":
        return RTNModifier(**common)
    if method == "gptq":
        return SLQGPTQModifier(**common)
    if method == "gsq":
        return GSQModifier(**common, epochs=args.epochs, batch_size=args.batch_size, logit_lr=args.logit_lr,
                           scale_lr=args.scale_lr, logit_weight_decay=args.weight_decay,
                           init_strength=args.init_strength, keep_init_if_worse=not args.no_fallback)
    raise ValueError(method)


def quantize(method: str, bits: int, path, tok, calib, args):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from vllm_slq.modifiers import quantized_weights

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    mod = make_modifier(method, bits, args)
    t0 = time.perf_counter()
    with PeakSampler() as ps:
        oneshot(model=model, processor=tok, dataset=calib if method != "rtn" else None, recipe=[mod],
                num_calibration_samples=args.n_calib, max_seq_length=args.seq_len)
    wall = time.perf_counter() - t0
    qws = quantized_weights(model)
    stats = getattr(mod, "stats", {}) if method == "gsq" else {}
    return model, qws, wall, ps, stats


def evaluate(ref_runner, model, blocks, n_boot):
    from vllm_slq.eval.hf_backend import HFRunner, teacher_forced_metrics
    from vllm_slq.eval.metrics import summarize

    cand = HFRunner(model.eval(), name="candidate")
    with torch.no_grad():
        seqs = teacher_forced_metrics(ref_runner, cand, blocks, progress=False)
    return summarize(seqs, n_boot=n_boot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "gsq"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2, help="calibration sequences per optimiser step")
    ap.add_argument("--logit-lr", type=float, default=1e-3)
    ap.add_argument("--scale-lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=1.0)
    ap.add_argument("--init-strength", type=float, default=10.0, help="logit prior strength (paper: 6)")
    ap.add_argument("--no-fallback", action="store_true", help="never fall back to the GPTQ init per block")
    ap.add_argument("--include-attention", action="store_true",
                    help="quantize q/k/v/o too (every decoder linear; the rows benchmarks/slq.py plots)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for EAR's 95%% CI")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None,
                    help="default: benchmarks/results/gsq.json (MLP) or gsq_all_linears.json (--include-attention)")
    ap.add_argument("--from-logs", nargs="+", metavar="LOG",
                    help="rebuild table/JSON/PNG from the per-run JSON lines of earlier runs' stdout "
                         "(e.g. 2-bit and 3-bit run in parallel), without quantizing anything")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / ("gsq_all_linears.json" if args.include_attention else "gsq.json"))
    if args.from_logs:
        rows = []
        for log in args.from_logs:
            for line in Path(log).read_text().splitlines():
                if line.startswith('{"method"'):
                    rows.append(json.loads(line))
        rows.sort(key=lambda r: (r["bits"], ["rtn", "gptq", "gsq"].index(r["method"])))
        return report(rows, args)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM

    from vllm_slq.data import calibration_dataset, load_model, load_text, resolve_model, token_blocks
    from vllm_slq.eval.hf_backend import HFRunner

    path = resolve_model(args.model)
    ref, tok = load_model(args.model, dtype=torch.float32)
    ref.eval()
    calib = calibration_dataset(tok, n_samples=args.n_calib, seq_len=args.seq_len)
    blocks = token_blocks(tok, load_text().evaluation, args.seq_len, args.n_eval)
    ref_runner = HFRunner(ref, name="fp32")

    rows = []
    for bits in args.bits:
        for method in args.methods:
            print(f"== {method} {bits}-bit G{args.group_size}", flush=True)
            model, qws, wall, ps, stats = quantize(method, bits, path, tok, calib, args)
            m = evaluate(ref_runner, model, blocks, args.n_boot)
            row = {
                "method": method, "bits": bits, "group_size": args.group_size,
                "n_quantized": len(qws), "kl": m["kl"], "ear": m["ear"], "ear_ci95": m["ear_ci95"],
                "ear_p5": m["ear_p5"], "n_positions": m["n_positions"],
                "top1": m.get("top1"), "ppl": m.get("ppl_cand"), "ppl_fp": m.get("ppl_ref"),
                "wall_s": wall, "peak_rss_mb": ps.peak, "rss_before_mb": ps.base,
            }
            if stats:
                row["blocks"] = stats
                row["block_mse_init_mean"] = sum(s["init_mse"] for s in stats.values()) / len(stats)
                row["block_mse_final_mean"] = sum(s["final_mse"] for s in stats.values()) / len(stats)
                row["blocks_kept_init"] = sum(s["kept"] == "init" for s in stats.values())
                row["gsq_state_mb_per_block"] = max(s["gsq_state_bytes"] for s in stats.values()) / 2**20
                row["gsq_seconds_per_block"] = sum(s["seconds"] for s in stats.values()) / len(stats)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
            write_json(rows, args, status=f"running: {len(rows)} row(s) done")
            del model, qws
    report(rows, args)


def report(rows, args):
    which = "all decoder linears" if args.include_attention else "MLP linears"
    print(f"\nreference {args.model}, {which}, symmetric G={args.group_size}, eval {args.n_eval} x "
          f"{args.seq_len} held-out tokens; GSQ {args.epochs} epochs x {args.n_calib} seqs, batch {args.batch_size}")
    hdr = f"{'method':6} {'bits':>4} {'KL':>9} {'EAR':>7} {'top1':>6} {'PPL':>8} {'wall s':>7} {'peak MB':>8}"
    print(hdr)
    for r in rows:
        print(f"{r['method']:6} {r['bits']:>4} {r['kl']:9.4f} {r['ear']:7.4f} {r['top1'] or 0:6.3f} "
              f"{r['ppl'] or 0:8.2f} {r['wall_s']:7.1f} {r['peak_rss_mb']:8.0f}")
    for r in rows:
        if r["method"] == "gsq" and "block_mse_init_mean" in r:
            print(f"GSQ {r['bits']}-bit: mean block-output MSE {r['block_mse_init_mean']:.4g} (GPTQ init) -> "
                  f"{r['block_mse_final_mean']:.4g}; {r['blocks_kept_init']} blocks kept the init; "
                  f"GSQ state {r['gsq_state_mb_per_block']:.1f} MB/block, {r['gsq_seconds_per_block']:.1f} s/block")
    for bits in sorted({r["bits"] for r in rows}):
        g = {r["method"]: r for r in rows if r["bits"] == bits}
        if "gsq" in g and "gptq" in g:
            print(f"{bits}-bit: KL(GSQ)/KL(GPTQ) = {g['gsq']['kl'] / g['gptq']['kl']:.3f}")

    out = write_json(rows, args, status="complete")
    plot(rows, out.with_suffix(".png"), args)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def write_json(rows, args, status: str) -> Path:
    """The rows so far, atomically: a run stopped between widths keeps the widths it finished."""
    from vllm_slq.fileio import atomic_write_json

    out = Path(args.out)
    atomic_write_json(out, {"status": status, "settings": vars(args), "rows": rows,
                            "eval_protocol": "teacher-forced, fp32 softmax full vocab, T=1, all positions; "
                                             f"EAR 95% CI: sequence bootstrap, {args.n_boot} resamples, seed 0"})
    return out


def plot(rows, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = sorted({r["bits"] for r in rows})
    methods = [m for m in ["rtn", "gptq", "gsq"] if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    width = 0.8 / max(1, len(methods))
    for ax, key, label in [(axes[0], "kl", "KL(FP || quant), log scale"), (axes[1], "ear", "EAR")]:
        for i, m in enumerate(methods):
            xs, ys = [], []
            for j, b in enumerate(bits):
                r = next((r for r in rows if r["method"] == m and r["bits"] == b), None)
                if r:
                    xs.append(j + i * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=m.upper())
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(bits))])
        ax.set_xticklabels([f"{b}-bit" for b in bits])
        ax.set_title(label)
        if key == "kl":
            ax.set_yscale("log")
    axes[0].legend()
    which = "all decoder linears" if args.include_attention else "MLP"
    fig.suptitle(f"SmolLM2-135M, {which}, symmetric G={args.group_size}: RTN vs GPTQ vs GSQ")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
