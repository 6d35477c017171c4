"""The user's command end to end on larger models: `vllm-slq quantize DIR --target bpp=4.0`.

For each size a random-weight Llama is saved once (fp16 safetensors plus the reference
model's tokenizer, vocabulary sized to it) under --models-dir, then the real CLI runs
on it in a child process, as a user would type it, with the search made short enough
for a 2-core CPU (fidelity is meaningless on random weights; completing, memory and
time are the point):

    vllm-slq quantize DIR --target bpp=4.0 --device cpu --calib-samples 8 --seq-len 256
        --objective-blocks 2 --probe-seq-len 128 --rco-steps 4 --eval-tokens 1024

--search replaces those search arguments (the 1.5B row was run with a shorter search,
recorded in its row: on this CPU the default one takes hours at that size).

Recorded per size: exit status, wall, the child's peak RSS (VmHWM, polled), the
report's bpp over the quantized linears and over all parameters, checkpoint GB, the
quantize (database + allocation) and allocation seconds.

    PYTHONPATH=.. python slq_scale_e2e.py [--sizes 0.5b 1.5b]

Prints a table, writes results/slq_scale_e2e.json and results/slq_scale_e2e.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, print_table, save_figure, write_json

from vllm_slq.testing import save_tiny_llama

# random Llamas: hidden, layers, intermediate, heads, kv heads (vocabulary: the tokenizer's)
SIZES = {
    "0.5b": dict(hidden=1024, layers=24, intermediate=4096, heads=16, kv_heads=8),
    "1.5b": dict(hidden=2048, layers=24, intermediate=6144, heads=16, kv_heads=8),
}
SEARCH = ["--calib-samples", "8", "--seq-len", "256", "--objective-blocks", "2", "--probe-seq-len", "128",
          "--rco-steps", "4", "--eval-tokens", "1024"]


def model_dir(size: str, root: Path) -> Path:
    path = root / f"random-llama-{size}"
    if not (path / "config.json").exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:  # complete or absent, never half written
            save_tiny_llama(Path(tmp) / "m", with_tokenizer=True, max_positions=2048, **SIZES[size])
            (Path(tmp) / "m").rename(path)
    return path


def peak_rss_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB -> GB, as the other sizes here
    except OSError:
        return None
    return None


def run(size: str, args) -> dict:
    src = model_dir(size, Path(args.models_dir))
    out = Path(args.models_dir) / f"random-llama-{size}-slq-bpp4"
    cmd = [str(Path(sys.executable).parent / "vllm-slq"), "quantize", str(src), "--target", "bpp=4.0",
           "--device", "cpu", "--output", str(out), "--overwrite", *args.search.split()]
    print(f"[slq_scale_e2e] {size}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, peak_rss_gb(proc.pid) or 0.0)
        time.sleep(0.5)
    row = {"size": size, "model": str(src), "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
           "peak_rss_gb": peak, "search": args.search, "command": " ".join(cmd)}
    report = out / "slq_report.json"
    if proc.returncode == 0 and report.exists():
        rep = json.loads(report.read_text())
        alloc = rep.get("allocation") or {}
        fid = (rep.get("fidelity") or {}).get("teacher_forced") or {}
        row.update(params_all=rep["params_all"], params_quantized=rep["params_quantized"], bpp=rep["bpp"],
                   bpp_all_params=rep["bpp_all_params"], checkpoint_gb=rep["checkpoint_gb"],
                   fp16_gb=2 * rep["params_all"] / 1e9, quantize_s=rep["quantize_seconds"],
                   allocation_s=alloc.get("seconds"), widths=sorted(set(rep["layers"].values())),
                   kl=fid.get("kl"), ear=fid.get("ear"),
                   sensitivity_passes=(alloc.get("kl_sensitivities") or {}).get("passes"),
                   sensitivity_capped_options=(alloc.get("kl_sensitivities") or {}).get("capped_options"))
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["returncode"] == 0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = [r["params_all"] / 1e9 for r in ok]
    a.plot(x, [r["peak_rss_gb"] for r in ok], "o-", label="peak RSS of `quantize`")
    a.plot(x, [r["fp16_gb"] for r in ok], "s--", label="fp16 model")
    a.set_xlabel("parameters (B)")
    a.set_ylabel("GB")
    a.legend(fontsize=8)
    b.bar([r["size"] for r in ok], [r["quantize_s"] / 60 for r in ok], label="database + allocation")
    b.bar([r["size"] for r in ok], [(r["wall_s"] - r["quantize_s"]) / 60 for r in ok],
          bottom=[r["quantize_s"] / 60 for r in ok], label="load, write, evaluate")
    b.set_ylabel("minutes (2-core CPU)")
    b.legend(fontsize=8)
    fig.suptitle("vllm-slq quantize --target bpp=4.0 on random-weight Llamas (CPU)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "vllm-slq-bench"))
    ap.add_argument("--search", default=" ".join(SEARCH), help="the quantize arguments after --overwrite")
    ap.add_argument("--out", default="slq_scale_e2e")
    args = ap.parse_args()
    Path(args.models_dir).mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    previous = {}
    if path.exists():
        old = json.loads(path.read_text())
        for r in old["rows"]:  # rows from before --search existed ran the default search
            r.setdefault("search", " ".join(old.get("search", SEARCH)))
            previous[r["size"]] = r
    for size in args.sizes:  # a size re-run replaces its row; the others stay
        previous[size] = run(size, args)
        rows = [previous[s] for s in SIZES if s in previous]
        write_json(path, {"benchmark": "slq_scale_e2e", "rows": rows,
                          "machine": {"platform": platform.platform(), "cpus": 2},
                          "command": "PYTHONPATH=.. python slq_scale_e2e.py " + " ".join(sys.argv[1:])})
    print_table(rows, [("size", "size", "s"), ("returncode", "exit", "d"), ("params_all", "params", ".3g"),
                       ("wall_s", "wall s", ".0f"), ("quantize_s", "quantize s", ".0f"),
                       ("allocation_s", "allocation s", ".0f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
                       ("fp16_gb", "fp16 model GB", ".2f"), ("bpp", "bpp linears", ".3f"),
                       ("bpp_all_params", "bpp all", ".3f"), ("checkpoint_gb", "checkpoint GB", ".3f")])
    plot(rows, RESULTS / f"{args.out}.png")


if __name__ == "__main__":
    main()
