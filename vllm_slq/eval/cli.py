"""`vllm-slq eval` and `vllm-slq report`: argument parsing and glue only.

vllm_slq/cli.py wires these as subcommands via add_eval_args/run_eval and
add_report_args/run_report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_slq.pipeline import resolve_device


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", default="smollm2-135m", help="FP16 reference: alias, HF dir or hub id")
    p.add_argument("--candidate", required=True, help="candidate: compressed-tensors checkpoint or HF dir")
    p.add_argument("--dataset", default="brown", help="brown | sampled | hf:<name> | file.txt/.jsonl")
    p.add_argument("--n-tokens", type=int, default=16384, help="held-out tokens to score")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help="how the candidate runs")
    p.add_argument("--topk", type=int, default=-1,
                   help="vLLM backend: -1 = full-vocabulary prompt logprobs (exact EAR); k > 0 = top-k "
                        "(exact lower bound on EAR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="HF compute dtype of the reference (and HF candidate)")
    p.add_argument("--candidate-dtype", default=None, help="candidate dtype (vLLM default: bfloat16 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the HF reference (and HF candidate) run (auto: cuda when available)")
    p.add_argument("--vocab-chunk", type=int, default=8192)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--sample-prompts", type=int, default=8, help="0 disables the sampled protocol")
    p.add_argument("--sample-prompt-len", type=int, default=32)
    p.add_argument("--sample-new-tokens", type=int, default=64)
    p.add_argument("--label", default=None, help="run name (default: candidate directory name)")
    p.add_argument("--method", default=None, help="method name for `report` (default: from checkpoint)")
    p.add_argument("--bpp", type=float, default=None, help="bits per parameter (default: from checkpoint)")
    p.add_argument("--out", default="eval_results", help="directory for <label>.json and <label>.md")
    p.add_argument("--lm-eval-tasks", nargs="*", default=None,
                   help="also run the task-lossless check on these lm-eval tasks "
                        "(local: slq_brown_next_word slq_brown_next_sentence)")
    p.add_argument("--lm-eval-limit", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def run_eval(args) -> int:
    from vllm_slq.data import DataError

    from .api import evaluate
    from .hf_backend import EvalError
    from .report import format_table, write_run

    meta = {k: v for k, v in (("method", args.method), ("bpp", args.bpp)) if v is not None}
    try:
        result = evaluate(args.reference, args.candidate, dataset=args.dataset, n_tokens=args.n_tokens,
                          seq_len=args.seq_len, backend=args.backend, seed=args.seed, dtype=args.dtype,
                          cand_dtype=args.candidate_dtype, topk=args.topk, vocab_chunk=args.vocab_chunk,
                          n_boot=args.n_boot, sample_prompts=args.sample_prompts,
                          sample_prompt_len=args.sample_prompt_len,
                          sample_new_tokens=args.sample_new_tokens, label=args.label, meta=meta,
                          progress=not args.no_progress, device=resolve_device(args.device))
        if args.lm_eval_tasks:
            from .lmeval import task_lossless

            lm_backend = "vllm" if args.backend == "vllm" else "hf"
            tl = task_lossless(str(_resolve(args.reference)), args.candidate, args.lm_eval_tasks,
                               backend=lm_backend, limit=args.lm_eval_limit)
            tl.pop("runs", None)
            result["task_lossless"] = tl
    except (EvalError, DataError, ValueError) as e:
        print(f"vllm-slq eval: error: {e}", file=sys.stderr)
        return 2
    j, m = write_run(result, args.out)
    print(format_table([result]))
    if "task_lossless" in result:
        print(json.dumps(result["task_lossless"], indent=1))
    print(f"wrote {j} and {m}")
    return 0


def _resolve(spec: str):
    from vllm_slq.data import resolve_model

    return resolve_model(spec)


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run JSON files or directories of them")
    p.add_argument("--out", default="eval_report", help="directory for fidelity.md/.json/_vs_bpp.png")
    p.add_argument("--compare", action="store_true",
                   help="exactly two runs scored on the same text: A against B, KL ratio and EAR "
                        "difference with paired bootstrap 95%% CIs (writes comparison.json)")


def run_report(args) -> int:
    from .report import ReportError, gather

    if args.compare:
        return run_compare(args)
    try:
        res = gather(args.runs, args.out)
    except ReportError as e:
        print(f"vllm-slq report: error: {e}", file=sys.stderr)
        return 2
    print(res["table"])
    print(f"wrote {res['markdown']}, {res['json']}" + (f", {res['png']}" if res["png"] else
                                                       " (no run has a bpp: no plot)"))
    return 0


def run_compare(args) -> int:
    from vllm_slq.fileio import atomic_write_json

    from .report import ReportError, format_comparison, load_runs, paired_comparison

    try:
        runs = load_runs(args.runs)
        if len(runs) != 2:
            raise ReportError(f"--compare takes exactly two runs, got {len(runs)} from {args.runs}")
        c = paired_comparison(*runs)
    except ReportError as e:
        print(f"vllm-slq report: error: {e}", file=sys.stderr)
        return 2
    c["files"] = [str(p) for p in args.runs]
    path = Path(args.out) / "comparison.json"
    atomic_write_json(path, c)
    print(format_comparison(c))
    print(f"wrote {path}")
    return 0
