"""Reports: one run -> Markdown + JSON; many runs -> fidelity-vs-bpp plot + table.

`write_run(result, out_dir)` writes `<label>.json` (the full `api.evaluate`
result, protocol included) and `<label>.md` (a table plus the protocol:
dataset split, blocks x seq_len, positions, seed, backends, whether EAR is
exact or a top-k bound).

`gather(paths, out_dir)` reads many run JSONs (files or directories),
groups them by method (candidate_info.method, else the label's prefix before
the first '-'), and writes `fidelity_vs_bpp.png` (EAR and KL against bpp, one
line per method; the EAR panel shows the bootstrap 95% CI as error bars and
the distribution-lossless line EAR = 0.99), `fidelity.md` and `fidelity.json`.
Runs without a bpp are listed in the table but not plotted.

`paired_comparison(a, b)` compares two runs scored on the same held-out
blocks: the KL ratio and the EAR difference, each with a paired bootstrap 95%
interval over sequences (`metrics.paired_bootstrap_ci`), which is far tighter
than comparing the two runs' own intervals when both move with the text.

Run files are `vllm-slq eval` outputs, or the `slq_report.json` that
`vllm-slq quantize` writes into a checkpoint (its "fidelity" section).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

from vllm_slq.fileio import atomic_path
from vllm_slq.fileio import atomic_write as _atomic_write


class ReportError(ValueError):
    """Run files that cannot be read or combined."""


def _fmt(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.3e}"
        return f"{x:.{nd}f}"
    return str(x)


COLUMNS = ("label", "backend", "bpp", "EAR", "95% CI", "p5", "p50", "EAR^100", "KL", "top-1",
           "PPL ref", "PPL cand", "EAR sampled", "positions", "time s")


def table_row(r: dict) -> list[str]:
    tf = r.get("teacher_forced") or {}
    sm = r.get("sampled") or {}
    info = r.get("candidate_info") or {}
    ear = _fmt(tf.get("ear"))
    if tf and not tf.get("ear_exact", True):
        ear = f">= {ear} (top-k)"
    ci = tf.get("ear_ci95")
    return [str(r.get("label", "?")), str(r.get("backend", "?")), _fmt(info.get("bpp"), 3), ear,
            f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-", _fmt(tf.get("ear_p5")),
            _fmt(tf.get("ear_p50")), _fmt(tf.get("ear_pow100")), _fmt(tf.get("kl")),
            _fmt(tf.get("top1")), _fmt(tf.get("ppl_ref"), 3), _fmt(tf.get("ppl_cand"), 3),
            _fmt(sm.get("ear")) if sm else "-", str(tf.get("n_positions", "-")),
            _fmt((r.get("runtime_s") or {}).get("total"), 1)]


def format_table(results: Sequence[dict]) -> str:
    """A Markdown table, one row per run."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in results]
    return "\n".join(lines)


def protocol_markdown(r: dict) -> str:
    p = r.get("protocol") or {}
    lines = [f"- reference: `{r.get('reference')}`; candidate: `{r.get('candidate')}`",
             f"- candidate backend: **{r.get('backend')}**; reference backend: {p.get('reference_backend')}",
             f"- text: {p.get('dataset')}; {p.get('n_blocks')} blocks x {p.get('seq_len')} tokens = "
             f"{p.get('n_positions')} scored next-token positions (teacher-forced)",
             f"- softmax: {p.get('softmax')}; EAR: {p.get('ear')}",
             f"- bootstrap: {p.get('bootstrap')}; seed {p.get('seed')}"]
    if p.get("sampled"):
        s = p["sampled"]
        lines.append(f"- sampled protocol: {s['prompts']} prompts of {s['prompt_len']} held-out tokens, "
                     f"{s['new_tokens']} tokens sampled from the {s['sampler']}; scored on sampled positions")
    for n in r.get("notes") or []:
        lines.append(f"- note: {n}")
    return "\n".join(lines)


