"""Per-layer kernel registry: the plugin asks for a kernel by layer config.

A kernel family registers a LinearKernel subclass with a priority; at load
time the plugin calls select_kernel(config, device) and gets the
highest-priority kernel whose can_implement() accepts the layer. Dispatch is
data (this table), not if-chains in the linear method.

Contract for a kernel:
  process_weights(packed, scale, zero_point, config) -> dict[str, Tensor]
      packed:     int32 [N, ceil(K*b/32)], checkpoint layout (dense
                  little-endian bit stream of q + 2^(b-1)), already TP-sharded
      scale:      [N, groups] in the activation dtype
      zero_point: int8 [N, groups] signed (unpacked), or None when symmetric
    Returns whatever tensors the kernel wants at run time (its own layout);
    called once, in process_weights_after_loading.
  apply(x, weights, bias) -> Tensor
      x [..., K] -> [..., N] in x.dtype.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KernelConfig:
    bits: int
    group_size: Optional[int]  # None: per-channel
    symmetric: bool
    in_features: int  # K of this (sharded) layer
    out_features: int  # N of this (sharded) layer
    act_dtype: torch.dtype = torch.float16


class LinearKernel:
    name: str = "abstract"

    @classmethod
    def can_implement(cls, config: KernelConfig, device: torch.device) -> tuple[bool, Optional[str]]:
        raise NotImplementedError

    def __init__(self, config: KernelConfig):
        self.config = config

    def process_weights(self, packed: torch.Tensor, scale: torch.Tensor,
                        zero_point: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: list[tuple[int, type[LinearKernel]]] = []
# Families whose toolchain is not installed, with the reason (select_kernel reports it).
MISSING_TOOLCHAINS: dict[str, str] = {}
_loaded = False


class ToolchainMissing(ImportError):
    """A kernel family's compiler/runtime (e.g. triton) is not installed."""


def register_kernel(priority: int):
    def wrap(cls: type[LinearKernel]) -> type[LinearKernel]:
        if all(c is not cls for _, c in _REGISTRY):
            _REGISTRY.append((priority, cls))
            _REGISTRY.sort(key=lambda pc: -pc[0])
        return cls

    return wrap


def _load_kernel_modules() -> None:
    """Import every family once. Families are plain imports; only a missing toolchain is tolerated,
    and it is checked up front (find_spec), never inferred from an error message."""
    global _loaded
    if _loaded:
        return
    from . import cpu_dequant  # noqa: F401 -- registers CPUDequantKernel (torch only)

    if importlib.util.find_spec("triton") is None:
        MISSING_TOOLCHAINS["triton_wna16"] = "the triton package is not installed"
    else:
        from . import triton_wna16  # noqa: F401 -- registers TritonWNA16Kernel
    _loaded = True


def registered_kernels() -> list[type[LinearKernel]]:
    _load_kernel_modules()
    return [cls for _, cls in _REGISTRY]


def select_kernel(config: KernelConfig, device: torch.device, layer: str = "") -> LinearKernel:
    reasons = []
    for cls in registered_kernels():
        ok, why = cls.can_implement(config, device)
        if ok:
            return cls(config)
        reasons.append(f"{cls.name}: {why}")
    reasons += [f"{name}: {why}" for name, why in MISSING_TOOLCHAINS.items()]
    raise ValueError(
        f"no kernel for layer {layer!r} ({config}) on {device}: " + "; ".join(reasons)
    )
