"""Launch configurations for the WNA16 Triton kernels: shipped data, on-disk cache, tuner.

Lookup (``get_config``), first hit wins, all keyed by (bits, M bucket, N, K):
  1. the user's tuned cache, ``$VLLM_SLQ_CACHE_DIR/autotune.json`` (default
     ``~/.cache/vllm_slq/autotune.json``), written by ``tune()`` -- so a tuned
     machine never re-tunes at startup;
  2. the shipped per-device data ``kernels/configs/<device>.json`` ("entries"),
     matched by substrings of torch.cuda.get_device_name() ("match");
  3. a heuristic from that file's "defaults" block sizes plus a split-K that
     fills the device's SMs (``heuristic_config``).
Nothing here benchmarks at run time: Triton's @autotune would time configs on
first call, which stalls startup and cannot run inside CUDA-graph capture.

M buckets: the next power of two >= M (1, 2, 4, 8, 16 use the GEMV/split-K
kernel; 32 .. 4096 the tiled GEMM), so one entry serves a range of batches.

``tune()`` (GPU only) times candidate configs with triton.testing.do_bench on
random weights, checks each candidate's output against the heuristic one, and
stores the fastest in the cache (atomically). CLI:
    python -m vllm_slq.kernels.autotune --shapes 4096x4096 4096x14336 --bits 2 3 4 --m 1 4 16 64
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch

CONFIG_DIR = Path(__file__).with_name("configs")
CACHE_VERSION = 1
GEMV_MAX_M = 16

# Used when no shipped file matches the GPU (and on CPU under TRITON_INTERPRET=1).
_FALLBACK_DEFAULTS = {
    "gemv_m1": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    "gemv": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    "gemm_small": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "gemm": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
}
# The interpreter runs each program serially in numpy: few large programs, but
# still split-K > 1 so the atomic path is exercised by the CPU tests.
_CPU_CONFIGS = {
    "gemv": {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1},
    "gemm": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4, "num_warps": 4, "num_stages": 1},
}


class AutotuneError(RuntimeError):
    pass


def m_bucket(m: int) -> int:
    if m < 1:
        raise ValueError(f"M must be >= 1, got {m}")
    return min(1 << (m - 1).bit_length(), 4096)


def config_key(bits: int, m: int, n: int, k: int) -> str:
    return f"{bits}|{m_bucket(m)}|{n}|{k}"


def cache_path() -> Path:
    root = os.environ.get("VLLM_SLQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vllm_slq")
    return Path(root) / "autotune.json"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


@functools.lru_cache(maxsize=None)
def shipped_configs() -> tuple[dict, ...]:
    """All kernels/configs/*.json, validated on load (a broken data file names itself)."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise AutotuneError(f"{path}: invalid JSON: {e}") from e
        for field in ("device", "match", "num_sms", "defaults", "entries"):
            if field not in data:
                raise AutotuneError(f"{path}: missing field {field!r}")
        for key, cfg in data["entries"].items():
            _validate(cfg, f"{path} entry {key!r}")
        for key, cfg in data["defaults"].items():
            _validate(cfg, f"{path} default {key!r}", partial=True)
        data["_path"] = str(path)
        out.append(data)
    return tuple(out)


def _validate(cfg: dict, where: str, partial: bool = False) -> None:
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUP_M"):
        v = cfg.get(name)
        if v is None:
            continue
        if not isinstance(v, int) or v < 1 or (name != "GROUP_M" and v & (v - 1)):
            raise AutotuneError(f"{where}: {name} must be a positive power of two, got {v!r}")
    if not partial and "BLOCK_N" not in cfg:
        raise AutotuneError(f"{where}: BLOCK_N missing")


def device_table(name: str) -> Optional[dict]:
    low = name.lower()
    for data in shipped_configs():
        if any(m.lower() in low for m in data["match"]):
            return data
    return None


@functools.lru_cache(maxsize=None)
def _load_cache(path: str, mtime: float) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # an unreadable cache is only a lost speed-up, never an error
    if data.get("version") != CACHE_VERSION:
        return {}
    return data.get("devices", {})


def cached_entries(name: str) -> dict:
    path = cache_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return {}
    return _load_cache(str(path), mtime).get(name, {})


def heuristic_config(bits: int, m: int, n: int, k: int, num_sms: int = 132,
                     defaults: Optional[dict] = None) -> dict:
    """Block sizes from `defaults`; split-K for decode so that >= 2 waves of programs run."""
    d = dict(_FALLBACK_DEFAULTS)
    if defaults:
        d.update(defaults)
    if m <= GEMV_MAX_M:
        cfg = dict(d["gemv_m1" if m == 1 else "gemv"])
        n_tiles = -(-n // cfg["BLOCK_N"])
        k_tiles = -(-k // cfg["BLOCK_K"])
        split = 1
        while n_tiles * split < 2 * num_sms and split * 2 <= k_tiles and split < 16:
            split *= 2
        cfg["SPLIT_K"] = split
        return cfg
    return dict(d["gemm_small" if m <= 64 else "gemm"])


@functools.lru_cache(maxsize=4096)
def _lookup(name: str, bits: int, mb: int, n: int, k: int, cache_stamp: float) -> tuple[str, dict]:
    key = f"{bits}|{mb}|{n}|{k}"
    cached = cached_entries(name)
    if key in cached:
        return "cache", dict(cached[key])
    table = device_table(name)
    if table is not None and key in table["entries"]:
        return table["_path"], dict(table["entries"][key])
    num_sms = table["num_sms"] if table else _num_sms(name)
    return "heuristic", heuristic_config(bits, mb, n, k, num_sms, table["defaults"] if table else None)


def _num_sms(name: str) -> int:
    if torch.cuda.is_available() and name != "cpu":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 8


@functools.lru_cache(maxsize=None)
def _cache_stamp() -> float:
    """mtime of the tuned cache, read once per process (no filesystem call per matmul); tune() resets it."""
    p = cache_path()
    return p.stat().st_mtime if p.exists() else 0.0


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def get_config(device: torch.device, bits: int, m: int, n: int, k: int, path: Optional[str] = None) -> dict:
    """The launch config for one call; `path` ("gemv"/"gemm") only checks consistency."""
    want = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path is not None and path != want:
        raise ValueError(f"M={m} uses the {want} path, not {path}")
    if device.type == "cpu":
        return dict(_CPU_CONFIGS[want])
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _lookup(_cuda_name(index), bits, m_bucket(m), n, k, _cache_stamp())[1]


def explain_config(device: torch.device, bits: int, m: int, n: int, k: int) -> tuple[str, dict]:
    """(source, config) -- where the config for this call comes from (benchmarks print it)."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu-interpreter", get_config(device, bits, m, n, k)
    return _lookup(device_name(device), bits, m_bucket(m), n, k, _cache_stamp())


# --------------------------------------------------------------------------- tuning (GPU)


def candidate_configs(m: int, n: int, k: int) -> list[dict]:
    out = []
    if m <= GEMV_MAX_M:
        for bn, bk, split, warps, stages in itertools.product(
                (32, 64, 128, 256), (32, 64, 128, 256), (1, 2, 4, 8, 16), (2, 4, 8), (1, 2, 3, 4)):
            if bk * split > max(k, bk) * 2 or (m == 1 and bn * bk > 32768) or (m > 1 and bk < 16):
                continue
            out.append({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages})
    else:
        for bm, bn, bk, warps, stages in itertools.product(
                (32, 64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)):
            if bm > 2 * m_bucket(m):
                continue
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                        "num_warps": warps, "num_stages": stages})
    return out


def _write_cache_atomic(path: Path, devices: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune.", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CACHE_VERSION, "devices": devices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tune(shapes: Iterable[tuple[int, int]], bits_list: Iterable[int], ms: Iterable[int],
         group_size: Optional[int] = 128, symmetric: bool = False, dtype: torch.dtype = torch.float16,
         max_candidates: Optional[int] = None, seed: int = 0, progress: bool = True) -> dict:
    """Time candidate configs on this GPU; store the best per (bits, M bucket, N, K) in the cache.

    shapes are (N, K) = (out_features, in_features). Returns {key: config}.
    """
    if not torch.cuda.is_available():
        raise AutotuneError("tune() needs a CUDA GPU (configs are per device)")
    import random

    import triton.testing
    from tqdm import tqdm

    from .layout import pack_dense_bitstream, repack
    from .triton_wna16 import launch_gemm, launch_gemv

    dev = torch.device("cuda")
    name = device_name(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    results: dict[str, dict] = {}
    jobs = [(nk, b, m) for nk in shapes for b in bits_list for m in ms]
    for (n, k), bits, m in tqdm(jobs, desc="autotune", disable=not progress):
        g = k if group_size is None else group_size
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
        scale = (torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3).to(dtype)
        zp = None if symmetric else torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k // g),
                                                  generator=gen, dtype=torch.int8)
        w = repack(pack_dense_bitstream(codes, bits).to(dev), scale.to(dev), None if zp is None else zp.to(dev),
                   bits, group_size, k, n, act_dtype=dtype)
        x = torch.randn(m, k, generator=gen).to(dtype).to(dev)
        gs = group_size or 0
        launch = launch_gemv if m <= GEMV_MAX_M else launch_gemm
        ref = launch(x, w["packed"], w["scale"], w.get("zero"), bits, gs, k,
                     heuristic_config(bits, m, n, k, _num_sms(name)))
        cands = candidate_configs(m, n, k)
        if max_candidates and len(cands) > max_candidates:
            cands = random.Random(seed).sample(cands, max_candidates)
        best = (float("inf"), None)
        for cfg in cands:
            try:
                fn = functools.partial(launch, x, w["packed"], w["scale"], w.get("zero"), bits, gs, k, cfg)
                y = fn()
                if not torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2):
                    continue  # a miscompiled config is never chosen
                ms_ = triton.testing.do_bench(fn, warmup=10, rep=30)
            except Exception:  # noqa: BLE001 -- e.g. out of shared memory for this config
                continue
            if ms_ < best[0]:
                best = (ms_, cfg)
        if best[1] is None:
            raise AutotuneError(f"no candidate config ran for bits={bits} M={m} N={n} K={k}")
        results[config_key(bits, m, n, k)] = dict(best[1], us=round(best[0] * 1e3, 2))
    path = cache_path()
    devices = {}
    if path.exists():
        try:
            devices = json.loads(path.read_text()).get("devices", {})
        except (OSError, json.JSONDecodeError):
            devices = {}
    devices.setdefault(name, {}).update(results)
    _write_cache_atomic(path, devices)
    _lookup.cache_clear()
    _cache_stamp.cache_clear()
    return results


def export_shipped(name: Optional[str] = None) -> Path:
    """Merge this device's tuned cache entries into its shipped kernels/configs/*.json (to commit)."""
    name = name or device_name(torch.device("cuda"))
    entries = cached_entries(name)
    if not entries:
        raise AutotuneError(f"no tuned entries for {name!r} in {cache_path()}; run tune() first")
    table = device_table(name)
    if table is None:
        slug = "_".join(name.lower().replace("-", " ").split()[:2])
        path = CONFIG_DIR / f"{slug}.json"
        data = {"device": name, "match": [name.lower()], "num_sms": _num_sms(name),
                "source": "tune()", "defaults": dict(_FALLBACK_DEFAULTS), "entries": {}}
    else:
        path = Path(table["_path"])
        data = json.loads(path.read_text())
    data["entries"].update({k: {kk: vv for kk, vv in v.items() if kk != "us"} for k, v in entries.items()})
    data["source"] = f"measured by vllm_slq.kernels.autotune.tune() on {name}"
    fd, tmp = tempfile.mkstemp(prefix=".cfg.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    shipped_configs.cache_clear()
    _lookup.cache_clear()
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
