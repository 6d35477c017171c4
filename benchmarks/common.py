"""What every benchmark here shares: peak-RSS sampling, a plain-text table, atomic JSON and PNG."""
from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path

from vllm_slq.fileio import atomic_path, atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "current_rss_mb", "current_anon_mb", "PeakSampler", "DevicePeak", "print_table", "write_json", "save_figure",
           "run_pending", "paired_comparisons", "print_comparisons", "add_series_arguments", "run_series"]


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def current_anon_mb() -> float:
    """Anonymous resident memory of this process now (RssAnon in /proc/self/status), in MiB:
    RSS without the pages of mapped files. With the allocation's offload files mapped, this is
    what a GPU would have to hold (allocation/offload.py)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


class PeakSampler:
    """Samples this process's RSS (or with anon=True its anonymous RSS) every `interval` s in a
    thread: the peak during a block of code.

    base is the value on entry, so `peak - base` is what the block added at its worst.
    """

    def __init__(self, interval: float = 0.02, anon: bool = False):
        self.interval = interval
        self._now = current_anon_mb if anon else current_rss_mb
        self.peak = 0.0
        self.base = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.base = self._now()
        self.peak = self.base
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())


class DevicePeak:
    """Peak memory of a block of code in MiB: RSS on the CPU (PeakSampler; anon=True: anonymous
    RSS only), the CUDA caching allocator's max_memory_allocated on a GPU. base and peak as
    PeakSampler's."""

    def __init__(self, device: str = "cpu", anon: bool = False):
        self.device = device
        self._rss = PeakSampler(anon=anon) if device == "cpu" else None

    def __enter__(self):
        if self._rss is not None:
            self._rss.__enter__()
            self.base = self._rss.base
            return self
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated() / 2**20
        return self

    def __exit__(self, *exc):
        if self._rss is not None:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak
            return
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() / 2**20


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows as a Markdown table; columns are (key, header, format spec). Prints and returns it."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns) + " |"
            for r in rows]
    text = "\n".join([head, sep, *body])
    print(text)
    return text


def write_json(path: Path | str, obj) -> Path:
    atomic_write_json(path, obj)
    return Path(path)


def save_figure(fig, path: Path | str, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def run_pending(names, rows: list[dict], run_one, out, result: dict) -> list[dict]:
    """Run each name not already in rows (kept by --resume) with run_one(name) -> row, writing
    result (with the rows so far) to out after every run, so an interrupted series resumes."""
    for name in names:
        if any(r["run"] == name for r in rows):
            print(f"{name}: kept from {out}", flush=True)
            continue
        rows.append(run_one(name))
        print(f"{name}: KL {rows[-1]['kl']:.4f} in {rows[-1]['wall_s']:.0f} s", flush=True)
        result["rows"] = rows
        write_json(out, result)
    return rows


def paired_comparisons(fidelity: dict, pairs) -> list[dict]:
    """For each (a, b) in pairs with both runs present, a vs b on the same sequences (the
    statistics of `vllm-slq report --compare`): KL ratio with its paired 95% CI, EAR difference."""
    from vllm_slq.eval.report import paired_comparison

    comparisons = []
    for a, b in pairs:
        if a in fidelity and b in fidelity:
            c = paired_comparison(fidelity[a], fidelity[b])
            lo, hi = c["kl"]["ci95"]
            comparisons.append({"a": a, "b": b, "kl_ratio": c["kl"]["ratio_a_over_b"], "kl_ratio_ci": [lo, hi],
                                "kl_ratio_ci_text": f"[{lo:.3f}, {hi:.3f}]",
                                "ear_difference": c["ear"]["a_minus_b"], "ear_difference_ci": c["ear"]["ci95"]})
    return comparisons


def add_series_arguments(p, runs, work_name: str, out_name: str) -> None:
    """The options of a series of main-job runs as subprocesses (rotation.py, scale_tuning.py)."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--runs", nargs="+", default=list(runs), choices=list(runs))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "vllm-slq-bench" / work_name))
    p.add_argument("--out", default=str(RESULTS / out_name))
    p.add_argument("--resume", action="store_true",
                   help="keep the runs --out already holds (their settings are not checked: pass the same ones)")


def run_series(args, benchmark: str, run_one, pairs) -> dict:
    """Run args.runs with run_one(name, work_dir) -> row, keeping with --resume the rows (and the
    hand-written notes) --out already holds, and pair them on the same sequences.
    Returns the result ({"benchmark", "settings", "machine", "rows", "comparisons"[, "notes"]})."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows, result = [], {"benchmark": benchmark, "settings": vars(args),
                        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    if args.resume and Path(args.out).exists():  # rows keep their per-sequence sums, so they pair later
        kept = json.loads(Path(args.out).read_text())
        rows = [r for r in kept["rows"] if r["run"] in args.runs]
        if "notes" in kept:  # written by hand: which rows predate which fix
            result["notes"] = kept["notes"]
    result["rows"] = run_pending(args.runs, rows, lambda name: run_one(name, work), args.out, result)
    result["comparisons"] = paired_comparisons({r["run"]: r["fidelity"] for r in rows}, pairs)
    return result


def print_comparisons(comparisons: list[dict]) -> str:
    """paired_comparisons' rows as a table."""
    return print_table(comparisons, [("a", "a", ""), ("b", "b", ""), ("kl_ratio", "KL a/b", ".3f"),
                                     ("kl_ratio_ci_text", "paired 95% CI", ""), ("ear_difference", "EAR a-b", "+.4f")])
