"""Peak memory of each SLQ allocation phase at growing model sizes, and the model that extrapolates it.

    python benchmarks/slq_memory.py                      # reference model + ~0.5B + ~1.5B random Llamas
    python benchmarks/slq_memory.py --sizes ref 0.5b     # a subset
    python benchmarks/slq_memory.py --device cuda --sizes ref 8b   # on a GPU (gpu_smoke.sh)
    python benchmarks/slq_memory.py --offload /tmp/slq-offload     # the 70B path: blocks and store in files

For each size, in one process (RSS sampled every 20 ms, benchmarks/common.PeakSampler),
the phases of an SLQ run on the CPU, in the objective's compute dtype (--dtype, default
bf16: what a GPU run uses; the CPU main job computes in fp32):

    database    every layer's seven candidates (w2..w8, asymmetric g64) built one layer
                at a time straight into the CandidateStore (RTN: the store holds the
                same codes and group parameters whatever quantizer filled it)
    objective   ModelKLObjective: the reference log-probs of the calibration blocks
    sensitivity one KL-sensitivity pass (forward + backward through MixedLinear; the
                phase repeats such passes, so its peak is one pass's)
    rco         rco_allocate, --rco-steps steps of --rco-samples samples
    ear_probe   held-out KL/EAR of the chosen allocation (probe.heldout_metrics: the EAR
                target's FidelityProbe)
    write       the chosen entries as QuantizedWeights, save_checkpoint to a temp dir

Memory is RSS above the process's RSS once the libraries are imported and warmed up
(one forward and backward of a tiny Llama) and before the model exists, with glibc's mmap threshold fixed (exact_rss) so RSS tracks live memory;
with --device cuda it is the caching allocator's max_memory_allocated per phase. The design formula is the model in fp16 plus the packed store
(store.nbytes, measured): the issue's target is an allocation-phase peak (objective,
sensitivity, rco) within 1.2x of it. A least-squares fit memory = a * params + b per
phase extrapolates to Llama-3.1-8B (8.03e9 parameters) and Llama-3.1-70B (70.6e9):
that is a *model*, labelled so in the table and the JSON. The random-weight Llamas
make memory and time meaningful and fidelity meaningless.

--offload DIR measures the path for models whose weights and store exceed the device
(allocation/offload.py): the store's candidates and the decoder blocks' weights rest in
memory-mapped files in DIR and each block is copied onto the device only while it runs.
Memory is then the *anonymous* RSS (file pages excluded): on a GPU that is what the device
would hold. Each row is compared with a stated model of that device peak (offload_model_mb:
non-block parameters + one block's weights and candidates + the largest layer's transient
fp32 copies + the checkpointed block inputs + one block's activations + the KL chunk's
temporaries); the 70B device prediction is that model at Llama-3.1-70B's shapes times the
largest measured/model ratio (at least 1). These rows go to the JSON's "offload" section; a run of
either kind keeps the other kind's section.

Writes benchmarks/results/slq_memory.json and slq_memory.png.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import json

from common import DevicePeak, RESULTS, print_table, save_figure, write_json
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from vllm_slq.allocation import objective as objective_mod
from vllm_slq.allocation.objective import ModelKLObjective
from vllm_slq.allocation.offload import OffloadDir, offload_module
from vllm_slq.allocation.probe import heldout_metrics
from vllm_slq.allocation.problem import AllocationProblem, group_linears, linear_shapes
from vllm_slq.allocation.rco import RCOConfig, rco_allocate
from vllm_slq.allocation.store import CandidateStore
from vllm_slq.checkpoint import save_checkpoint
from vllm_slq.data import resolve_model
from vllm_slq.quant.grid import rtn
from vllm_slq.quant.spec import QuantSpec
from vllm_slq.testing import tiny_llama

# random Llamas: (hidden, layers, intermediate, heads, kv heads, vocab)
SIZES = {
    "0.5b": dict(hidden=1024, layers=24, intermediate=4096, heads=16, kv_heads=8, vocab=32000),
    "1.5b": dict(hidden=2048, layers=24, intermediate=6144, heads=16, kv_heads=8, vocab=32000),
    # Llama-3.1-8B's shapes, for a GPU (benchmarks/gpu_smoke.sh)
    "8b": dict(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
}
# Llama-3.1-70B's shapes, for the offload model's prediction (never built here)
LLAMA_70B = dict(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8, vocab=128256, tied=False)
TARGETS = {"8b": 8.03e9, "70b": 70.6e9}
# the 8B/70B linears as a share of all parameters (embeddings and lm_head untied)
LINEAR_SHARE = {"8b": 6.98e9 / 8.03e9, "70b": 68.5e9 / 70.6e9}
PHASES = ["database", "objective", "sensitivity", "rco", "ear_probe", "write"]
ALLOCATION_PHASES = ["objective", "sensitivity", "rco"]
OPTIONS = [QuantSpec(b, 64, False) for b in range(2, 9)]


def build_model(size: str, dtype: torch.dtype, device: str, layers=None) -> torch.nn.Module:
    if size == "ref":
        return AutoModelForCausalLM.from_pretrained(str(resolve_model("smollm2-135m")), dtype=dtype).to(device)
    c = SIZES[size]
    with torch.device(device):  # random init where the model will live
        return tiny_llama(vocab=c["vocab"], hidden=c["hidden"], layers=layers or c["layers"],
                          intermediate=c["intermediate"], heads=c["heads"], kv_heads=c["kv_heads"],
                          max_positions=2048).to(dtype)


def shapes_of(model) -> dict:
    c = model.config
    return dict(hidden=c.hidden_size, layers=c.num_hidden_layers, intermediate=c.intermediate_size,
                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, vocab=c.vocab_size,
                tied=bool(getattr(c, "tie_word_embeddings", False)))


def offload_model_mb(shapes: dict, batch_blocks: int, seq_len: int, dtype_bytes: int,
                     store_bytes_per_weight: float) -> dict:
    """MODEL of the allocation's device peak with offload (Llama-shaped decoder), in MiB, by term."""
    h, n_layers, inter = shapes["hidden"], shapes["layers"], shapes["intermediate"]
    kv = shapes["kv_heads"] * (h // shapes["heads"])
    tokens = batch_blocks * seq_len
    linears = 2 * h * h + 2 * h * kv + 3 * h * inter
    embed = shapes["vocab"] * h * (1 if shapes["tied"] else 2)
    terms = {
        "non_block_params": (embed + h) * dtype_bytes,
        "one_block": (linears + 2 * h) * dtype_bytes + linears * store_bytes_per_weight,
        # MixedLinear's backward: fp32 W_ref, one dequantized candidate, their product, dL/dW
        "layer_transients": 4 * h * inter * 4,
        "block_inputs": n_layers * tokens * h * dtype_bytes,
        # a Llama block's saved activations: ~10 hidden-wide and 4 FFN-wide tensors per token,
        # plus the attention probabilities
        "block_activations": tokens * (10 * h + 4 * inter) * dtype_bytes
                             + batch_blocks * shapes["heads"] * seq_len * seq_len * 4,
        # the KL's chunk through the head: hidden / 8 positions, ~16 B per logit at its peak
        "kl_chunk": 16 * (h // objective_mod._HEAD_CHUNK_HIDDEN_PER_ROW) * shapes["vocab"],
    }
    out = {k: v / 2**20 for k, v in terms.items()}
    out["total"] = sum(out.values())
    return out


def measure(size: str, args) -> dict:
    dtype = getattr(torch, args.dtype)
    scale_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
    anon = args.offload is not None  # with offload, file pages are not device memory
    warm_libraries(dtype, args.device)
    gc.collect()
    with DevicePeak(args.device, anon=anon) as bare:
        pass
    base = bare.base
    model = build_model(size, dtype, args.device, args.layers)
    if anon:  # the blocks' weights live on the host from the start, as llmcompressor's offloading keeps them
        host = OffloadDir(args.offload)
        for blk in objective_mod.decoder_blocks(model):
            offload_module(blk, host)
        gc.collect()
    n_params = sum(p.numel() for p in model.parameters())
    problem = AllocationProblem(group_linears(linear_shapes(model)), OPTIONS)
    n_linear = sum(m.out_features * m.in_features for g in problem.groups for m in g.modules)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (args.blocks, args.seq_len), generator=g)
    held = torch.randint(0, vocab, (2, args.seq_len), generator=g)
    row = {"size": size, "checkpoint_blocks": args.checkpoint_blocks or anon, "offload": anon, "device": args.device,
           "device_name": device_name(args.device), "params": n_params, "linear_params": n_linear, "dtype": args.dtype,
           "fp16_model_mb": n_params * 2 / 2**20, "phases": {}, "wall_s": {}}
    mods = dict(model.named_modules())

    def phase(name, fn):
        t = time.perf_counter()
        with DevicePeak(args.device, anon=anon) as ps:
            out = fn()
        row["phases"][name] = ps.peak - base
        row["wall_s"][name] = time.perf_counter() - t
        print(f"  {size} {name}: peak {ps.peak - base:.0f} MB over the bare process, "
              f"{row['wall_s'][name]:.1f} s", file=sys.stderr)
        return out

    def database():
        store = CandidateStore(args.device, offload=OffloadDir(args.offload) if anon else None)
        for name in tqdm(problem.module_names(), desc=f"{size} database", leave=False):
            w = mods[name].weight.detach()
            entries = {s: rtn(w.float(), s, layer=name, scale_dtype=scale_dtype) for s in OPTIONS}
            for q in entries.values():  # rtn rounds scales to scale_dtype but returns fp32; GPTQ's are scale_dtype
                q.scale = q.scale.to(scale_dtype)
            store.put(name, entries)
        return store

    store = phase("database", database)
    row["store_mb"] = store.nbytes / 2**20
    row["design_mb"] = row["fp16_model_mb"] + row["store_mb"]
    obj = phase("objective", lambda: ModelKLObjective(model, problem, store, calib, batch_blocks=args.batch_blocks,
                                                      compute_dtype=None, checkpoint_blocks=args.checkpoint_blocks,
                                                      offload_dir=args.offload))
    def sensitivity_pass():  # one pass of allocation.sensitivity: every group at w5, one backward
        P = problem.one_hot(np.full(problem.n_groups, 3)).requires_grad_(True)
        obj(P, 0).backward()

    phase("sensitivity", sensitivity_pass)
    budget = 4.0
    cfg = RCOConfig(steps=args.rco_steps, samples=args.rco_samples, progress=False)
    res = phase("rco", lambda: rco_allocate(problem, budget, obj, config=cfg,
                                            select=lambda ch: obj.evaluate(ch, 1)))
    phase("ear_probe", lambda: heldout_metrics(obj, res.choice, held))

    def write():
        specs = problem.module_specs(res.choice)
        quantized = {n: store.quantized(n, s) for n, s in specs.items()}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(model, quantized, Path(d) / "ckpt", dtype=dtype)

    phase("write", write)
    row["allocation_peak_mb"] = max(row["phases"][p] for p in ALLOCATION_PHASES)
    row["allocation_peak_over_design"] = row["allocation_peak_mb"] / row["design_mb"]
    if anon:
        row["offload_model_mb"] = offload_model_mb(shapes_of(model), args.batch_blocks, args.seq_len,
                                                   dtype.itemsize, store.nbytes / n_linear)
        row["allocation_peak_over_offload_model"] = row["allocation_peak_mb"] / row["offload_model_mb"]["total"]
    obj.close()
    del obj, store, model
    gc.collect()
    return row


def warm_libraries(dtype: torch.dtype, device: str) -> None:
    """One forward and backward of a tiny Llama before the bare process is measured: the first
    of each kind of op makes the math libraries set up their own state (~40 MB of RSS on this CPU),
    which a GPU keeps outside max_memory_allocated too; it is the process's, not the allocation's."""
    model = tiny_llama().to(dtype=dtype, device=device)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)
    model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum().backward()
    del model, ids
    gc.collect()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fit(rows: list[dict]) -> dict:
    """memory_mb = a * params + b per phase (least squares), plus the store per linear weight."""
    x = np.array([r["params"] for r in rows], dtype=np.float64)
    out = {}
    for p in PHASES + ["allocation_peak"]:
        y = np.array([r["allocation_peak_mb"] if p == "allocation_peak" else r["phases"][p] for r in rows])
        a, b = np.polyfit(x, y, 1) if len(rows) > 1 else (y[0] / x[0], 0.0)
        out[p] = {"mb_per_param": float(a), "mb_offset": float(b)}
    out["store_bytes_per_linear_weight"] = float(np.mean([r["store_mb"] * 2**20 / r["linear_params"] for r in rows]))
    return out


