"""What rotating the weights first (RotationModifier, `vllm-slq quantize --rotate`) buys, on the
reference model: each run of the main job's pipeline with and without the rotation, paired on the
same held-out sequences (the statistics of `vllm-slq report --compare`).

    w4          --target bpp=4.3125 --bits-options 4 --tune-steps 0   uniform asymmetric w4 g64
    w3          --target bpp=3.296875 --bits-options 3 --tune-steps 0   uniform w3 g64
    slq         --target bpp=4.0                                     the main job (64 tuning steps)
    <run>/rot   the same with --rotate: R1 (residual stream) and R2 (value heads), random
                Hadamard, fused into the weights; evaluated against the unrotated original

Pairs: every /rot run against its twin, and slq/rot against w4 (issue #15's target: SLQ at
4.0 bpp <= 0.75x uniform w4's KL, paired CI below 1).

    PYTHONPATH=.. python rotation.py [--runs w4 w4/rot slq slq/rot] [--resume]

Prints a table, writes results/rotation.json (after every run) and results/rotation.png
(held-out KL per run, rotated beside unrotated).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import add_series_arguments, print_comparisons, print_table, run_series, save_figure, write_json

BASE_RUNS = {
    "w4": ["--target", "bpp=4.3125", "--bits-options", "4", "--tune-steps", "0"],
    "w3": ["--target", "bpp=3.296875", "--bits-options", "3", "--tune-steps", "0"],
    "slq": ["--target", "bpp=4.0"],
}
RUNS = {**BASE_RUNS, **{f"{name}/rot": [*args, "--rotate"] for name, args in BASE_RUNS.items()}}
PAIRS = [*((f"{name}/rot", name) for name in BASE_RUNS), ("slq/rot", "w4"), ("slq", "w4"), ("slq/rot", "w4/rot")]


def run(name: str, args, work: Path) -> dict:
    out = work / name.replace("/", "_")
    cmd = [str(Path(sys.executable).parent / "vllm-slq"), "quantize", args.model, "--eval-tokens", str(args.eval_tokens),
           "--database-cache", str(work / "db"), "--output", str(out), "--overwrite", *RUNS[name]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    report = json.loads((out / "slq_report.json").read_text())
    fid = report["fidelity"]
    fid["label"] = name
    tf = fid["teacher_forced"]
    return {"run": name, "command": " ".join(cmd), "wall_s": time.time() - t0, "bpp": report["bpp"],
            "bpp_all_params": report["bpp_all_params"], "kl": tf["kl"], "ear": tf["ear"], "ear_ci95": tf["ear_ci95"],
            "top1": tf.get("top1"), "ppl": tf.get("ppl_cand"),
            "rotation_kl": (report.get("rotation") or {}).get("function_kl"), "fidelity": fid}


def plot(rows: list[dict], comparisons: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["run"]: r for r in rows}
    names = [n for n in BASE_RUNS if n in by or f"{n}/rot" in by]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    for k, (suffix, label, color) in enumerate((("", "as is", "tab:gray"), ("/rot", "rotated (--rotate)", "tab:blue"))):
        xs = [i + (k - 0.5) * width for i, n in enumerate(names) if n + suffix in by]
        ks = [by[n + suffix]["kl"] for n in names if n + suffix in by]
        ax.bar(xs, ks, width, label=label, color=color)
        for x, n in zip(xs, [n for n in names if n + suffix in by]):
            r = by[n + suffix]
            ax.text(x, r["kl"], f"{r['kl']:.3f}\n{r['bpp']:.2f} bpp", ha="center", va="bottom", fontsize=7)
    ratio = {(c["a"], c["b"]): c for c in comparisons}
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n + (f"\nrot/as is {ratio[(n + '/rot', n)]['kl_ratio']:.2f} "
                             f"[{ratio[(n + '/rot', n)]['kl_ratio_ci'][0]:.2f}, "
                             f"{ratio[(n + '/rot', n)]['kl_ratio_ci'][1]:.2f}]" if (n + "/rot", n) in ratio else "")
                        for n in names], fontsize=8)
    ax.set_ylabel("held-out KL to the original")
    ax.set_title("rotating the weights first (R1 + R2, random Hadamard, fused)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_series_arguments(p, RUNS, "rotation", "rotation.json")
    args = p.parse_args()
    result = run_series(args, "rotation", lambda name, work: run(name, args, work), PAIRS)
    rows, comparisons = result["rows"], result["comparisons"]
    print_table(rows, [("run", "run", ""), ("bpp", "bpp", ".3f"), ("bpp_all_params", "bpp all params", ".2f"),
                       ("kl", "held-out KL", ".4f"), ("ear", "EAR", ".4f"), ("top1", "top-1", ".4f"),
                       ("ppl", "PPL", ".2f"), ("rotation_kl", "rotation KL", ".1e"), ("wall_s", "wall s", ".0f")])
    print()
    print_comparisons(comparisons)
    write_json(args.out, result)
    plot(rows, comparisons, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
