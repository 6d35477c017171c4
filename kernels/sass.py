"""Compile a WNA16 kernel variant for a GPU target on any machine and read its SASS.

Triton compiles ahead of time without a GPU: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline down to a cubin, and
the triton wheel ships ``cuobjdump`` and ``nvdisasm`` to read it. We pass the
divisibility hints the runtime would add (pointers and the N/K arguments are
multiples of 16 for every real layer), so the code is what a launch would get.

``compile_variant`` returns a ``CompiledVariant``: registers, spill bytes,
shared memory, and the inner K loop (the largest loop that holds the weight
loads) as instruction counts. ``weight_request_ratio`` compares the bytes the
loop's weight loads request with the unique bytes one iteration consumes, and
``sass_per_weight_byte`` divides the loop's instruction count by the weight bytes
each thread consumes per iteration: the two numbers the issue-rate roofline
(benchmarks/kernel_model.py) needs.

Weight loads: in the GEMV they are the loads with the evict-first hint
(``LDG.E.EF``), which the kernels put on weight loads only. In the tl.dot kernel
Triton's pipeliner turns the tile loads into asynchronous copies to shared memory
(``LDGSTS``); the evict-first weight tile becomes the L1-bypassing 16-byte form
(``LDGSTS.E.BYPASS.128``, cp.async.cg), while the activation, scale and zero
loads stay L1-allocating (``LDGSTS.E``), except activation slabs of >= 16 bytes
per thread (BLOCK_M >= 64 at 4 warps), which take the bypass form too and are
subtracted (C slabs of BLOCK_M x 16 elements per iteration). A scale load that ever took the bypass
form would count as weight bytes and fail the request-ratio gate: the accounting
errs towards a false alarm, never towards a false pass.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_wna16 as tw
from .layout import SLAB_ROWS, container_format

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


# Regression ceilings on the inner loop's SASS instructions per weight byte, per (path, bits):
# 10% above what this design compiled to when they were set (tests/test_kernel_sass.py says
# how). Not the bandwidth-bound target of about 7 on H200. Every shipped launch config must
# stay within them, so benchmarks/kernel_model.py's config search picks only configs that do.
SASS_BUDGET = {
    "gemv": {2: 13.8, 3: 10.6, 4: 8.1, 5: 9.7, 6: 8.5, 7: 6.5, 8: 6.5},
    "dot": {2: 18.8, 3: 18.5, 4: 11.5, 5: 13.6, 6: 12.9, 7: 9.0, 8: 8.1},
}


class SassError(RuntimeError):
    pass


@dataclass
class CompiledVariant:
    kernel: str
    arch: int
    num_warps: int
    registers: int
    spill_bytes: int  # local memory (STACK/LOCAL) the kernel needs
    shared_bytes: int
    loop_ops: Counter = field(default_factory=Counter)
    loop_instructions: int = 0
    weight_load_bytes_per_thread: float = 0.0  # per loop iteration, from the SASS
    weight_loads: Counter = field(default_factory=Counter)
    unique_weight_bytes_per_thread: float = 0.0  # per loop iteration, from the tile shape

    @property
    def weight_request_ratio(self) -> float:
        return self.weight_load_bytes_per_thread / self.unique_weight_bytes_per_thread

    @property
    def sass_per_weight_byte(self) -> float:
        return self.loop_instructions / self.unique_weight_bytes_per_thread

    @property
    def barriers_in_loop(self) -> int:
        return self.loop_ops.get("BAR", 0)

    @property
    def shuffles_in_loop(self) -> int:
        return self.loop_ops.get("SHFL", 0)


def _tool(name: str) -> str:
    path = os.path.join(_BIN, name)
    if not os.path.exists(path):
        raise SassError(f"{name} not found in the triton wheel ({_BIN}); static analysis needs triton's "
                        f"NVIDIA backend binaries")
    return path


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource usage text) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(path)
    return sass, res


def _resource(res: str, key: str) -> int:
    m = re.search(rf"\b{key}:(\d+)", res)
    return int(m.group(1)) if m else 0


def loops(sass: str) -> list[list[tuple[str, str]]]:
    """Every backward-branch loop as a list of (opcode, modifiers)."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if m:
            instrs.append((m.group(3), m.group(4), line))
    out = []
    for i, (_, _, line) in enumerate(instrs):
        b = _BRANCH.search(line)
        if b and b.group(1) in labels and labels[b.group(1)] <= i:
            out.append([(o, mods) for o, mods, _ in instrs[labels[b.group(1)]: i + 1]])
    return out


def _load_bytes(mods: str) -> int:
    for part in mods.split("."):
        if part in _LOAD_BYTES:
            return _LOAD_BYTES[part]
    return 4


def _weight_loads(loop: list[tuple[str, str]], path: str) -> Counter:
    if path == "gemv":
        return Counter(f"{o}{mods}" for o, mods in loop if o == "LDG" and ".EF" in mods)
    return Counter(f"{o}{mods}" for o, mods in loop if o == "LDGSTS" and ".BYPASS" in mods)


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   divisible: tuple[str, ...]):
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _act(dtype: str) -> str:
    return {"float16": "fp16", "bfloat16": "bf16"}[dtype]


