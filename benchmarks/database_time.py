"""SLQ's 7-width GPTQ database wall vs llmcompressor's GPTQModifier at one width.

Each arm is a fresh process (run alone, one after the other) doing llmcompressor's
real oneshot with the sequential pipeline on the same model (loaded as `quantize`
loads it: fp32 on a CPU), the same calibration blocks (vllm_slq.data's, as
`quantize` feeds them) and the same grid (int, asymmetric, group 64):

    llmcompressor-w4   llmcompressor's GPTQModifier, 4 bits, actorder static,
                       dampening 0.01 (what a user would otherwise run)
    ours-w4            SLQGPTQModifier at 4 bits: our single-width GPTQ
                       (Hessian scale search, min/max retry; `--method gptq`)
    slq-database       SLQModifier exactly as `quantize --target bpp=4.0` builds it,
                       stopped when the database is complete (on_finalize): every
                       width 2..8 per layer from one Hessian, packed into the
                       candidate store. The allocation that follows is not timed here.

wall is the oneshot call (to the end of the database for slq-database); quantize is
the time inside the modifiers' quantization step (llmcompressor's compress_modules,
our quantize_module); calibration = wall - quantize is the pipeline's forward passes
and Hessian accumulation, the same work for every arm. With --profile, the
slq-database arm also records cProfile's top functions inside quantize_module
(a second run: the profiler's own overhead stays out of the timed one).

    PYTHONPATH=.. python database_time.py [--model smollm2-135m --calib-samples 32 --seq-len 512]

Prints a table, writes results/database_time.json and results/database_time.png.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import subprocess
import sys
import time

import torch
from common import RESULTS, print_table, save_figure, write_json

ARMS = ("llmcompressor-w4", "ours-w4", "slq-database")
TARGET_RATIO = 2.0  # issue #18: the 7-width database within 2x llmcompressor's one width


class Clock:
    """Time spent inside the modifiers' quantization step, summed over layers."""

    quantize_s = 0.0
    database_done = None
    profile: cProfile.Profile | None = None

    @classmethod
    def timed(cls, fn, *a, **kw):
        t = time.perf_counter()
        if cls.profile is not None:
            cls.profile.enable()
        try:
            return fn(*a, **kw)
        finally:
            if cls.profile is not None:
                cls.profile.disable()
            cls.quantize_s += time.perf_counter() - t


