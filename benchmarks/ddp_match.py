"""Does a data-parallel run build what one process builds? Compare two checkpoints of the main job.

    vllm-slq quantize smollm2-135m --target bpp=4.0 --eval-tokens 8192 --output out/one
    torchrun --nproc-per-node 2 -m vllm_slq.cli quantize smollm2-135m --target bpp=4.0 \\
        --eval-tokens 8192 --output out/ddp2
    python benchmarks/ddp_match.py out/one out/ddp2 [--out benchmarks/results/slq_ddp2_vs_one.json]

Reports whether every layer got the same width (the allocation), the fraction of equal
codes (overall and per decoder block) and the largest relative scale difference over the
layers that did (the database entries the allocation picked), and each run's bpp, KL,
EAR and wall from its report. The first block sees FP inputs in both runs, so its Hessians
differ only by the order of the fp32 sums; each later block calibrates on the previous
blocks' quantized outputs, so GPTQ's rounding flips compound with depth.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from common import RESULTS, print_table, write_json

from vllm_slq.checkpoint import load_checkpoint


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    if set(a.quantized) != set(b.quantized):
        raise SystemExit(f"{a_dir} and {b_dir} quantize different layers")
    same_spec = [n for n in a.quantized if a.quantized[n].spec == b.quantized[n].spec]
    equal = total = 0
    scale_rel = 0.0
    by_block: dict[str, list[int]] = {}  # per decoder block (the first index in the name), in order
    for n in same_spec:
        qa, qb = a.quantized[n], b.quantized[n]
        eq = int((qa.codes == qb.codes).sum())
        equal += eq
        total += qa.codes.numel()
        block = re.search(r"\.(\d+)\.", n)
        acc = by_block.setdefault(block.group(1) if block else "-", [0, 0])
        acc[0] += eq
        acc[1] += qa.codes.numel()
        sa, sb = qa.scale.float(), qb.scale.float()
        scale_rel = max(scale_rel, float(((sa - sb).abs() / sa.abs().clamp_min(1e-12)).max()))
    runs = {}
    for d in (a_dir, b_dir):
        rep = json.loads((d / "slq_report.json").read_text())
        tf = (rep.get("fidelity") or {}).get("teacher_forced") or {}
        runs[d.name] = {"bpp": rep["bpp"], "kl": tf.get("kl"), "ear": tf.get("ear"), "ear_ci95": tf.get("ear_ci95"),
                        "quantize_s": rep["quantize_seconds"],
                        "calib_kl": (rep.get("search") or [{}])[0].get("calib_kl")}
    return {"a": str(a_dir), "b": str(b_dir), "layers": len(a.quantized),
            "layers_same_width": len(same_spec), "same_allocation": len(same_spec) == len(a.quantized),
            "codes_equal_fraction": equal / max(total, 1), "codes_compared": total,
            "codes_equal_by_block": {k: e / t for k, (e, t) in sorted(by_block.items(),
                                                                      key=lambda kv: (len(kv[0]), kv[0]))},
            "max_scale_rel_diff": scale_rel, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "slq_ddp2_vs_one.json")
    args = ap.parse_args(argv)
    res = compare(args.a, args.b)
    print_table([{"run": k, **v} for k, v in res["runs"].items()],
                [("run", "run", ""), ("bpp", "bpp", ".4f"), ("calib_kl", "calib KL", ".5f"), ("kl", "held-out KL", ".5f"),
                 ("ear", "EAR", ".4f"), ("quantize_s", "quantize s", ".0f")])
    blocks = list(res["codes_equal_by_block"].items())
    print("codes equal per block: " + ", ".join(f"{k}: {v:.4f}" for k, v in blocks[:3] + blocks[-3:]))
    print(f"same allocation: {res['same_allocation']} ({res['layers_same_width']}/{res['layers']} layers); "
          f"codes equal: {res['codes_equal_fraction']:.6f} of {res['codes_compared']}; "
          f"max scale rel diff {res['max_scale_rel_diff']:.2e}")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
