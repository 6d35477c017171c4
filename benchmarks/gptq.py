"""GPTQ benchmarks: the multi-bit database vs separate single-width runs, and a hook for
comparing our per-layer GPTQ error with another implementation's (llmcompressor).

Part 1 (this file, pure math, synthetic data): for reference-model-shaped layers
(SmolLM2-135M: 576x576 q/o, 1536x576 gate/up, 576x1536 down) and a synthetic
correlated Hessian, time

    single      gptq_quantize for one width (w4a g64)
    7 singles   gptq_quantize for each width 2..8 (asym g64), one after another
    database    build_database for the same 7 widths (one factorisation, one pass)

for scale_search="hessian" (the default) and "minmax", and record each width's
Hessian-weighted relative error tr((W-Q)H(W-Q)^T)/tr(WHW^T).

Part 2 (extended by the modifiers side): `compare_layer_errors` takes, per layer,
W, H and a dequantized weight produced elsewhere (e.g. llmcompressor's
GPTQModifier on the real reference model) and reports both relative errors on
the same H. `llmcompressor_gptq` runs llmcompressor's GPTQ kernel on one layer
(imported lazily; the package itself never imports llmcompressor), and
`--vs-llmcompressor` does the comparison on the synthetic layers.

    python benchmarks/gptq.py [--device cpu|cuda] [--threads 1] [--repeats 1] [--quick]
    python benchmarks/gptq.py --vs-llmcompressor   # Part 2 on synthetic layers

Writes benchmarks/results/gptq_database.json and .png (or
gptq_vs_llmcompressor_synthetic.json), prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch

from vllm_slq.quant.database import build_database
from vllm_slq.quant.gptq import gptq_quantize, hessian_relative_error
from vllm_slq.quant.grid import rtn
from vllm_slq.quant.spec import QuantSpec
from common import save_figure

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"q_proj/o_proj 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536)}
WIDTHS = list(range(2, 9))


def synthetic_hessian(k: int, n_tokens: int = 4096, seed: int = 0, device="cpu") -> torch.Tensor:
    """H = 2/n X^T X for activations with correlated channels and uneven magnitudes."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 1.5 * torch.randn(k, k, generator=g) / k ** 0.5
    scales = torch.exp(torch.randn(k, generator=g))
    x = (torch.randn(n_tokens, k, generator=g) @ mix) * scales
    return (2.0 / n_tokens * x.T @ x).to(device)


