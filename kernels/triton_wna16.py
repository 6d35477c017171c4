"""Fused dequantize + matmul Triton kernels for 2..8-bit weights (WNA16), and their registration.

Math (kernels/layout.py has the storage and why): for y = x W^T, W [N, K],

    y[n] = sum_slabs s[g, n] * ( sum_{k in slab} q[k, n] x[k]  -  z[g, n] sum_{k in slab} x[k] )

q the signed code, z the signed zero point (0 when symmetric), g the group of the
slab (a slab is R = 16 consecutive k and never straddles a group). Scale and zero
are factored out of the inner sum, so the inner loop is code extraction plus one
multiply-add per weight.

  * ``_wna16_gemv_kernel`` -- decode, M == 1. Grid (N_pad / BLOCK_N, SPLIT_K); the
    program walks its share of K tiles. Each iteration loads one [R, BLOCK_N]
    container tile (each word once, VEC_N containers per thread along N, warps along
    N, no masks: N and K are padded) and, per code slot j (a slab), extracts the codes
    with the magic-number trick (``_slab_codes``), multiplies them by the slab's
    16 activations and reduces over the slab inside the thread:
      - 2..4 bits (int16 containers): half2 math in the activation dtype; the
        16-term partial sum is rounded to fp16/bf16 once, then accumulated in fp32;
      - 5..8 bits (int32 containers): fp32 math (|q| <= 128 would overflow fp16
        partial sums against large activations).
    The extraction is inline PTX on compiled GPU code (one shr + lop3 per register,
    the exponent word loaded once into a register; see ``_extract_asm`` for why),
    Triton's own ops under the interpreter. Slabs that share one scale (known at
    compile time: per-channel, or K tiles and groups nested) sum their fp32 partials
    first: one scale and zero load and one FMA per group, not per slab. When K is a
    multiple of the tile (EVEN_K) the activation loads carry no mask.
    Partial sums over K are combined with fp32 atomics when SPLIT_K > 1.
    BLOCK_N = VEC_N x 32 x num_warps puts every thread on all R rows of its own
    columns, so the slab sums never cross threads. VEC_N caps the contiguity Triton
    may assume along N: 128-bit loads by default; 2-bit takes 32- to 64-bit ones,
    since 8 int16 containers x 16 rows per thread spill or make Triton put warps
    along the rows (a cross-warp reduction per slab).
  * ``_wna16_dot_kernel`` -- M > 1 (batched decode and prefill). Tiled GEMM with a
    grouped program order. The packed container tile is what is loaded (and what
    Triton's pipeliner stages in shared memory); each slab's codes are extracted in
    the tensor-core operand layout. Where consecutive slabs share one scale, their
    exact integer codes q - z go to tl.dot unscaled and the fp32 partial tile is
    scaled once per group (no multiply per weight); otherwise each slab is
    dequantised to (q - z) * s with one rounding first. The slab's magic offset is
    added to z per column, so the asymmetric kernel subtracts once per weight, as the
    symmetric one does. 2-4-bit extraction on GPU is unary inline PTX with immediate
    constants (``_extract_imm_asm``): Triton moves a unary pure asm into the operand
    layout as it moves its own ops (a two-input asm it leaves in the load's layout: a
    shared-memory round trip per slab), and ptxas then keeps the exponent word in one
    register. For small M the grid also splits K (fp32 atomics, as the GEMV),
    since a few rows give too few [BLOCK_M, BLOCK_N] tiles to fill the SMs.

Padding makes every weight load unmasked: N_pad is a multiple of 64 and the
launcher picks BLOCK_N dividing it; K_pad is a multiple of the tile. Only the
tiny activation loads (x beyond K) and the output store (n >= N) are masked.

On CPU the kernels run only under TRITON_INTERPRET=1 (tests), which runs no inline
PTX: there the GEMV extracts with Triton's ops, and the PTX's semantics are checked
bit by bit by tests/test_triton_kernels.py (test_inline_ptx_extraction_gives_every_code);
with a GPU the same test file runs the compiled kernels. In the interpreter bf16 tl.dot
is wrong, so bf16 operands are upcast to fp32 (DOT_FP32) with input_precision
"ieee". ``benchmarks/kernel_model.py`` compiles these kernels for sm_80/sm_90 and
reads their SASS; ``tests/test_kernel_sass.py`` gates spills, load widths and the
inner loop's instruction count.

The op ``torch.ops.vllm_slq.wna16_matmul`` is registered on a torch.library
FRAGMENT (define + impl for CUDA/CPU + register_fake), the same registration vLLM's
``direct_register_custom_op`` performs, so it works under torch.compile and CUDA
graphs (no host syncs, no data-dependent allocation).

IMPORTANT: TRITON_INTERPRET=1 must be in the environment before ``triton`` is
first imported (Triton reads it at import time).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .autotune import GEMV_MAX_M, get_config
from .layout import (SLAB_ROWS, LayoutError, container_format, extraction_plan, magic_exponents, magic_offsets,
                     padded_n, repack)
from .registry import KernelConfig, LinearKernel, register_kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------- kernels


_shift_plan = triton.constexpr_function(extraction_plan)
_magic_exponents = triton.constexpr_function(magic_exponents)
_magic_offsets = triton.constexpr_function(magic_offsets)


@triton.constexpr_function
def _extract_asm(sh, s, bits, container_bits, exponent=None):
    """PTX giving the magic float of the code at bit s after a right shift by sh, on one
    32-bit register: two 16-bit containers (half2 lanes) or one 32-bit container. The
    pair is shifted as one word, which is safe: bits crossing from the high container
    land above the code's mask. Then (w & mask) | exponent in one lop3 (LUT 0xea =
    a & b | c), the exponent word read from a register ($2), or an immediate if given.
    Why asm: written as Triton ops (both constants immediate), ptxas re-materialises one
    of them (MOV or HFMA2.MMA) before every lop3, a sixth to an eighth of the inner loop,
    and in 16-bit lanes LLVM shifts each container apart (PRMT pairs). In the GEMV an
    immediate exponent inside this asm compiles about the same as the register one
    (2-bit: 9.7 vs 9.3 SASS per byte)."""
    m = ((1 << bits) - 1) << s
    if container_bits == 16:
        m |= m << 16
    e = "$2" if exponent is None else hex(exponent)
    lop = f"lop3.b32 $0, {{src}}, {hex(m)}, {e}, 0xea;"
    if sh == 0:
        return lop.format(src="$1")
    return "{ .reg .b32 t; shr.b32 t, $1, " + str(sh) + "; " + lop.format(src="t") + " }"


@triton.constexpr_function
def _extract_imm_asm(j, bits, mantissa):
    """The tensor-core kernel's PTX for code slot j of two 16-bit containers (one register,
    half2 lanes): ``_extract_asm``'s shift and lop3 with the exponent word as an immediate.
    Unary and pure, so that Triton moves it into the tensor-core operand layout as it moves
    its own ops (a two-input asm would stay in the load's layout: a shared-memory round
    trip per slab). Written as asm, the exponent stays in one register for the whole loop;
    written as Triton ops, ptxas re-materialises a constant before every lop3 and LLVM
    shifts the two containers apart (PRMT pairs): about a third of the 2-bit loop."""
    plan = _shift_plan(bits, 16, mantissa)
    e = _magic_exponents(bits, mantissa, plan)[j]
    return _extract_asm(plan[j], j * bits - plan[j], bits, 16, e | e << 16)


@triton.jit
def _slab_codes(w, e_ptr, J: tl.constexpr, BITS: tl.constexpr, CBITS: tl.constexpr, FDTYPE: tl.constexpr,
                MANT: tl.constexpr, EMU_BF16: tl.constexpr, ASM: tl.constexpr, IMM_ASM: tl.constexpr = False):
    """Magic floats of slot J of the containers w, as FDTYPE: 2^(MANT - S) + u for the
    unsigned code u at bit S after the slot's shift (the caller subtracts
    ``_magic_offsets`` to get the signed code).

    (src & (mask << S)) | exponent(2^(MANT - S)) reinterpreted as a float is
    2^(MANT - S) + u. ASM (compiled GPU code): the same bits by inline PTX
    (``_extract_asm``), with the exponent word loaded from e_ptr (a loaded value stays in
    a register; an immediate is re-materialised per use). EMU_BF16 (interpreter only,
    which stores bf16 as raw bits and cannot do bf16 arithmetic): the bf16 bit pattern
    is widened to fp32 (exact), so FDTYPE is fp32 there.
    """
    SH: tl.constexpr = _shift_plan(BITS, CBITS, MANT)[J]
    S: tl.constexpr = J * BITS - SH
    if ASM:
        e = tl.load(e_ptr + J)  # loop-invariant: hoisted, held in a register
        if CBITS == 32:  # one container per register, fp32 lanes
            f = tl.inline_asm_elementwise(_extract_asm(SH, S, BITS, CBITS), "=r,r,r", [w, e], dtype=tl.float32,
                                          is_pure=True, pack=1)
        elif FDTYPE == tl.float16:  # two containers per register, half2 lanes
            f = tl.inline_asm_elementwise(_extract_asm(SH, S, BITS, CBITS), "=r,r,r,r", [w, e], dtype=tl.float16,
                                          is_pure=True, pack=2)
        else:
            f = tl.inline_asm_elementwise(_extract_asm(SH, S, BITS, CBITS), "=r,r,r,r", [w, e], dtype=tl.bfloat16,
                                          is_pure=True, pack=2)
    elif IMM_ASM and CBITS == 16:  # tensor-core kernel on GPU, half2 lanes: unary PTX, immediates
        # the bits as int16, bitcast after (as below), so that LLVM keeps half2 math on them
        c = tl.inline_asm_elementwise(_extract_imm_asm(J, BITS, MANT), "=r,r", [w], dtype=tl.int16,
                                      is_pure=True, pack=2)
        f = c.to(FDTYPE, bitcast=True)
    else:
        src = w
        if SH > 0:
            src = w >> SH  # arithmetic shift: the sign-extended bits are masked off below
        c = (src & (((1 << BITS) - 1) << S)) | _magic_exponents(BITS, MANT, _shift_plan(BITS, CBITS, MANT))[J]
        if CBITS == 32 and MANT != 23:
            c = c.to(tl.int16)  # the code and exponent lie in the low 16 bits
        if EMU_BF16:
            f = c.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            f = c.to(FDTYPE, bitcast=True)
    return f


@triton.constexpr_function
def _slabs_per_scale(codes_per_container, group):
    """Consecutive slabs of a K tile that share one scale at every tile position, when
    that is known at compile time (per-channel, or tiles and groups nested); else 1."""
    tile_k = codes_per_container * SLAB_ROWS
    if group == 0 or group % tile_k == 0:
        return codes_per_container
    if tile_k % group == 0:
        return group // SLAB_ROWS
    return 1


@triton.jit
def _wna16_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, e_ptr, y_ptr, N, NP, K, TILES, TILES_PER_PROG,
                       BITS: tl.constexpr, CBITS: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, VEC_N: tl.constexpr, EVEN_K: tl.constexpr,
                       EMU_BF16: tl.constexpr, ASM: tl.constexpr):
    R: tl.constexpr = 16
    C: tl.constexpr = CBITS // BITS
    KT: tl.constexpr = R * C
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    if CBITS == 16:
        FDTYPE: tl.constexpr = tl.float32 if EMU_BF16 else ACT
        MANT: tl.constexpr = 10 if ACT == tl.float16 else 7
        EMU: tl.constexpr = EMU_BF16
    else:
        FDTYPE: tl.constexpr = tl.float32
        MANT: tl.constexpr = 23
        EMU: tl.constexpr = False
    FL: tl.constexpr = _slabs_per_scale(C, GROUP)  # slabs in a row that share one scale (and zero)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.max_contiguous(tl.arange(0, BLOCK_N), VEC_N)
    offs_r = tl.arange(0, R)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    grp = tl.zeros([BLOCK_N], dtype=tl.float32)
    xsum = 0.0
    t_lo = pid_k * TILES_PER_PROG
    t_hi = tl.minimum(t_lo + TILES_PER_PROG, TILES)
    for t in range(t_lo, t_hi):
        w = tl.load(w_ptr + (t * R + offs_r)[:, None] * NP + offs_n[None, :], eviction_policy="evict_first")
        for j in tl.static_range(C):
            k0 = t * KT + j * R
            if EVEN_K:  # K is a multiple of the tile: no slab reaches past x
                xk = tl.load(x_ptr + k0 + offs_r, eviction_policy="evict_last")
            else:
                xk = tl.load(x_ptr + k0 + offs_r, mask=k0 + offs_r < K, other=0.0, eviction_policy="evict_last")
            q = (_slab_codes(w, e_ptr, j, BITS, CBITS, FDTYPE, MANT, EMU, ASM)
                 - _magic_offsets(BITS, MANT, _shift_plan(BITS, CBITS, MANT))[j])
            part = tl.sum(q * xk.to(FDTYPE)[:, None], axis=0).to(tl.float32)
            # sum over the FL slabs of one scale group, then scale once: s (q.x - z sum x)
            if j % FL == 0:
                grp = part
                if HAS_ZP:
                    xsum = tl.sum(xk.to(tl.float32), axis=0)
            else:
                grp += part
                if HAS_ZP:
                    xsum += tl.sum(xk.to(tl.float32), axis=0)
            if (j + 1) % FL == 0:
                if GROUP == 0:
                    g = 0
                else:
                    g = k0 // GROUP
                s = tl.load(s_ptr + g * NP + offs_n).to(tl.float32)
                if HAS_ZP:
                    z = tl.load(z_ptr + g * NP + offs_n).to(tl.float32)
                    grp -= z * xsum
                acc += grp * s
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)
    else:
        tl.atomic_add(y_ptr + offs_n, acc, mask=offs_n < N)  # y is an fp32 buffer, zeroed by the launcher


@triton.jit
def _wna16_dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, NP, K, TILES, TILES_PER_PROG, stride_xm, stride_ym,
                      BITS: tl.constexpr, CBITS: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
                      DOT_FP32: tl.constexpr, EMU_BF16: tl.constexpr, ASM: tl.constexpr = False):
    R: tl.constexpr = 16
    C: tl.constexpr = CBITS // BITS
    KT: tl.constexpr = R * C
    ACT: tl.constexpr = x_ptr.dtype.element_ty
    # 8-bit codes do not fit bf16's 7 mantissa bits: extract those in fp32 (exact integers either way)
    WIDE: tl.constexpr = EMU_BF16 or (ACT == tl.bfloat16 and BITS > 7)
    MDTYPE: tl.constexpr = tl.float32 if WIDE else ACT
    MANT: tl.constexpr = 23 if (ACT == tl.bfloat16 and BITS > 7) else (10 if ACT == tl.float16 else 7)
    # FL slabs in a row share one scale: their integer codes go to tl.dot unscaled and the
    # fp32 partial tile is scaled once (no multiply per weight); otherwise each slab is
    # dequantised to (q - z) * s before the dot.
    FL: tl.constexpr = _slabs_per_scale(C, GROUP)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = NP // BLOCK_N
    # Grouped ordering: GROUP_M row-blocks share each weight column-block while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    t_lo = tl.program_id(1) * TILES_PER_PROG
    t_hi = tl.minimum(t_lo + TILES_PER_PROG, TILES)
    for t in range(t_lo, t_hi):
        w = tl.load(w_ptr + (t * R + offs_r)[:, None] * NP + offs_n[None, :], eviction_policy="evict_first")
        for j in tl.static_range(C):
            k0 = t * KT + j * R
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_r)[None, :],
                        mask=(offs_m < M)[:, None] & ((k0 + offs_r) < K)[None, :], other=0.0)
            if j % FL == 0:  # first slab of a scale group: its scale (and zero) for these columns
                if GROUP == 0:
                    g = 0
                else:
                    g = k0 // GROUP
                s = tl.load(s_ptr + g * NP + offs_n)
                if HAS_ZP:
                    z = tl.load(z_ptr + g * NP + offs_n).to(MDTYPE)
            # 16-bit containers on GPU: unary inline PTX, which Triton moves into the mma operand
            # layout with the rest (_extract_imm_asm); 32-bit containers and the interpreter: Triton ops
            f = _slab_codes(w, None, j, BITS, CBITS, MDTYPE, MANT, EMU_BF16 and MANT == 7, False, ASM)
            if HAS_ZP:  # the slot's magic offset joins z per column: one subtraction per weight, exact
                q = f - (z + _magic_offsets(BITS, MANT, _shift_plan(BITS, CBITS, MANT))[j])[None, :]
            else:
                q = f - _magic_offsets(BITS, MANT, _shift_plan(BITS, CBITS, MANT))[j]
            if FL > 1:
                wq = q.to(ACT)  # exact: |q - z| <= 255
            else:
                wq = (q * s.to(q.dtype)[None, :]).to(ACT)  # one rounding, as the reference's cast of (q - z) * s
            if DOT_FP32:
                xo = x.to(tl.float32)
                wq = wq.to(tl.float32)
            else:
                xo = x
            if FL > 1:
                if j % FL == 0:
                    part = tl.dot(xo, wq, input_precision="ieee" if DOT_FP32 else None)
                else:
                    part = tl.dot(xo, wq, part, input_precision="ieee" if DOT_FP32 else None)
                if (j + 1) % FL == 0:
                    acc += part * s.to(tl.float32)[None, :]
            else:
                acc = tl.dot(xo, wq, acc, input_precision="ieee" if DOT_FP32 else None)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)  # y is an fp32 buffer, zeroed by the launcher


# --------------------------------------------------------------------------- launchers


def _block_n(np_: int, want: int) -> int:
    """The largest power of two <= want that divides N_pad (N_pad is a multiple of 64)."""
    b = 1 << (int(want).bit_length() - 1)
    while np_ % b:
        b //= 2
    return b


def launch_blocks(path: str, bits: int, cfg: dict, n_pad: Optional[int] = None) -> dict:
    """cfg's block sizes as a launch uses them: BLOCK_N lowered to the largest power of
    two dividing N_pad (when known), and for the GEMV VEC_N resolved (default: one 128-bit
    load per row) and capped at BLOCK_N. The launchers and the static model both use it,
    so the model predicts the kernel that runs."""
    out = dict(cfg)
    if n_pad is not None:
        out["BLOCK_N"] = _block_n(n_pad, int(cfg["BLOCK_N"]))
    if path == "gemv":
        out["VEC_N"] = min(int(cfg.get("VEC_N", 128 // container_format(bits).container_bits)), int(out["BLOCK_N"]))
    return out


def _split(tiles: int, want: int) -> tuple[int, int]:
    """(programs along K, K tiles per program) for a wanted split-K: no program without tiles."""
    split_k = max(1, min(want, tiles))
    per_prog = -(-tiles // split_k)
    return -(-tiles // per_prog), per_prog


def _check_inputs(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                  zero: Optional[torch.Tensor], bits: int, group_size: int, k: int, n: int) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"wna16_matmul: activations must be float16/bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"wna16_matmul: x has {x.shape[-1]} features, layer has in_features={k}")
    fmt = container_format(bits)
    npad = padded_n(n)
    if packed.dtype != fmt.container_dtype or tuple(packed.shape) != (fmt.container_rows(k), npad):
        raise LayoutError(f"wna16_matmul: packed must be {fmt.container_dtype} [{fmt.container_rows(k)}, {npad}] "
                          f"for K={k}, N={n}, bits={bits}; got {packed.dtype} {tuple(packed.shape)}")
    g = k if group_size == 0 else group_size
    groups_pad = -(-fmt.padded_k(k) // g)
    if tuple(scale.shape) != (groups_pad, npad) or scale.dtype != x.dtype:
        raise LayoutError(f"wna16_matmul: scale must be {x.dtype} [{groups_pad}, {npad}], "
                          f"got {scale.dtype} {tuple(scale.shape)}")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != x.dtype):
        raise LayoutError(f"wna16_matmul: zero must be {x.dtype} {tuple(scale.shape)}, "
                          f"got {zero.dtype} {tuple(zero.shape)}")


_EXPONENT_WORDS: dict[tuple, torch.Tensor] = {}


def exponent_words(device: torch.device, bits: int, act_dtype: torch.dtype) -> torch.Tensor:
    """int32 [C]: slot j's magic exponent as the GEMV's inline PTX ORs it onto a register
    (``_slab_codes``): in both 16-bit halves for 2-4-bit containers (half2 in the activation
    dtype), once for 5-8-bit ones (fp32). Cached per device, bits and dtype;
    ``TritonWNA16Kernel.process_weights`` creates it at load time, so that a launch inside
    CUDA-graph capture only looks it up."""
    key = (torch.device(device), bits, act_dtype)
    if key not in _EXPONENT_WORDS:
        fmt = container_format(bits)
        mant = 23 if fmt.container_bits == 32 else (10 if act_dtype == torch.float16 else 7)
        exps = magic_exponents(bits, mant, extraction_plan(bits, fmt.container_bits, mant))
        words = [e | (e << 16) if fmt.container_bits == 16 else e for e in exps]
        _EXPONENT_WORDS[key] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words],
                                            dtype=torch.int32, device=device)
    return _EXPONENT_WORDS[key]


def _uses_asm() -> bool:
    """Inline-PTX code extraction in the GEMV: compiled GPU code (the interpreter runs no PTX)."""
    return not _interpreting()


def _common(x2, packed, scale, zero, bits, group_size, k, n):
    fmt = container_format(bits)
    return dict(x_ptr=x2, w_ptr=packed, s_ptr=scale, z_ptr=zero if zero is not None else scale,
                N=n, NP=packed.shape[1], K=k, TILES=fmt.padded_k(k) // fmt.tile_k,
                BITS=bits, CBITS=fmt.container_bits, HAS_ZP=zero is not None, GROUP=group_size,
                # the interpreter cannot do bf16 arithmetic: it widens to fp32 (GPU code never sets this)
                EMU_BF16=_interpreting() and x2.dtype == torch.bfloat16)


def launch_gemv(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                bits: int, group_size: int, k: int, n: int, cfg: dict) -> torch.Tensor:
    """Decode path (M == 1). x2 [1, K] with unit last stride -> [1, N] in x2.dtype."""
    if x2.shape[0] != 1:
        raise ValueError(f"gemv path takes M == 1, got M={x2.shape[0]}")
    args = _common(x2, packed, scale, zero, bits, group_size, k, n)
    split_k, per_prog = _split(args["TILES"], int(cfg["SPLIT_K"]))
    blocks = launch_blocks("gemv", bits, cfg, packed.shape[1])
    block_n = blocks["BLOCK_N"]
    y = (torch.zeros(1, n, device=x2.device, dtype=torch.float32) if split_k > 1
         else torch.empty(1, n, device=x2.device, dtype=x2.dtype))
    grid = (packed.shape[1] // block_n, split_k)
    asm = _uses_asm()
    _wna16_gemv_kernel[grid](y_ptr=y, TILES_PER_PROG=per_prog, BLOCK_N=block_n, SPLIT_K=split_k,
                             VEC_N=blocks["VEC_N"], ASM=asm, EVEN_K=k % container_format(bits).tile_k == 0,
                             e_ptr=exponent_words(x2.device, bits, x2.dtype) if asm else scale, **args,
                             num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2)))
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def launch_dot(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
               bits: int, group_size: int, k: int, n: int, cfg: dict) -> torch.Tensor:
    """Tensor-core path (any M; chosen for M > 1). x2 [M, K] -> [M, N] in x2.dtype.

    cfg["SPLIT_K"] (small M): K is cut into that many ranges, one program each, whose
    partial [BLOCK_M, BLOCK_N] tiles are summed by fp32 atomics, so that a batch of a few
    rows still runs enough programs to keep every SM's loads in flight.
    """
    m = x2.shape[0]
    args = _common(x2, packed, scale, zero, bits, group_size, k, n)
    split_k, per_prog = _split(args["TILES"], int(cfg.get("SPLIT_K", 1)))
    y = (torch.zeros(m, n, device=x2.device, dtype=torch.float32) if split_k > 1
         else torch.empty(m, n, device=x2.device, dtype=x2.dtype))
    block_m = int(cfg["BLOCK_M"])
    block_n = launch_blocks("dot", bits, cfg, packed.shape[1])["BLOCK_N"]
    grid = (triton.cdiv(m, block_m) * (packed.shape[1] // block_n), split_k)
    _wna16_dot_kernel[grid](
        y_ptr=y, M=m, TILES_PER_PROG=per_prog, stride_xm=x2.stride(0), stride_ym=y.stride(0), **args,
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=int(cfg.get("GROUP_M", 8)), SPLIT_K=split_k,
        # bf16 tl.dot is wrong in the interpreter; fp16 and all GPU paths keep the native dtype.
        DOT_FP32=_interpreting() and x2.dtype == torch.bfloat16, ASM=_uses_asm(),
        num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 3)),
    )
    return y if y.dtype == x2.dtype else y.to(x2.dtype)


def wna16_matmul_impl(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                      bits: int, group_size: int, in_features: int, out_features: int) -> torch.Tensor:
    """y = x @ W^T for the repacked weight; group_size 0 means per-channel."""
    _check_inputs(x, packed, scale, zero, bits, group_size, in_features, out_features)
    n = out_features
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = get_config(x.device, bits, m, n, in_features)
    launch = launch_gemv if m <= GEMV_MAX_M else launch_dot
    y = launch(x2, packed, scale, zero, bits, group_size, in_features, n, cfg)
    return y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------- torch custom op

OP_NAMESPACE = "vllm_slq"
OP_NAME = "wna16_matmul"
_OP_SCHEMA = ("(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, "
              "int in_features, int out_features) -> Tensor")


def _wna16_matmul_fake(x, packed, scale, zero, bits, group_size, in_features, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


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
                 bits: int, group_size: Optional[int], in_features: int, out_features: int) -> torch.Tensor:
    """The custom op (torch.ops.vllm_slq.wna16_matmul); group_size None = per-channel."""
    return torch.ops.vllm_slq.wna16_matmul(x, packed, scale, zero, bits, group_size or 0, in_features,
                                           out_features)


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
        if g is not None and g % SLAB_ROWS:
            return False, f"group_size {g} is not a multiple of {SLAB_ROWS} (the kernels' K slab)"
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return False, "CUDA is not available"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return False, f"compute capability {major}.x < 8.0 (bf16 and half2 magic dequant need sm_80)"
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
        out = repack(packed, scale, zero_point, c.bits, c.group_size, c.in_features, c.out_features,
                     act_dtype=c.act_dtype)
        if _uses_asm() and out["packed"].is_cuda:
            exponent_words(out["packed"].device, c.bits, c.act_dtype)  # before any CUDA-graph capture
        return out

    def apply(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        c = self.config
        y = wna16_matmul(x, weights["packed"], weights["scale"], weights.get("zero"),
                         c.bits, c.group_size, c.in_features, c.out_features)
        if bias is not None:
            y = y + bias
        return y

