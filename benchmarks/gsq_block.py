"""GSQ on single decoder blocks of the reference model: GPTQ init vs refined, per block.

The tuning/profiling companion of benchmarks/gsq.py. For each chosen decoder layer
of SmolLM2-135M-Instruct it caches the layer's inputs (FP model, calibration Brown
text) and FP outputs, builds the MLP linears' Hessians from those inputs, runs our
GPTQ (symmetric, hessian scale search: the GSQ init, as GSQModifier does), then
refines gate/up/down jointly with vllm_slq.quant.gsq.refine against the block-output
MSE -- the same loss, block call and soft-weight plumbing as GSQModifier, without
llmcompressor's pipeline (so every block sees FP inputs, not quantized-propagated
ones). Reports, per block: hard (argmax) block-output MSE of the GPTQ init and of
the refined weights on the calibration items and on held-out sequences, steps and
seconds (refinement only, one thread by default).

    python benchmarks/gsq_block.py --bits 2 --layers 0 2 10 20
    python benchmarks/gsq_block.py --bits 3 --layers 2 --profile   # cProfile of one block
    python benchmarks/gsq_block.py --asymmetric --bits 2 3 4 5 6 7 8 --layers 2 20 --out results/gsq_block_asym.json

--asymmetric: the asymmetric grid, initialised by the GPTQ variant SLQ's database and the
uniform baseline use (gptq.GPTQ_VARIANT), zero points fixed; several --bits run in turn.

Steps curve: several --epochs run in turn (each a fresh refinement from the GPTQ init, its
cosine schedules over its own length), and the PNG gains a panel of MSE ratio vs steps:

    python benchmarks/gsq_block.py --bits 2 --layers 2 20 --n-calib 64 --seq-len 256 \
        --epochs 5 20 80 --out results/gsq_block_2bit_steps.json
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import save_figure  # noqa: E402
from vllm_slq.fileio import atomic_path, atomic_write_json  # noqa: E402
from vllm_slq.quant.gsq_block import first_output  # noqa: E402

MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def capture_layers(model, tokens: torch.Tensor, layers, batch: int = 1):
    """Per layer: [(args, kwargs, fp_out)] per sequence and the three MLP Hessians (2/n sum x x^T)."""
    from vllm_slq.quant.gptq import GPTQ

    blocks = model.model.layers
    items = {i: [] for i in layers}
    hess = {i: {n: GPTQ(getattr(blocks[i].mlp, n).in_features) for n in MLP_NAMES} for i in layers}
    hooks = []
    pending = {}

    for i in layers:
        def pre(_m, args, kwargs, i=i):
            pending[i] = (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args),
                          {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()
                           if k not in ("past_key_values", "past_key_value", "use_cache")})

        def post(_m, _args, out, i=i):
            a, kw = pending.pop(i)
            items[i].append((a, kw, first_output(out).detach().clone()))

        hooks.append(blocks[i].register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(blocks[i].register_forward_hook(post))
        for n in MLP_NAMES:
            hooks.append(getattr(blocks[i].mlp, n).register_forward_hook(
                lambda _m, inp, _o, acc=hess[i][n]: acc.add_batch(inp[0])))
    try:
        for s in range(0, tokens.shape[0], batch):
            model(input_ids=tokens[s:s + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return items, {i: {n: hess[i][n].H for n in MLP_NAMES} for i in layers}


def refine_block(block, block_index, items, heldout, H, bits, group, cfg, threads=1, profile=None,
                 symmetric=True):
    """GPTQ init, then the package's GSQ block refinement (vllm_slq.quant.gsq_block) of the MLP."""
    from vllm_slq.quant.gptq import GPTQ_VARIANT, gptq_quantize
    from vllm_slq.quant.gsq_block import refine_block as gsq_refine_block
    from vllm_slq.quant.spec import QuantSpec

    spec = QuantSpec(bits, group, symmetric=symmetric)
    mods = {n: getattr(block.mlp, n) for n in MLP_NAMES}
    gptq_kw = dict(negative_scale=False) if symmetric else dict(GPTQ_VARIANT)
    t0 = time.perf_counter()
    inits = {n: gptq_quantize(mods[n].weight.data, H[n], spec, layer=n, scale_search="hessian",
                              scale_dtype=torch.float16, **gptq_kw) for n in MLP_NAMES}
    t_init = time.perf_counter() - t0
    t1 = time.perf_counter()
    if profile:
        prof = cProfile.Profile()
        prof.enable()
    out = gsq_refine_block(block, mods, inits, items, cfg, block_index=block_index, seed=cfg.seed,
                           dtype=torch.float32, keep_init_if_worse=False, heldout=heldout or None)
    if profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    t_refine = time.perf_counter() - t1
    res, gsq = out.result, out.weights
    held_init, held_final = out.heldout_init, out.heldout_final
    changed = sum(int((w.hard_codes() != w.q0).sum()) for w in gsq.values())
    total = sum(w.q0.numel() for w in gsq.values())
    return {
        "init_mse": res.init_hard_loss, "final_mse": res.final_hard_loss,
        "heldout_init_mse": held_init, "heldout_final_mse": held_final,
        "ratio": res.final_hard_loss / res.init_hard_loss,
        "heldout_ratio": held_final / held_init if heldout else float("nan"),
        "steps": res.steps, "gptq_init_s": t_init, "refine_s": t_refine,
        "codes_changed_frac": changed / total,
        "first_loss": res.losses[0], "last_loss": res.losses[-1],
    }


