"""benchmarks/slq.py end to end on the reference model's first two layers: every curve it
writes, the bits it claims for them, and --resume reusing what it measured."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--max-layers", "2", "--calib-blocks", "2", "--eval-blocks", "2", "--seq-len", "64",
         "--budgets", "3", "4", "--rco-steps", "2", "--sensitivity-batches", "1", "--bisect-steps", "0",
         "--skip-sym", "--threads", "1", "--n-boot", "50",
         "--tune-steps", "2", "--tune-budgets", "4", "--tune-uniform", "4", "--tune-blocks", "4",
         "--tune-check-blocks", "2", "--tune-seq-len", "32"]


def _run(args, tmp_path):
    r = subprocess.run([sys.executable, "slq.py", *args], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                       timeout=900, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                         "VLLM_SLQ_CACHE": str(Path.home() / ".cache" / "vllm_slq"),
                                         "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_slq_benchmark_writes_every_curve_with_true_bits_and_resumes(tmp_path, reference_model_dir):
    out = tmp_path / "slq.json"
    args = [*SMOKE, "--cache-dir", str(tmp_path / "db"), "--gsq-json", str(tmp_path / "none.json"), "--out", str(out)]
    _run(args, tmp_path)
    result = json.loads(out.read_text())
    assert result["status"] == "complete" and result["settings"]["model"] == "smollm2-135m"
    rows = {(r["curve"], r.get("option"), r.get("budget")): r for r in result["rows"]}

    # uniform rows: b bits plus a 16-bit scale and a b-bit zero point per 64 weights
    for b in range(2, 9):
        row = rows[("uniform_asym", f"w{b}ag64", None)]
        assert row["achieved_bpp"] == pytest.approx(b + (16 + b) / 64)
        assert row["n_positions"] == 2 * 63 and len(row["kl_seq_sums"]) == 2 and row["kl"] > 0
    # the uniform line is monotone where rounding dominates (2 -> 4 bits)
    assert rows[("uniform_asym", "w2ag64", None)]["kl"] > rows[("uniform_asym", "w4ag64", None)]["kl"]

    for budget in (3.0, 4.0):
        slq = rows[("slq_asym", None, budget)]
        assert 2.28125 <= slq["achieved_bpp"] <= budget + 1e-9
    # the tuning changes scales, never the format: the same bits as the rows it tuned
    tuned = rows[("slq_asym_tuned", None, 4.0)]
    assert tuned["achieved_bpp"] == rows[("slq_asym", None, 4.0)]["achieved_bpp"]
    assert rows[("uniform_asym_tuned", "w4ag64", None)]["achieved_bpp"] == pytest.approx(4.3125)
    gains = {(g["curve"], g.get("option"), g.get("budget")): g for g in result["comparisons"]["tuning_gain"]}
    assert gains.keys() == {("slq_asym_tuned", None, 4.0), ("uniform_asym_tuned", "w4ag64", None)}
    for g in gains.values():  # each tuned row paired with the row it started from, with a CI
        low, high = g["kl_ratio_ci95"]
        assert low <= g["kl_ratio"] <= high and g["kl_ratio"] == pytest.approx(g["kl"] / g["untuned_kl"], rel=1e-9)
    assert out.with_name("slq_fidelity_vs_bpp.png").stat().st_size > 10_000

    # --resume with the same settings measures nothing again: every row comes back as it was
    _run([*args, "--resume"], tmp_path)
    again = json.loads(out.read_text())
    assert len(again["rows"]) == len(result["rows"])
    for r in again["rows"]:
        assert r["resumed"] is True
        assert r["kl"] == rows[(r["curve"], r.get("option"), r.get("budget"))]["kl"]
