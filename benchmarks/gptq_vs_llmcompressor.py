"""Our GPTQ (SLQGPTQModifier) vs llmcompressor's GPTQModifier on the reference model.

Both run through llmcompressor's real oneshot with the sequential pipeline on the
same calibration blocks and the same grid (int, asymmetric, group 64, min/max
weight observer = compressed-tensors' calculate_qparams). For every quantized
Linear we report the relative output error on the FP model's own inputs

    e = ||X W^T - X Q^T||^2 / ||X W^T||^2 = tr((W-Q) H (W-Q)^T) / tr(W H W^T),  H = X^T X

(X = that Linear's inputs in the *unquantized* model over the calibration blocks;
a common ground for both methods, whose own calibration inputs differ because each
propagates its own quantization error), plus held-out perplexity of each quantized
model, and wall-clock: llmcompressor GPTQ at one width vs our multi-bit database
(vllm_slq.quant.database.build_database, bits 2..8 from one Hessian) in the same
oneshot flow.

    python benchmarks/gptq_vs_llmcompressor.py [--samples 64 --seq-len 512 --bits 3 4]

Prints a table, writes benchmarks/results/gptq_vs_llmcompressor.json and a PNG.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vllm_slq.fileio import atomic_write_json
from vllm_slq.perplexity import blocks_perplexity
from common import save_figure

RESULTS = Path(__file__).resolve().parent / "results"


def _timer_store():
    return {"quantize_s": 0.0}


LLMC_TIMER = _timer_store()
OURS_TIMER = _timer_store()


def make_llmc_gptq(bits: int, group: int, actorder, dampening: float, block: int, targets):
    from llmcompressor.modifiers.gptq import GPTQModifier

    class TimedGPTQModifier(GPTQModifier):
        """llmcompressor's GPTQModifier, timing only its compress step."""

        def compress_modules(self):
            t = time.perf_counter()
            super().compress_modules()
            LLMC_TIMER["quantize_s"] += time.perf_counter() - t

    return TimedGPTQModifier(
        block_size=block,
        dampening_frac=dampening,
        actorder=actorder,
        ignore=["lm_head"],
        config_groups={"group_0": {
            "targets": targets,
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": group, "observer": "memoryless_minmax"},
        }},
    )


def make_ours(bits: int, group: int, dampening: float, block: int, scale_search: str, targets, database_bits=None,
              act_order: bool = False):
    from vllm_slq.modifiers import SLQGPTQModifier
    from vllm_slq.quant.database import build_database
    from vllm_slq.quant.gptq import gptq_quantize  # noqa: F401  (the single-width path)
    from vllm_slq.quant.spec import QuantSpec

    class TimedSLQGPTQ(SLQGPTQModifier):
        """Our GPTQ; with database_bits, builds every width from one Hessian per layer
        and writes back `bits` (what the sequential pipeline then propagates)."""

        def quantize_module(self, name, module, H, spec):
            t = time.perf_counter()
            if database_bits:
                specs = [QuantSpec(b, spec.group_size, spec.symmetric) for b in database_bits]
                db = build_database(module.weight.data, H, specs, layer=name, percdamp=self.dampening_frac,
                                    blocksize=self.block_size, scale_search=self.scale_search,
                                    scale_dtype=self.scale_dtype_for(module), negative_scale=False,
                                    act_order=self.act_order)
                qw = db[spec]
            else:
                qw = super().quantize_module(name, module, H, spec)
            OURS_TIMER["quantize_s"] += time.perf_counter() - t
            return qw

    return TimedSLQGPTQ(bits=bits, group_size=group, symmetric=False, dampening_frac=dampening,
                        block_size=block, scale_search=scale_search, act_order=act_order,
                        attach_compressed_tensors=False,
                        targets=targets)


def target_names(model, max_layer=None):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    if max_layer is not None:
        names = [n for n in names if n.startswith("model.layers.") and int(n.split(".")[2]) < max_layer]
    return names


