"""Fused dequantize + matmul Triton kernels for 2..8-bit weights (WNA16), and their registration.

Math (kernels/layout.py has the storage): for a layer y = x W^T with W [N, K],

    W[n, k] = (u[n, k] - z_u[g, n]) * s[g, n],      g = k // G  (g = 0 per-channel)

u the unsigned b-bit code (q + 2^(b-1)) and z_u the unsigned zero point
(z + 2^(b-1); the constant 2^(b-1) when symmetric). Both kernels compute the
dequantised tile in fp32 from the bit planes (``_dequant_tile``) and accumulate
y in fp32:

  * ``_wna16_gemv_kernel`` -- decode, M <= 16. Grid (N tiles, SPLIT_K); each
    program walks K tiles pid_k, pid_k + SPLIT_K, ... so that a batch-1 layer
    with few N tiles still fills the GPU; partial sums are combined with fp32
    atomics. M == 1 uses a broadcast-multiply + row reduction (no tensor cores:
    batch-1 is bandwidth bound); 2 <= M <= 16 pads M to 16 and uses tl.dot.
  * ``_wna16_gemm_kernel`` -- prefill, M > 16. Classic tiled GEMM with a grouped
    (GROUP_M) program order for L2 reuse; each program owns a full K loop.

tl.dot operands are the activation dtype (fp16/bf16 tensor cores, fp32
accumulate) on GPUs. On CPU the kernels run only under TRITON_INTERPRET=1
(tests); there bf16 tl.dot is wrong, so bf16 operands are upcast to fp32
(DOT_FP32) and multiplied with input_precision="ieee".

The op ``torch.ops.vllm_slq.wna16_matmul`` is registered directly on a
torch.library FRAGMENT (define + impl for CUDA/CPU + register_fake), which is
exactly what vLLM's ``direct_register_custom_op`` does (read in vllm 0.32's
vllm/utils/torch_utils.py). We do not import vLLM for it: that would pull in
vLLM's platform detection at kernel import time and tie the kernels to a
vLLM install; the registration is equivalent and works under torch.compile
(opaque op with a fake/meta implementation) and CUDA graphs (no host syncs,
no data-dependent allocation in the op).

IMPORTANT: TRITON_INTERPRET=1 must be in the environment before ``triton`` is
first imported (Triton reads it at import time) -- tests set it at the top of
the test module.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the registry skips families whose toolchain is missing
    raise ImportError(f"vllm_slq.kernels.triton_wna16 needs triton: {e}") from e

from .autotune import get_config
from .layout import LayoutError, padded_k, plane_widths, repack
from .registry import KernelConfig, LinearKernel, register_kernel

GEMV_MAX_M = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- kernels


@triton.jit
def _plane_codes(ptr, offs_k, offs_n, N, mask, W: tl.constexpr):
    """Codes of one bit plane (width W, 32/W codes per int32, K-major) for a [BK, BN] tile."""
    PER: tl.constexpr = 32 // W
    words = tl.load(ptr + (offs_k // PER)[:, None] * N + offs_n[None, :], mask=mask, other=0)
    # >> on int32 is arithmetic; the mask discards the sign-extended bits.
    return (words >> ((offs_k % PER) * W)[:, None]) & ((1 << W) - 1)


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, N, K, KPAD, GROUP,
                  W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                  HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_TILE: tl.constexpr):
    """fp32 [BK, BN] tile of W^T: (u - z_u) * s, zero where k >= K or n >= N."""
    mask_n = offs_n < N
    mask = (offs_k < K)[:, None] & mask_n[None, :]
    u = _plane_codes(w_ptr, offs_k, offs_n, N, mask, W0)
    if W1 > 0:
        u |= _plane_codes(w_ptr + (KPAD * W0 // 32) * N, offs_k, offs_n, N, mask, W1) << W0
    if W2 > 0:
        u |= _plane_codes(w_ptr + (KPAD * (W0 + W1) // 32) * N, offs_k, offs_n, N, mask, W2) << (W0 + W1)
    if PER_CHANNEL or GROUP_TILE:
        # one group for the whole tile: a row vector of scales (and zeros)
        if PER_CHANNEL:
            g = 0
        else:
            g = k0 // GROUP
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_ZP:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]
        else:
            z = 1 << (W0 + W1 + W2 - 1)
    else:
        g2 = (offs_k // GROUP)[:, None] * N + offs_n[None, :]
        s = tl.load(s_ptr + g2, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + g2, mask=mask, other=0).to(tl.int32)
        else:
            z = 1 << (W0 + W1 + W2 - 1)
    # (u - z) is an exact small integer; times an fp16/bf16 scale it is exact in fp32.
    return (u - z).to(tl.float32) * s


@triton.jit
def _wna16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, KPAD, GROUP, stride_xm, stride_ym,
                       W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                       HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    for it in range(pid_k, num_k, SPLIT_K):
        k0 = it * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, N, K, KPAD, GROUP,
                          W0, W1, W2, HAS_ZP, PER_CHANNEL, GROUP_TILE)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None] * w, axis=0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
            if DOT_FP32:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
    if BLOCK_M == 1:
        y_ptrs = y_ptr + offs_n
        y_mask = offs_n < N
    else:
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)  # y is an fp32 buffer, zeroed by the launcher


@triton.jit
def _wna16_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, KPAD, GROUP, stride_xm, stride_ym,
                       W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                       HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, GROUP_TILE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-blocks share each weight column-block while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, offs_k, offs_n, k0, N, K, KPAD, GROUP,
                          W0, W1, W2, HAS_ZP, PER_CHANNEL, GROUP_TILE)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# --------------------------------------------------------------------------- launchers


def _plane_args(bits: int) -> tuple[int, int, int]:
    w = plane_widths(bits) + (0, 0)
    return w[0], w[1], w[2]


def _check_inputs(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                  zero: Optional[torch.Tensor], bits: int, group_size: int, k: int) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"wna16_matmul: activations must be float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"wna16_matmul: x has {x.shape[-1]} features, layer has in_features={k}")
    if packed.dtype != torch.int32 or packed.shape[0] != padded_k(k) * bits // 32:
        raise LayoutError(f"wna16_matmul: packed must be int32 [{padded_k(k) * bits // 32}, N] for K={k}, "
                          f"bits={bits}; got {packed.dtype} {tuple(packed.shape)}")
    groups = 1 if group_size == 0 else k // group_size
    if tuple(scale.shape) != (groups, packed.shape[1]):
        raise LayoutError(f"wna16_matmul: scale must be [{groups}, {packed.shape[1]}], got {tuple(scale.shape)}")
    if zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape):
        raise LayoutError(f"wna16_matmul: zero must be uint8 {tuple(scale.shape)}, got {zero.dtype} {tuple(zero.shape)}")


def _common(x2, packed, scale, zero, bits, group_size, k):
    w0, w1, w2 = _plane_args(bits)
    per_channel = group_size == 0
    return dict(
        x_ptr=x2, w_ptr=packed, s_ptr=scale, z_ptr=zero if zero is not None else scale,
        M=x2.shape[0], N=packed.shape[1], K=k, KPAD=padded_k(k), GROUP=k if per_channel else group_size,
        stride_xm=x2.stride(0), W0=w0, W1=w1, W2=w2, HAS_ZP=zero is not None, PER_CHANNEL=per_channel,
        # bf16 tl.dot is wrong in the interpreter; fp16 and all GPU paths keep the native dtype.
        DOT_FP32=_interpreting() and x2.dtype == torch.bfloat16,
    )


def launch_gemv(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                bits: int, group_size: int, k: int, cfg: dict) -> torch.Tensor:
    """Decode path (M <= 16). x2 [M, K] with unit last stride -> [M, N] in x2.dtype."""
    m, n = x2.shape[0], packed.shape[1]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv path takes M <= {GEMV_MAX_M}, got M={m}")
    block_m = 1 if m == 1 else 16
    split_k = int(cfg["SPLIT_K"])
    args = _common(x2, packed, scale, zero, bits, group_size, k)
    if split_k > 1:
        y = torch.zeros(m, n, device=x2.device, dtype=torch.float32)
    else:
        y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    block_k = int(cfg["BLOCK_K"])
    grid = (triton.cdiv(n, int(cfg["BLOCK_N"])), split_k)
    _wna16_gemv_kernel[grid](
        y_ptr=y, stride_ym=y.stride(0), **args,
        GROUP_TILE=group_size != 0 and group_size % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=int(cfg["BLOCK_N"]), BLOCK_K=block_k, SPLIT_K=split_k,
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2)),
    )
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def launch_gemm(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                bits: int, group_size: int, k: int, cfg: dict) -> torch.Tensor:
    """Prefill path (any M; chosen for M > 16). x2 [M, K] -> [M, N] in x2.dtype."""
    m, n = x2.shape[0], packed.shape[1]
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    block_m, block_n, block_k = int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"]), int(cfg["BLOCK_K"])
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _wna16_gemm_kernel[grid](
        y_ptr=y, stride_ym=y.stride(0), **_common(x2, packed, scale, zero, bits, group_size, k),
        GROUP_TILE=group_size != 0 and group_size % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=int(cfg.get("GROUP_M", 8)),
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)),
    )
    return y


def wna16_matmul_impl(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                      bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """y = x @ W^T for the repacked weight; group_size 0 means per-channel."""
    _check_inputs(x, packed, scale, zero, bits, group_size, in_features)
    n = packed.shape[1]
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = get_config(x.device, bits, m, n, in_features, path="gemv" if m <= GEMV_MAX_M else "gemm")
    if m <= GEMV_MAX_M:
        y = launch_gemv(x2, packed, scale, zero, bits, group_size, in_features, cfg)
    else:
        y = launch_gemm(x2, packed, scale, zero, bits, group_size, in_features, cfg)
    return y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------- torch custom op

OP_NAMESPACE = "vllm_slq"
OP_NAME = "wna16_matmul"
_OP_SCHEMA = ("(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, "
              "int in_features) -> Tensor")


def _wna16_matmul_fake(x, packed, scale, zero, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[1])


_lib: Optional[torch.library.Library] = None


def _register_op() -> None:
    """define + impl(CUDA, CPU) + fake on our own FRAGMENT, like vLLM's direct_register_custom_op."""
    global _lib
    if hasattr(torch.ops, OP_NAMESPACE) and hasattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME):
        return  # already defined in this process (module re-import)
    _lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    _lib.define(OP_NAME + _OP_SCHEMA)
    _lib.impl(OP_NAME, wna16_matmul_impl, "CUDA")
    _lib.impl(OP_NAME, wna16_matmul_impl, "CPU")  # only works under TRITON_INTERPRET=1 (tests)
    _lib._register_fake(OP_NAME, _wna16_matmul_fake)


