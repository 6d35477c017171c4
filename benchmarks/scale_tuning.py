"""What tuning the group scales on the model's KL (allocation/scale_tuning.py) buys, on the reference model.

Four runs of the main job, as subprocesses, sharing one GPTQ database cache (so each pair
differs in the tuning alone):

    slq        vllm-slq quantize smollm2-135m --target bpp=4.0 --tune-steps 0
    slq+tune   ... --tune-steps N           (the main job since tuning is on by default: N = 128,
                                            over SLQModifier's 256 training blocks)
    w4         --target bpp=4.3125 --bits-options 4 --tune-steps 0   (uniform asymmetric w4 g64: SLQ's database
               and pipeline with one width, the same GPTQ as `--method gptq --bits 4`)
    w4+tune    ... --tune-steps N
    slq+tune64, w4+tune64: the default until session 22, 64 steps over 128 blocks

with the main job's evaluation (--eval-tokens held-out tokens of the evaluation split, which
neither GPTQ nor the tuning read). Paired on the same sequences (the statistics of `vllm-slq
report --compare`): each tuned run against its untuned twin, and SLQ against uniform w4
with and without tuning (issue #15's target: SLQ at 4.0 bpp <= 0.75x uniform w4's KL).

    PYTHONPATH=.. python scale_tuning.py [--tune-steps 64] [--tune-lr LR] [--runs slq slq+tune w4 w4+tune ...]

(slq/obj32, slq/obj32+tune: the same with --objective-blocks 32; slq/obj32+longtune with
--long-tune-steps, default 256.)

Prints a table, writes results/scale_tuning.json (after every run) and
results/scale_tuning.png (held-back calibration KL against the tuning step; held-out KL per run).
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

# the untuned runs say --tune-steps 0: SLQ tunes 64 steps by default since 2026-12-06
RUNS = {
    "slq": ["--target", "bpp=4.0", "--tune-steps", "0"],
    "slq+tune": ["--target", "bpp=4.0", "--tune-steps", "{steps}"],
    "w4": ["--target", "bpp=4.3125", "--bits-options", "4", "--tune-steps", "0"],
    "w4+tune": ["--target", "bpp=4.3125", "--bits-options", "4", "--tune-steps", "{steps}"],
    "slq+tune64": ["--target", "bpp=4.0", "--tune-steps", "64", "--tune-blocks", "128"],
    "w4+tune64": ["--target", "bpp=4.3125", "--bits-options", "4", "--tune-steps", "64", "--tune-blocks", "128"],
    # the allocation objective on 32 blocks instead of 8: RCO's steps and the sensitivities
    # read the same number of blocks per step either way, so this costs little compute;
    # it asks whether 2,048 tokens are too few to choose the widths from
    "slq/obj32": ["--target", "bpp=4.0", "--objective-blocks", "32", "--tune-steps", "0"],
    "slq/obj32+tune": ["--target", "bpp=4.0", "--objective-blocks", "32", "--tune-steps", "{steps}"],
    "slq/obj32+longtune": ["--target", "bpp=4.0", "--objective-blocks", "32", "--tune-steps", "{long_steps}"],
}
PAIRS = [("slq+tune", "slq"), ("w4+tune", "w4"), ("slq", "w4"), ("slq+tune", "w4"), ("slq+tune", "w4+tune"),
         ("slq+tune", "slq+tune64"), ("w4+tune", "w4+tune64"), ("slq+tune64", "w4"), ("w4+tune64", "w4"),
         ("slq/obj32", "slq"), ("slq/obj32", "w4"), ("slq/obj32+tune", "slq/obj32"), ("slq/obj32+tune", "w4"),
         ("slq/obj32+tune", "w4+tune"), ("slq/obj32+longtune", "slq/obj32"), ("slq/obj32+longtune", "w4"),
         ("slq/obj32+longtune", "w4+tune")]


def run(name: str, args, out_root: Path) -> dict:
    out = out_root / name
    cmd = [str(Path(sys.executable).parent / "vllm-slq"), "quantize", args.model, "--eval-tokens", str(args.eval_tokens),
           "--database-cache", str(out_root / "db"), "--output", str(out), "--overwrite",
           *[a.format(steps=args.tune_steps, long_steps=args.long_tune_steps) for a in RUNS[name]]]
    if args.tune_lr is not None:  # ignored by the runs with --tune-steps 0
        cmd += ["--tune-lr", str(args.tune_lr)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    report = json.loads((out / "slq_report.json").read_text())
    fid = report["fidelity"]
    fid["label"] = name
    tuning = (report.get("allocation") or {}).get("scale_tuning")
    return {"run": name, "command": " ".join(cmd), "wall_s": time.time() - t0, "bpp": report["bpp"],
            "kl": fid["teacher_forced"]["kl"], "ear": fid["teacher_forced"]["ear"],
            "ear_ci95": fid["teacher_forced"]["ear_ci95"], "ppl": fid["teacher_forced"].get("ppl_cand"),
            "tuning_s": None if tuning is None else tuning["seconds"],
            "heldback_kl_ratio": None if tuning is None else tuning["heldout_kl_ratio"],
            "tuning": tuning, "fidelity": fid}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["tuning"]:
            log = r["tuning"]["log"]
            a.plot([e["step"] for e in log], [e["heldout_kl"] for e in log], marker="o", label=r["run"])
    a.set_xlabel("tuning step")
    a.set_ylabel("held-back calibration KL")
    a.set_title("scale tuning: KL on blocks it did not fit")
    a.legend()
    b.bar([r["run"] for r in rows], [r["kl"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        b.text(i, r["kl"], f"{r['kl']:.3f}\n{r['bpp']:.2f} bpp", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("held-out KL (evaluation split)")
    b.set_title("held-out KL to the original")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_series_arguments(p, RUNS, "scale_tuning", "scale_tuning.json")
    p.add_argument("--tune-steps", type=int, default=128, help="the +tune runs' steps (SLQModifier's default)")
    p.add_argument("--long-tune-steps", type=int, default=256, help="the +longtune runs' steps")
    p.add_argument("--tune-lr", type=float, default=None, help="the tuned runs' --tune-lr (default: the CLI's)")
    args = p.parse_args()
    result = run_series(args, "scale_tuning", lambda name, work: run(name, args, work), PAIRS)
    rows, comparisons = result["rows"], result["comparisons"]
    print_table(rows, [("run", "run", ""), ("bpp", "bpp", ".3f"), ("kl", "held-out KL", ".4f"), ("ear", "EAR", ".4f"), ("ppl", "PPL", ".2f"),
                       ("heldback_kl_ratio", "held-back KL tuned/start", ".3f"), ("tuning_s", "tuning s", ".0f"),
                       ("wall_s", "wall s", ".0f")])
    print()
    print_comparisons(comparisons)
    write_json(args.out, result)
    plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