def compile_variant(path: str, bits: int, symmetric: bool, group_size: int, cfg: dict, arch: int = 90,
                    act_dtype: str = "float16", even_k: bool = False) -> CompiledVariant:
    """Compile the decode (path "gemv") or tensor-core (path "dot") kernel with launch config cfg.

    even_k: K is a multiple of the K tile (every Llama-8B layer below 3/5/6 bits), so the
    GEMV's activation loads carry no mask, as a launch on such a layer compiles them."""
    fmt = container_format(bits)
    act = _act(act_dtype)
    wty = "*i16" if fmt.container_bits == 16 else "*i32"
    cfg = tw.launch_blocks(path, bits, cfg)  # VEC_N resolved as a launch resolves it
    nw = int(cfg.get("num_warps", 4))
    common = dict(BITS=bits, CBITS=fmt.container_bits, HAS_ZP=not symmetric, GROUP=group_size, EMU_BF16=False)
    if path == "gemv":
        sig = {"x_ptr": f"*{act}", "w_ptr": wty, "s_ptr": f"*{act}", "z_ptr": f"*{act}", "e_ptr": "*i32",
               "y_ptr": "*fp32", "N": "i32", "NP": "i32", "K": "i32", "TILES": "i32", "TILES_PER_PROG": "i32"}
        const = dict(common, BLOCK_N=int(cfg["BLOCK_N"]), SPLIT_K=max(2, int(cfg.get("SPLIT_K", 2))),
                     VEC_N=int(cfg["VEC_N"]), EVEN_K=even_k,
                     ASM=True)  # as a GPU launch sets it (triton_wna16._uses_asm)
        fn, div = tw._wna16_gemv_kernel, ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "e_ptr", "y_ptr", "N", "NP", "K")
    elif path == "dot":
        sig = {"x_ptr": f"*{act}", "w_ptr": wty, "s_ptr": f"*{act}", "z_ptr": f"*{act}", "y_ptr": f"*{act}",
               "M": "i32", "N": "i32", "NP": "i32", "K": "i32", "TILES": "i32", "TILES_PER_PROG": "i32",
               "stride_xm": "i32", "stride_ym": "i32"}
        split = int(cfg.get("SPLIT_K", 1))
        if split > 1:
            sig["y_ptr"] = "*fp32"  # split-K partial tiles meet in an fp32 buffer
        const = dict(common, BLOCK_M=int(cfg["BLOCK_M"]), BLOCK_N=int(cfg["BLOCK_N"]),
                     GROUP_M=int(cfg.get("GROUP_M", 8)), SPLIT_K=split, DOT_FP32=False,
                     ASM=True)  # as a GPU launch sets it (triton_wna16._uses_asm)
        fn = tw._wna16_dot_kernel
        div = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "N", "NP", "K", "stride_xm", "stride_ym")
    else:
        raise ValueError(f"path must be 'gemv' or 'dot', got {path!r}")
    kern = compile_kernel(fn, sig, const, arch, nw, int(cfg.get("num_stages", 2)), div)
    sass, res = disassemble(kern.asm["cubin"])
    weight_loops = [lp for lp in loops(sass) if _weight_loads(lp, path)]
    if not weight_loops:
        raise SassError(f"{fn.__name__} bits={bits}: no loop with weight loads in the SASS")
    loop = max(weight_loops, key=len)
    wl = _weight_loads(loop, path)
    threads = 32 * nw
    requested = sum(_load_bytes(k.split(".", 1)[1]) * v for k, v in wl.items())
    x_slab_bytes = int(cfg.get("BLOCK_M", 1)) * SLAB_ROWS * 2 / threads  # one thread's share of an x slab
    if path == "dot" and x_slab_bytes >= 16:  # x slabs wide enough for the 16-byte bypass form too
        requested -= fmt.codes_per_container * x_slab_bytes
    tile_bytes = tile_weight_bytes(bits, int(cfg["BLOCK_N"]))
    return CompiledVariant(
        kernel=fn.__name__, arch=arch, num_warps=nw, registers=_resource(res, "REG"),
        spill_bytes=_resource(res, "STACK") + _resource(res, "LOCAL"),
        shared_bytes=max(_resource(res, "SHARED"), int(getattr(kern.metadata, "shared", 0))),
        loop_ops=Counter(o for o, _ in loop), loop_instructions=len(loop),
        weight_load_bytes_per_thread=requested,
        weight_loads=wl, unique_weight_bytes_per_thread=tile_bytes / threads,
    )


def tile_weight_bytes(bits: int, block_n: int) -> int:
    """Unique weight bytes one K-loop iteration consumes: R container rows x BLOCK_N."""
    return SLAB_ROWS * block_n * container_format(bits).container_bits // 8