def synthetic_weight(n: int, k: int, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    outliers = torch.rand(n, k, generator=g) < 0.002  # a few large weights, as in trained LLMs
    return torch.where(outliers, w * 8, w).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_database(shapes: Mapping[str, tuple[int, int]] = SHAPES, widths: Sequence[int] = WIDTHS,
                   group_size: int = 64, device: str = "cpu", repeats: int = 1,
                   modes: Sequence[str] = ("hessian", "minmax")) -> list[dict]:
    """Wall-clock of build_database (all widths) vs single-width GPTQ, per layer shape."""
    from tqdm import tqdm

    rows = []
    specs = [QuantSpec(b, group_size, False) for b in widths]
    one = QuantSpec(4, group_size, False)
    jobs = [(name, shape, mode) for name, shape in shapes.items() for mode in modes]
    for name, (n, k), mode in tqdm(jobs, desc="gptq database bench"):
        H = synthetic_hessian(k, device=device)
        W = synthetic_weight(n, k, device=device)
        kw = dict(scale_search=mode, device=device)
        t_single, _ = _timed(lambda: gptq_quantize(W, H, one, **kw), device, repeats)
        t_singles, singles = _timed(lambda: {s: gptq_quantize(W, H, s, **kw) for s in specs}, device, repeats)
        t_db, db = _timed(lambda: build_database(W, H, specs, **kw), device, repeats)
        same = all(torch.equal(db[s].codes.cpu(), singles[s].codes.cpu()) for s in specs)
        rows.append({
            "layer": name, "n": n, "k": k, "scale_search": mode, "group_size": group_size,
            "t_single_w4_s": t_single, "t_7_singles_s": t_singles, "t_database_s": t_db,
            "speedup_vs_singles": t_singles / t_db, "database_over_single": t_db / t_single,
            "bit_identical_to_singles": same,
            "rel_err": {f"w{s.bits}": db[s].meta["rel_err"] for s in specs},
            "rtn_rel_err": {f"w{s.bits}": hessian_relative_error(W, rtn(W, s).dequantize().to(W.device), H)
                            for s in specs},
        })
    return rows


def compare_layer_errors(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                         spec: QuantSpec, label: str = "other", **gptq_kw) -> list[dict]:
    """Per layer: our GPTQ's relative error vs another implementation's, on the same H.

    layers: {name: (W [N, K] original weight, H [K, K] its Hessian, Q [N, K] the
    other implementation's dequantized weight)}. Returns rows with ours, theirs,
    RTN and ours/theirs; the modifiers side feeds llmcompressor GPTQModifier output
    (label="llmcompressor") collected on the reference model.
    """
    rows = []
    for name, (W, H, Q_other) in layers.items():
        ours = gptq_quantize(W, H, spec, layer=name, **gptq_kw)
        theirs = hessian_relative_error(W, Q_other, H)
        rows.append({
            "layer": name, "spec": spec.short(), "ours": ours.meta["rel_err"], label: theirs,
            "rtn": hessian_relative_error(W, rtn(W, spec, name).dequantize().to(W.device), H),
            f"ours_over_{label}": ours.meta["rel_err"] / theirs if theirs > 0 else float("nan"),
        })
    return rows


def llmcompressor_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """llmcompressor's own GPTQ kernel (the one GPTQModifier runs) on one layer.

    Group parameters come from min/max of the original weight, as GPTQModifier's
    observer computes them (compressed-tensors' formula = grid.compute_qparams).
    Returns the dequantized weight [N, K].
    """
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from vllm_slq.quant.grid import compute_qparams

    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                            strategy="channel" if spec.group_size is None else "group",
                            group_size=spec.group_size)
    scale, zero = compute_qparams(W, spec)
    zero = torch.zeros_like(scale, dtype=torch.int8) if zero is None else zero
    Q, _, _ = quantize_weight(W.float().unsqueeze(0).clone(), H.float().unsqueeze(0).clone(),
                              scale.to(torch.float16).unsqueeze(0), zero.unsqueeze(0), None, args)
    return Q[0]


def bench_vs_llmcompressor_synthetic(shapes: Mapping[str, tuple[int, int]] = SHAPES,
                                     specs: Sequence[QuantSpec] = (QuantSpec(2, 64), QuantSpec(3, 64),
                                                                   QuantSpec(4, 64), QuantSpec(4, 64, True),
                                                                   QuantSpec(8, 64))) -> list[dict]:
    """compare_layer_errors on synthetic layers, against llmcompressor's GPTQ kernel.

    Also runs ours with static min/max groups (llmcompressor's choice of parameters):
    that variant should reproduce llmcompressor's error, isolating what the
    current-weight groups + Hessian-weighted scale search add.
    """
    rows = []
    for name, (n, k) in shapes.items():
        H, W = synthetic_hessian(k), synthetic_weight(n, k)
        for spec in specs:
            Q = llmcompressor_gptq(W, H, spec)
            r = compare_layer_errors({name: (W, H, Q)}, spec, label="llmcompressor")[0]
            r["ours_static_minmax"] = gptq_quantize(W, H, spec, static_groups=True,
                                                    scale_search="minmax").meta["rel_err"]
            rows.append(r)
    return rows


