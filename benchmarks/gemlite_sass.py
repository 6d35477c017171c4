"""Static SASS analysis of gemlite's decode (M = 1) GEMV, for side-by-side rows with ours.

Compiles gemlite 0.6.0.post2's ``gemv_INT_revsplitK_kernel``
(gemlite/triton_kernels/gemv_revsplitK_kernels.py, the kernel gemlite's
``get_matmul_type`` picks for M = 1 and W_nbits < 8) for an NVIDIA target on a
CPU-only machine with ``vllm_slq.kernels.sass.compile_kernel``, exactly as our own
kernels are analysed, with the constexprs ``gemv_revsplitK_forward`` passes for an
A16Wn layer (helper.A16Wn -> GemLiteLinearTriton.pack): fp16 activations, int32
packing over K, group 128, asymmetric in gemlite's default fma form (zeros stored as
-z*s, W_group_mode 4), no channel scales, fp32 accumulation, fp16 output.

The launch config is gemlite's cached H100 entry (gemlite/configs/h100.json,
GEMV_REVSPLITK, key (M, N, K, group, elements_per_sample, type_id)) when there is one,
else gemlite's default NVIDIA config run through gemlite's pruning rules. A real launch
on a shape without an entry would autotune gemlite's "fast" list instead.

The kernel has no K loop: each program runs two BLOCK_SIZE_K stages (split_k fixed at 2),
so the numbers are per program: total SASS instructions, the span between the first
and last weight load (LDG with evict-first, which gemlite puts on weight loads only),
bytes each thread's weight loads request vs. the unique weight bytes it consumes
(2 * BLOCK_SIZE_K * BLOCK_SIZE_N * bits / 8 over 32 * num_warps threads), and
sass_per_weight_byte = total instructions / unique weight bytes per thread.

gemlite's source comes from the `bench` extra's install or from $GEMLITE_SRC (an unpacked
sdist). Its package __init__ files are bypassed (they import core.py, which needs a GPU),
and while its kernel module is imported, the four device queries its utils.py makes at
import time are answered for an H100 (compute capability 9.0, name/SM count, the triton
driver's target, triton.set_allocator). Nothing is launched.
benchmarks/kernel_model.py turns these rows into predicted fractions with its roofline.

    python benchmarks/gemlite_sass.py        # table for bits 2/4/8, three Llama-8B shapes, sm_90 and sm_80
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from collections import Counter
from types import SimpleNamespace
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import DriverConfig

from vllm_slq.kernels import sass

GROUP = 128
SPLIT_K = 2  # fixed in gemv_revsplitK_forward's grid
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)


class GemliteNotFound(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def gemlite_dir() -> str:
    """The gemlite package directory: $GEMLITE_SRC (an unpacked sdist), else the installed
    package (the `bench` extra), found without importing it."""
    src = os.environ.get("GEMLITE_SRC")
    if src:
        path = os.path.join(src, "gemlite")
    else:
        spec = importlib.util.find_spec("gemlite")
        path = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(os.path.join(path, "triton_kernels", "gemv_revsplitK_kernels.py")):
        raise GemliteNotFound("gemlite 0.6.0.post2 not found: pip install -e '.[bench]', or set GEMLITE_SRC to "
                              "an unpacked sdist (pip download gemlite==0.6.0.post2 --no-deps, tar xzf)")
    return path


@functools.lru_cache(maxsize=None)
def _gemlite_module():
    root = gemlite_dir()
    for name in ("gemlite", "gemlite.triton_kernels"):  # bare packages: skip __init__ (imports core.py)
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules.setdefault(name, pkg)
    target = SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32))
    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", multi_processor_count=132)
    with mock.patch.object(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props), \
            mock.patch.object(triton, "set_allocator", lambda fn: None), \
            mock.patch.object(DriverConfig, "active", property(lambda self: target)):
        return importlib.import_module("gemlite.triton_kernels.gemv_revsplitK_kernels")


def fast_configs() -> list[dict]:
    """gemlite's own "fast" autotune list for this kernel on NVIDIA: what its autotuner times
    on a shape without a cached entry."""
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in _gemlite_module().get_fast_autotune_config_nvidia()]


def _pow2(v: int) -> int:
    return 1 << (int(v) - 1).bit_length()


def launch_config(bits: int, k: int, n: int, config: dict | None = None) -> tuple[dict, str]:
    """(config, source): the h100.json entry for the shape, else the given or default config
    clamped as gemlite's kernel_config_pruner clamps non-cached configs."""
    eps = 32 // bits
    if config is None:
        key = str((1, n, k, GROUP, eps, 100 + bits))
        with open(os.path.join(gemlite_dir(), "configs", "h100.json")) as f:
            entry = json.load(f)["GEMV_REVSPLITK"].get(key)
        if entry is not None:  # cached entries are used as they are
            return entry, "h100.json"
        default = _gemlite_module().get_default_config_nvidia()[0]
        config, source = dict(default.kwargs, num_warps=default.num_warps, num_stages=default.num_stages), "default"
    else:
        source = "given"
    cfg = dict(config)
    bk = _pow2(min(k, int(cfg["BLOCK_SIZE_K"]), GROUP))
    while bk >= 8 and bk * SPLIT_K > GROUP:
        bk //= 2
    cfg["BLOCK_SIZE_K"] = max(bk, 8)
    cfg["BLOCK_SIZE_N"] = _pow2(min(n, int(cfg["BLOCK_SIZE_N"])))
    if cfg["BLOCK_SIZE_K"] < eps:
        raise ValueError(f"gemlite prunes BLOCK_SIZE_K {cfg['BLOCK_SIZE_K']} < elements_per_sample {eps}")
    return cfg, source


