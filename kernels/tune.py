"""Offline tuner for the WNA16 kernels (GPU only): times candidate launch configs, keeps the fastest.

``tune()`` times candidates with triton.testing.do_bench on random weights, checks
each candidate's output against the heuristic config's, and stores the fastest per
(bits, M bucket, N, K) in the user's cache (vllm_slq.kernels.autotune reads it).
``export_shipped()`` merges a device's tuned entries into kernels/configs/*.json to
commit. CLI:
    python -m vllm_slq.kernels.tune --shapes 4096x4096 4096x14336 --bits 2 3 4 --m 1 4 16 64
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
from pathlib import Path
from typing import Iterable, Optional

import torch

from vllm_slq.fileio import atomic_write_json

from . import autotune
from .autotune import DOT_SMALL_MAX_M, GEMV_MAX_M, AutotuneError, cache_path, config_key, device_name, m_bucket


def candidate_configs(m: int, n: int, k: int) -> list[dict]:
    out = []
    if m <= GEMV_MAX_M:
        for bn, split, warps, stages in itertools.product((64, 128, 256, 512, 1024), (1, 2, 4, 8, 16, 32, 64),
                                                          (1, 2, 4, 8), (1, 2, 3)):
            out.append({"BLOCK_N": bn, "SPLIT_K": split, "num_warps": warps, "num_stages": stages})
    else:
        splits = (1, 2, 4, 8, 16, 32) if m <= DOT_SMALL_MAX_M else (1,)
        for bm, bn, split, warps, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), splits, (4, 8),
                                                               (2, 3, 4)):
            if bm > 2 * m_bucket(m):
                continue
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": split, "num_warps": warps,
                        "num_stages": stages})
    return out


def write_cache(path: Path, devices: dict) -> None:
    atomic_write_json(path, {"version": autotune.CACHE_VERSION, "devices": devices})


def tune(shapes: Iterable[tuple[int, int]], bits_list: Iterable[int], ms: Iterable[int],
         group_size: Optional[int] = 128, symmetric: bool = False, dtype: torch.dtype = torch.float16,
         max_candidates: Optional[int] = None, seed: int = 0, progress: bool = True) -> dict:
    """Time candidate configs on this GPU; store the best per (bits, M bucket, N, K) in the cache.

    shapes are (N, K) = (out_features, in_features). Returns {key: config}.
    """
    if not torch.cuda.is_available():
        raise AutotuneError("tune() needs a CUDA GPU (configs are per device)")
    import triton.testing
    from tqdm import tqdm

    from vllm_slq.quant.packing import pack_codes

    from .layout import repack
    from .triton_wna16 import launch_dot, launch_gemv

    dev = torch.device("cuda")
    name = device_name(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    results: dict[str, dict] = {}
    jobs = [(nk, b, m) for nk in shapes for b in bits_list for m in ms]
    for (n, k), bits, m in tqdm(jobs, desc="autotune", disable=not progress):
        g = k if group_size is None else group_size
        half = 1 << (bits - 1)
        codes = torch.randint(-half, half, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
        scale = (torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3).to(dtype)
        zp = None if symmetric else torch.randint(-half, half, (n, k // g), generator=gen,
                                                  dtype=torch.int32).to(torch.int8)
        w = repack(pack_codes(codes, bits).to(dev), scale.to(dev), None if zp is None else zp.to(dev),
                   bits, group_size, k, n, act_dtype=dtype)
        x = torch.randn(m, k, generator=gen).to(dtype).to(dev)
        gs = group_size or 0
        launch = launch_gemv if m <= GEMV_MAX_M else launch_dot
        ref = launch(x, w["packed"], w["scale"], w.get("zero"), bits, gs, k, n,
                     autotune.heuristic_config(bits, m, n, k, autotune._num_sms(name)))
        cands = candidate_configs(m, n, k)
        if max_candidates and len(cands) > max_candidates:
            cands = random.Random(seed).sample(cands, max_candidates)
        best = (float("inf"), None)
        for cfg in cands:
            try:
                fn = functools.partial(launch, x, w["packed"], w["scale"], w.get("zero"), bits, gs, k, n, cfg)
                y = fn()
                if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2):
                    continue  # a miscompiled config is never chosen
                ms_ = triton.testing.do_bench(fn, warmup=10, rep=30)
            except triton.runtime.errors.OutOfResources:  # e.g. shared memory for this config
                continue
            if ms_ < best[0]:
                best = (ms_, cfg)
        if best[1] is None:
            raise AutotuneError(f"no candidate config ran for bits={bits} M={m} N={n} K={k}")
        results[config_key(bits, m, n, k)] = dict(best[1], us=round(best[0] * 1e3, 2))
    path = cache_path()
    devices = {}
    if path.exists():
        devices = json.loads(path.read_text()).get("devices", {})
    devices.setdefault(name, {}).update(results)
    write_cache(path, devices)
    autotune._lookup.cache_clear()
    autotune._cache_stamp.cache_clear()
    return results


def export_shipped(name: Optional[str] = None) -> Path:
    """Merge this device's tuned cache entries into its shipped kernels/configs/*.json (to commit)."""
    name = name or device_name(torch.device("cuda"))
    entries = autotune.cached_entries(name)
    if not entries:
        raise AutotuneError(f"no tuned entries for {name!r} in {cache_path()}; run tune() first")
    table = autotune.device_table(name)
    if table is None:
        slug = "_".join(name.lower().replace("-", " ").split()[:2])
        path = autotune.CONFIG_DIR / f"{slug}.json"
        data = {"device": name, "match": [name.lower()], "num_sms": autotune._num_sms(name),
                "source": "tune()", "defaults": dict(autotune._FALLBACK_DEFAULTS), "entries": {}}
    else:
        path = Path(table["_path"])
        data = json.loads(path.read_text())
    data["entries"].update({k: {kk: vv for kk, vv in v.items() if kk != "us"} for k, v in entries.items()})
    data["source"] = f"measured by vllm_slq.kernels.tune.tune() on {name}"
    atomic_write_json(path, data)
    autotune.shipped_configs.cache_clear()
    autotune._lookup.cache_clear()
    return path


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "14336x4096"],
                    help="NxK (out_features x in_features)")
    ap.add_argument("--bits", nargs="+", type=int, default=list(range(2, 9)))
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16, 64])
    ap.add_argument("--group-size", type=int, default=128, help="0 = per-channel")
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--max-candidates", type=int, default=200)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    res = tune(shapes, args.bits, args.m, args.group_size or None, args.symmetric,
               max_candidates=args.max_candidates)
    for key, cfg in sorted(res.items()):
        print(key, cfg)
    print(f"wrote {cache_path()}")


if __name__ == "__main__":
    main()
