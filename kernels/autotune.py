"""Launch configurations for the WNA16 Triton kernels: shipped data, on-disk cache, tuner.

Lookup (``get_config``), first hit wins, all keyed by (bits, M bucket, N, K):
  1. the user's tuned cache, ``$VLLM_SLQ_CACHE_DIR/autotune.json`` (default
     ``~/.cache/vllm_slq/autotune.json``), written by ``vllm_slq.kernels.tune`` -- so a tuned
     machine never re-tunes at startup;
  2. the shipped per-device data ``kernels/configs/<device>.json`` ("entries"),
     matched by substrings of torch.cuda.get_device_name() ("match");
  3. a heuristic from that file's "defaults" block sizes plus a split-K that
     fills the device's SMs (``heuristic_config``).
Nothing here benchmarks at run time: Triton's @autotune would time configs on
first call, which stalls startup and cannot run inside CUDA-graph capture.

M buckets: the next power of two >= M (1, 2, 4, 8, 16 use the GEMV/split-K
kernel; 32 .. 4096 the tiled GEMM), so one entry serves a range of batches.

The offline tuner that writes the cache and the shipped files is
vllm_slq.kernels.tune (GPU only); this module only reads.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .layout import container_format

CONFIG_DIR = Path(__file__).with_name("configs")
CACHE_VERSION = 1
GEMV_MAX_M = 1  # M == 1: the GEMV kernel; M > 1: the tl.dot kernel
DOT_SMALL_MAX_M = 16  # M in 2..16: the "dot_small" tile, with split-K
DOT_SMALL_WAVES = 4  # programs per SM the small-M split-K aims for

# Used when no shipped file matches the GPU (and on CPU under TRITON_INTERPRET=1).
# "gemv" is keyed by bits: BLOCK_N = 32 lanes x num_warps x one 128-bit load of
# containers (8 int16 or 4 int32 per thread), so warps lie along N and the K slab
# reduction stays inside a thread; 2-bit takes 2 containers per thread (VEC_N), as
# 8 x 16 rows spill (kernels/sass.py, benchmarks/kernel_model.py).
_FALLBACK_DEFAULTS = {
    "gemv": {"2": {"BLOCK_N": 512, "num_warps": 8, "num_stages": 2, "VEC_N": 2},
             "3": {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 2},
             "4": {"BLOCK_N": 1024, "num_warps": 4, "num_stages": 2},
             "5": {"BLOCK_N": 512, "num_warps": 4, "num_stages": 2},
             "6": {"BLOCK_N": 512, "num_warps": 4, "num_stages": 2},
             "7": {"BLOCK_N": 512, "num_warps": 4, "num_stages": 2},
             "8": {"BLOCK_N": 512, "num_warps": 4, "num_stages": 2}},
    "dot_small": {"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "dot": {"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
}
# The interpreter runs each program serially in numpy: small programs, and
# split-K > 1 so that the atomic path is exercised by the CPU tests.
_CPU_CONFIGS = {
    "gemv": {"BLOCK_N": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1},
    "gemm": {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 4, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1},
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
            for sub, c in (cfg.items() if key == "gemv" else [("", cfg)]):
                _validate(c, f"{path} default {key!r}{' bits ' + sub if sub else ''}", partial=True)
        data["_path"] = str(path)
        out.append(data)
    return tuple(out)


def _validate(cfg: dict, where: str, partial: bool = False) -> None:
    for name in ("BLOCK_M", "BLOCK_N", "SPLIT_K", "GROUP_M", "VEC_N"):
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
    """Block sizes from `defaults`, plus a split-K for M <= 16: the GEMV (M == 1) runs
    >= 2 waves of programs, the small-M tensor-core path >= DOT_SMALL_WAVES (its
    programs hold fewer weight bytes in flight each, kernel_model.py)."""
    d = copy.deepcopy(_FALLBACK_DEFAULTS)
    for key, v in (defaults or {}).items():
        if key == "gemv":
            d["gemv"].update(v)
        else:
            d[key] = v
    k_tiles = -(-k // container_format(bits).tile_k)
    if m <= GEMV_MAX_M:
        cfg = dict(d["gemv"][str(bits)])
        cfg["SPLIT_K"] = _fill_split(max(1, -(-n // cfg["BLOCK_N"])), k_tiles, 2 * num_sms)
        return cfg
    if m > DOT_SMALL_MAX_M:
        return dict(d["dot"])
    cfg = dict(d["dot_small"])
    tiles = max(1, -(-n // cfg["BLOCK_N"])) * -(-m // cfg["BLOCK_M"])
    cfg["SPLIT_K"] = _fill_split(tiles, k_tiles, DOT_SMALL_WAVES * num_sms)
    return cfg


def _fill_split(programs: int, k_tiles: int, want: int) -> int:
    """The smallest power-of-two split-K (<= 64, <= K tiles) giving >= want programs."""
    split = 1
    while programs * split < want and split * 2 <= k_tiles and split < 64:
        split *= 2
    return split


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
    """mtime of the tuned cache, read once per process (no filesystem call per matmul); the tuner resets it."""
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