def plot(payload, path):
    """Bars per block: GPTQ init and GSQ hard block-output MSE, calibration and held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = payload["blocks"]
    layers = list(blocks)
    curve = len({r.get("epochs") for r in blocks.values()}) > 1  # a steps curve: one more panel
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(13.5 if curve else 9, 3.5))
    if curve:
        runs = {}
        for r in blocks.values():
            runs.setdefault((r["bits"], r["layer"]), []).append(r)
        for (bits, layer), rs in sorted(runs.items()):
            rs = sorted(rs, key=lambda r: r["steps"])
            line, = axes[2].plot([r["steps"] for r in rs], [r["heldout_ratio"] for r in rs], "o-",
                                 label=f"w{bits} layer {layer}, held-out")
            axes[2].plot([r["steps"] for r in rs], [r["ratio"] for r in rs], "s--", color=line.get_color(),
                         label=f"w{bits} layer {layer}, calibration")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("optimiser steps per block")
        axes[2].set_ylabel("GSQ / GPTQ block-output MSE")
        axes[2].axhline(1.0, color="grey", lw=0.8)
        axes[2].legend(fontsize=7)
        axes[2].set_title("steps curve")
    for ax, (a, b, title) in zip(axes, [("init_mse", "final_mse", "calibration"),
                                        ("heldout_init_mse", "heldout_final_mse", "held-out")]):
        xs = range(len(layers))
        ax.bar([x - 0.2 for x in xs], [blocks[l][a] for l in layers], 0.4, label="GPTQ init")
        ax.bar([x + 0.2 for x in xs], [blocks[l][b] for l in layers], 0.4, label="GSQ (hard)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"layer {l}" if str(l).isdigit() else str(l) for l in layers],
                           rotation=45 if len(layers) > 4 else 0, fontsize=7 if len(layers) > 4 else None)
        ax.set_yscale("log")
        ax.set_title(f"block-output MSE, {title}")
    axes[0].legend()
    st = payload["settings"]
    bits = st["bits"] if isinstance(st["bits"], int) else "/".join(map(str, st["bits"]))
    grid = "asymmetric" if st.get("asymmetric") else "symmetric"
    steps = "/".join(sorted({str(r["steps"]) for r in blocks.values()}, key=int))
    fig.suptitle(f"SmolLM2-135M MLP, {bits}-bit {grid} G{st['group_size']}: {steps} "
                 f"steps/block, logit lr {st['logit_lr']:g}, scale lr {st['scale_lr']:g}, strength {st['init_strength']:g}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    from vllm_slq.quant.gsq import GSQConfig

    d = GSQConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, nargs="+", default=[2])
    ap.add_argument("--asymmetric", action="store_true", help="asymmetric grid, GPTQ_VARIANT init")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 2, 10, 20])
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-heldout", type=int, default=8)
    ap.add_argument("--epochs", type=int, nargs="+", default=[d.epochs],
                    help="several: a steps curve, one refinement per value")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--logit-lr", type=float, default=d.logit_lr)
    ap.add_argument("--scale-lr", type=float, default=d.scale_lr)
    ap.add_argument("--weight-decay", type=float, default=d.logit_weight_decay)
    ap.add_argument("--tau", type=float, nargs=2, default=[d.tau_start, d.tau_end])
    ap.add_argument("--kappa", type=float, nargs=2, default=[d.kappa_start, d.kappa_end])
    ap.add_argument("--init-strength", type=float, default=d.init_strength)
    ap.add_argument("--init-std", type=float, default=d.init_std)
    ap.add_argument("--paper-init", action="store_true",
                    help="the paper's logit draw, which starts some codes off GPTQ's (GSQConfig.init_keeps_codes off)")
    ap.add_argument("--final-lr-fraction", type=float, default=d.final_lr_fraction)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cache", default="/tmp/gsq_block_cache", help="folder for cached layer inputs")
    ap.add_argument("--out", default=None, help="JSON output (default: print only)")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw the PNG of an earlier run's JSON and exit")
    args = ap.parse_args(argv)
    if args.plot_only:
        src = Path(args.plot_only)
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"wrote {src.with_suffix('.png')}")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from vllm_slq.data import load_model, load_text, token_blocks

    model, tok = load_model(args.model, dtype=torch.float32)
    model.eval()
    key = f"{args.model}_n{args.n_calib}_h{args.n_heldout}_L{args.seq_len}_" + "-".join(map(str, args.layers))
    cache = Path(args.cache) / f"{key}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        text = load_text()
        calib = token_blocks(tok, text.calibration, args.seq_len, args.n_calib)
        held = token_blocks(tok, text.evaluation, args.seq_len, args.n_heldout)
        items, H = capture_layers(model, calib, args.layers)
        held_items, _ = capture_layers(model, held, args.layers)
        data = {"items": items, "H": H, "held": held_items}
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)

    def config(epochs):
        return GSQConfig(tau_start=args.tau[0], tau_end=args.tau[1], kappa_start=args.kappa[0],
                         kappa_end=args.kappa[1], logit_lr=args.logit_lr, logit_weight_decay=args.weight_decay,
                         scale_lr=args.scale_lr, final_lr_fraction=args.final_lr_fraction, init_std=args.init_std,
                         init_strength=args.init_strength, init_keeps_codes=not args.paper_init, epochs=epochs,
                         batch_size=args.batch_size, seed=args.seed)

    rows = {}
    print(f"{'bits':>4} {'layer':>5} {'init':>9} {'final':>9} {'ratio':>6} {'held init':>9} {'held fin':>9} "
          f"{'ratio':>6} {'steps':>5} {'refine s':>8} {'changed':>7}")
    for epochs, bits, i in ((e, b, i) for e in args.epochs for b in args.bits for i in args.layers):
        # the refinement leaves the block's FP weights in place (soft_linears), so each run
        # starts from the same GPTQ init
        r = refine_block(model.model.layers[i], i, data["items"][i], data["held"][i], data["H"][i], bits,
                         args.group_size, config(epochs), threads=args.threads, profile=args.profile,
                         symmetric=not args.asymmetric)
        r["bits"], r["layer"], r["epochs"] = bits, i, epochs
        key = i if len(args.bits) == 1 else f"w{bits}-layer{i}"
        rows[key if len(args.epochs) == 1 else f"e{epochs}-{key}"] = r
        print(f"{bits:>4} {i:>5} {r['init_mse']:9.4g} {r['final_mse']:9.4g} {r['ratio']:6.3f} "
              f"{r['heldout_init_mse']:9.4g} {r['heldout_final_mse']:9.4g} {r['heldout_ratio']:6.3f} "
              f"{r['steps']:>5} {r['refine_s']:8.1f} {r['codes_changed_frac']:7.3f}", flush=True)
    if args.out:
        out = Path(args.out)
        payload = {"settings": vars(args), "config": {k: v for k, v in vars(config(args.epochs[0])).items()
                                                      if k != "epochs"}, "blocks": rows}
        atomic_write_json(out, payload, indent=2, default=str)
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
