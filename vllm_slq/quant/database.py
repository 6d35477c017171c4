"""Per-layer multi-bit "database": every candidate quantization of a layer from one Hessian.

SLQ's wide bit-width search and RCO's allocation (docs/methods.md sections 2 and 4)
choose, per layer, one of several quantized versions W^(k) (e.g. asymmetric GPTQ
at 2..8 bits). Building them costs one GPTQ pass over the columns for all widths:

    build_database(W, H, specs)   one factorisation chol(H^-1) shared by all specs,
                                  one batched column loop over [S, N, K]
                                  (gptq.gptq_quantize_many); each entry records
                                  meta["rel_err"] = tr((W-Q) H (W-Q)^T) / tr(W H W^T),
                                  the per-layer sensitivity the proxy-DP baseline and
                                  RCO's initialisation read; with scale_searches, one
                                  such pass per group-parameter rule and the lower
                                  objective per spec (gptq.lowest_error)
    build_database_sharded(...)   the same over torch.distributed ranks: GPTQ's rows are
                                  independent given H, so each rank quantizes its share
                                  of the N rows and the codes, scales and zero points are
                                  all-gathered; rel_err's numerator and denominator and
                                  gptq_loss are all-reduced. Same entries as one process
                                  (bit for bit, given the same H), 1/world of the work
    database_key(W, H, specs)     what a layer's entries depend on, hashed: the weights,
                                  the Hessian, the specs and GPTQ's options
    LayerDatabase(dir)            the entries on disk, compact (codes int8, scales in
                                  their storage dtype, zero points int8: no dense
                                  float copies), one safetensors file per layer written
                                  atomically, plus index.json (shapes, specs, meta);
                                  get() reads only the tensors of one entry, lazily

Layout of `dir`:
    index.json                    {"format": "vllm-slq-layer-database", "version": 1,
                                   "layers": {name: {"file", "shape": [N, K],
                                   "entries": {spec.short(): {"bits", "group_size",
                                   "symmetric", "meta"}}}}}
    <layer-file>.safetensors      "<spec.short()>.codes" int8 [N, K],
                                  "<spec.short()>.scale" [N, G],
                                  "<spec.short()>.zero_point" int8 [N, G] (asymmetric)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_path, atomic_write
from .gptq import gptq_quantize_many, lowest_error
from .spec import QuantizedWeight, QuantSpec

__all__ = ["build_database", "LayerDatabase", "DatabaseError", "INDEX_NAME"]

INDEX_NAME = "index.json"
FORMAT_NAME = "vllm-slq-layer-database"
FORMAT_VERSION = 1


class DatabaseError(ValueError):
    """A malformed database directory, or a request for a layer/spec it does not hold."""


def _runs_per_rule(build, W, H, specs, layer, scale_searches, gptq_kw) -> dict[QuantSpec, QuantizedWeight]:
    """`build` once per group-parameter rule, then per spec the lowest objective
    (gptq.lowest_error, as gptq_quantize_best chooses for the uniform baseline)."""
    if "scale_search" in gptq_kw:
        raise ValueError(f"build_database{' ' + layer if layer else ''}: give scale_search or scale_searches, "
                         "not both")
    return lowest_error({mode: build(W, H, specs, layer=layer, scale_search=mode, **gptq_kw)
                         for mode in dict.fromkeys(scale_searches)})


def build_database(W: torch.Tensor, H: torch.Tensor, specs: Sequence[QuantSpec], layer: str = "",
                   scale_searches: Optional[Sequence[str]] = None, **gptq_kw) -> dict[QuantSpec, QuantizedWeight]:
    """GPTQ of W for every spec from one factorisation of H and one pass over the columns.

    Keyword options are those of gptq.gptq_quantize_many (percdamp, blocksize,
    scale_search, shrink_grid, negative_scale, scale_dtype, factor, device).
    Each entry equals, bit for bit, gptq_quantize(W, H, spec) with the same options,
    is stored compactly (int8 codes/zeros, scale in scale_dtype, on the CPU) and
    carries meta["rel_err"] and meta["bpp"]. scale_searches (e.g. ("hessian", "minmax")):
    one pass per group-parameter rule, and per spec the entry with the lower objective,
    equal to gptq_quantize_best's (not our default: gptq.GPTQ_VARIANT says why).
    """
    if scale_searches is not None:
        return _runs_per_rule(build_database, W, H, specs, layer, scale_searches, gptq_kw)
    out = gptq_quantize_many(W, H, specs, layer=layer, **gptq_kw)
    k = W.shape[1]
    for spec, qw in out.items():
        qw.codes = qw.codes.cpu()
        qw.scale = qw.scale.cpu()
        if qw.zero_point is not None:
            qw.zero_point = qw.zero_point.cpu()
        qw.meta["bpp"] = spec.bpp(k)
    return out


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_rows(t: Optional[torch.Tensor], rows: list[int], device: torch.device) -> Optional[torch.Tensor]:
    """Concatenate every rank's [rows_r, ...] tensor along dim 0 (rank order). The bytes
    travel as uint8 on `device` (gloo and NCCL both move those; NCCL needs CUDA tensors),
    padded to the longest shard, and come back on the CPU in t's dtype."""
    if t is None:
        return None
    t = t.contiguous()
    raw = t.view(torch.uint8).reshape(t.shape[0], -1).to(device)
    width, longest = raw.shape[1], max(rows)
    padded = torch.zeros(longest, width, dtype=torch.uint8, device=device)
    padded[: raw.shape[0]] = raw
    parts = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(parts, padded)
    full = torch.cat([p[:r] for p, r in zip(parts, rows)]).cpu()
    return full.view(t.dtype).reshape(sum(rows), *t.shape[1:])