def predict(model_fit: dict) -> dict:
    pred = {}
    for name, n in TARGETS.items():
        f = model_fit["allocation_peak"]
        store_gb = n * LINEAR_SHARE[name] * model_fit["store_bytes_per_linear_weight"] / 1e9
        pred[name] = {"params": n, "fitted_allocation_peak_gb": (f["mb_per_param"] * n + f["mb_offset"]) * 2**20 / 1e9,
                      "design_gb": n * 2 / 1e9 + store_gb, "store_gb": store_gb}
    return pred


def plot(rows: list[dict], model_fit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.array([r["params"] for r in rows]) / 1e9
    for p in PHASES:
        ax.plot(x, [r["phases"][p] / 1024 for r in rows], "o-", label=p)
    ax.plot(x, [r["design_mb"] / 1024 for r in rows], "k--", label="design: fp16 model + packed store")
    ax.plot(x, [1.2 * r["design_mb"] / 1024 for r in rows], "k:", label="1.2 x design (target)")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("peak memory over the bare process (GiB)")
    ax.set_title(f"SLQ phases, measured on {rows[0]['device_name']} ({rows[0]['dtype']} compute)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def exact_rss() -> None:
    """glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so RSS
    would remember every layer-sized temporary ever freed. A fixed 128 KiB threshold (mallopt
    M_MMAP_THRESHOLD) returns each freed tensor to the OS at once: RSS then tracks live memory,
    which is what a GPU caching allocator would have to hold too."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: RSS would not track live memory")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["ref", "0.5b", "1.5b"], choices=["ref", *SIZES])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--blocks", type=int, default=4, help="calibration blocks of the objective")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-blocks", type=int, default=2, help="blocks per forward/backward (the modifier's 2)")
    ap.add_argument("--checkpoint-blocks", action=argparse.BooleanOptionalAction, default=True,
                    help="objective recomputes decoder blocks (the modifier's default)")
    ap.add_argument("--rco-steps", type=int, default=2)
    ap.add_argument("--rco-samples", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: memory is torch.cuda.max_memory_allocated per phase")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the random Llamas (default: SIZES)")
    ap.add_argument("--offload", default=None, metavar="DIR",
                    help="the 70B path: store and decoder blocks in memory-mapped files under DIR; "
                         "measures anonymous (device) memory and writes the JSON's offload section")
    ap.add_argument("--out", default=str(RESULTS / "slq_memory.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        exact_rss()
    rows = [measure(s, args) for s in args.sizes]
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.offload is not None:
        data = {**previous, "offload": offload_section(rows, args)}
        data.setdefault("predicted_peak_gb", {})["70b_device"] = data["offload"]["predicted_70b_device_gb"]
        write_json(out, data)
        plot_offload(rows, data["offload"], out.with_name(out.stem + "_offload.png"))
        print(f"wrote the offload section of {out} and {out.with_name(out.stem + '_offload.png')}")
        return 0
    model_fit = fit(rows)
    pred = predict(model_fit)
    cols = [("size", "size", ""), ("params", "params", ".3g"), ("fp16_model_mb", "fp16 model MB", ".0f"),
            ("store_mb", "store MB", ".0f")] + [(p, p, ".0f") for p in PHASES] + \
           [("allocation_peak_over_design", "alloc peak / design", ".2f")]
    flat = [{**r, **r["phases"]} for r in rows]
    table = print_table(flat, cols)
    print("\nMODEL (least-squares fit of the allocation peak, a * params + b, to the sizes above):")
    for name, p in pred.items():
        print(f"  {name}: fitted allocation peak {p['fitted_allocation_peak_gb']:.1f} GB; design formula "
              f"{p['design_gb']:.1f} GB (fp16 model {p['params'] * 2 / 1e9:.1f} + packed store {p['store_gb']:.1f})")
    data = {
        "what": f"peak memory over the bare process per SLQ phase on {rows[0]['device_name']}; "
                "predictions are a linear model fitted to them",
        "args": vars(args), "rows": rows, "fit": model_fit, "predictions_model": pred, "table": table,
        "predicted_peak_gb": {"8b": pred["8b"]["fitted_allocation_peak_gb"],
                              # without offload a 70B's device peak is its whole allocation peak
                              "70b_device": pred["70b"]["fitted_allocation_peak_gb"]},
        "allocation_peak_over_design": [r["allocation_peak_over_design"] for r in rows],
    }
    if "offload" in previous:  # the 70B path's measured prediction stands until re-measured
        data["offload"] = previous["offload"]
        data["predicted_peak_gb"]["70b_device"] = previous["offload"]["predicted_70b_device_gb"]
    write_json(out, data)
    plot(rows, model_fit, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def offload_section(rows: list[dict], args) -> dict:
    """The offload rows, their table, and the 70B device prediction (the MODEL times the worst ratio)."""
    cols = [("size", "size", ""), ("params", "params", ".3g"), ("store_mb", "store MB", ".0f")] + \
           [(p, p, ".0f") for p in ALLOCATION_PHASES + ["ear_probe"]] + \
           [("model_mb", "MODEL MB", ".0f"), ("allocation_peak_over_offload_model", "peak / MODEL", ".2f")]
    flat = [{**r, **r["phases"], "model_mb": r["offload_model_mb"]["total"]} for r in rows]
    print("device (anonymous) memory over the bare process, MiB, with --offload:")
    table = print_table(flat, cols)
    # never below the model itself: a ratio under 1 at these sizes is not a promise at 70B
    worst = max(1.0, max(r["allocation_peak_over_offload_model"] for r in rows))
    bpw = float(np.mean([r["store_mb"] * 2**20 / r["linear_params"] for r in rows]))
    m70 = offload_model_mb(LLAMA_70B, args.batch_blocks, args.seq_len, getattr(torch, args.dtype).itemsize, bpw)
    pred = m70["total"] * worst * 2**20 / 1e9
    print(f"\nMODEL, Llama-3.1-70B with offload: {m70['total'] * 2**20 / 1e9:.1f} GB by the terms "
          + ", ".join(f"{k} {v * 2**20 / 1e9:.2f}" for k, v in m70.items() if k != "total")
          + f"; x {worst:.2f} (the largest measured/model ratio, at least 1) = {pred:.1f} GB on the device")
    return {"what": "allocation phases' anonymous RSS over the bare process with --offload (blocks and store "
                    "in memory-mapped files): what the device holds; MODEL = offload_model_mb",
            "args": vars(args), "rows": rows, "table": table, "store_bytes_per_linear_weight": bpw,
            "model_70b_mb": m70, "worst_ratio": worst, "predicted_70b_device_gb": pred}


def plot_offload(rows: list[dict], section: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["allocation_peak_mb"] / 1024 for r in rows], 0.4, label="measured allocation peak (anon RSS)")
    ax.bar(x + 0.2, [r["offload_model_mb"]["total"] / 1024 for r in rows], 0.4, label="MODEL (offload_model_mb)")
    ax.plot(x, [r["fp16_model_mb"] / 1024 for r in rows], "k--o", label="fp16 model (without offload: + store)")
    ax.set_xticks(x, [f"{r['size']}\n{r['params'] / 1e9:.2f}B" for r in rows])
    ax.set_ylabel("GiB")
    ax.set_title(f"Allocation with --offload on {rows[0]['device_name']}; MODEL for 70B: "
                 f"{section['predicted_70b_device_gb']:.1f} GB", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
