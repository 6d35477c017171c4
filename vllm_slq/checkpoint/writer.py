"""Write a compressed-tensors pack-quantized checkpoint, atomically.

``save_checkpoint(model, quantized, out_dir)`` stores every module in ``quantized``
in the layout of ``layout.py`` (packed codes, scales, shape, packed zero points)
and every other tensor of the model dense, in ``dtype`` (fp16 by default), with
config.json (model config + quantization_config + our top-level ``vllm_slq``
metadata), generation_config.json and the tokenizer files.

Nothing is written before every input is validated (codes in range, finite
scales, groups dividing K, fused shards agreeing). Files go to a temporary
directory next to ``out_dir`` and are fsynced before one rename publishes them,
so a crash or an exception leaves either the old directory or the new one, never
a half-written checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from ..fileio import atomic_dir
from ..quant.spec import QuantizedWeight, QuantSpecError
from .errors import CheckpointError, CheckpointExistsError, InvalidQuantizedWeightError
from .layout import (
    EXTRA_KEY,
    QUANT_TENSOR_SUFFIXES,
    build_quant_config,
    check_fused_consistency,
    encode_weight,
)

__all__ = ["save_checkpoint", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 4 * 1024**3
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def _count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/inf entries. Fast path: a float32 sum is finite iff every entry is (barring
    overflow of huge finite values, which the exact check below then clears)."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(t)).sum())


def _validate_quantized(name: str, qw: QuantizedWeight, module: torch.nn.Module, dtype: torch.dtype) -> None:
    def bad(msg: str) -> InvalidQuantizedWeightError:
        return InvalidQuantizedWeightError(f"layer {name!r}: {msg}")

    if not isinstance(module, torch.nn.Linear):
        raise bad(f"is a {type(module).__name__}, only nn.Linear modules can be stored pack-quantized")
    spec = qw.spec
    codes = qw.codes
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise bad(f"codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
    if tuple(codes.shape) != tuple(module.weight.shape):
        raise bad(f"codes shape {tuple(codes.shape)} != module weight shape {tuple(module.weight.shape)}")
    n, k = codes.shape
    try:
        groups = spec.groups(k, name)
    except QuantSpecError as e:
        raise InvalidQuantizedWeightError(str(e)) from None
    cmin, cmax = (int(v) for v in torch.aminmax(codes))
    if cmin < spec.qmin or cmax > spec.qmax:
        raise bad(f"codes span [{cmin}, {cmax}], outside the {spec.bits}-bit range [{spec.qmin}, {spec.qmax}]")
    scale = qw.scale
    if tuple(scale.shape) != (n, groups):
        raise bad(f"scale shape {tuple(scale.shape)}, expected {(n, groups)} for spec {spec.short()}")
    if not scale.dtype.is_floating_point:
        raise bad(f"scale must be floating point, got {scale.dtype}")
    stored = scale.detach().to(dtype)
    n_bad = _count_nonfinite(stored)
    if n_bad:
        raise bad(f"{n_bad} scale(s) are NaN/inf (after casting to {dtype})")
    zp = qw.zero_point
    if spec.symmetric:
        if zp is not None:
            raise bad(f"spec {spec.short()} is symmetric but a zero point was given")
    else:
        if zp is None:
            raise bad(f"spec {spec.short()} is asymmetric but no zero point was given")
        if zp.dtype != torch.int8 or tuple(zp.shape) != (n, groups):
            raise bad(f"zero point must be int8 {(n, groups)}, got {zp.dtype} {tuple(zp.shape)}")
        zmin, zmax = (int(v) for v in torch.aminmax(zp))
        if zmin < spec.qmin or zmax > spec.qmax:
            raise bad(f"zero points span [{zmin}, {zmax}], outside [{spec.qmin}, {spec.qmax}]")


def _dense_state(model: torch.nn.Module, quantized: Mapping[str, QuantizedWeight], dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the model except the weights of quantized modules, floats cast to dtype.
    Tensors sharing storage (tied embeddings) are written once, as HF does."""
    drop = {f"{name}.weight" for name in quantized}
    seen: dict[tuple, str] = {}
    dense = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in drop:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue
        seen[ident] = key
        if t.is_floating_point():
            t = t.detach().to(dtype)
            n_bad = _count_nonfinite(t)  # after the cast: fp32 values beyond fp16's range become inf
            if n_bad:
                raise CheckpointError(f"tensor {key!r}: {n_bad} NaN/inf values (in {dtype})")
        dense[key] = t.detach().cpu().contiguous().clone()
    # a quantized weight tied to a dense tensor (e.g. lm_head <-> embed_tokens) cannot be split
    for name in quantized:
        w = model.get_submodule(name).weight
        ident = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.dtype)
        if ident in seen:
            raise CheckpointError(f"layer {name!r}: its weight is tied to {seen[ident]!r}; untie the "
                                  f"weights or leave this layer unquantized")
    return dense


