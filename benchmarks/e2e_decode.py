"""End-to-end vLLM decode throughput: quantized (our plugin + Triton kernels) vs FP16, 8B-shaped Llama.

The model has Llama-3-8B's shapes (hidden 4096, 32 layers, FFN 14336, 32 heads /
8 KV heads, vocab 128256) and random weights, so nothing is downloaded:

  fp16        config.json only, vLLM load_format="dummy" (random fp16 weights)
  quantized   a compressed-tensors pack-quantized checkpoint written here with
              random packed words (every int32 bit pattern is a valid dense bit
              stream of codes), random fp16 scales and zero points; tensor
              names/shapes from vllm_slq.checkpoint.layout, config from
              build_quant_config. Default specs: w3a g128 (3.16 bpp) and
              w4a g128 (4.16 bpp) -- the "~3 and ~4 bpp" points.
  --stock     also runs the quantized checkpoints with VLLM_SLQ_DISABLE=1, i.e.
              vLLM's own kernel choice (Humming/Marlin/Machete) for comparison.

Each engine runs in its own subprocess (GPU memory is not reliably returned
in-process). Decode tokens/s = batch * (output_len - 1) / (t(output_len) - t(1)):
the time of a 1-token generation (prefill + first token) is subtracted so the
number is decode only. CUDA graphs are on (enforce_eager=False), as in serving.

    python benchmarks/e2e_decode.py                  # GPU + vLLM (CUDA build)
    python benchmarks/e2e_decode.py --dry-run --out /tmp/e2e.json   # CPU: configs + bpp only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernel_timing import versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
PROJ = {  # module -> (out_features, in_features) as functions of the config
    "self_attn.q_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "self_attn.k_proj": lambda c: (c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
                                   c["hidden_size"]),
    "self_attn.v_proj": lambda c: (c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
                                   c["hidden_size"]),
    "self_attn.o_proj": lambda c: (c["hidden_size"], c["hidden_size"]),
    "mlp.gate_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.up_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
    "mlp.down_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
}
SPEC_RE = re.compile(r"^w([2-8])([sa])(?:g(\d+)|ch)$")


def parse_spec(text: str):
    """'w4ag128' / 'w3sch' (QuantSpec.short() format) -> QuantSpec."""
    from vllm_slq.quant.spec import QuantSpec

    m = SPEC_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"spec {text!r} is not like w4ag128 / w3sg64 / w8sch")
    return QuantSpec(int(m.group(1)), int(m.group(3)) if m.group(3) else None, m.group(2) == "s")


def model_config(layers: int) -> dict:
    c = dict(LLAMA8B, num_hidden_layers=layers)
    c.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
             tie_word_embeddings=False, torch_dtype="float16", bos_token_id=1, eos_token_id=2,
             head_dim=c["hidden_size"] // c["num_attention_heads"])
    return c


def linear_specs(cfg: dict, spec) -> dict:
    return {f"model.layers.{i}.{p}": spec for i in range(cfg["num_hidden_layers"]) for p in PROJ}


def model_bpp(cfg: dict, spec) -> float:
    """Bits per parameter over the quantized linears (scales + zero points included)."""
    bits = params = 0
    for i in range(cfg["num_hidden_layers"]):
        for p, shape in PROJ.items():
            n, k = shape(cfg)
            bits += spec.bpp(k) * n * k
            params += n * k
    return bits / params


def write_quantized_checkpoint(path: Path, cfg: dict, spec, seed: int = 0) -> None:
    """Random pack-quantized checkpoint, written atomically (vllm_slq.fileio.atomic_dir)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from vllm_slq.checkpoint.layout import build_quant_config, expected_tensors
    from vllm_slq.fileio import atomic_dir

    gen = torch.Generator().manual_seed(seed)
    with atomic_dir(path) as tmp:
        h, v = cfg["hidden_size"], cfg["vocab_size"]
        weight_map = {}

        def rand_f16(*shape, scale=0.02):
            return (torch.randn(*shape, generator=gen) * scale).half()

        dense = {"model.embed_tokens.weight": rand_f16(v, h), "lm_head.weight": rand_f16(v, h),
                 "model.norm.weight": torch.ones(h, dtype=torch.float16)}
        save_file(dense, str(tmp / "model-dense.safetensors"))
        weight_map.update({k: "model-dense.safetensors" for k in dense})
        for i in tqdm(range(cfg["num_hidden_layers"]), desc=f"writing {spec.short()} layers"):
            tensors = {f"model.layers.{i}.input_layernorm.weight": torch.ones(h, dtype=torch.float16),
                       f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16)}
            for p, shape in PROJ.items():
                n, k = shape(cfg)
                name = f"model.layers.{i}.{p}"
                for suffix, lay in expected_tensors(n, k, spec, module=name).items():
                    if lay.dtype == torch.int32:  # packed codes / zero points: any bit pattern is valid
                        t = torch.randint(-2**31, 2**31, lay.shape, generator=gen, dtype=torch.int64).to(torch.int32)
                    elif lay.dtype == torch.int64:  # weight_shape
                        t = torch.tensor([n, k], dtype=torch.int64)
                    else:  # scales: small so activations stay finite through 32 random layers
                        t = (torch.rand(*lay.shape, generator=gen) * 1e-3 + 1e-4).to(lay.dtype)
                    tensors[f"{name}.{suffix}"] = t
            fname = f"model-{i:05d}.safetensors"
            save_file(tensors, str(tmp / fname))
            weight_map.update({k: fname for k in tensors})
        full = dict(cfg, quantization_config=build_quant_config(linear_specs(cfg, spec), ignore=["lm_head"]))
        (tmp / "config.json").write_text(json.dumps(full, indent=1))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_fp16_config(path: Path, cfg: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


# ----------------------------------------------------------------------------- worker (one engine)


def worker(spec_json: str) -> None:
    """Runs in a subprocess: one vLLM engine, prints one JSON line with the timings."""
    job = json.loads(spec_json)
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], load_format=job["load_format"], skip_tokenizer_init=True, dtype="float16",
              max_model_len=job["input_len"] + job["output_len"] + 8, enforce_eager=False,
              gpu_memory_utilization=job["gpu_mem"], max_num_seqs=max(job["batch"], 1), seed=0)
    prompts = [{"prompt_token_ids": [(17 * i + 31 * j) % 1000 + 10 for j in range(job["input_len"])]}
               for i in range(job["batch"])]

    def timed(max_tokens: int) -> float:
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs), "engine stopped early"
        return dt

    timed(8)  # warmup: compile, CUDA graphs, autotune-free kernel JIT
    t1 = min(timed(1) for _ in range(3))
    tn = min(timed(job["output_len"]) for _ in range(job["reps"]))
    decode_tps = job["batch"] * (job["output_len"] - 1) / (tn - t1)
    print("E2E_RESULT " + json.dumps({"t_first_s": t1, "t_total_s": tn, "decode_tokens_per_s": decode_tps}))