def llmcompressor_w4(group: int, scale_dtype: str):
    from llmcompressor.modifiers.gptq import GPTQModifier

    class Timed(GPTQModifier):
        def compress_modules(self):
            return Clock.timed(super().compress_modules)

    return Timed(block_size=128, dampening_frac=0.01, actorder="static", ignore=["lm_head"],
                 config_groups={"group_0": {"targets": ["Linear"], "weights": {
                     "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                     "group_size": group, "observer": "memoryless_minmax"}}})


def ours_w4(group: int, scale_dtype: str):
    from vllm_slq.modifiers import SLQGPTQModifier

    class Timed(SLQGPTQModifier):
        def quantize_module(self, *a, **kw):
            return Clock.timed(super().quantize_module, *a, **kw)

    return Timed(bits=4, group_size=group, symmetric=False, scale_dtype=scale_dtype, attach_compressed_tensors=False)


def slq_database(group: int, scale_dtype: str):
    from vllm_slq.modifiers.slq import SLQModifier

    class DatabaseOnly(SLQModifier):
        def quantize_module(self, *a, **kw):
            return Clock.timed(super().quantize_module, *a, **kw)

        def on_finalize(self, state, **kwargs):
            Clock.database_done = time.perf_counter()
            if not self.ended_:
                self.on_end(state, None)
            if len(self._db) != len(self._names):
                raise RuntimeError(f"database holds {len(self._db)} of {len(self._names)} layers")
            self._db.clear()
            self._w_ref.clear()
            return True

    return DatabaseOnly(target_bpp=4.0, group_size=group, symmetric=False, scale_dtype=scale_dtype)


MODIFIERS = {"llmcompressor-w4": llmcompressor_w4, "ours-w4": ours_w4, "slq-database": slq_database}


def run_arm(arm: str, args) -> dict:
    """One arm in this process: oneshot on a freshly loaded model."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_slq.data import calibration_dataset, resolve_model
    from vllm_slq.pipeline import model_dtype

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    dataset = calibration_dataset(tok, "brown", args.calib_samples, args.seq_len)
    # scales in the checkpoint dtype, as `quantize` sets them
    modifier = MODIFIERS[arm](args.group_size, str(model_dtype("auto", path)).removeprefix("torch."))
    if args.profile_child:
        Clock.profile = cProfile.Profile()
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, recipe=[modifier], dataset=dataset, num_calibration_samples=len(dataset),
            max_seq_length=args.seq_len, pipeline="sequential")
    end = Clock.database_done if arm == "slq-database" else time.perf_counter()
    row = {"arm": arm, "wall_s": end - t0, "quantize_s": Clock.quantize_s,
           "calibration_s": end - t0 - Clock.quantize_s}
    if Clock.profile is not None:
        buf = io.StringIO()
        pstats.Stats(Clock.profile, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
        row["profile_tottime"] = buf.getvalue()
    return row


def child(arm: str, args, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--model", args.model, "--calib-samples", str(args.calib_samples),
           "--seq-len", str(args.seq_len), "--group-size", str(args.group_size), "--threads", str(args.threads),
           "--profile-top", str(args.profile_top)] + (["--profile-child"] if profile else [])
    print(f"[database_time] {arm}{' (profiled)' if profile else ''} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["arm"] for r in rows]
    cal = [r["calibration_s"] / 60 for r in rows]
    q = [r["quantize_s"] / 60 for r in rows]
    ax.barh(names, cal, label="calibration (forward passes, Hessians)")
    ax.barh(names, q, left=cal, label="quantize step (GPTQ, all widths)")
    for i, r in enumerate(rows):
        ax.text(cal[i] + q[i], i, f" {r['wall_over_llmcompressor']:.2f}x", va="center")
    ax.set_xlabel("minutes (wall, one process, this machine)")
    ax.set_title("SLQ database (w2..w8) vs llmcompressor GPTQ (w4)")
    ax.set_xlim(0, 1.25 * max(c + x for c, x in zip(cal, q)))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--profile", action="store_true", help="also profile the slq-database arm's quantize step")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--out", default="database_time")
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child, args)))
        return

    rows = [child(arm, args) for arm in args.arms]
    base = next((r for r in rows if r["arm"] == "llmcompressor-w4"), rows[0])
    for r in rows:
        r["wall_over_llmcompressor"] = r["wall_s"] / base["wall_s"]
        r["quantize_over_llmcompressor"] = r["quantize_s"] / base["quantize_s"]
    table = print_table(rows, [("arm", "arm", "s"), ("wall_s", "wall s", ".1f"),
                               ("calibration_s", "calibration s", ".1f"), ("quantize_s", "quantize s", ".1f"),
                               ("wall_over_llmcompressor", "wall / llmc", ".2f"),
                               ("quantize_over_llmcompressor", "quantize / llmc", ".2f")])
    db = next((r for r in rows if r["arm"] == "slq-database"), None)
    result = {
        "benchmark": "database_time", "model": args.model,
        "calibration": {"dataset": "brown", "samples": args.calib_samples, "seq_len": args.seq_len},
        "grid": {"type": "int", "symmetric": False, "group_size": args.group_size},
        "rows": rows, "table": table,
        "target": {"wall_ratio_max": TARGET_RATIO,
                   "wall_ratio": None if db is None else db["wall_over_llmcompressor"],
                   "met": None if db is None else db["wall_over_llmcompressor"] <= TARGET_RATIO},
        "machine": {"platform": platform.platform(), "threads": args.threads, "cuda": torch.cuda.is_available()},
        "command": "PYTHONPATH=.. python database_time.py " + " ".join(sys.argv[1:]),
    }
    if args.profile and db is not None:
        result["profile"] = child("slq-database", args, profile=True)["profile_tottime"]
        print(result["profile"])
    write_json(RESULTS / f"{args.out}.json", result)
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / (args.out + '.json')}")


if __name__ == "__main__":
    main()