def _bpp_summary(quantized: Mapping[str, QuantizedWeight], dense: Mapping[str, torch.Tensor]) -> dict:
    """Bits per parameter (incl. scales/zero points) per layer and parameter-weighted overall,
    over the quantized linears ("bpp") and over every parameter as stored ("bpp_all_params":
    the dense tensors -- embeddings, lm_head, norms -- at their stored width). "4.0 bpp" over
    the linears of Llama-3.1-8B is about 5.6 over the whole model, whose 128k-entry embedding
    and lm_head stay 16-bit."""
    layer_bpp = {name: qw.spec.bpp(qw.codes.shape[1]) for name, qw in sorted(quantized.items())}
    params = {name: qw.codes.numel() for name, qw in quantized.items()}
    total = sum(params.values())
    linear_bits = sum(layer_bpp[n] * params[n] for n in params)
    dense_params = sum(t.numel() for t in dense.values() if t.is_floating_point())
    dense_bits = sum(t.numel() * t.element_size() * 8 for t in dense.values() if t.is_floating_point())
    return {
        "bpp": linear_bits / total,
        "bpp_all_params": (linear_bits + dense_bits) / (total + dense_params),
        "params_quantized": int(total),
        "params_all": int(total + dense_params),
        "layer_bpp": layer_bpp,
        "layer_spec": {name: qw.spec.short() for name, qw in sorted(quantized.items())},
    }


def _shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards


def _write_shard(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file(dict(tensors), str(path), metadata={"format": "pt"})


def _config_dict(model: torch.nn.Module, tmp: Path, dtype: torch.dtype) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        raise CheckpointError("model has no .config; save_checkpoint needs a transformers PreTrainedModel")
    config.save_pretrained(tmp)
    with open(tmp / "config.json") as f:
        data = json.load(f)
    data.pop("quantization_config", None)
    dtype_name = str(dtype).removeprefix("torch.")
    data["dtype"] = dtype_name
    if "torch_dtype" in data:
        data["torch_dtype"] = dtype_name
    return data


def save_checkpoint(
    model: torch.nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    out_dir,
    tokenizer=None,
    extra: Optional[dict] = None,
    *,
    overwrite: bool = False,
    allow_mixed_fused: bool = False,
    dtype: torch.dtype = torch.float16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` with the modules in ``quantized`` stored pack-quantized; return the path.

    extra: JSON-serialisable metadata stored under config.json's top-level "vllm_slq" key,
      after a computed summary ("bpp" weighted over quantized layers, "layer_bpp",
      "layer_spec"); keys in ``extra`` win.
    overwrite: replace an existing ``out_dir`` (the old one is removed only after the new
      one is in place). allow_mixed_fused: write q/k/v or gate/up shards with different specs.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise CheckpointExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointExistsError(f"{out_dir} exists and is not a directory")
    if not quantized:
        raise CheckpointError("no quantized layers given; nothing to store pack-quantized")
    if extra is not None:
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"extra metadata is not JSON-serialisable: {e}") from None

    # ---- validate everything before touching the disk
    modules = dict(model.named_modules())
    for name, qw in quantized.items():
        if name not in modules:
            raise InvalidQuantizedWeightError(f"layer {name!r}: no such module in the model")
        _validate_quantized(name, qw, modules[name], dtype)
    linear_names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
    specs = {name: qw.spec for name, qw in quantized.items()}
    if not allow_mixed_fused:
        check_fused_consistency(specs, linear_names)
    ignore = [n for n in linear_names if n not in quantized]
    quant_config = build_quant_config(specs, ignore)

    tensors = _dense_state(model, quantized, dtype)
    for name, qw in quantized.items():
        for suffix, t in encode_weight(qw, scale_dtype=dtype, module=name).items():
            tensors[f"{name}.{suffix}"] = t
    encoded = {f"{name}.{suffix}" for name in quantized for suffix in QUANT_TENSOR_SUFFIXES}
    summary = _bpp_summary(quantized, {k: t for k, t in tensors.items() if k not in encoded})
    # a quantized layer's bias (if any) stays in the dense part under its usual name

    # ---- write into a temp dir in the same parent, then publish with one rename
    with atomic_dir(out_dir, replace=overwrite, durable=True) as tmp:
        config = _config_dict(model, tmp, dtype)
        config["quantization_config"] = quant_config
        if extra is not None:
            config[EXTRA_KEY] = {**summary, **extra}
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")

        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            _write_shard(shards[0], tmp / SAFE_WEIGHTS_NAME)
        else:
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_shard(shard, tmp / fname)
                for key, t in shard.items():
                    weight_map[key] = fname
                    total += t.numel() * t.element_size()
            with open(tmp / SAFE_WEIGHTS_INDEX_NAME, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2,
                          sort_keys=True)
    return out_dir