def targets_for(max_layer):
    """compressed-tensors targets: every Linear, or those of decoder layers < max_layer."""
    if max_layer is None:
        return ["Linear"]
    return [rf"re:^model\.layers\.({'|'.join(str(i) for i in range(max_layer))})\..*_proj$"]


@torch.no_grad()
def fp_hessians(model, blocks: torch.Tensor, names, batch: int = 4) -> dict[str, torch.Tensor]:
    """H = X^T X (fp32) of every target Linear's inputs on the FP model."""
    H, handles = {}, []
    for name in names:
        mod = model.get_submodule(name)
        H[name] = torch.zeros(mod.in_features, mod.in_features)

        def hook(m, a, o, name=name):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            H[name].addmm_(x.t(), x)

        handles.append(mod.register_forward_hook(hook))
    for i in range(0, len(blocks), batch):
        model(input_ids=blocks[i:i + batch])
    for h in handles:
        h.remove()
    return H


def rel_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    Hd = H.double()
    return float(((D @ Hd) * D).sum() / ((W.double() @ Hd) * W.double()).sum())


def run_oneshot(path, tok, ds, recipe, n_samples, seq_len):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    t = time.perf_counter()
    oneshot(model=model, processor=tok, recipe=recipe, dataset=ds, num_calibration_samples=n_samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False)
    return model, time.perf_counter() - t