def compile_gemlite_gemv(bits: int, k: int, n: int, arch: int = 90, config: dict | None = None) -> dict:
    cfg, source = launch_config(bits, k, n, config)
    bn, bk, nw = int(cfg["BLOCK_SIZE_N"]), int(cfg["BLOCK_SIZE_K"]), int(cfg.get("num_warps", 4))
    fn = _gemlite_module().gemv_INT_revsplitK_kernel.fn
    # what gemv_revsplitK_forward passes for x (1, K) fp16, W_q (K/eps, N) int32 contiguous,
    # scales/zeros (K/G, N) fp16 contiguous, out (1, N) fp16, scales_x None
    const = dict(
        scales_a_ptr=None, M=1, N=n, K=k, W_nbits=bits, group_size=GROUP, unpack_mask=2 ** bits - 1,
        elements_per_sample=32 // bits, type_id=100 + bits, use_prehook=False,
        stride_am=k, stride_ak=1, stride_bk=n, stride_bn=1, stride_cm=n, stride_cn=1,
        stride_meta_a_m=0, stride_meta_a_g=0, stride_meta_g=n, stride_meta_n=1,
        input_dtype=tl.float16, output_dtype=tl.float16, acc_dtype=tl.float32, meta_dtype=tl.float16,
        channel_scale_mode=0, W_group_mode=4, zero_is_scalar=False, data_contiguous=True, dump_b_val=0,
        BLOCK_SIZE_M=1, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, A_load_order=int(cfg.get("A_load_order", 0)),
        dot_prod_mode=int(cfg.get("dot_prod_mode", 0)),
        EVEN_K=k % (bk * SPLIT_K) == 0, EVEN_N=n % bn == 0,
    )
    for p in fn.params:  # the kernel's own defaults for the rest (eviction policies, atomic_mode, ...)
        if p.is_constexpr and p.name not in const:
            const[p.name] = p.default
    sig = {"a_ptr": "*fp16", "b_ptr": "*i32", "c_ptr": "*fp16", "scales_ptr": "*fp16", "zeros_ptr": "*fp16"}
    t0 = time.perf_counter()
    kern = sass.compile_kernel(fn, sig, const, arch, nw, int(cfg.get("num_stages", 1)), tuple(sig))
    text, res = sass.disassemble(kern.asm["cubin"])
    compile_s = time.perf_counter() - t0

    instrs = []
    for line in text.splitlines():
        m = sass._INSTR.match(line)
        if m:
            instrs.append((m.group(3), m.group(4)))
    last_exit = max(i for i, (op, _) in enumerate(instrs) if op == "EXIT")
    instrs = instrs[:last_exit + 1]  # drop the trailing self-branch and NOP padding
    wl_idx = [i for i, (op, mods) in enumerate(instrs) if op == "LDG" and ".EF" in mods]
    if not wl_idx:
        raise sass.SassError(f"gemlite gemv bits={bits} K={k} N={n}: no evict-first weight loads in the SASS")
    weight_loads = Counter(op + mods for op, mods in (instrs[i] for i in wl_idx))
    requested = sum(sass._load_bytes(name.split(".", 1)[1]) * c for name, c in weight_loads.items())
    unique = SPLIT_K * bk * bn * bits / 8 / (32 * nw)
    return dict(
        kernel=fn.__name__, bits=bits, k=k, n=n, arch=arch, config_source=source,
        config={key: cfg[key] for key in ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "A_load_order", "dot_prod_mode",
                                          "num_warps", "num_stages") if key in cfg},
        num_warps=nw, registers=sass._resource(res, "REG"),
        spill_bytes=sass._resource(res, "STACK") + sass._resource(res, "LOCAL"),
        shared_bytes=max(sass._resource(res, "SHARED"), int(getattr(kern.metadata, "shared", 0))),
        instructions=len(instrs), weight_span_instructions=wl_idx[-1] - wl_idx[0] + 1,
        # backward branches other than the BRA-to-self after EXIT: no K loop exists, but a
        # one-fp16-per-thread output (BLOCK_SIZE_N 32 on 1 warp) becomes an ATOMG.CAS retry loop
        loops=sum(lp != [("BRA", "")] for lp in sass.loops(text)),
        weight_loads=dict(weight_loads),
        weight_load_bytes_per_thread=requested, unique_weight_bytes_per_thread=unique,
        weight_request_ratio=requested / unique, sass_per_weight_byte=len(instrs) / unique,
        programs=triton.cdiv(n, bn) * triton.cdiv(k, bk * SPLIT_K), compile_s=compile_s,
    )


def main() -> None:
    cols = ("arch", "bits", "KxN", "cfg", "BN", "BK", "w", "st", "regs", "spill", "smem", "instr", "span",
            "loops", "wloads", "req_B", "uniq_B", "req_ratio", "sass/B", "programs", "compile_s")
    print(" | ".join(cols))
    for arch in (90, 80):
        for bits in (2, 4, 8):
            for k, n in SHAPES:
                r = compile_gemlite_gemv(bits, k, n, arch)
                c = r["config"]
                loads = ",".join(f"{c_}x{name}" for name, c_ in sorted(r["weight_loads"].items()))
                print(" | ".join(str(x) for x in (
                    arch, bits, f"{k}x{n}", r["config_source"], c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"],
                    c["num_warps"], c["num_stages"], r["registers"], r["spill_bytes"], r["shared_bytes"],
                    r["instructions"], r["weight_span_instructions"], r["loops"], loads,
                    f"{r['weight_load_bytes_per_thread']:g}", f"{r['unique_weight_bytes_per_thread']:g}",
                    f"{r['weight_request_ratio']:.2f}", f"{r['sass_per_weight_byte']:.2f}", r["programs"],
                    f"{r['compile_s']:.1f}")), flush=True)


if __name__ == "__main__":
    main()
