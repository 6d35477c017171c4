"""Read a compressed-tensors pack-quantized checkpoint back into QuantizedWeights.

``load_checkpoint(path)`` parses config.json's quantization_config (layout.py),
opens every safetensors file (sharded or not), and decodes each quantized module
into a QuantizedWeight, checking every field against the layout its spec implies.
Errors name the file, layer and field. ``dequantized_model(path)`` builds the HF
model from config.json with dense tensors as stored and quantized weights
replaced by our own dequantization w = (q - z) * s: the reference that HF's
compressed-tensors decompression and the vLLM plugin are compared against.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from ..quant.spec import QuantizedWeight
from .errors import CheckpointError, CorruptCheckpointError, LayoutError
from .layout import (
    EXTRA_KEY,
    QUANT_TENSOR_SUFFIXES,
    WEIGHT_PACKED,
    ParsedQuantConfig,
    decode_weight,
    parse_quant_config,
)

__all__ = ["QuantizedCheckpoint", "load_checkpoint", "dequantized_model", "read_config"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class QuantizedCheckpoint:
    config: dict
    quantized: dict[str, QuantizedWeight]
    dense: dict[str, torch.Tensor]
    quant_config: Optional[ParsedQuantConfig] = None
    path: Optional[Path] = None
    files: dict[str, str] = field(default_factory=dict)  # tensor key -> file name

    @property
    def extra(self) -> dict:
        """Our top-level metadata ("vllm_slq" key of config.json), {} if absent."""
        return self.config.get(EXTRA_KEY) or {}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: missing")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object")
    return data


def read_config(path) -> dict:
    """config.json of a checkpoint directory as a dict."""
    return _read_json(Path(path) / "config.json")


def _weight_files(path: Path) -> list[Path]:
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index}: no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / SAFE_WEIGHTS_NAME).exists():
        files = [path / SAFE_WEIGHTS_NAME]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CorruptCheckpointError(f"{path}: no safetensors files")
    for f in files:
        if not f.is_file():
            raise CorruptCheckpointError(f"{f}: listed in {SAFE_WEIGHTS_INDEX_NAME} but missing")
    return files


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
        return out
    except Exception as e:  # safetensors raises its own error types for truncation/corruption
        raise CorruptCheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt "
                                     f"({type(e).__name__}: {e})") from None


def load_checkpoint(path) -> QuantizedCheckpoint:
    """Read a pack-quantized checkpoint directory; raise CheckpointError subclasses on bad input."""
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"{path}: not a checkpoint directory")
    config = _read_json(path / "config.json")
    if "quantization_config" not in config:
        raise CheckpointError(f"{path / 'config.json'}: no quantization_config; not a quantized checkpoint")

    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    for file in _weight_files(path):
        for key, t in _read_safetensors(file).items():
            if key in tensors:
                raise CorruptCheckpointError(f"{file}: tensor {key!r} also stored in {files[key]}")
            tensors[key] = t
            files[key] = file.name

    # module -> {suffix: tensor} for every module storing a quantization tensor
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix in QUANT_TENSOR_SUFFIXES:
            grouped.setdefault(module, {})[suffix] = t
        else:
            dense[key] = t
    packed_modules = sorted(m for m, ts in grouped.items() if WEIGHT_PACKED in ts)

    parsed = parse_quant_config(config)
    specs = dict(parsed.specs)  # explicit names
    if parsed.unresolved_targets:  # "Linear" / "re:..." targets: resolve against what is stored
        resolved = parsed.resolve(packed_modules)
        specs.update({k: v for k, v in resolved.items() if k not in specs})

    quantized: dict[str, QuantizedWeight] = {}
    for module in sorted(set(specs) | set(grouped)):
        spec = specs.get(module)
        stored = grouped.get(module, {})
        if spec is None:
            raise LayoutError(f"layer {module!r} in {files[f'{module}.{next(iter(stored))}']}: stores "
                              f"{sorted(stored)} but no config group targets it")
        if not stored:
            hint = " (stored dense)" if f"{module}.weight" in dense else ""
            raise LayoutError(f"layer {module!r}: config.json quantizes it ({spec.short()}) but the "
                              f"checkpoint has no {module}.{WEIGHT_PACKED}{hint}")
        if f"{module}.weight" in dense:
            raise LayoutError(f"layer {module!r}: stores both a dense weight and {WEIGHT_PACKED}")
        file = files.get(f"{module}.{WEIGHT_PACKED}", "")
        quantized[module] = decode_weight(module, stored, spec, file=file)
    return QuantizedCheckpoint(config=config, quantized=quantized, dense=dense, quant_config=parsed,
                               path=path, files=files)


def dequantized_model(path, dtype: torch.dtype = torch.float16):
    """HF model built from the checkpoint's config: dense tensors as stored, quantized layers
    replaced by our dequantization. No compressed-tensors involved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = load_checkpoint(path)
    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt.dense.items()}
    for name, qw in ckpt.quantized.items():
        state[f"{name}.weight"] = qw.dequantize(dtype)
    result = model.load_state_dict(state, strict=False)
    tied = set()
    for key in result.missing_keys:  # keys HF ties to another parameter are legitimately absent
        owner, _, pname = key.rpartition(".")
        param = model.get_parameter(key) if pname else None
        for other, p in model.named_parameters(remove_duplicate=False):
            if other != key and other in state and param is not None and p is param:
                tied.add(key)
                break
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: checkpoint does not match the model built from config.json: "
                              f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model