def plot(per_layer: dict, out_png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(per_layer)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        llmc, ours = per_layer[key]["llmcompressor"], per_layer[key]["ours"]
        names = sorted(llmc)
        x = [llmc[n] for n in names]
        y = [ours[n] for n in names]
        ax.loglog(x, y, ".", alpha=0.6)
        lo, hi = min(x + y), max(x + y)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="equal error")
        ax.set_xlabel("llmcompressor GPTQModifier: relative output error")
        ax.set_ylabel("vllm-slq SLQGPTQModifier: relative output error")
        ax.set_title(f"{key}: {sum(a <= b for a, b in zip(y, x))}/{len(x)} layers ours <= llmcompressor")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out_png)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-blocks", type=int, default=8)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--scale-search", default="hessian", choices=["minmax", "mse", "hessian"])
    ap.add_argument("--llmc-actorder", default="static", choices=["static", "group", "weight", "none"])
    ap.add_argument("--ours-act-order", default="on", choices=["on", "off"],
                    help="our GPTQ visits columns in descending diag(H) order (static groups)")
    ap.add_argument("--database-bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    ap.add_argument("--database-writeback", type=int, default=4,
                    help="width the database run writes back; 0 = no database run (single widths only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-layer", type=int, default=None,
                    help="quantize only decoder layers < this (both methods); default all")
    ap.add_argument("--out", default=str(RESULTS / "gptq_vs_llmcompressor.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vllm_slq.modifiers  # noqa: F401  (registers our modifiers)
    from vllm_slq.data import load_text, resolve_model, token_blocks

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    text = load_text()
    blocks = token_blocks(tok, text.calibration, args.seq_len, args.samples)
    eval_blocks = token_blocks(tok, text.evaluation, args.seq_len, args.eval_blocks)
    ds = Dataset.from_dict({"input_ids": blocks.tolist(), "attention_mask": torch.ones_like(blocks).tolist()})
    print(f"calibration: {tuple(blocks.shape)} tokens blocks, eval: {tuple(eval_blocks.shape)}")

    fp = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    names = target_names(fp, args.max_layer)
    targets = targets_for(args.max_layer)
    W_fp = {n: fp.get_submodule(n).weight.detach().clone() for n in names}
    t = time.perf_counter()
    H_fp = fp_hessians(fp, blocks, names)
    print(f"FP input Hessians for {len(names)} linears in {time.perf_counter() - t:.1f}s")
    ppl_fp = blocks_perplexity(fp, eval_blocks)
    del fp

    actorder = None if args.llmc_actorder == "none" else args.llmc_actorder
    runs, per_layer = [], {}

    def record(key, method, bits, model, wall, quant_s):
        errs = {n: rel_output_error(W_fp[n], model.get_submodule(n).weight.detach().float(), H_fp[n]) for n in names}
        if hasattr(model.get_submodule(names[0]), "quantization_scheme"):
            # llmcompressor's forward would fake-quantize again; the weights are already on the grid
            from llmcompressor.utils.helpers import DisableQuantization

            with DisableQuantization(model):
                ppl = blocks_perplexity(model, eval_blocks)
        else:
            ppl = blocks_perplexity(model, eval_blocks)
        per_layer.setdefault(key, {})[method] = errs
        run = {"setting": key, "method": method, "bits": bits, "wall_s": wall, "quantize_s": quant_s,
               "mean_rel_err": statistics.fmean(errs.values()), "median_rel_err": statistics.median(errs.values()),
               "sum_rel_err": sum(errs.values()), "eval_ppl": ppl}
        runs.append(run)
        print(f"{key} {method:14s} wall {wall:7.1f}s  quantize {quant_s:6.1f}s  mean err {run['mean_rel_err']:.5f}"
              f"  ppl {ppl:.3f}", flush=True)

    for bits in args.bits:
        key = f"w{bits}a_g{args.group_size}"
        for method in ("llmcompressor", "ours"):
            if method == "ours" and bits == args.database_writeback and args.database_writeback:
                continue  # the database run below writes back exactly this (bit-identical entries)
            LLMC_TIMER["quantize_s"] = OURS_TIMER["quantize_s"] = 0.0
            if method == "llmcompressor":
                recipe = make_llmc_gptq(bits, args.group_size, actorder, args.dampening, args.block_size, targets)
            else:
                recipe = make_ours(bits, args.group_size, args.dampening, args.block_size, args.scale_search, targets,
                                   act_order=args.ours_act_order == "on")
            model, wall = run_oneshot(path, tok, ds, recipe, args.samples, args.seq_len)
            record(key, method, bits, model, wall,
                   (LLMC_TIMER if method == "llmcompressor" else OURS_TIMER)["quantize_s"])
            del model

    db_wall = db_quant = None
    if args.database_writeback:
        # our multi-bit database in the same oneshot flow (writes back --database-writeback bits)
        OURS_TIMER["quantize_s"] = 0.0
        recipe = make_ours(args.database_writeback, args.group_size, args.dampening, args.block_size, args.scale_search,
                           targets, database_bits=args.database_bits, act_order=args.ours_act_order == "on")
        model, db_wall = run_oneshot(path, tok, ds, recipe, args.samples, args.seq_len)
        db_quant = OURS_TIMER["quantize_s"]
        if args.database_writeback in args.bits:
            record(f"w{args.database_writeback}a_g{args.group_size}", "ours", args.database_writeback, model, db_wall,
                   db_quant)
            runs[-1]["from_database"] = True
            runs[-1]["note"] = (f"from the database run (wall/quantize times are the database's,  bits {args.database_bits}); its entry equals single-width "
                                "gptq_quantize(scale_search=hessian) bit for bit; single-width runs also try min/max groups")
        del model
        print(f"database bits {args.database_bits}: wall {db_wall:.1f}s, quantize {db_quant:.1f}s", flush=True)


    comparisons = []
    for key, d in per_layer.items():
        llmc, ours = d["llmcompressor"], d["ours"]
        wins = sum(ours[n] <= llmc[n] for n in names)
        r_l = next(r for r in runs if r["setting"] == key and r["method"] == "llmcompressor")
        r_o = next(r for r in runs if r["setting"] == key and r["method"] == "ours")
        comparisons.append({"setting": key, "layers": len(names), "layers_ours_le_llmc": wins,
                            "mean_err_ratio_ours_over_llmc": r_o["mean_rel_err"] / r_l["mean_rel_err"],
                            "median_layer_ratio": statistics.median(ours[n] / llmc[n] for n in names),
                            "ppl_llmc": r_l["eval_ppl"], "ppl_ours": r_o["eval_ppl"],
                            "target_met": r_o["mean_rel_err"] <= r_l["mean_rel_err"]})
    llmc_one = [r for r in runs if r["method"] == "llmcompressor" and r["bits"] == args.database_writeback] or \
               [r for r in runs if r["method"] == "llmcompressor"]
    ref = llmc_one[0]
    if db_wall is None:
        timing = {"database": "not run (--database-writeback 0)"}
    else:
        timing = {"database_bits": args.database_bits, "database_wall_s": db_wall, "database_quantize_s": db_quant,
                  "llmc_single_width_bits": ref["bits"], "llmc_single_width_wall_s": ref["wall_s"],
                  "llmc_single_width_quantize_s": ref["quantize_s"],
                  "ours_single_width": [{"bits": r["bits"], "wall_s": r["wall_s"], "quantize_s": r["quantize_s"]}
                                        for r in runs if r["method"] == "ours" and not r.get("from_database")],
                  "wall_ratio_database_over_llmc": db_wall / ref["wall_s"],
                  "quantize_ratio_database_over_llmc": db_quant / max(ref["quantize_s"], 1e-9),
                  "target_met": db_wall <= 2 * ref["wall_s"]}

    print()
    print(f"{'setting':12s} {'method':14s} {'mean err':>10s} {'median err':>10s} {'ppl':>8s} {'wall s':>8s} {'quant s':>8s}")
    print(f"{'fp32':12s} {'-':14s} {'':>10s} {'':>10s} {ppl_fp:8.3f}")
    for r in runs:
        wall = f"{r['wall_s']:.1f}" + ("*" if r.get("from_database") else "")
        qs = f"{r['quantize_s']:.1f}" + ("*" if r.get("from_database") else "")
        print(f"{r['setting']:12s} {r['method']:14s} {r['mean_rel_err']:10.5f} {r['median_rel_err']:10.5f} "
              f"{r['eval_ppl']:8.3f} {wall:>8s} {qs:>8s}")
    print("(* = the multi-bit database run, whose write-back width is this row)")
    for c in comparisons:
        print(f"{c['setting']}: ours <= llmcompressor on {c['layers_ours_le_llmc']}/{c['layers']} layers; "
              f"mean-error ratio {c['mean_err_ratio_ours_over_llmc']:.3f}; target met: {c['target_met']}")
    if db_wall is not None:
        print(f"database ({len(args.database_bits)} widths) wall {db_wall:.1f}s vs llmcompressor {ref['bits']}-bit "
              f"{ref['wall_s']:.1f}s -> x{timing['wall_ratio_database_over_llmc']:.2f} (quantize step "
              f"{db_quant:.1f}s vs {ref['quantize_s']:.1f}s); target (<= 2x) met: {timing['target_met']}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "gptq_vs_llmcompressor",
        "model": args.model, "calibration": {"blocks": args.samples, "seq_len": args.seq_len, "text": text.source},
        "eval_blocks": args.eval_blocks, "quantized_layers": names,
        "grid": {"type": "int", "symmetric": False, "group_size": args.group_size, "observer": "memoryless_minmax"},
        "llmcompressor": {"actorder": args.llmc_actorder, "dampening_frac": args.dampening,
                          "block_size": args.block_size},
        "ours": {"scale_search": args.scale_search, "act_order": args.ours_act_order, "dampening_frac": args.dampening, "block_size": args.block_size},
        "error_metric": "||XW^T - XQ^T||^2 / ||XW^T||^2 on the FP model's calibration inputs",
        "fp_eval_ppl": ppl_fp,
        "runs": runs, "comparisons": comparisons, "timing": timing,
        "per_layer_rel_err": per_layer,
        "machine": {"platform": platform.platform(), "threads": args.threads, "cuda": torch.cuda.is_available(),
                    "cpu_count": os.cpu_count()},
        "command": "python benchmarks/gptq_vs_llmcompressor.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
    }
    atomic_write_json(out, result)
    png = out.with_suffix(".png")
    plot(per_layer, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