def print_compare(rows: list[dict], label: str = "llmcompressor") -> None:
    head = f"{'layer':<24}{'spec':<8}{'RTN':>10}{label:>15}{'ours':>10}{'ours/' + label[:5]:>11}{'ours static mm':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<24}{r['spec']:<8}{r['rtn']:>10.3e}{r[label]:>15.3e}{r['ours']:>10.3e}"
              f"{r[f'ours_over_{label}']:>11.3f}{r.get('ours_static_minmax', float('nan')):>16.3e}")


def print_table(rows: list[dict]) -> None:
    head = f"{'layer':<24}{'search':<9}{'1x w4':>9}{'7 singles':>11}{'database':>10}{'vs singles':>11}{'db/1x':>7}  bit-exact"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['layer']:<24}{r['scale_search']:<9}{r['t_single_w4_s']:>8.2f}s{r['t_7_singles_s']:>10.2f}s"
              f"{r['t_database_s']:>9.2f}s{r['speedup_vs_singles']:>10.2f}x{r['database_over_single']:>7.2f}"
              f"  {r['bit_identical_to_singles']}")
    print()
    print(f"{'layer':<24}{'search':<9}" + "".join(f"{'w%d' % b:>10}" for b in WIDTHS) + "   (rel err GPTQ / RTN)")
    for r in rows:
        print(f"{r['layer']:<24}{r['scale_search']:<9}"
              + "".join(f"{r['rel_err'][f'w{b}']:>10.2e}" for b in WIDTHS))
        print(f"{'':<24}{'rtn':<9}" + "".join(f"{r['rtn_rel_err'][f'w{b}']:>10.2e}" for b in WIDTHS))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['layer'].split()[-1]}\n{r['scale_search']}" for r in rows]
    x = range(len(rows))
    width = 0.27
    a.bar([i - width for i in x], [r["t_single_w4_s"] for r in rows], width, label="single width (w4)")
    a.bar(list(x), [r["t_7_singles_s"] for r in rows], width, label="7 single runs (w2..w8)")
    a.bar([i + width for i in x], [r["t_database_s"] for r in rows], width, label="database (w2..w8, one pass)")
    a.set_xticks(list(x), labels, fontsize=8)
    a.set_ylabel("seconds")
    a.set_title("GPTQ wall-clock per layer")
    a.legend(fontsize=8)
    for r in rows:
        if r["scale_search"] != "hessian":
            continue
        b.semilogy(WIDTHS, [r["rel_err"][f"w{w}"] for w in WIDTHS], "o-", label=f"GPTQ {r['layer'].split()[-1]}")
        b.semilogy(WIDTHS, [r["rtn_rel_err"][f"w{w}"] for w in WIDTHS], "x--", label=f"RTN {r['layer'].split()[-1]}")
    b.set_xlabel("bits (asym, g64)")
    b.set_ylabel("tr(EHE^T)/tr(WHW^T)")
    b.set_title("Hessian-weighted relative error")
    b.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    ap.add_argument("--quick", action="store_true", help="576x576 only, hessian search only")
    ap.add_argument("--out", default=str(RESULTS / "gptq_database.json"))
    ap.add_argument("--vs-llmcompressor", action="store_true",
                    help="instead: per-layer error of ours vs llmcompressor's GPTQ kernel on synthetic layers")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.vs_llmcompressor:
        rows = bench_vs_llmcompressor_synthetic()
        print_compare(rows)
        out = RESULTS / "gptq_vs_llmcompressor_synthetic.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"note": "synthetic correlated Hessian; rel err = tr(EHE^T)/tr(WHW^T)",
                                   "rows": rows}, indent=1))
        tmp.replace(out)
        print(f"\nwrote {out}")
        return
    shapes = {"q_proj/o_proj 576x576": SHAPES["q_proj/o_proj 576x576"]} if args.quick else SHAPES
    modes = ("hessian",) if args.quick else ("hessian", "minmax")
    rows = bench_database(shapes, device=args.device, repeats=args.repeats, modes=modes)
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "note": "synthetic correlated Hessian (4096 tokens); times are best of --repeats"}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    tmp.replace(out)
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
