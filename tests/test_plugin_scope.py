"""Which layers the plugin serves with its own kernels and which it hands to vLLM's.

A layer stock vLLM serves with a kernel of its own (CompressedTensorsWNA16's choice:
Machete/Marlin/Humming on CUDA, CPUWNA16 on CPU) goes to vLLM, so a llmcompressor
W4A16 checkpoint runs as it would without the plugin; ours serve the rest. On this
CPU vLLM's only such kernel is CPUWNA16 (4-bit, K and N multiples of 32). Greedy
outputs through both paths are checked end to end in test_plugin_e2e.py and
test_plugin_llmcompressor.py.
"""
from __future__ import annotations

import pytest
import torch

from plugin_util import build_mixed_checkpoint, layer_schemes
from test_sharding import vllm_dist  # noqa: F401  (the fixture)

pytestmark = pytest.mark.vllm


def _scheme(bits, sym, group=64):
    from vllm_slq.vllm.linear_method import SLQWNA16Scheme

    return SLQWNA16Scheme(num_bits=bits, strategy="group" if group else "channel", group_size=group,
                          symmetric=sym, layer_name="model.layers.0.mlp.down_proj")


BF16 = torch.bfloat16


@pytest.mark.parametrize("bits,sym,group,n,dtype,served_by", [
    (4, True, 64, 64, BF16, "CPUWNA16LinearKernel"),    # W4A16: vLLM's kernel, as without the plugin
    (4, False, 64, 64, BF16, "CPUWNA16LinearKernel"),   # its zero-point variant too
    (4, True, None, 64, torch.float16, "CPUWNA16LinearKernel"),  # per channel, fp16
    (4, True, 64, 64, torch.float32, None),  # vLLM's CPU op has no fp32 path (it would raise)
    (4, True, 64, 48, BF16, None),            # N not a multiple of 32: no vLLM kernel takes it
    (3, False, 64, 64, BF16, None),           # asymmetric odd widths: always ours
    (3, True, 64, 64, BF16, None),            # no vLLM CPU kernel below 4 bits
    (8, True, 64, 64, BF16, None),            # nor at 8 bits on CPU
])
def test_layers_go_to_vllms_kernel_where_it_has_one(vllm_dist, bits, sym, group, n, dtype, served_by):
    from vllm_slq.vllm.linear_method import vllm_cpu_runs_w4a8

    if served_by is not None and vllm_cpu_runs_w4a8(served_by, dtype):
        served_by = None  # an AMX CPU: vLLM's kernel would quantize the activations to int8
    scheme = _scheme(bits, sym, group)
    assert scheme.vllm_kernel(128, n, 128, n, dtype) == served_by
    layer = torch.nn.Module()
    scheme.create_weights(layer, n, 128, [n], 128, dtype, weight_loader=lambda *a, **kw: None)
    if served_by is None:
        assert scheme.stock is None and hasattr(layer, "slq_geom")
    else:  # the stock scheme registered its own parameters: vLLM's loaders and kernel from here on
        assert scheme.stock is not None and not hasattr(layer, "slq_geom")
        assert tuple(layer.weight_packed.shape) == (n, 128 * bits // 32)


def test_env_forces_ours_and_rejects_unknown_values(vllm_dist, monkeypatch):
    monkeypatch.setenv("VLLM_SLQ_KERNELS", "ours")
    assert _scheme(4, True).vllm_kernel(128, 64, 128, 64, BF16) is None
    monkeypatch.setenv("VLLM_SLQ_KERNELS", "fastest")
    with pytest.raises(ValueError, match="VLLM_SLQ_KERNELS"):
        _scheme(4, True).vllm_kernel(128, 64, 128, 64, BF16)


@pytest.mark.slow
def test_bf16_engine_serves_4bit_layers_with_vllms_kernel(tmp_path):
    """A mixed checkpoint in a bf16 engine: every 4-bit layer on vLLM's CPUWNA16 (what stock
    vLLM picks for a W4A16 checkpoint), the other widths on ours, and it generates. On a CPU
    with AMX, CPUWNA16 would run W4A8 (and fails to repack this model's 960 x 576 layers):
    there every layer is ours."""
    from vllm import LLM, SamplingParams

    from vllm_slq.vllm.linear_method import vllm_cpu_runs_w4a8

    path, specs = build_mixed_checkpoint(tmp_path / "mixed")
    fused = [s for name, s in specs.items() if not name.endswith(("k_proj", "v_proj", "up_proj"))]
    n4 = sum(s.bits == 4 for s in fused)
    to_vllm = 0 if vllm_cpu_runs_w4a8("CPUWNA16LinearKernel", torch.bfloat16) else n4
    llm = LLM(str(path), dtype="bfloat16", max_model_len=128, enforce_eager=True, seed=0)
    try:
        schemes, kernels = layer_schemes(llm)
        assert n4 > 0 and schemes == {"SLQWNA16Scheme": len(fused)}
        assert kernels == {k: v for k, v in {"cpu_dequant": len(fused) - to_vllm,
                                             "vllm:CPUWNA16LinearKernel": to_vllm}.items() if v}, kernels
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 8
    finally:
        del llm