_register_op()


def wna16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                 bits: int, group_size: Optional[int], in_features: int) -> torch.Tensor:
    """The custom op (torch.ops.vllm_slq.wna16_matmul); group_size None = per-channel."""
    return torch.ops.vllm_slq.wna16_matmul(x, packed, scale, zero, bits, group_size or 0, in_features)


# --------------------------------------------------------------------------- registry


def _cpu_forced() -> bool:
    return _interpreting() and os.environ.get("VLLM_SLQ_FORCE_TRITON", "0") == "1"


@register_kernel(priority=100)
class TritonWNA16Kernel(LinearKernel):
    """Triton fused dequant-matmul for 2..8-bit, sym/asym, group/channel, fp16/bf16."""

    name = "triton_wna16"

    @classmethod
    def can_implement(cls, config: KernelConfig, device: torch.device) -> tuple[bool, Optional[str]]:
        device = torch.device(device)
        if not 2 <= config.bits <= 8:
            return False, f"bits {config.bits} outside 2..8"
        if config.act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"activation dtype {config.act_dtype} is not float16/bfloat16"
        g = config.group_size
        if g is not None and (g <= 0 or config.in_features % g):
            return False, f"group_size {g} does not divide in_features {config.in_features}"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            major, _ = torch.cuda.get_device_capability(device)
            need = 8 if config.act_dtype == torch.bfloat16 else 7
            if major < need:
                return False, f"compute capability {major}.x < {need}.0 for {config.act_dtype}"
            return True, None
        if device.type == "cpu" and _cpu_forced():
            return True, None
        return False, (f"device {device.type}: Triton kernels run on CUDA (on CPU only with "
                       "TRITON_INTERPRET=1 and VLLM_SLQ_FORCE_TRITON=1, for tests)")

    def process_weights(self, packed: torch.Tensor, scale: torch.Tensor,
                        zero_point: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.config
        if c.symmetric and zero_point is not None:
            raise LayoutError("symmetric layer was given a zero_point")
        if not c.symmetric and zero_point is None:
            raise LayoutError("asymmetric layer is missing its zero_point")
        return repack(packed, scale, zero_point, c.bits, c.group_size, c.in_features, c.out_features,
                      act_dtype=c.act_dtype)

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.config
        y = wna16_matmul(x, weights["packed"], weights["scale"], weights.get("zero"),
                         c.bits, c.group_size, c.in_features)
        if bias is not None:
            y = y + bias
        return y