def run_engine(job: dict, env_extra: dict) -> dict:
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("E2E_RESULT "):
            return json.loads(line[len("E2E_RESULT "):])
    return {"error": f"engine exited {proc.returncode}: " + (proc.stderr or proc.stdout)[-2000:]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="vLLM decode tokens/s: quantized vs FP16 (8B-shaped random Llama)")
    ap.add_argument("--specs", nargs="+", type=parse_spec, default=None, help="default: w3ag128 w4ag128")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-mem", type=float, default=0.85)
    ap.add_argument("--stock", action="store_true", help="also time vLLM's own kernels (VLLM_SLQ_DISABLE=1)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "vllm_slq_e2e")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: write configs, compute bpp, JSON only")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.specs is None:
        args.specs = [parse_spec("w3ag128"), parse_spec("w4ag128")]
    if args.output_len < 2:
        ap.error("--output-len must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args._worker)
        return 0
    cfg = model_config(args.layers)
    plan = [{"name": "fp16", "bpp": 16.0}] + [
        {"name": s.short(), "spec": s, "bpp": round(model_bpp(cfg, s), 4)} for s in args.specs]
    if args.dry_run:
        from vllm_slq.checkpoint.layout import build_quant_config

        device = "dry-run (no GPU)"
        results = []
        for p in plan:
            row = {"model": p["name"], "bpp": p["bpp"]}
            if "spec" in p:  # the config the real run writes, checked by building it
                row["quantization_config_groups"] = len(
                    build_quant_config(linear_specs(cfg, p["spec"]), ignore=["lm_head"])["config_groups"])
            results.append(row)
    else:
        try:
            import torch
            import vllm  # noqa: F401
        except ImportError as e:
            print(f"benchmarks/e2e_decode.py needs vLLM and a CUDA GPU ({e}); use --dry-run on CPU.", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("benchmarks/e2e_decode.py needs a CUDA GPU (none found); use --dry-run on CPU.", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name()
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for p in plan:
            path = args.workdir / f"llama8b-{args.layers}l-{p['name']}"
            if "spec" in p:
                if not path.exists():
                    write_quantized_checkpoint(path, cfg, p["spec"])
                load_format, variants = "auto", [("ours", {})] + ([("stock", {"VLLM_SLQ_DISABLE": "1"})]
                                                                 if args.stock else [])
            else:
                write_fp16_config(path, cfg)
                load_format, variants = "dummy", [("fp16", {})]
            for label, env in variants:
                for b in args.batches:
                    job = {"model": str(path), "load_format": load_format, "batch": b,
                           "input_len": args.input_len, "output_len": args.output_len, "reps": args.reps,
                           "gpu_mem": args.gpu_mem}
                    r = run_engine(job, env)
                    results.append({"model": p["name"], "kernels": label, "bpp": p["bpp"], "batch": b, **r})
                    print(json.dumps(results[-1]))
        base = {r["batch"]: r.get("decode_tokens_per_s") for r in results if r["model"] == "fp16"}
        for r in results:
            if r.get("decode_tokens_per_s") and base.get(r["batch"]):
                r["speedup_vs_fp16"] = r["decode_tokens_per_s"] / base[r["batch"]]
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    out = args.out or RESULTS_DIR / f"e2e_decode_{slug}.json"
    payload = {"benchmark": "e2e_decode", "device": device, "versions": versions(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "settings": {"layers": args.layers, "batches": args.batches, "input_len": args.input_len,
                            "output_len": args.output_len, "model_shape": LLAMA8B},
               "results": results}
    from vllm_slq.fileio import atomic_write_json

    atomic_write_json(out, payload)
    print(f"{'model':>10} {'kernels':>8} {'bpp':>6} {'batch':>5} {'tok/s':>9} {'x fp16':>7}")
    for r in results:
        tps = r.get("decode_tokens_per_s")
        print(f"{r['model']:>10} {r.get('kernels', '-'):>8} {r['bpp']:>6.2f} {r.get('batch', '-'):>5} "
              f"{(f'{tps:9.1f}' if tps else '        -')} {r.get('speedup_vs_fp16', float('nan')):>7.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
