"""Sanity anchors for the EAR protocol on the reference model (SmolLM2-135M-Instruct).

RTN fake-quantisation (vllm_slq.quant.grid.rtn) of every decoder linear
(q/k/v/o, gate/up/down in all 30 layers; embeddings and lm_head stay fp16
values), group size 64, evaluated with vllm_slq.eval on held-out Brown text:
teacher-forced, fp32 softmax over the full vocabulary, HF backend in fp32.

Expected (issue 4): 8-bit symmetric EAR ~0.98, KL ~0.0015; 4-bit asymmetric
EAR ~0.74; 2-bit EAR < 0.05.

    python benchmarks/eval_anchors.py [--n-tokens 16384] [--seq-len 512]

Prints a table and writes benchmarks/results/eval_anchors.json (atomically,
after every configuration, so a partial run still leaves its numbers), then
the EAR/KL-vs-bpp plot and table in benchmarks/results/eval_anchors/.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from vllm_slq.data import REFERENCE_MODEL, load_model
from vllm_slq.eval.api import Evaluator
from vllm_slq.eval.report import format_table
from vllm_slq.fileio import atomic_write_json
from vllm_slq.quant.grid import rtn
from vllm_slq.quant.spec import QuantSpec

CONFIGS = {
    "rtn-w8s-g64": QuantSpec(8, 64, symmetric=True),
    "rtn-w4a-g64": QuantSpec(4, 64, symmetric=False),
    "rtn-w2a-g64": QuantSpec(2, 64, symmetric=False),
}
EXPECTED = {"rtn-w8s-g64": "EAR ~0.98, KL ~0.0015", "rtn-w4a-g64": "EAR ~0.74",
            "rtn-w2a-g64": "EAR < 0.05"}


def rtn_copy(model: torch.nn.Module, spec: QuantSpec) -> tuple[torch.nn.Module, float]:
    """A copy of `model` whose decoder linears hold RTN-dequantized weights; and its bpp."""
    cand = copy.deepcopy(model)
    bits = params = 0.0
    with torch.no_grad():
        for name, mod in cand.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                qw = rtn(mod.weight.data.float(), spec, layer=f"model.layers.{name}")
                mod.weight.copy_(qw.dequantize(mod.weight.dtype))
                bits += qw.bits_total()
                params += mod.weight.numel()
    return cand, bits / params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--sample-prompts", type=int, default=4)
    ap.add_argument("--sample-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_anchors.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model(REFERENCE_MODEL, dtype=torch.float32)
    ev = Evaluator(model, tokenizer=tok, n_tokens=args.n_tokens, seq_len=args.seq_len,
                   sample_prompts=args.sample_prompts, sample_new_tokens=args.sample_new_tokens)
    ev.reference_name = REFERENCE_MODEL
    ev.dataset = "brown (evaluation split)"
    out = {"reference": REFERENCE_MODEL, "protocol": ev.protocol("hf", True, -1),
           "quantized": "all decoder linears (q,k,v,o,gate,up,down x 30 layers), RTN, group 64",
           "threads": args.threads, "runs": {}}
    rows = []
    for name in args.configs:
        spec = CONFIGS[name]
        cand, bpp = rtn_copy(model, spec)
        r = ev.evaluate(cand, label=name, meta={"method": "rtn", "bpp": bpp, "spec": spec.short()})
        del cand
        r["candidate"] = name
        r["expected"] = EXPECTED[name]
        tf = r["runtime_s"]["teacher_forced"]
        r["runtime_s"]["positions_per_s"] = round(r["teacher_forced"]["n_positions"] / tf, 2)
        out["runs"][name] = r
        out["total_runtime_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(Path(args.out), out)
        rows.append(r)
        print(format_table(rows), flush=True)
    from vllm_slq.eval.report import gather

    rep = gather([args.out], Path(args.out).with_suffix(""))
    print(f"\nwrote {args.out} and {rep['png']}; total {out['total_runtime_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