def run_markdown(r: dict) -> str:
    tf = r.get("teacher_forced") or {}
    out = [f"# Fidelity: {r.get('label')}", "", format_table([r]), "", "## Protocol", "",
           protocol_markdown(r), ""]
    if "pinsker_ear_lower_bound" in tf:
        out.append(f"Pinsker check: mean EAR {tf['ear']:.4f} >= 1 - sqrt(KL/2) = "
                   f"{tf['pinsker_ear_lower_bound']:.4f}.")
    if not tf.get("ear_exact", True):
        out.append(f"EAR is the exact top-k lower bound; the matching upper bound is "
                   f"{_fmt(tf.get('ear_upper'))}. KL is not available from top-k log-probs.")
    sm = r.get("sampled")
    if sm:
        out += ["", "## Sampled continuations (separate protocol)", "",
                f"EAR {sm['ear']:.4f} (95% CI [{sm['ear_ci95'][0]:.4f}, {sm['ear_ci95'][1]:.4f}]), "
                f"KL {_fmt(sm.get('kl'))}, top-1 {_fmt(sm.get('top1'))} over {sm['n_positions']} positions."]
    return "\n".join(out) + "\n"


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def write_run(result: dict, out_dir, name: Optional[str] = None) -> tuple[Path, Path]:
    """Write `<name>.json` and `<name>.md` into out_dir (atomically); returns both paths."""
    out_dir = Path(out_dir)
    stem = _safe(name or result.get("label") or "run")
    j, m = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    _atomic_write(j, json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(m, run_markdown(result))
    return j, m


def load_runs(paths: Iterable) -> list[dict]:
    """Run JSONs from files and directories (a file with a "runs" mapping contributes each run)."""
    runs = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not files:
            raise ReportError(f"{p}: no run JSON files")
        for f in files:
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ReportError(f"{f}: not a readable JSON file ({e})") from e
            if isinstance(data, dict) and isinstance(data.get("runs"), dict):
                runs.extend(data["runs"].values())
            elif isinstance(data, dict) and isinstance(data.get("fidelity"), dict) \
                    and "teacher_forced" in data["fidelity"]:
                runs.append(data["fidelity"])  # a quantize report: its evaluation
            elif isinstance(data, dict) and "teacher_forced" in data:
                runs.append(data)
            elif f.name.startswith("fidelity"):
                continue  # our own gathered output in the same directory
            else:
                raise ReportError(f"{f}: not a vllm-slq eval result (no 'teacher_forced' field)")
    if not runs:
        raise ReportError("no runs to report")
    return runs


def paired_comparison(a: dict, b: dict, n_boot: int = 1000, seed: int = 0) -> dict:
    """Run a against run b on the same held-out sequences: KL(p||q_a) / KL(p||q_b) and
    EAR_a - EAR_b, each with a paired bootstrap 95% interval. Raises ReportError when the
    two were not scored on the same blocks, or lack the per-sequence sums."""
    from .metrics import paired_bootstrap_ci

    la, lb = a.get("label", "a"), b.get("label", "b")
    pa, pb = a.get("protocol") or {}, b.get("protocol") or {}
    for key in ("dataset", "n_blocks", "seq_len", "seed"):
        if pa.get(key) != pb.get(key):
            raise ReportError(f"{la} and {lb} were scored on different text: protocol {key!r} is "
                              f"{pa.get(key)!r} vs {pb.get(key)!r}")
    for lab, p in ((la, pa), (lb, pb)):
        if p.get("ear") != "exact":
            raise ReportError(f"{lab}: EAR is {p.get('ear')!r}, not exact; a paired comparison needs "
                              f"full-vocabulary scores (--topk -1)")
    sa = (a.get("teacher_forced") or {}).get("per_sequence")
    sb = (b.get("teacher_forced") or {}).get("per_sequence")
    for lab, ps in ((la, sa), (lb, sb)):
        if not ps or "kl_sum" not in ps:
            raise ReportError(f"{lab}: no per-sequence sums in its teacher_forced results (written by an "
                              f"older vllm-slq); evaluate it again")
    if sa["n_positions"] != sb["n_positions"]:
        raise ReportError(f"{la} and {lb} scored different positions per sequence")
    kl, kl_lo, kl_hi = paired_bootstrap_ci(sa["kl_sum"], sb["kl_sum"], n_boot=n_boot, seed=seed)
    ear, ear_lo, ear_hi = paired_bootstrap_ci(sa["ear_sum"], sb["ear_sum"], sa["n_positions"],
                                              kind="difference", n_boot=n_boot, seed=seed)
    ta, tb = a["teacher_forced"], b["teacher_forced"]
    bpp = {lab: (r.get("candidate_info") or {}).get("bpp") for lab, r in ((la, a), (lb, b))}
    return {
        "a": la, "b": lb, "bpp": bpp,
        "positions": int(sum(sa["n_positions"])), "sequences": len(sa["n_positions"]),
        "kl": {"a": ta.get("kl"), "b": tb.get("kl"), "ratio_a_over_b": kl, "ci95": [kl_lo, kl_hi],
               "a_lower_beyond_noise": kl_hi < 1.0},
        "ear": {"a": ta.get("ear"), "b": tb.get("ear"), "a_minus_b": ear, "ci95": [ear_lo, ear_hi],
                "a_higher_beyond_noise": ear_lo > 0.0},
        "bootstrap": f"paired: {n_boot} resamples of whole sequences, seed {seed}, 95% percentile interval",
    }


def format_comparison(c: dict) -> str:
    bpp = " vs ".join(_fmt(v, 3) for v in c["bpp"].values())
    k, e = c["kl"], c["ear"]
    return (f"{c['a']} vs {c['b']} ({c['sequences']} sequences, {c['positions']} positions; bpp {bpp})\n"
            f"  KL   {_fmt(k['a'])} vs {_fmt(k['b'])}: ratio {k['ratio_a_over_b']:.4f}, paired 95% CI "
            f"[{k['ci95'][0]:.4f}, {k['ci95'][1]:.4f}]"
            f"{'  -> a lower beyond noise' if k['a_lower_beyond_noise'] else ''}\n"
            f"  EAR  {_fmt(e['a'])} vs {_fmt(e['b'])}: difference {e['a_minus_b']:+.4f}, paired 95% CI "
            f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"
            f"{'  -> a higher beyond noise' if e['a_higher_beyond_noise'] else ''}")


def log_interpolate(points: Iterable[tuple[float, float]], x: float
                    ) -> Optional[tuple[float, tuple[float, float]]]:
    """A metric that falls geometrically with bpp (KL) at bpp x, log-linear between the two
    measured (bpp, value) points around x: the "line through the uniform points" a mixed
    allocation is judged against. Returns (value, (bpp below, bpp above)), or None when x
    lies outside the points."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            f = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp((1 - f) * math.log(y0) + f * math.log(y1)), (x0, x1)
    return None


def method_of(r: dict) -> str:
    info = r.get("candidate_info") or {}
    if info.get("method"):
        return str(info["method"])
    return str(r.get("label", "run")).split("-")[0]


def plot_fidelity(runs: Sequence[dict], path) -> Optional[Path]:
    """EAR and KL vs bpp, one line per method; None when no run has a bpp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = {}
    for r in runs:
        bpp = (r.get("candidate_info") or {}).get("bpp")
        if bpp is not None and r.get("teacher_forced"):
            by_method.setdefault(method_of(r), []).append(r)
    if not by_method:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["candidate_info"]["bpp"])
        x = [r["candidate_info"]["bpp"] for r in rs]
        ear = [r["teacher_forced"]["ear"] for r in rs]
        lo = [e - r["teacher_forced"]["ear_ci95"][0] for e, r in zip(ear, rs)]
        hi = [r["teacher_forced"]["ear_ci95"][1] - e for e, r in zip(ear, rs)]
        ax1.errorbar(x, ear, yerr=[lo, hi], marker="o", capsize=3, label=method)
        kl = [r["teacher_forced"].get("kl") for r in rs]
        pts = [(a, b) for a, b in zip(x, kl) if b is not None and b > 0]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=method)
    ax1.axhline(0.99, ls="--", c="gray", lw=0.8)
    ax1.set(xlabel="bits per parameter (incl. scales/zeros)", ylabel="EAR (teacher-forced)",
            title="EAR vs bpp (95% bootstrap CI)", ylim=(0, 1.02))
    ax2.set(xlabel="bits per parameter (incl. scales/zeros)", ylabel="KL(p || q), nats/token",
            title="KL vs bpp", yscale="log")
    for a in (ax1, ax2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def gather(paths: Iterable, out_dir) -> dict:
    """Combine run JSONs into fidelity.md / fidelity.json / fidelity_vs_bpp.png in out_dir."""
    runs = load_runs(paths)
    runs.sort(key=lambda r: (method_of(r), (r.get("candidate_info") or {}).get("bpp") or 0))
    out_dir = Path(out_dir)
    table = format_table(runs)
    png = plot_fidelity(runs, out_dir / "fidelity_vs_bpp.png")
    backends = sorted({str(r.get("backend")) for r in runs})
    md = ["# Fidelity vs bits per parameter", "", table, "",
          f"Candidate backends: {', '.join(backends)}. Protocol of each run: its JSON's 'protocol'.", ""]
    if png:
        md.append(f"![fidelity vs bpp]({png.name})")
    _atomic_write(out_dir / "fidelity.md", "\n".join(md) + "\n")
    summary = [{"label": r.get("label"), "method": method_of(r), "backend": r.get("backend"),
                "bpp": (r.get("candidate_info") or {}).get("bpp"),
                **{k: (r.get("teacher_forced") or {}).get(k)
                   for k in ("ear", "ear_ci95", "ear_p5", "ear_p50", "ear_pow100", "kl", "top1",
                             "ppl_ref", "ppl_cand", "n_positions", "ear_exact")},
                "sampled_ear": (r.get("sampled") or {}).get("ear")} for r in runs]
    _atomic_write(out_dir / "fidelity.json", json.dumps(summary, indent=1) + "\n")
    return {"table": table, "png": str(png) if png else None, "markdown": str(out_dir / "fidelity.md"),
            "json": str(out_dir / "fidelity.json"), "n_runs": len(runs)}