def build_database_sharded(W: torch.Tensor, H: torch.Tensor, specs: Sequence[QuantSpec], layer: str = "",
                           scale_searches: Optional[Sequence[str]] = None,
                           **gptq_kw) -> dict[QuantSpec, QuantizedWeight]:
    """build_database with the rows of W split over the torch.distributed ranks (a plain
    build_database outside a process group). Every rank must call it with the same H, specs
    and options; every rank returns the full entries. With scale_searches each rule's
    entries are reduced first, so every rank picks by the whole layer's objective."""
    if scale_searches is not None:
        return _runs_per_rule(build_database_sharded, W, H, specs, layer, scale_searches, gptq_kw)
    rank, world = _world()
    n = W.shape[0]
    if world == 1 or n < world:
        return build_database(W, H, specs, layer=layer, **gptq_kw)
    bounds = [n * r // world for r in range(world + 1)]
    rows = [bounds[r + 1] - bounds[r] for r in range(world)]
    device = W.device
    local = build_database(W[bounds[rank]: bounds[rank + 1]], H, specs, layer=layer, **gptq_kw)
    # tr((W-Q) H (W-Q)^T) and tr(W H W^T) are sums over rows: reduce numerators and denominators
    den = local[specs[0]].meta["whw"]  # 0 only for all-zero rows, which quantize exactly
    sums = torch.tensor([local[s].meta["rel_err"] * den if den > 0 else 0.0 for s in specs]
                        + [local[s].meta["gptq_loss"] for s in specs] + [den], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    out = {}
    for i, spec in enumerate(specs):
        q = local[spec]
        meta = dict(q.meta, rel_err=float(sums[i] / sums[-1]), gptq_loss=float(sums[len(specs) + i]),
                    whw=float(sums[-1]), shards=world)
        out[spec] = QuantizedWeight(codes=_all_gather_rows(q.codes, rows, device),
                                    scale=_all_gather_rows(q.scale, rows, device),
                                    zero_point=_all_gather_rows(q.zero_point, rows, device), spec=spec, meta=meta)
    return out


def sha256_tensor(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes to the hash `h` (cache keys by content)."""
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def database_key(W: torch.Tensor, H: torch.Tensor, specs: Sequence[QuantSpec], **gptq_kw) -> str:
    """A content hash of everything build_database(W, H, specs, **gptq_kw) depends on.

    Two calls with equal keys store the same entries, whatever the layer is called,
    so a store keyed by it can be shared by runs that differ only in what they do
    with the database (another SLQ target, another allocation).
    """
    gptq_kw = {k: v for k, v in gptq_kw.items() if k != "device"}  # where it runs changes nothing
    if "factor" in gptq_kw:
        raise ValueError("database_key: a precomputed Hessian 'factor' cannot be part of a key; pass H")
    h = hashlib.sha256()
    for t in (W, H):
        sha256_tensor(h, t.to(torch.float32))
    h.update(json.dumps({"specs": [s.short() for s in specs],
                         "gptq": {k: _jsonable(str(v) if isinstance(v, torch.dtype) else v)
                                  for k, v in sorted(gptq_kw.items())}}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _spec_to_json(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric}


def _spec_from_json(d: dict, where: str) -> QuantSpec:
    try:
        return QuantSpec(bits=int(d["bits"]), group_size=None if d["group_size"] is None else int(d["group_size"]),
                         symmetric=bool(d["symmetric"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DatabaseError(f"{where}: bad spec entry {d!r}: {e}") from e


def _jsonable(v):
    """Meta values as JSON (floats that are not finite become strings, objects their repr)."""
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(a): _jsonable(b) for a, b in v.items()}
    return repr(v)


class LayerDatabase:
    """A directory of quantized layer variants: put() once per layer, get() lazily later.

    Not safe for concurrent writers (one builder process per directory).
    """

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        self._index_path = self.path / INDEX_NAME
        if self._index_path.exists():
            self._index = self._read_index()
        elif create:
            self.path.mkdir(parents=True, exist_ok=True)
            self._index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": {}}
        else:
            raise DatabaseError(f"{self.path}: no {INDEX_NAME}; not a layer database")

    # ---- index -----------------------------------------------------------------
    def _read_index(self) -> dict:
        try:
            idx = json.loads(self._index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatabaseError(f"{self._index_path}: unreadable index: {e}") from e
        if not isinstance(idx, dict) or idx.get("format") != FORMAT_NAME:
            raise DatabaseError(f"{self._index_path}: field 'format' must be {FORMAT_NAME!r}")
        if idx.get("version") != FORMAT_VERSION:
            raise DatabaseError(f"{self._index_path}: unsupported version {idx.get('version')!r} "
                                f"(this code reads {FORMAT_VERSION})")
        if not isinstance(idx.get("layers"), dict):
            raise DatabaseError(f"{self._index_path}: field 'layers' must be an object")
        return idx

    def _write_index(self) -> None:
        text = json.dumps(self._index, indent=1, sort_keys=True)
        atomic_write(self._index_path, text)

    def _file_for(self, layer: str) -> str:
        if layer in self._index["layers"]:
            return self._index["layers"][layer]["file"]
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", layer)[:150] or "layer"
        taken = {v["file"] for v in self._index["layers"].values()}
        name = f"{stem}.safetensors"
        if name in taken or name == INDEX_NAME:
            name = f"{stem}.{hashlib.sha1(layer.encode()).hexdigest()[:10]}.safetensors"
        return name

    # ---- queries ---------------------------------------------------------------
    def layers(self) -> list[str]:
        return list(self._index["layers"])

    def __contains__(self, layer: str) -> bool:
        return layer in self._index["layers"]

    def __len__(self) -> int:
        return len(self._index["layers"])

    def _layer_entry(self, layer: str) -> dict:
        try:
            return self._index["layers"][layer]
        except KeyError:
            known = self.layers()
            raise DatabaseError(f"{self.path}: no layer {layer!r} (holds {len(known)} layers"
                                f"{': ' + ', '.join(known[:5]) if known else ''}{', ...' if len(known) > 5 else ''})") from None

    def specs(self, layer: str) -> list[QuantSpec]:
        entries = self._layer_entry(layer)["entries"]
        return [_spec_from_json(v, f"{self._index_path} layer {layer!r}") for v in entries.values()]

    def shape(self, layer: str) -> tuple[int, int]:
        return tuple(self._layer_entry(layer)["shape"])  # type: ignore[return-value]

    def meta(self, layer: str, spec: QuantSpec) -> dict:
        return dict(self._spec_entry(layer, spec)["meta"])

    def errors(self, layer: str) -> dict[QuantSpec, float]:
        """{spec: Hessian-weighted relative error} for one layer (proxy-DP / RCO init input)."""
        return {s: float(self.meta(layer, s)["rel_err"]) for s in self.specs(layer)}

    def _spec_entry(self, layer: str, spec: QuantSpec) -> dict:
        entries = self._layer_entry(layer)["entries"]
        key = spec.short()
        if key not in entries:
            raise DatabaseError(f"{self.path}: layer {layer!r} has no entry for {key} "
                                f"(has {', '.join(entries) or 'none'})")
        return entries[key]

    def get(self, layer: str, spec: QuantSpec) -> QuantizedWeight:
        """Read one entry (only its tensors are read from the layer's file)."""
        entry = self._spec_entry(layer, spec)
        file = self.path / self._layer_entry(layer)["file"]
        key = spec.short()
        try:
            # clone: get_tensor may hand out views of the file's memory map, and one kept entry
            # (the modifier keeps a width per layer) then pins every page read from the file:
            # reading a 1.4B model's cache this way held 7 GB of mapped pages in RSS
            with safe_open(str(file), framework="pt") as f:
                codes = f.get_tensor(f"{key}.codes").clone()
                scale = f.get_tensor(f"{key}.scale").clone()
                zero = None if spec.symmetric else f.get_tensor(f"{key}.zero_point").clone()
        except (OSError, KeyError, RuntimeError) as e:
            raise DatabaseError(f"{file}: cannot read entry {key} of layer {layer!r}: {e}") from e
        n, k = self.shape(layer)
        if tuple(codes.shape) != (n, k) or codes.dtype != torch.int8:
            raise DatabaseError(f"{file}: {key}.codes is {codes.dtype} {tuple(codes.shape)}, expected int8 {(n, k)}")
        return QuantizedWeight(codes=codes, scale=scale, zero_point=zero, spec=spec, meta=dict(entry["meta"]))

    def items(self, layer: str) -> Iterator[tuple[QuantSpec, QuantizedWeight]]:
        for s in self.specs(layer):
            yield s, self.get(layer, s)

    # ---- writing ---------------------------------------------------------------
    def put(self, layer: str, entries: dict[QuantSpec, QuantizedWeight], merge: bool = True) -> None:
        """Store a layer's entries (one safetensors file, replaced atomically, then the index).

        merge=True keeps this layer's stored entries for specs not in `entries`.
        """
        if not layer:
            raise DatabaseError("put: layer name must be non-empty")
        if not entries:
            raise DatabaseError(f"put: layer {layer!r}: no entries")
        shapes = {tuple(qw.codes.shape) for qw in entries.values()}
        if len(shapes) != 1:
            raise DatabaseError(f"put: layer {layer!r}: entries have different shapes {sorted(shapes)}")
        shape = shapes.pop()
        if layer in self and merge:
            if self.shape(layer) != shape:
                raise DatabaseError(f"put: layer {layer!r}: shape {shape} differs from stored {self.shape(layer)}")
            old = {s: self.get(layer, s) for s in self.specs(layer) if s not in entries}
            entries = {**old, **entries}
        tensors: dict[str, torch.Tensor] = {}
        index_entries: dict[str, dict] = {}
        for spec, qw in entries.items():
            if qw.spec != spec:
                raise DatabaseError(f"put: layer {layer!r}: entry keyed {spec.short()} holds {qw.spec.short()}")
            key = spec.short()
            if qw.codes.dtype != torch.int8:
                raise DatabaseError(f"put: layer {layer!r} {key}: codes must be int8, got {qw.codes.dtype}")
            tensors[f"{key}.codes"] = qw.codes.detach().cpu().contiguous()
            tensors[f"{key}.scale"] = qw.scale.detach().cpu().contiguous()
            if not spec.symmetric:
                if qw.zero_point is None or qw.zero_point.dtype != torch.int8:
                    raise DatabaseError(f"put: layer {layer!r} {key}: asymmetric entry needs int8 zero points")
                tensors[f"{key}.zero_point"] = qw.zero_point.detach().cpu().contiguous()
            index_entries[key] = {**_spec_to_json(spec), "meta": _jsonable(qw.meta)}
        file = self._file_for(layer)
        with atomic_path(self.path / file) as tmp:
            save_file(tensors, str(tmp), metadata={"layer": layer})
        self._index["layers"][layer] = {"file": file, "shape": list(shape), "entries": index_entries}
        self._write_index()

    def build(self, layer: str, W: torch.Tensor, H: torch.Tensor, specs: Sequence[QuantSpec],
              **gptq_kw) -> dict[QuantSpec, QuantizedWeight]:
        """build_database for one layer and stream it to disk; returns the entries too."""
        entries = build_database(W, H, specs, layer=layer, **gptq_kw)
        self.put(layer, entries)
        return entries

    def build_cached(self, W: torch.Tensor, H: torch.Tensor, specs: Sequence[QuantSpec], layer: str = "",
                     write: bool = True, sharded: bool = False, **gptq_kw
                     ) -> tuple[dict[QuantSpec, QuantizedWeight], bool]:
        """(entries, hit): the stored entries under database_key(W, H, specs, ...) if
        present, else build_database's, stored under that key unless write=False (the
        ranks of a torchrun other than the writer build the same entries and only read).
        sharded: build with build_database_sharded; every rank must then call this for the
        same layer, and a miss on any rank makes all of them build (one collective).
        A store used this way is keyed by content, not by layer name."""
        key = database_key(W, H, specs, **gptq_kw)
        if not write and self._index_path.exists():  # see what the writer has stored since
            self._index = self._read_index()
        hit = key in self and all(s.short() in self._layer_entry(key)["entries"] for s in specs)
        if sharded and _world()[1] > 1:  # all ranks read, or all ranks build their shard
            flag = torch.tensor([int(hit)], device=W.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            hit = bool(flag.item())
        if hit:
            return {s: self.get(key, s) for s in specs}, True
        build = build_database_sharded if sharded else build_database
        entries = build(W, H, specs, layer=layer, **gptq_kw)
        if write:
            self.put(key, entries, merge=False)
        return entries, False

    def __repr__(self) -> str:
        return f"LayerDatabase({str(self.path)!r}, layers={len(self)})"
